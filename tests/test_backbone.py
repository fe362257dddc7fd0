"""CvTBackbone: stage maps at strides 4/8/16, pretrained classification weights, frozen stages."""

import os
import re

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import cvt
from backbone import CvTBackbone, FeatureShape
from config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_classes=10, **model):
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    config.defrost()
    config.MODEL.DIM_EMBED = [16, 32, 48]
    config.MODEL.NUM_HEADS = [1, 2, 3]
    config.MODEL.DEPTH = [1, 1, 2]
    config.MODEL.NUM_CLASSES = num_classes
    for key, value in model.items():
        config.MODEL[key] = value
    config.freeze()
    return config


def arrays(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize('height, width', [(64, 64), (96, 64), (48, 112)])
def test_maps_at_strides_4_8_16_for_square_and_other_inputs(height, width):
    backbone = CvTBackbone(tiny_config())
    assert backbone.feat_channels == [16, 32, 48]
    assert backbone.out_shape == [FeatureShape(16, 4), FeatureShape(32, 8), FeatureShape(48, 16)]
    maps = backbone(paddle.randn([2, 3, height, width]))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, height // s, width // s) for c, s in zip(backbone.feat_channels, (4, 8, 16))]


def test_cvt13_shapes_and_channels_of_the_released_configs():
    backbone = CvTBackbone(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'), out_indices=[0])
    maps = backbone(paddle.randn([1, 3, 224, 224]))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 56, 56)]
    w24 = get_config(os.path.join(ROOT, 'configs', 'cvt-w24-384x384.yaml'))
    assert [w24.MODEL.DIM_EMBED[i] for i in range(3)] == [192, 768, 1024]


def test_chosen_stages_only_are_kept_and_every_parameter_gets_a_gradient():
    backbone = CvTBackbone(tiny_config(), out_indices=[-2, 0])
    assert backbone.out_indices == [0, 1] and backbone.feat_channels == [16, 32]
    assert len(backbone.cvt.stages) == 2
    assert not any(name.startswith(('cvt.norm', 'cvt.head', 'cvt.stages.2')) for name in backbone.state_dict())
    backbone.train()
    maps = backbone(paddle.randn([2, 3, 64, 80]))
    sum(m.square().mean() for m in maps).backward()
    for name, param in backbone.named_parameters():
        if param.stop_gradient:  # BatchNorm statistics
            continue
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r'out_indices \[3\]: the model has stages 0-2'):
        CvTBackbone(tiny_config(), out_indices=[3])
    with pytest.raises(ValueError, match='frozen_stages = 4'):
        CvTBackbone(tiny_config(), frozen_stages=4)


def test_classification_checkpoint_loads_without_its_head(tmp_path, capsys):
    classifier = cvt.build_cvt(tiny_config(num_classes=7))
    path = str(tmp_path / 'classifier.pdparams')
    paddle.save(classifier.state_dict(), path)
    backbone = CvTBackbone(tiny_config(num_classes=1000), pretrained=path[:-len('.pdparams')])
    assert 'classifier head left out' in capsys.readouterr().out
    own = arrays(backbone)
    for key, value in arrays(classifier).items():
        if key.startswith('stages.'):
            np.testing.assert_array_equal(own['cvt.' + key], value)
    classifier.eval()
    backbone.eval()
    x = paddle.randn([1, 3, 64, 96])
    with paddle.no_grad():
        for ours, theirs in zip(backbone(x), classifier.forward_intermediates(x)):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_model_is_refused_listing_keys(tmp_path):
    path = str(tmp_path / 'deeper.pdparams')
    paddle.save(cvt.build_cvt(tiny_config(DEPTH=[1, 1, 3])).state_dict(), path)
    with pytest.raises(ValueError, match=r'unexpected: stages\.2\.blocks\.2\.'):
        CvTBackbone(tiny_config(), pretrained=path)


def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    backbone = CvTBackbone(tiny_config(), frozen_stages=1)
    before = arrays(backbone)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=backbone.parameters())
    backbone.train()  # as a parent model's train() would: every sublayer in training mode
    for _ in range(2):
        maps = backbone(paddle.randn([2, 3, 64, 64]))
        sum(m.square().mean() for m in maps).backward()
        optimizer.step()
        optimizer.clear_grad()
    after = arrays(backbone)
    stage0 = [k for k in before if k.startswith('cvt.stages.0.')]
    assert any(k.endswith('_mean') for k in stage0)  # BatchNorm statistics are among them
    for key in stage0:
        np.testing.assert_array_equal(after[key], before[key])
    assert all(p.grad is None for p in backbone.cvt.stages[0].parameters())
    changed = [k for k in before if k.startswith('cvt.stages.1.') and not np.array_equal(after[k], before[k])]
    assert any(k.endswith('_mean') for k in changed) and any(k.endswith('proj.weight') for k in changed)


def test_norm_eval_keeps_every_batchnorm_statistic():
    backbone = CvTBackbone(tiny_config(), norm_eval=True)
    before = arrays(backbone)
    backbone.train()
    backbone(paddle.randn([2, 3, 64, 64]))
    after = arrays(backbone)
    for key in before:
        if key.endswith(('_mean', '_variance')):
            np.testing.assert_array_equal(after[key], before[key])


def test_the_segmentation_example_of_the_docs_trains(tmp_path):
    with open(os.path.join(ROOT, 'docs', 'backbone.md')) as doc:
        blocks = re.findall(r'```python\n(.*?)```', doc.read(), re.S)
    example = next(block for block in blocks if 'class StrideEightSegmenter' in block)
    namespace = {}
    exec(compile(example, 'docs/backbone.md', 'exec'), namespace)
    classifier_path = str(tmp_path / 'classifier.pdparams')
    paddle.save(cvt.build_cvt(tiny_config()).state_dict(), classifier_path)
    model = namespace['StrideEightSegmenter'](num_classes=5, config=tiny_config(), pretrained=classifier_path)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    images = paddle.randn([2, 3, 64, 48])
    labels = paddle.randint(0, 5, [2, 64, 48])
    losses = []
    for _ in range(8):
        logits = model(images)
        assert tuple(logits.shape) == (2, 5, 64, 48)
        loss = F.cross_entropy(logits.transpose([0, 2, 3, 1]), labels.unsqueeze(-1))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
