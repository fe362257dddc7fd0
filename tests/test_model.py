"""The CvT model: the PaddleViT weight layout, the official sizes and semantics."""

import math
import os

import numpy as np
import paddle
import pytest

from config import get_config
from cvt import (Attention, DropPath, QuickGELU, build_cvt, load_pretrained, record_attention)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# copies of ../shared/reference/*.state_dict.txt: PaddleViT's released weight layout
REFERENCE = os.path.join(ROOT, 'tests', 'data')


def tiny_config(**model):
    """A CvT small enough for fast tests; `model` overrides MODEL keys."""
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    config.defrost()
    config.MODEL.DIM_EMBED = [16, 32, 48]
    config.MODEL.NUM_HEADS = [1, 2, 3]
    config.MODEL.DEPTH = [1, 1, 2]
    config.MODEL.NUM_CLASSES = 10
    for key, value in model.items():
        config.MODEL[key] = value
    return config


def reference_layout(name):
    with open(os.path.join(REFERENCE, f'{name}.state_dict.txt')) as lines:
        return {p[0]: tuple(int(s) for s in p[1:]) for p in (line.split() for line in lines) if p}


@pytest.mark.parametrize('cfg, name, trainable', [
    ('cvt-13-224x224', 'cvt-13', 19_997_480),
    ('cvt-21-224x224', 'cvt-21', 31_622_696),
    ('cvt-w24-384x384', 'cvt-w24', 277_196_392),
])
def test_state_dict_is_paddlevit_layout_and_param_count_official(cfg, name, trainable):
    model = build_cvt(get_config(os.path.join(ROOT, 'configs', f'{cfg}.yaml')))
    layout = {k: tuple(int(s) for s in v.shape) for k, v in model.state_dict().items()}
    want = reference_layout(name)
    assert sorted(set(layout) - set(want)) == [] and sorted(set(want) - set(layout)) == []
    assert {k: v for k, v in layout.items() if want[k] != v} == {}
    assert sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient) == trainable


@pytest.mark.parametrize('shape', [(1, 3, 64, 64), (3, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 53)])
def test_logits_shape_for_any_batch_and_image_size(shape):
    model = build_cvt(tiny_config())
    model.eval()
    assert list(model(paddle.randn(shape)).shape) == [shape[0], 10]


def test_num_classes_zero_returns_pooled_features():
    model = build_cvt(tiny_config(NUM_CLASSES=0))
    model.eval()
    x = paddle.randn([1, 3, 64, 64])
    features = model(x)
    assert list(features.shape) == [1, 48]
    np.testing.assert_allclose(features.numpy(), model.forward_features(x).numpy())
    assert 'head.weight' not in model.state_dict()


def test_cls_token_only_in_stages_that_ask_for_it():
    model = build_cvt(tiny_config(CLS_TOKEN=[False, True, False]))
    keys = set(model.state_dict())
    assert 'stages.1.cls_token' in keys
    assert 'stages.0.cls_token' not in keys and 'stages.2.cls_token' not in keys
    model.eval()
    # without a cls token in the last stage the head pools the mean of the tokens
    assert list(model(paddle.randn([2, 3, 64, 64])).shape) == [2, 10]


def test_mean_pooling_head_when_last_stage_has_no_cls_token():
    model = build_cvt(tiny_config(CLS_TOKEN=[False, False, False], NUM_CLASSES=0))
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    feature_map, cls_token = x, None
    for stage in model.stages:
        feature_map, cls_token = stage(feature_map)
    assert cls_token is None
    tokens = feature_map.flatten(2).transpose([0, 2, 1])
    expected = model.norm(tokens).mean(axis=1)
    np.testing.assert_allclose(model(x).numpy(), expected.numpy(), atol=1e-6)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('with_cls_token', [False, True])
def test_attention_uses_official_scale_over_full_width(with_cls_token):
    dim, heads, h, w = 12, 3, 4, 5
    attn = Attention(dim, dim, heads, method='linear', with_cls_token=with_cls_token)
    attn.eval()
    n = h * w + int(with_cls_token)
    x = paddle.randn([2, n, dim])
    got = attn(x, h, w).numpy()

    xs = x.numpy()
    linear = lambda layer, t: t @ layer.weight.numpy() + layer.bias.numpy()
    split = lambda t: t.reshape(2, n, heads, dim // heads).transpose(0, 2, 1, 3)
    # with `linear` projections q, k and v are all the tokens themselves
    q, k, v = (split(linear(p, xs)) for p in (attn.proj_q, attn.proj_k, attn.proj_v))
    weights = softmax(q @ k.transpose(0, 1, 3, 2) * dim ** -0.5)  # not head_dim ** -0.5
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(2, n, dim)
    np.testing.assert_allclose(got, linear(attn.proj, out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('method', ['dw_bn', 'avg', 'linear'])
def test_qkv_projection_methods_give_expected_key_grid(method):
    model = build_cvt(tiny_config(QKV_PROJ_METHOD=[method] * 3))
    model.eval()
    with record_attention(model) as records:
        model(paddle.randn([1, 3, 64, 64]))
    stage0 = [weights for stage, _, weights in records if stage == 0][0]
    queries = 16 * 16
    # ceil_mode pooling keeps a 9th window over the padding, as PyTorch does
    keys = {'linear': queries, 'dw_bn': 8 * 8, 'avg': 9 * 9}[method]
    assert list(stage0.shape) == [1, 1, queries, keys]
    np.testing.assert_allclose(stage0.sum(-1).numpy(), 1.0, rtol=1e-5)
    has_conv = any('conv_proj_k.0.weight' in k for k in model.state_dict())
    assert has_conv == (method == 'dw_bn')


def test_avg_projection_counts_padding_like_pytorch():
    attn = Attention(4, 4, 1, method='avg', with_cls_token=False)
    pooled = attn.conv_proj_k(paddle.ones([1, 4, 4, 4])).numpy()
    # windows start at -1, 1, 3: the first counts its padded row (2 of 3 rows are
    # image), the ceil_mode one past the edge is clipped to image + padding (1 of 2)
    per_axis = np.array([2 / 3, 1.0, 1 / 2])
    np.testing.assert_allclose(pooled[0, 0], np.outer(per_axis, per_axis), rtol=1e-6)


def test_cvt13_attention_grids_at_224():
    model = build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    model.eval()
    with record_attention(model) as records:
        model(paddle.randn([1, 3, 224, 224]))
    shapes = {(stage, block): list(w.shape) for stage, block, w in records}
    assert shapes[(0, 0)] == [1, 1, 56 * 56, 28 * 28]
    assert shapes[(1, 1)] == [1, 3, 28 * 28, 14 * 14]
    assert shapes[(2, 9)] == [1, 6, 1 + 14 * 14, 1 + 7 * 7]
    assert len(records) == 13
    # outside the context nothing is recorded
    model(paddle.randn([1, 3, 224, 224]))
    assert len(records) == 13


def test_stochastic_depth_grows_linearly_within_each_stage():
    model = build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    rates = [[getattr(b.drop_path, 'drop_prob', 0.0) for b in stage.blocks] for stage in model.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0, 0.0]
    np.testing.assert_allclose(rates[2], np.linspace(0, 0.1, 10), atol=1e-12)


def test_drop_path_keeps_expectation_and_drops_whole_samples():
    layer = DropPath(0.25)
    layer.train()
    out = layer(paddle.ones([4000, 3, 2])).numpy()
    per_sample = out.reshape(4000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert abs(out.mean() - 1.0) < 0.05
    layer.eval()
    assert np.all(layer(paddle.ones([8, 3])).numpy() == 1)


def test_quick_gelu_formula():
    x = paddle.linspace(-4, 4, 17)
    expected = x.numpy() / (1 + np.exp(-1.702 * x.numpy()))
    np.testing.assert_allclose(QuickGELU()(x).numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('init', ['trunc_norm', 'xavier'])
def test_linear_init_follows_config(init):
    model = build_cvt(tiny_config(INIT=init, DIM_EMBED=[64, 128, 192], NUM_HEADS=[1, 2, 3]))
    fc1 = model.stages[2].blocks[0].mlp.fc1
    weight = fc1.weight.numpy()
    assert np.all(fc1.bias.numpy() == 0)
    if init == 'trunc_norm':
        # truncated at +-2 absolute, as timm's trunc_normal_: practically a plain normal
        assert abs(weight.std() - 0.02) < 0.002 and abs(weight.mean()) < 0.001
    else:
        bound = math.sqrt(6 / sum(weight.shape))
        assert np.abs(weight).max() <= bound and weight.std() > 0.5 * bound / math.sqrt(3)
    norm = model.stages[2].blocks[0].norm1
    assert np.all(norm.weight.numpy() == 1) and np.all(norm.bias.numpy() == 0)
    cls_token = model.stages[2].cls_token.numpy()
    assert 0.01 < cls_token.std() < 0.03


def test_seed_readme_usage_loads_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    source = build_cvt(get_config('./configs/cvt-13-224x224.yaml'))
    path = str(tmp_path / 'CvT-13-224x224-IN-1k')
    paddle.save(source.state_dict(), path + '.pdparams')

    from config import get_config as seed_get_config
    from cvt import build_cvt as build_model
    config = seed_get_config('./configs/cvt-13-224x224.yaml')
    model = build_model(config)
    model.set_dict(paddle.load(path + '.pdparams'))
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value.numpy())


def test_load_pretrained_accepts_path_without_suffix_and_drops_other_head(tmp_path):
    source = build_cvt(tiny_config())
    paddle.save(source.state_dict(), str(tmp_path / 'w.pdparams'))
    messages = []
    target = build_cvt(tiny_config(NUM_CLASSES=5))
    skipped = load_pretrained(target, str(tmp_path / 'w'), log=messages.append)
    assert skipped == ['head.weight', 'head.bias'] and len(messages) == 1
    assert 'NUM_CLASSES' in messages[0]
    np.testing.assert_array_equal(target.stages[0].patch_embed.proj.weight.numpy(),
                                  source.stages[0].patch_embed.proj.weight.numpy())


def test_load_pretrained_lists_missing_and_misshaped_keys(tmp_path):
    source = build_cvt(tiny_config())
    paddle.save(source.state_dict(), str(tmp_path / 'w.pdparams'))
    deeper = build_cvt(tiny_config(DEPTH=[1, 1, 3]))
    with pytest.raises(ValueError, match=r'missing: stages\.2\.blocks\.2\.'):
        load_pretrained(deeper, str(tmp_path / 'w.pdparams'))
    wider = build_cvt(tiny_config(DIM_EMBED=[16, 32, 60]))
    with pytest.raises(ValueError, match='mis-shaped'):
        load_pretrained(wider, str(tmp_path / 'w.pdparams'))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load_pretrained(wider, str(tmp_path / 'nowhere'))


def test_batchnorm_statistics_update_only_in_training():
    model = build_cvt(tiny_config())
    bn = model.stages[0].blocks[0].attn.conv_proj_k[1]
    before = bn._mean.numpy().copy()
    model.eval()
    model(paddle.randn([2, 3, 64, 64]))
    np.testing.assert_array_equal(bn._mean.numpy(), before)
    model.train()
    model(paddle.randn([2, 3, 64, 64]))
    assert not np.allclose(bn._mean.numpy(), before)


def test_forward_intermediates_are_the_stage_maps_at_strides_4_8_16():
    model = build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    model.eval()
    with paddle.no_grad():
        maps = model.forward_intermediates(paddle.randn([1, 3, 224, 224]))
    assert [list(m.shape) for m in maps] == [[1, 64, 56, 56], [1, 192, 28, 28], [1, 384, 14, 14]]


@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (1, 3, 48, 80), (1, 3, 37, 53)])
def test_forward_intermediates_any_size_without_head_and_with_gradients(shape):
    model = build_cvt(tiny_config(NUM_CLASSES=0))
    x = paddle.randn(shape)
    maps = model.forward_intermediates(x)
    h, w = shape[2:]
    sizes = []
    for stride, pad, kernel in zip((4, 2, 2), (2, 1, 1), (7, 3, 3)):
        h, w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        sizes.append([shape[0], h, w])
    assert [[m.shape[0], m.shape[2], m.shape[3]] for m in maps] == sizes
    assert [m.shape[1] for m in maps] == [16, 32, 48]
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.stages.parameters() if not p.stop_gradient)


def test_forward_intermediates_chosen_stages_stop_early_and_match_the_full_run():
    model = build_cvt(tiny_config())
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        every = model.forward_intermediates(x)
        last = model.forward_intermediates(x, indices=[-1])
        first_two = model.forward_intermediates(x, indices=[1, 0])
        assert np.allclose(last[0].numpy(), every[2].numpy())
        assert [m.shape[1] for m in first_two] == [16, 32]
        assert np.allclose(first_two[1].numpy(), every[1].numpy())
    with pytest.raises(ValueError, match='stages 0-2'):
        model.forward_intermediates(x, indices=[3])
