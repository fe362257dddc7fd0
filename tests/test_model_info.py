"""tools/model_info.py: parameter counts and GMACs of the released models, and
MAC counting checked against a real forward of an unusual configuration."""

import math
import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from config import get_config
from cvt import build_cvt, record_attention
from tools.model_info import build_for_counting, count_macs, count_parameters, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the official implementation's figures (../shared/reference/README.md)
PUBLISHED = {
    'cvt-13-224x224': (19_997_480, 4.57),
    'cvt-21-224x224': (31_622_696, 7.18),
    'cvt-13-384x384': (19_997_480, 16.27),
    'cvt-21-384x384': (31_622_696, 24.85),
    'cvt-w24-384x384': (277_196_392, 194.2),
}


@pytest.fixture(scope='module')
def measured():
    """(params, GMACs) of every released config, each model built once (lazily)."""
    figures = {}
    for name in PUBLISHED:
        config = get_config(os.path.join(ROOT, 'configs', f'{name}.yaml'))
        model = build_for_counting(config)
        figures[name] = (count_parameters(model), count_macs(model, config.DATA.IMAGE_SIZE).total / 1e9)
    return figures


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_count_equals_published(measured, name):
    assert measured[name][0] == PUBLISHED[name][0]


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_gmacs_within_two_percent_of_published(measured, name):
    assert measured[name][1] == pytest.approx(PUBLISHED[name][1], rel=0.02)


def test_lazy_build_counts_the_same_parameters_as_a_real_build():
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    assert count_parameters(build_cvt(config)) == count_parameters(build_for_counting(config))


def _unusual_config():
    """Odd strides, kernels, projection methods and cls tokens in two stages."""
    config = get_config()
    config.defrost()
    m = config.MODEL
    m.NUM_CLASSES = 7
    m.PATCH_SIZE = [5, 3, 3]
    m.PATCH_STRIDE = [3, 2, 1]
    m.PATCH_PADDING = [1, 1, 1]
    m.DIM_EMBED = [8, 12, 16]
    m.NUM_HEADS = [1, 2, 4]
    m.DEPTH = [1, 2, 1]
    m.MLP_RATIO = [2.0, 3.0, 4.0]
    m.CLS_TOKEN = [True, False, True]
    m.QKV_PROJ_METHOD = ['avg', 'linear', 'dw_bn']
    m.KERNEL_QKV = [3, 3, 5]
    m.PADDING_Q = [1, 1, 2]
    m.PADDING_KV = [1, 1, 2]
    m.STRIDE_KV = [2, 1, 3]
    config.freeze()
    return config


def _measure_forward(model, image_hw):
    """MACs of one real forward of a (1, 3, H, W) input, from hooks and the attention
    weights' shapes, with the (queries, keys) each block saw."""
    totals = {'conv': 0, 'linear': 0, 'attention': 0}

    def on_linear(layer, inputs, output):
        totals['linear'] += math.prod(inputs[0].shape[:-1]) * math.prod(layer.weight.shape)

    def on_conv(layer, inputs, output):
        totals['conv'] += math.prod(output.shape) * math.prod(layer.weight.shape[1:])

    hooks = []
    for layer in model.sublayers():
        if isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_post_hook(on_linear))
        elif isinstance(layer, nn.Conv2D):
            hooks.append(layer.register_forward_post_hook(on_conv))
    image = paddle.to_tensor(np.random.rand(1, 3, *image_hw).astype('float32'))
    with paddle.no_grad(), record_attention(model) as records:
        model(image)
    for hook in hooks:
        hook.remove()
    tokens = []
    for i, j, weights in records:
        _, heads, queries, keys = weights.shape
        width = model.stages[i].blocks[j].attn.proj_q.weight.shape[1]
        totals['attention'] += 2 * queries * keys * width
        tokens.append((queries, keys))
    return totals, tokens


def test_counting_matches_a_real_forward_of_an_unusual_config():
    config = _unusual_config()
    config.defrost()
    config.MODEL.LAYERS = 'plain'  # the plain layers call every layer: the hooks see each convolution and Linear
    model = build_cvt(config)
    model.eval()
    image_hw = (41, 34)
    measured, tokens = _measure_forward(model, image_hw)
    counted = count_macs(model, image_hw)
    assert [(b.queries, b.keys) for b in counted.blocks] == tokens
    assert (counted.conv, counted.linear, counted.attention) == (
        measured['conv'], measured['linear'], measured['attention'])


def test_cli_prints_params_and_gmacs(capsys):
    assert main(['-cfg', os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'), '-image_size', '384']) == 0
    out = capsys.readouterr().out
    assert '19,997,480' in out
    assert 'GMACs:      16.27' in out


def test_cli_rejects_a_missing_config_in_one_line(capsys, tmp_path):
    assert main(['-cfg', str(tmp_path / 'nope.yaml')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'nope.yaml' in err
