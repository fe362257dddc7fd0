"""The model's speed paths give the plain layers' results.

`cvt.set_fast_paths(model, False)` runs the attention and MLP step by step as
the official code writes them; every fast path must match it: eval logits to
1e-4, training gradients and BatchNorm statistics alike. No timings here: speed
is measured by tools/benchmark.py.
"""

import copy
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import cpu_kernels
import cvt
import fast_paths
from conftest import runnable_kernel_builds, switch_kernel_build
from config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=['paddle-ops'] + [f'{isa}-kernels' for isa in runnable_kernel_builds()])
def cpu_ops(request, monkeypatch):
    """The fast paths each way they run: through each CPU kernel build this
    machine runs (each with the kernels its table ships), and through Paddle's
    ops alone (as on GPU, or where no C compiler is found)."""
    if request.param == 'paddle-ops':
        monkeypatch.setattr(cpu_kernels, 'use', lambda kernel, x: False)
    else:
        switch_kernel_build(monkeypatch, request.param.split('-')[0])
    return request.param


def small_model(image_cls=(False, False, True), method='dw_bn', **model_keys) -> cvt.ConvolutionalVisionTransformer:
    """A CvT-13-shaped model, narrowed for speed, with non-trivial BatchNorm statistics
    (fresh ones are mean 0, variance 1, which would hide a wrong fold)."""
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    config.defrost()
    config.MODEL.DIM_EMBED = [16, 48, 96]
    config.MODEL.NUM_HEADS = [1, 3, 6]
    config.MODEL.DEPTH = [1, 2, 2]
    config.MODEL.NUM_CLASSES = 10
    config.MODEL.CLS_TOKEN = list(image_cls)
    config.MODEL.QKV_PROJ_METHOD = [method] * 3
    for key, value in model_keys.items():
        config.MODEL[key] = value
    model = cvt.build_cvt(config)
    for name, buffer in model.named_buffers():
        if name.endswith('_mean'):
            buffer.set_value(paddle.randn(buffer.shape) * 0.2)
        elif name.endswith('_variance'):
            buffer.set_value(paddle.rand(buffer.shape) + 0.5)
    return model


def eval_logits(model, images, fast: bool, fused=None) -> np.ndarray:
    cvt.set_fast_paths(model, fast, fused)
    model.eval()
    with paddle.no_grad():
        return model(images).numpy()


@pytest.mark.parametrize('method', ['dw_bn', 'avg', 'linear'])
@pytest.mark.parametrize('cls_token', [(False, False, True), (False, False, False)])
def test_eval_logits_match_plain_path(method, cls_token, cpu_ops):
    model = small_model(cls_token, method)
    images = paddle.randn([3, 3, 64, 64])
    plain = eval_logits(model, images, fast=False)
    np.testing.assert_allclose(eval_logits(model, images, fast=True), plain, atol=1e-4, rtol=0)
    np.testing.assert_allclose(eval_logits(model, images, fast=True, fused=True), plain, atol=1e-4, rtol=0)


def test_cvt13_logits_match_plain_path_at_224(cpu_ops):
    """The released architecture at its resolution, where Paddle's kernels take their large-size paths."""
    model = cvt.build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    images = paddle.randn([2, 3, 224, 224])
    plain = eval_logits(model, images, fast=False)
    np.testing.assert_allclose(eval_logits(model, images, fast=True), plain, atol=1e-4, rtol=0)


def test_training_gradients_and_batchnorm_statistics_match_plain_path(cpu_ops):
    fast = small_model()
    plain = copy.deepcopy(fast)
    cvt.set_fast_paths(plain, False)
    images = paddle.randn([2, 3, 64, 64])
    labels = paddle.to_tensor([1, 7])
    for model in (fast, plain):
        model.train()
        paddle.seed(1)  # drop path is random in training: both models draw the same masks
        F.cross_entropy(model(images), labels).backward()
    grads_fast = {n: p.grad.numpy() for n, p in fast.named_parameters() if p.grad is not None}
    grads_plain = {n: p.grad.numpy() for n, p in plain.named_parameters() if p.grad is not None}
    assert grads_fast.keys() == grads_plain.keys() == {n for n, p in fast.named_parameters() if not p.stop_gradient}
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fast[name], grad, atol=1e-5, rtol=1e-3, err_msg=name)
    buffers = dict(plain.named_buffers())
    for name, buffer in fast.named_buffers():
        np.testing.assert_allclose(buffer.numpy(), buffers[name].numpy(), atol=1e-6, err_msg=name)


def test_block_with_drop_path_matches_plain_path_in_training(cpu_ops):
    """The fast block draws DropPath's factors as the plain one does and adds the
    residuals with them: outputs and gradients alike, dropped samples included."""
    fast = cvt.Block(16, 16, num_heads=2, drop_path=0.5)
    plain = copy.deepcopy(fast)
    cvt.set_fast_paths(plain, False)
    paddle.seed(3)
    factors = fast.drop_path.sample_scale(paddle.ones([8, 1, 1])).flatten().numpy()
    assert (factors == 0).any() and (factors == 2).any(), 'this seed should drop some samples and keep others'
    tokens, upstream = paddle.randn([8, 1 + 16, 16]), paddle.randn([8, 1 + 16, 16])
    results = []
    for model in (fast, plain):
        model.train()
        x = tokens.clone()
        x.stop_gradient = False
        paddle.seed(3)
        out = model(x, 4, 4)
        (out * upstream).sum().backward()
        results.append([out.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in model.parameters()
                                                        if not p.stop_gradient])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_recording_attention_takes_explicit_softmax_and_keeps_logits():
    model = small_model()
    model.eval()
    images = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        fast = model(images).numpy()
        with cvt.record_attention(model) as records:
            recorded = model(images).numpy()
    np.testing.assert_allclose(recorded, fast, atol=1e-4, rtol=0)
    assert [(i, j) for i, j, _ in records] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    stage, block, weights = records[-1]
    assert list(weights.shape) == [2, 6, 1 + 4 * 4, 1 + 2 * 2]
    np.testing.assert_allclose(weights.sum(axis=-1).numpy(), 1.0, atol=1e-5)


def test_linear_matches_paddle_linear_forward_and_backward():
    x = paddle.randn([2, 5, 8])
    weight, bias = paddle.randn([8, 3]), paddle.randn([3])
    for t in (x, weight, bias):
        t.stop_gradient = False
    grads = []
    for fn in (fast_paths.linear, F.linear):
        out = fn(x, weight, bias)
        (out * out).sum().backward()
        grads.append([out.numpy()] + [t.grad.numpy().copy() for t in (x, weight, bias)])
        for t in (x, weight, bias):
            t.clear_gradient()
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_unchanged_by_fast_paths():
    model = small_model()
    keys = list(model.state_dict())
    cvt.set_fast_paths(model, True)
    model.eval()
    with paddle.no_grad():
        model(paddle.randn([2, 3, 32, 32]))
    assert list(model.state_dict()) == keys


def test_runtime_sets_threads_and_mkl_path_but_respects_the_user(monkeypatch):
    import runtime
    shared = []
    monkeypatch.setattr(runtime, 'share_threads_with_paddle', shared.append)  # not in this process
    for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'KMP_BLOCKTIME'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, 'usable_cores', lambda: 7)
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('AuthenticAMD', frozenset({'avx2', 'fma'})))
    runtime.configure()
    assert os.environ['MKL_NUM_THREADS'] == '7'
    assert 'OMP_NUM_THREADS' not in os.environ  # left to the user
    assert os.environ['MKL_DEBUG_CPU_TYPE'] == '5'
    monkeypatch.setenv('MKL_NUM_THREADS', '1')
    runtime.configure()
    assert os.environ['MKL_NUM_THREADS'] == '1'  # the user's
    assert os.environ['KMP_BLOCKTIME'] == '1'
    assert shared == ['7', '1']
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    runtime.configure()
    assert shared == ['7', '1']  # the user's OpenMP threads stay
    monkeypatch.delenv('OMP_NUM_THREADS')
    monkeypatch.delenv('MKL_DEBUG_CPU_TYPE')
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('GenuineIntel', frozenset({'avx2', 'fma', 'avx512f'})))
    runtime.configure()
    assert 'MKL_DEBUG_CPU_TYPE' not in os.environ


def test_mkl_code_path_follows_the_amd_cpu_features():
    import runtime
    zen4 = frozenset({'avx2', 'fma', 'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl', 'avx512_bf16'})
    assert runtime.mkl_cpu_type('AuthenticAMD', zen4) == '7'
    assert runtime.mkl_cpu_type('AuthenticAMD', zen4 - {'avx512bw'}) == '5'  # a partial AVX-512 is not enough
    assert runtime.mkl_cpu_type('AuthenticAMD', frozenset({'avx2', 'fma'})) == '5'
    assert runtime.mkl_cpu_type('AuthenticAMD', frozenset({'sse4_2'})) is None
    assert runtime.mkl_cpu_type('GenuineIntel', zen4) is None


def test_plain_path_calls_every_linear_and_conv_layer():
    """With the fast paths off, forward hooks (and replaced layers: quantisation,
    LoRA) see every nn.Linear and nn.Conv2D call."""
    model = small_model()
    cvt.set_fast_paths(model, False)
    layers = [layer for layer in model.sublayers() if isinstance(layer, (paddle.nn.Linear, paddle.nn.Conv2D))]
    called = []
    for layer in layers:
        layer.register_forward_post_hook(lambda layer, inputs, output: called.append(id(layer)))
    model.eval()
    with paddle.no_grad():
        model(paddle.randn([1, 3, 32, 32]))
    assert sorted(called) == sorted(id(layer) for layer in layers)


def test_paddle_openmp_kernels_get_the_configured_threads():
    """Paddle's own OpenMP kernels run on as many threads as MKL after configure();
    without it Paddle leaves them on one."""
    code = '''
import ctypes, os, sys
sys.path.insert(0, '.')
import runtime
runtime.configure(threads=2)
import paddle
iomp = [p for p in open('/proc/self/maps').read().split() if os.path.basename(p).startswith('libiomp5')][0]
print(ctypes.CDLL(iomp).omp_get_max_threads())
'''
    import runtime
    if runtime.usable_cores() < 2 or not sys.platform.startswith('linux'):
        pytest.skip('needs 2 cores and Linux (/proc/self/maps)')
    env = {k: v for k, v in os.environ.items() if k not in ('MKL_NUM_THREADS', 'OMP_NUM_THREADS')}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == '2'


def test_importing_the_model_changes_nothing_process_wide():
    """`import cvt` (config, engine, ...) leaves the environment and the warning
    filters alone: runtime.configure() is for the entry points to call."""
    code = '''
import os, sys, warnings
sys.path.insert(0, '.')
import paddle  # Paddle's own import-time filters are not the project's
env, filters = dict(os.environ), list(warnings.filters)
import cvt, config, engine, fast_paths, cpu_kernels, runtime
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert list(warnings.filters) == filters
runtime.configure()
assert 'MKL_NUM_THREADS' in os.environ and list(warnings.filters) != filters
print('ok')
'''
    env = {k: v for k, v in os.environ.items()
           if k not in ('MKL_NUM_THREADS', 'KMP_BLOCKTIME', 'MKL_DEBUG_CPU_TYPE')}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr
