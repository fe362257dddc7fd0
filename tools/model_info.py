"""Parameter count and GMACs of a CvT model, as the README's Model Zoo shows them.

    python tools/model_info.py -cfg configs/cvt-13-224x224.yaml [-image_size 384]

MACs are counted analytically, per sample, from the built model's layers: every
convolution (token embeddings, depthwise q/k/v projections), every Linear, and
the two attention products q @ k^T and attn @ v. Norms, activations, pooling,
softmax and additions are not counted (the convention of the published
figures). The model is built under `paddle.LazyGuard`, so no weights are
allocated and even CvT-W24 is counted in a fraction of a second.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

from config import ConfigError, get_config  # noqa: E402
from cvt import ConvolutionalVisionTransformer, build_cvt  # noqa: E402
from paddle_internals import conv_geometry, padding_pairs  # noqa: E402
from utils import add_opts_argument, int_at_least  # noqa: E402


@dataclass
class BlockTokens:
    """Token counts one attention block sees (cls token included)."""
    stage: int
    block: int
    queries: int
    keys: int


@dataclass
class MacCount:
    """Multiply-accumulates of one forward pass of one sample, by kind."""
    conv: int = 0
    linear: int = 0
    attention: int = 0
    blocks: List[BlockTokens] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.conv + self.linear + self.attention


def count_parameters(model: nn.Layer) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    return sum(math.prod(p.shape) for p in model.parameters() if not p.stop_gradient)


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f'{name} = {value!r}: expected an int or two ints')


def _padding_pairs(padding, name: str) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """padding_pairs, its error naming the layer `name`."""
    try:
        return padding_pairs(padding)
    except ValueError as err:
        raise ValueError(f'{name} {err}') from None


def _window_output(size: int, kernel: int, stride: int, pad: Tuple[int, int],
                   dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling window along one axis."""
    span = size + pad[0] + pad[1] - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad[0]:
        out -= 1  # the last window may not start in the right padding
    return out


def _conv_output_hw(conv: nn.Conv2D, hw: Tuple[int, int]) -> Tuple[int, int]:
    g = conv_geometry(conv)
    if not g.explicit_padding:
        raise ValueError(f'{conv.full_name()}: only explicit padding is counted, not SAME or VALID')
    kernel = conv.weight.shape[2:]
    return tuple(_window_output(hw[a], kernel[a], g.stride[a], g.padding[a], g.dilation[a]) for a in (0, 1))


def _conv_macs(conv: nn.Conv2D, out_hw: Tuple[int, int]) -> int:
    """Each output element costs (input channels per group) x kernel area."""
    out_channels, in_per_group, kh, kw = conv.weight.shape
    return out_hw[0] * out_hw[1] * out_channels * in_per_group * kh * kw


def _linear_macs(linear: nn.Layer, tokens: int) -> int:
    in_features, out_features = linear.weight.shape  # Paddle stores [in, out]
    return tokens * in_features * out_features


def _projection(proj: Optional[nn.Layer], hw: Tuple[int, int], count: MacCount) -> Tuple[int, int]:
    """Map size after a q/k/v convolutional projection; adds its conv MACs to `count`."""
    if proj is None:
        return hw
    for layer in proj.sublayers() if isinstance(proj, nn.Sequential) else [proj]:
        if isinstance(layer, nn.Conv2D):
            hw = _conv_output_hw(layer, hw)
            count.conv += _conv_macs(layer, hw)
        elif isinstance(layer, nn.AvgPool2D):
            kernel = _pair(layer.ksize, 'ksize')
            stride = _pair(layer.stride if layer.stride is not None else layer.ksize, 'stride')
            pads = _padding_pairs(layer.padding, layer.full_name())
            hw = tuple(_window_output(hw[a], kernel[a], stride[a], pads[a], ceil_mode=layer.ceil_mode)
                       for a in (0, 1))
    return hw


def count_macs(model: ConvolutionalVisionTransformer,
               image_size: Union[int, Tuple[int, int]]) -> MacCount:
    """Per-sample MACs of `model` on a (H, W) image (an int is a square image)."""
    hw = _pair(image_size, 'image_size')
    count = MacCount()
    for i, stage in enumerate(model.stages):
        embed = stage.patch_embed.proj
        hw = _conv_output_hw(embed, hw)
        count.conv += _conv_macs(embed, hw)
        extra = 0 if stage.cls_token is None else 1
        tokens = hw[0] * hw[1] + extra
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            q_hw = _projection(attn.conv_proj_q, hw, count)
            k_hw = _projection(attn.conv_proj_k, hw, count)
            v_hw = _projection(attn.conv_proj_v, hw, count)
            queries = q_hw[0] * q_hw[1] + extra
            keys = k_hw[0] * k_hw[1] + extra
            values = v_hw[0] * v_hw[1] + extra
            width = attn.proj_q.weight.shape[1]
            count.linear += (_linear_macs(attn.proj_q, queries) + _linear_macs(attn.proj_k, keys)
                             + _linear_macs(attn.proj_v, values) + _linear_macs(attn.proj, queries))
            # q @ k^T and attn @ v: every head together spans the full width
            count.attention += queries * keys * width + queries * values * width
            count.linear += _linear_macs(block.mlp.fc1, queries) + _linear_macs(block.mlp.fc2, queries)
            count.blocks.append(BlockTokens(i, j, queries, keys))
            tokens = queries
        if tokens != hw[0] * hw[1] + extra:
            # a strided q projection shrinks the tokens, which the model's next stage cannot take
            raise ValueError(f'stage {i}: q projection maps {hw} tokens to {tokens - extra}')
    if isinstance(model.head, nn.Linear):
        count.linear += _linear_macs(model.head, 1)
    return count


def build_for_counting(config) -> ConvolutionalVisionTransformer:
    """The model of `config` with shapes only (no weights allocated), its plain layers."""
    config = config.clone()
    config.defrost()
    config.MODEL.LAYERS = 'plain'
    with paddle.LazyGuard():
        return build_cvt(config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-cfg', required=True, help='model config yaml, e.g. configs/cvt-13-224x224.yaml')
    add_opts_argument(parser)
    parser.add_argument('-image_size', type=int_at_least(1), default=None,
                        help='square input size (default: the config\'s DATA.IMAGE_SIZE)')
    args = parser.parse_args(argv)
    try:
        config = get_config(args.cfg, list(args.opts or ()) + (
            ['DATA.IMAGE_SIZE', str(args.image_size)] if args.image_size else []))
        image_size = config.DATA.IMAGE_SIZE
        model = build_for_counting(config)
        params = count_parameters(model)
        macs = count_macs(model, image_size)
    except (ConfigError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'model:      {config.MODEL.NAME} ({args.cfg})')
    print(f'image size: {image_size}x{image_size}')
    print(f'params:     {params:,} ({params / 1e6:.2f} M)')
    print(f'GMACs:      {macs.total / 1e9:.2f} (conv {macs.conv / 1e9:.2f}, '
          f'linear {macs.linear / 1e9:.2f}, attention {macs.attention / 1e9:.2f})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
