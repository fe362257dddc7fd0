"""CvT as a backbone for dense prediction: the stage output maps at strides 4, 8 and 16.

`CvTBackbone` has the interface PaddleSeg and PaddleDetection expect of a
backbone: it is built from a config (optionally with the weights of a
classification checkpoint), its forward returns a list of feature maps, and it
names their channels (`feat_channels`, as PaddleSeg reads them) and strides
(`out_shape`, entries with the `channels` and `stride` fields a PaddleDetection
neck reads from its ShapeSpec inputs). See docs/backbone.md.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Union

import paddle
import paddle.nn as nn

import cvt
from config import get_config


class FeatureShape(NamedTuple):
    """Channels and stride (input pixels per map cell) of one output map."""
    channels: int
    stride: int


def stage_strides(config) -> List[int]:
    """The stride of each stage's map: the product of the patch strides so far
    (4, 8, 16 for the released models)."""
    return [math.prod(config.MODEL.PATCH_STRIDE[:i + 1]) for i in range(config.MODEL.NUM_STAGES)]


class CvTBackbone(nn.Layer):
    """The CvT of `config` without its classifier, returning the maps of the stages
    in `out_indices` as a list of [B, C_i, H_i, W_i] tensors (no cls token).

    config: a config (config.get_config) or the path of a yaml file; its
        MODEL.NUM_CLASSES is ignored (the backbone has no classifier).
    pretrained: weights to start from (`.pdparams` optional), e.g. a released
        classification model or a checkpoint of the training scripts; its
        classifier head is left out, every other weight must fit.
    out_indices: the stages whose maps are returned (0-based; -1 is the last),
        in increasing order. Stages after the last one asked for are dropped.
    frozen_stages: the first `frozen_stages` stages get no gradient and always
        run in eval mode (BatchNorm statistics fixed, no dropout or drop path).
    norm_eval: keep every BatchNorm's statistics fixed in training (useful with
        the small per-GPU batches of detection).

    An H x W input gives maps of ceil-like sizes, exactly H/s x W/s when H and
    W are multiples of the last stride (16).
    """

    def __init__(self, config: Union[str, object], pretrained: Optional[str] = None,
                 out_indices: Sequence[int] = (0, 1, 2), frozen_stages: int = 0,
                 norm_eval: bool = False):
        super().__init__()
        config = get_config(config) if isinstance(config, str) else config.clone()
        config.defrost()
        config.MODEL.NUM_CLASSES = 0
        config.freeze()
        count = config.MODEL.NUM_STAGES
        if not out_indices or any(not -count <= i < count for i in out_indices):
            raise ValueError(f'out_indices {list(out_indices)}: the model has stages 0-{count - 1}')
        self.out_indices = sorted({i % count for i in out_indices})
        if not 0 <= frozen_stages <= count:
            raise ValueError(f'frozen_stages = {frozen_stages}: must be within 0-{count}')

        model = cvt.build_cvt(config)
        if pretrained:
            # the model has no classifier, so load_pretrained leaves the file's head out;
            # its own note on that speaks of training a new head, which a backbone does not
            left_out = cvt.load_pretrained(model, pretrained, log=lambda message: None)
            note = ' (classifier head left out)' if left_out else ''
            print(f'{cvt.resolve_weights_path(pretrained)}: loaded into the backbone{note}')
        # keep only what the maps need: the classifier path's final norm and the
        # stages after the last output would hold parameters that get no gradient
        # (which paddle.DataParallel refuses) and take memory
        model.stages = nn.LayerList(list(model.stages)[:self.out_indices[-1] + 1])
        model.norm = nn.Identity()
        self.cvt = model

        strides = stage_strides(config)
        self.feat_channels = [config.MODEL.DIM_EMBED[i] for i in self.out_indices]
        self.out_shape = [FeatureShape(config.MODEL.DIM_EMBED[i], strides[i]) for i in self.out_indices]

        frozen = list(model.stages)[:frozen_stages]
        for stage in frozen:
            for param in stage.parameters():
                param.stop_gradient = True
        # layers held in eval mode in every forward: Paddle's train() sets the mode of
        # all sublayers without calling their train(), so a parent model's train()
        # would undo anything done once here
        self._eval_layers = [layer for stage in frozen for layer in stage.sublayers(include_self=True)]
        if norm_eval:
            self._eval_layers += [layer for layer in model.sublayers()
                                  if isinstance(layer, nn.BatchNorm2D) and layer not in self._eval_layers]

    def forward(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        """Images [B, 3, H, W] -> the chosen stages' maps [B, C_i, H_i, W_i]."""
        if self.training:
            for layer in self._eval_layers:
                layer.training = False
        return self.cvt.forward_intermediates(x, self.out_indices)
