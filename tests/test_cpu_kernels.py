"""The threaded CPU kernels (fast/kernels.py, fast/csrc/kernels.c) against Paddle's own ops.

Forward outputs and every gradient must match Paddle's ops on awkward shapes
(odd sizes, strides, paddings, kernels, non-contiguous inputs), in each build
this CPU runs (AVX-512 and AVX2 here); NaN must propagate; a failed build must
fall back to Paddle's ops with one warning.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import runtime
from fast import build, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_kernels = pytest.mark.skipif(
    build.load() is None,
    reason='no C compiler here: the kernels cannot be built (test_kernels_build_where_a_compiler_exists covers it)')


def leaf(*shape, scale=1.0, shift=0.0) -> paddle.Tensor:
    t = paddle.randn(list(shape)) * scale + shift
    t.stop_gradient = False
    return t


def assert_same(ours, reference, atol=1e-5, rtol=1e-4, name=''):
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=atol, rtol=rtol, err_msg=name)


def forward_and_grads(fn, inputs, upstream):
    out = fn(*inputs)
    return [out] + list(paddle.grad(out, inputs, upstream))


def test_kernels_build_where_a_compiler_exists():
    if shutil.which('cc') is None and shutil.which('gcc') is None:
        pytest.skip('no C compiler on this machine: the model uses Paddle\'s ops')
    assert build.load() is not None
    assert kernels.runs_on(paddle.ones([2]))


@needs_kernels
@pytest.mark.parametrize('shape, kernel, stride, padding', [
    ((2, 5, 9, 7), 3, 1, 1),
    ((2, 5, 9, 7), 3, 2, 1),
    ((3, 4, 8, 8), 3, 2, 1),
    ((1, 3, 6, 11), 3, 1, 0),
    ((2, 3, 7, 7), 5, 2, 2),
    ((2, 2, 9, 9), 7, 1, 3),
    ((2, 4, 5, 6), 1, 1, 0),
    ((2, 6, 16, 16), 3, 1, 1),
    ((1, 2, 5, 40), 3, 1, 1),    # wide enough for the forward's row loops
    ((2, 3, 10, 8), 3, 2, 0),
    ((1, 2, 11, 13), 3, 3, 1),
    ((2, 3, 8, 8), 1, 2, 0),     # a kernel smaller than the stride
])
@pytest.mark.usefixtures('kernel_build')
def test_depthwise_conv2d_matches_paddle(shape, kernel, stride, padding):
    x = leaf(*shape)
    weight = leaf(shape[1], 1, kernel, kernel)
    reference = lambda x, w: F.conv2d(x, w, stride=stride, padding=padding, groups=shape[1])
    ours = lambda x, w: kernels.depthwise_conv2d(x, w, None, stride, padding)
    upstream = paddle.randn(reference(x, weight).shape)
    for got, want, name in zip(forward_and_grads(ours, [x, weight], upstream),
                               forward_and_grads(reference, [x, weight], upstream), ['y', 'dx', 'dweight']):
        assert_same(got, want, name=name)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_depthwise_conv2d_bias_is_inference_only():
    x, weight, bias = paddle.randn([2, 4, 6, 6]), paddle.randn([4, 1, 3, 3]), paddle.randn([4])
    with paddle.no_grad():
        got = kernels.depthwise_conv2d(x, weight, bias, 2, 1)
    assert_same(got, F.conv2d(x, weight, bias, stride=2, padding=1, groups=4))
    weight.stop_gradient = False
    with pytest.raises(ValueError, match='is for inference'):
        kernels.depthwise_conv2d(x, weight, bias, 1, 1)
    with pytest.raises(ValueError, match='not supported'):
        kernels.depthwise_conv2d(x, paddle.randn([4, 1, 9, 9]), None, 1, 4)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_fold_batch_norm_matches_the_convolution_then_batch_norm():
    x, weight = paddle.randn([2, 6, 9, 9]), paddle.randn([6, 1, 3, 3])
    gamma, beta, mean = paddle.randn([6]), paddle.randn([6]), paddle.randn([6])
    variance = paddle.rand([6]) + 0.5
    folded_weight, folded_bias = kernels.fold_batch_norm(weight, gamma, beta, mean, variance, 1e-5)
    want = F.batch_norm(F.conv2d(x, weight, padding=1, groups=6), mean, variance, gamma, beta,
                        training=False, epsilon=1e-5)
    assert_same(F.conv2d(x, folded_weight, folded_bias, padding=1, groups=6), want)
    with pytest.raises(ValueError, match=r'BatchNorm parameters shaped \[\[6\], \[6\], \[5\], \[6\]\] '
                                         r'for a weight of 6 output channels'):
        kernels.fold_batch_norm(weight, gamma, beta, paddle.zeros([5]), variance, 1e-5)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_depthwise_conv2d_puts_a_lead_column_before_each_map():
    x, weight, bias, lead = paddle.randn([2, 4, 7, 7]), paddle.randn([4, 1, 3, 3]), paddle.randn([4]), paddle.randn([2, 4, 1])
    for stride in (1, 2):
        with paddle.no_grad():
            got = kernels.depthwise_conv2d(x, weight, bias, stride, 1, lead=lead)
        want = paddle.concat([lead, F.conv2d(x, weight, bias, stride=stride, padding=1, groups=4).flatten(2)], axis=2)
        assert_same(got, want)
    with pytest.raises(ValueError, match=r'lead column of shape \[2, 4\] for maps shaped \[2, 4, 7, 7\]'):
        kernels.depthwise_conv2d(x, weight, bias, 1, 1, lead=paddle.randn([2, 4]))


@needs_kernels
@pytest.mark.parametrize('shape, with_lead', [((3, 5, 4, 6), False), ((2, 4, 7, 7), True), ((4, 3, 300), True)])
@pytest.mark.usefixtures('kernel_build')
def test_batch_norm_matches_paddle_in_training(shape, with_lead):
    channels = shape[1]
    x, weight, bias = leaf(*shape, scale=2.0, shift=1.0), leaf(channels), leaf(channels)
    inputs = [x, weight, bias] + ([leaf(shape[0], channels, 1)] if with_lead else [])
    upstream = paddle.randn([shape[0], channels, int(np.prod(shape[2:])) + int(with_lead)])
    statistics = {}
    for side in ('ours', 'paddle'):
        mean, variance = paddle.randn([channels]) * 0.1, paddle.rand([channels]) + 0.5
        def op(x, weight, bias, *lead):
            if side == 'ours':
                return kernels.batch_norm(x, weight, bias, mean, variance, 0.9, 1e-5, *lead)
            y = F.batch_norm(x, mean, variance, weight, bias, training=True, momentum=0.9, epsilon=1e-5).flatten(2)
            return paddle.concat([lead[0], y], axis=2) if lead else y
        paddle.seed(0)  # the same starting statistics on both sides
        mean.set_value(paddle.randn([channels]) * 0.1)
        variance.set_value(paddle.rand([channels]) + 0.5)
        statistics[side] = (forward_and_grads(op, inputs, upstream), mean.numpy(), variance.numpy())
    for got, want in zip(statistics['ours'][0], statistics['paddle'][0]):
        assert_same(got, want, atol=1e-4)
    np.testing.assert_allclose(statistics['ours'][1], statistics['paddle'][1], atol=1e-6)
    np.testing.assert_allclose(statistics['ours'][2], statistics['paddle'][2], atol=1e-6)


@needs_kernels
@pytest.mark.parametrize('shape, out_channels, kernel, stride, padding', [
    ((2, 3, 30, 30), 8, 7, 4, 2),   # CvT's first patch embedding
    ((2, 5, 13, 11), 6, 3, 2, 1),   # the later ones, odd sizes
    ((1, 4, 9, 9), 3, 3, 1, 1),
    ((2, 2, 8, 8), 4, 4, 4, 0),     # ViT-style patches
])
@pytest.mark.usefixtures('kernel_build')
def test_patch_conv_matches_paddle(shape, out_channels, kernel, stride, padding):
    x, weight, bias = leaf(*shape), leaf(out_channels, shape[1], kernel, kernel), leaf(out_channels)

    def reference(x, w, b):
        return F.conv2d(x, w, b, stride=stride, padding=padding).flatten(2).transpose([0, 2, 1])

    _, height, width = kernels.patch_conv(x, weight, bias, stride, padding)
    upstream = paddle.randn(reference(x, weight, bias).shape)
    ours = lambda x, w, b: kernels.patch_conv(x, w, b, stride, padding)[0]
    for got, want, name in zip(forward_and_grads(ours, [x, weight, bias], upstream),
                               forward_and_grads(reference, [x, weight, bias], upstream),
                               ['tokens', 'dx', 'dweight', 'dbias']):
        assert_same(got, want, atol=1e-4, name=name)
    expected_map = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    assert [height, width] == expected_map.shape[2:]
    with paddle.no_grad():
        assert_same(kernels.patch_conv(x, weight, bias, stride, padding)[0],
                    reference(x, weight, bias), atol=1e-4)
        assert_same(kernels.patch_conv(x, weight, None, stride, padding)[0],
                    reference(x, weight, None), atol=1e-4)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_bias_and_layer_norm_without_gradients_match_paddle():
    """Inference takes direct calls, not the PyLayers: the same values."""
    maps, tokens = paddle.randn([3, 5, 7]), paddle.randn([2, 9, 6]) * 2 + 1
    channel_bias, token_bias, weight = paddle.randn([5]), paddle.randn([6]), paddle.randn([6])
    with paddle.no_grad():
        assert_same(kernels.add_bias(maps, channel_bias, axis=1), maps + channel_bias.reshape([5, 1]))
        assert_same(kernels.add_bias(tokens, token_bias), tokens + token_bias)
        assert_same(kernels.layer_norm(tokens, weight, token_bias, 1e-5),
                    F.layer_norm(tokens, [6], weight, token_bias, 1e-5), atol=1e-5)


@needs_kernels
@pytest.mark.parametrize('shape', [(3, 7), (2, 3, 50, 13), (4, 1, 1)])
@pytest.mark.usefixtures('kernel_build')
def test_softmax_matches_paddle(shape):
    x = leaf(*shape, scale=4.0)
    upstream = paddle.randn(list(shape))
    for got, want in zip(forward_and_grads(kernels.softmax, [x], upstream),
                         forward_and_grads(lambda t: F.softmax(t, axis=-1), [x], upstream)):
        assert_same(got, want, atol=1e-6)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_softmax_of_extreme_scores_stays_finite():
    x = paddle.to_tensor([[1e4, -1e4, 0.0], [-90.0, -95.0, -200.0]])
    got = kernels.softmax(x)
    assert_same(got, F.softmax(x, axis=-1), atol=1e-6)


@needs_kernels
@pytest.mark.parametrize('shape', [(3, 7), (2, 37, 64), (5, 1, 384)])
@pytest.mark.usefixtures('kernel_build')
def test_layer_norm_matches_paddle(shape):
    x = leaf(*shape, scale=2.0, shift=1.0)
    weight, bias = leaf(shape[-1]), leaf(shape[-1])
    upstream = paddle.randn(list(shape))
    reference = lambda x, w, b: F.layer_norm(x, shape[-1:], w, b, 1e-5)
    ours = lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5)
    for got, want, name in zip(forward_and_grads(ours, [x, weight, bias], upstream),
                               forward_and_grads(reference, [x, weight, bias], upstream),
                               ['y', 'dx', 'dweight', 'dbias']):
        assert_same(got, want, atol=1e-4, name=name)


@needs_kernels
@pytest.mark.parametrize('shape', [(1, 5), (3, 1000), (2, 7, 33)])
@pytest.mark.usefixtures('kernel_build')
def test_bias_silu_matches_paddle(shape):
    x, bias = leaf(*shape, scale=6.0), leaf(shape[-1], scale=2.0)
    upstream = paddle.randn(list(shape))
    for got, want, name in zip(forward_and_grads(kernels.bias_silu, [x, bias], upstream),
                               forward_and_grads(lambda t, b: F.silu(t + b), [x, bias], upstream),
                               ['y', 'dx', 'dbias']):
        assert_same(got, want, name=name)
    extremes = paddle.to_tensor([[-200.0, -88.0, 0.0, 88.0, 200.0]])
    zero = paddle.zeros([5])
    assert_same(kernels.bias_silu(extremes, zero), F.silu(extremes))


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_bias_silu_with_a_slope_is_quick_gelu():
    """Slope 1.702: CvT's QuickGELU, z * sigmoid(1.702 z), and its gradients."""
    x, bias = leaf(4, 300, scale=6.0), leaf(300, scale=2.0)
    upstream = paddle.randn([4, 300])
    quick_gelu = lambda t, b: (t + b) * F.sigmoid(1.702 * (t + b))
    for got, want, name in zip(forward_and_grads(lambda t, b: kernels.bias_silu(t, b, 1.702), [x, bias], upstream),
                               forward_and_grads(quick_gelu, [x, bias], upstream), ['y', 'dx', 'dbias']):
        assert_same(got, want, name=name)
    with paddle.no_grad():
        assert_same(kernels.bias_silu(x.clone(), bias, 1.702, overwrite=True), quick_gelu(x, bias))


@needs_kernels
@pytest.mark.parametrize('shape', [(7, 5), (2, 5, 9)])
@pytest.mark.usefixtures('kernel_build')
def test_linear_and_bias_gradients_match_paddle(shape):
    x = leaf(*shape)
    weight, bias = leaf(shape[-1], 3), leaf(3)
    upstream = paddle.randn(list(shape[:-1]) + [3])
    for got, want, name in zip(forward_and_grads(kernels.linear, [x, weight, bias], upstream),
                               forward_and_grads(F.linear, [x, weight, bias], upstream),
                               ['y', 'dx', 'dweight', 'dbias']):
        assert_same(got, want, name=name)
    maps, channel_bias = leaf(3, 4, 10), leaf(4)
    upstream = paddle.randn([3, 4, 10])
    for got, want in zip(forward_and_grads(lambda t, b: kernels.add_bias(t, b, axis=1), [maps, channel_bias], upstream),
                         forward_and_grads(lambda t, b: t + b.reshape([1, 4, 1]), [maps, channel_bias], upstream)):
        assert_same(got, want)


@needs_kernels
@pytest.mark.parametrize('shape', [(4, 7, 5), (1, 40000), (3, 6000, 3)])  # samples smaller and larger than a thread's block
@pytest.mark.usefixtures('kernel_build')
def test_residual_add_matches_paddle(shape):
    x, branch = leaf(*shape), leaf(*shape)
    upstream = paddle.randn(list(shape))
    for got, want in zip(forward_and_grads(kernels.residual_add, [x, branch], upstream),
                         forward_and_grads(lambda a, b: a + b, [x, branch], upstream)):
        assert_same(got, want)
    scale = paddle.to_tensor([0.0, 1.25, 2.0, 0.5][:shape[0]]).reshape([-1] + [1] * (len(shape) - 1))
    for got, want in zip(forward_and_grads(lambda a, b: kernels.residual_add(a, b, scale), [x, branch], upstream),
                         forward_and_grads(lambda a, b: a + b * scale, [x, branch], upstream)):
        assert_same(got, want)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_residual_add_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'x \[2, 3\] and branch \[3, 2\]'):
        kernels.residual_add(paddle.ones([2, 3]), paddle.ones([3, 2]))
    with pytest.raises(ValueError, match='per-sample scale of shape \\[3, 1\\] for a batch of 2'):
        kernels.residual_add(paddle.ones([2, 3]), paddle.ones([2, 3]), paddle.ones([3, 1]))


@needs_kernels
@pytest.mark.parametrize('batch, lead, height, width, channels',
                         [(2, 1, 14, 14, 40), (3, 0, 9, 7, 33), (1, 3, 2, 5, 70), (2, 1, 1, 1, 1)])
@pytest.mark.usefixtures('kernel_build')
def test_tokens_to_maps_matches_split_and_transpose(batch, lead, height, width, channels):
    """Tile edges (sizes not a multiple of 32), several lead tokens, and the gradient of both outputs."""
    def reference(x):
        leading, tokens = x[:, :lead], x[:, lead:]
        return (tokens.transpose([0, 2, 1]).reshape([batch, channels, height, width]),
                leading.transpose([0, 2, 1]) if lead else None)

    x = leaf(batch, lead + height * width, channels)
    got, want = kernels.tokens_to_maps(x, height, width, lead), reference(x)
    assert_same(got[0], want[0], atol=0, rtol=0)
    upstream = [paddle.randn(got[0].shape)]
    if lead:
        assert_same(got[1], want[1], atol=0, rtol=0)
        upstream.append(paddle.randn(got[1].shape))
    else:
        assert got[1] is None
    outputs = [t for t in got if t is not None]
    reference_outputs = [t for t in want if t is not None]
    assert_same(paddle.grad(outputs, [x], upstream)[0], paddle.grad(reference_outputs, [x], upstream)[0],
                atol=0, rtol=0)
    # the lead tokens unused: their gradient is zero. Paddle 2.6 itself crashes (SIGSEGV in
    # paddle.grad) when any PyLayer with two outputs gets a gradient for only one of them;
    # the model always uses both
    if lead and (paddle.__version__ == '0.0.0' or int(paddle.__version__.split('.')[0]) >= 3):
        maps, _ = kernels.tokens_to_maps(x, height, width, lead)
        assert_same(paddle.grad([maps], [x], [upstream[0]])[0],
                    paddle.grad([want[0]], [x], [upstream[0]])[0], atol=0, rtol=0)
    with paddle.no_grad():
        assert_same(kernels.tokens_to_maps(x, height, width, lead)[0], want[0], atol=0, rtol=0)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_tokens_to_maps_rejects_a_mismatched_map():
    with pytest.raises(ValueError, match=r'tokens shaped \[2, 50, 8\] for 1 lead tokens and a 7x8 map; '
                                         r'expected \(B, 57, C\)'):
        kernels.tokens_to_maps(paddle.ones([2, 50, 8]), 7, 8, 1)


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_overwrite_reuses_a_temporary_only_without_gradients():
    ops = [(kernels.softmax, lambda t: F.softmax(t, axis=-1)),
           (lambda t, **kw: kernels.bias_silu(t, paddle.ones([5]), **kw), lambda t: F.silu(t + 1)),
           (lambda t, **kw: kernels.add_bias(t, paddle.arange(5, dtype='float32'), **kw),
            lambda t: t + paddle.arange(5, dtype='float32')),
           (lambda t, **kw: kernels.residual_add(paddle.ones([3, 4, 5]), t, paddle.full([3, 1, 1], 2.0), **kw),
            lambda t: 1 + t * 2)]
    for ours, reference in ops:
        x = paddle.randn([3, 4, 5])
        want = reference(x)
        with paddle.no_grad():
            temporary = x.clone()
            got = ours(temporary, overwrite=True)
        assert_same(got, want, atol=1e-6)
        assert_same(temporary, want, atol=1e-6)  # written in place
        tracked = leaf(3, 4, 5)
        before = tracked.numpy().copy()
        ours(tracked, overwrite=True).sum().backward()  # recorded for autograd: never in place
        np.testing.assert_array_equal(tracked.numpy(), before)
        assert tracked.grad is not None


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_kernels_read_strided_views_correctly():
    base = paddle.randn([4, 6, 5])
    view = base.transpose([0, 2, 1])  # a strided view on Paddle 3
    assert_same(kernels.softmax(view), F.softmax(view, axis=-1), atol=1e-6)
    assert_same(kernels.bias_silu(view, paddle.ones([6])), F.silu(view + 1))
    with pytest.raises(ValueError, match='bias of shape'):
        kernels.bias_silu(view, paddle.ones([4]))


@needs_kernels
@pytest.mark.usefixtures('kernel_build')
def test_nan_propagates():
    row = paddle.to_tensor([[1.0, float('nan'), 2.0]])
    assert np.isnan(kernels.softmax(row).numpy()).all()
    assert np.isnan(kernels.bias_silu(row, paddle.zeros([3])).numpy())[0, 1]
    out = kernels.layer_norm(row, paddle.ones([3]), paddle.zeros([3]), 1e-5)
    assert np.isnan(out.numpy()).all()
    maps = paddle.zeros([1, 1, 4, 4])
    maps[0, 0, 1, 1] = float('nan')
    assert np.isnan(kernels.depthwise_conv2d(maps, paddle.ones([1, 1, 3, 3]), None, 1, 1).numpy()).any()


@needs_kernels
def test_kernels_run_only_on_float32_cpu_tensors_in_dynamic_mode():
    assert not kernels.runs_on(paddle.ones([2], dtype='float64'))
    paddle.enable_static()
    try:
        assert not kernels.runs_on(paddle.static.data('x', [2], 'float32'))
    finally:
        paddle.disable_static()


def run_python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


SMALL_MODEL_RUN = '''
import sys
import runtime; runtime.configure()
import paddle, cvt
from fast import build
from config import get_config
config = get_config('configs/cvt-demo.yaml', ['MODEL.NUM_CLASSES', '3'] + sys.argv[1:])
model = cvt.build_cvt(config)
print('logits', list(model(paddle.randn([1, 3, 64, 64])).shape), 'kernels', build._library is not None)
'''


def test_failed_build_warns_once_and_falls_back(tmp_path):
    result = run_python(SMALL_MODEL_RUN, CC='/bin/false', CVT_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'logits [1, 3] kernels False' in result.stdout
    assert result.stderr.count('UserWarning: cpu_kernels: could not build') == 1


def test_plain_layers_build_nothing(tmp_path):
    result = run_python(SMALL_MODEL_RUN, 'MODEL.LAYERS', 'plain', CVT_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'kernels False' in result.stdout
    assert os.listdir(tmp_path) == []


@needs_kernels
def test_library_is_built_once_into_the_cache(tmp_path):
    first = run_python(SMALL_MODEL_RUN, CVT_CACHE_DIR=str(tmp_path))
    assert 'kernels True' in first.stdout, first.stderr
    built = os.listdir(tmp_path)
    assert len(built) == 1 and built[0].endswith('.so')  # no temporary files left
    stamp = os.path.getmtime(tmp_path / built[0])
    second = run_python(SMALL_MODEL_RUN, CVT_CACHE_DIR=str(tmp_path))
    assert 'kernels True' in second.stdout, second.stderr
    assert os.listdir(tmp_path) == built and os.path.getmtime(tmp_path / built[0]) == stamp


PLANTED = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { fclose(fopen("%s", "w")); }
'''


def plant_library(folder, marker) -> str:
    """A library under the cache's own name whose constructor writes `marker` when loaded."""
    compiler = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
    name = build.library_name(build.selected_isa(), compiler)
    source = os.path.join(str(folder), 'planted.c')
    with open(source, 'w') as out:
        out.write(PLANTED % marker)
    subprocess.run([compiler, '-shared', '-fPIC', source, '-o', os.path.join(str(folder), name)], check=True)
    os.remove(source)
    return os.path.join(str(folder), name)


@needs_kernels
@pytest.mark.parametrize('how', ['folder writable by others', 'library writable by others',
                                 'folder of another user'])
def test_a_library_others_could_have_planted_is_never_loaded(tmp_path, how):
    cache, marker = tmp_path / 'cache', tmp_path / 'planted-code-ran'
    cache.mkdir(mode=0o700)
    library = plant_library(cache, marker)
    if how == 'folder writable by others':
        os.chmod(cache, 0o777)
    elif how == 'library writable by others':
        os.chmod(library, 0o777)
    else:
        if os.getuid() != 0:
            pytest.skip('giving a folder to another user needs root')
        os.chown(cache, 12345, 12345)
    result = run_python(SMALL_MODEL_RUN, CVT_CACHE_DIR=str(cache))
    assert result.returncode == 0, result.stderr
    assert 'kernels True' in result.stdout  # built afresh
    assert not marker.exists()
    if how == 'library writable by others':  # our own private folder: the library is replaced in it
        assert 'UserWarning' not in result.stderr and os.stat(library).st_mode & 0o077 == 0
    else:
        assert result.stderr.count('UserWarning: cpu_kernels: not using the cache') == 1
        assert os.path.exists(library)  # left alone: not ours to remove


@needs_kernels
def test_the_cache_folder_is_created_private(tmp_path):
    cache = tmp_path / 'new' / 'cache'
    result = run_python(SMALL_MODEL_RUN, CVT_CACHE_DIR=str(cache))
    assert 'kernels True' in result.stdout, result.stderr
    assert os.stat(cache).st_mode & 0o777 == 0o700
    assert all(os.stat(cache / name).st_mode & 0o077 == 0 for name in os.listdir(cache))


@needs_kernels
def test_frozen_inputs_get_no_gradient():
    """A PyLayer must return None for inputs that want no gradient (frozen weights,
    a frozen teacher, images): each op with each input frozen in turn."""
    ops = [
        (lambda x, w: kernels.depthwise_conv2d(x, w, None, 2, 1), [(2, 4, 6, 6), (4, 1, 3, 3)]),
        (lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), [(3, 5), (5,), (5,)]),
        (kernels.linear, [(3, 5), (5, 2), (2,)]),
        (kernels.bias_silu, [(3, 5), (5,)]),
        (lambda x, b: kernels.add_bias(x, b, axis=1), [(2, 3, 4), (3,)]),
        (lambda x, w, b: kernels.patch_conv(x, w, b, 2, 1)[0], [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]),
        (kernels.residual_add, [(2, 3, 4), (2, 3, 4)]),
        (lambda x, w, b, lead: kernels.batch_norm(x, w, b, paddle.zeros([3]), paddle.ones([3]), 0.9, 1e-5, lead),
         [(2, 3, 4, 4), (3,), (3,), (2, 3, 1)]),
        (lambda x, b: kernels.residual_add(x, b, paddle.to_tensor([0.0, 2.0])), [(2, 3, 4), (2, 3, 4)]),
    ]
    for op, shapes in ops:
        for frozen in range(len(shapes)):
            inputs = [leaf(*shape) for shape in shapes]
            inputs[frozen].stop_gradient = True
            op(*inputs).sum().backward()
            for i, t in enumerate(inputs):
                assert (t.grad is None) == (i == frozen)


@needs_kernels
def test_model_with_frozen_backbone_trains_through_kernels():
    import cvt
    from config import get_config
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-demo.yaml'))
    config.defrost()
    config.MODEL.NUM_CLASSES = 4
    model = cvt.build_cvt(config)
    for name, parameter in model.named_parameters():
        parameter.stop_gradient = not name.startswith(('head', 'stages.2.blocks'))
    model.train()
    F.cross_entropy(model(paddle.randn([2, 3, 64, 64])), paddle.to_tensor([0, 3])).backward()
    assert model.head.weight.grad is not None and model.stages[0].patch_embed.proj.weight.grad is None


def test_build_follows_the_cpu_and_the_override(monkeypatch):
    zen3 = frozenset({'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe', 'sse4_2'})
    zen4 = zen3 | {'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'}
    monkeypatch.delenv('CVT_CPU_ISA', raising=False)
    for flags, native in ((zen4, 'avx512'), (zen3, 'avx2'), (zen4 - {'avx512bw'}, 'avx2'),
                          (frozenset({'sse4_2'}), None)):
        monkeypatch.setattr(runtime, 'cpu_info', lambda flags=flags: ('AuthenticAMD', flags))
        assert build.native_isa() == native
        assert build.selected_isa() == native
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('AuthenticAMD', zen4))
    monkeypatch.setenv('CVT_CPU_ISA', 'avx2')
    assert build.selected_isa() == 'avx2'
    monkeypatch.setenv('CVT_CPU_ISA', 'sse')
    with pytest.raises(ValueError, match="CVT_CPU_ISA='sse'"):
        build.selected_isa()
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('AuthenticAMD', zen3))
    monkeypatch.setenv('CVT_CPU_ISA', 'avx512')
    with pytest.raises(ValueError, match='no avx512'):
        build.selected_isa()


def test_unusable_build_override_warns_and_falls_back(tmp_path):
    result = run_python(SMALL_MODEL_RUN, CVT_CPU_ISA='avx9', CVT_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'kernels False' in result.stdout
    assert result.stderr.count("UserWarning: cpu_kernels: CVT_CPU_ISA='avx9'") == 1
