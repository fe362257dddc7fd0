"""The fast layers (fast/) compute the plain layers' results, and step aside for replaced or hooked sublayers.

Every fast forward must match cvt.py's plain one: eval logits to 1e-4, training
gradients and BatchNorm statistics alike, with each CPU kernel build this machine
runs and with Paddle's ops alone (as on a GPU, or without a C compiler). A
sublayer replaced (LoRA, SyncBatchNorm) or hooked must run as it does in the
plain model. No timings here: speed is measured by tools/benchmark.py.
"""

import copy
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

import cvt
import fast
import paddle_internals
from conftest import runnable_kernel_builds, switch_kernel_build
from config import get_config
from fast import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=['paddle-ops'] + [f'{isa}-kernels' for isa in runnable_kernel_builds()])
def cpu_ops(request, monkeypatch):
    """The fast layers each way they run: through each CPU kernel build this machine
    runs, and through Paddle's ops alone (as on GPU, or where no C compiler is found)."""
    if request.param == 'paddle-ops':
        monkeypatch.setattr(kernels, 'runs_on', lambda x: False)
    else:
        switch_kernel_build(monkeypatch, request.param.split('-')[0])
    return request.param


def small_config(image_cls=(False, False, True), method='dw_bn', layers='fast', **model_keys):
    """A CvT-13-shaped config, narrowed for speed."""
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    config.defrost()
    config.MODEL.DIM_EMBED = [16, 48, 96]
    config.MODEL.NUM_HEADS = [1, 3, 6]
    config.MODEL.DEPTH = [1, 2, 2]
    config.MODEL.NUM_CLASSES = 10
    config.MODEL.CLS_TOKEN = list(image_cls)
    config.MODEL.QKV_PROJ_METHOD = [method] * 3
    config.MODEL.LAYERS = layers
    for key, value in model_keys.items():
        config.MODEL[key] = value
    return config


def small_model(image_cls=(False, False, True), method='dw_bn', **model_keys) -> cvt.ConvolutionalVisionTransformer:
    """A small fast CvT with non-trivial BatchNorm statistics (fresh ones are mean 0,
    variance 1, which would hide a wrong fold)."""
    model = cvt.build_cvt(small_config(image_cls, method, **model_keys))
    for name, buffer in model.named_parameters():
        if name.endswith('_mean'):
            buffer.set_value(paddle.randn(buffer.shape) * 0.2)
        elif name.endswith('_variance'):
            buffer.set_value(paddle.rand(buffer.shape) + 0.5)
    return model


def plain_copy(model):
    return fast.convert(copy.deepcopy(model), 'plain')


def eval_logits(model, images) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(images).numpy()


@pytest.mark.parametrize('method', ['dw_bn', 'avg', 'linear'])
@pytest.mark.parametrize('cls_token', [(False, False, True), (False, False, False)])
def test_eval_logits_match_the_plain_layers(method, cls_token, cpu_ops):
    model = small_model(cls_token, method)
    images = paddle.randn([3, 3, 64, 64])
    np.testing.assert_allclose(eval_logits(model, images), eval_logits(plain_copy(model), images), atol=1e-4, rtol=0)


def test_flash_attention_core_matches_the_explicit_one():
    """The GPU's half-precision core (F.scaled_dot_product_attention), run here in float32
    on the CPU against the explicit softmax: the pre-scaled q gives CvT's dim_out ** -0.5."""
    attn = small_model().stages[2].blocks[0].attn
    attn.eval()
    q, k, v = paddle.randn([2, 96, 17]), paddle.randn([2, 96, 5]), paddle.randn([2, 96, 5])
    with paddle.no_grad():
        np.testing.assert_allclose(attn.attend_flash(q, k, v).numpy(), attn.attend(q, k, v).numpy(),
                                   atol=1e-5, rtol=1e-4)


def test_cvt13_logits_match_the_plain_layers_at_224(cpu_ops):
    """The released architecture at its resolution, where Paddle's kernels take their large-size paths."""
    model = cvt.build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    images = paddle.randn([2, 3, 224, 224])
    np.testing.assert_allclose(eval_logits(model, images), eval_logits(plain_copy(model), images), atol=1e-4, rtol=0)


def gradients_and_statistics(model, images, labels):
    model.train()
    paddle.seed(1)  # drop path is random in training: both models draw the same masks
    F.cross_entropy(model(images), labels).backward()
    return ({n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None},
            {n: p.numpy() for n, p in model.named_parameters() if n.endswith(('_mean', '_variance'))})


def test_training_gradients_and_batchnorm_statistics_match_the_plain_layers(cpu_ops):
    model = small_model()
    plain = plain_copy(model)
    images, labels = paddle.randn([2, 3, 64, 64]), paddle.to_tensor([1, 7])
    grads_fast, stats_fast = gradients_and_statistics(model, images, labels)
    grads_plain, stats_plain = gradients_and_statistics(plain, images, labels)
    assert grads_fast.keys() == grads_plain.keys() == {n for n, p in model.named_parameters() if not p.stop_gradient}
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fast[name], grad, atol=1e-5, rtol=1e-3, err_msg=name)
    for name, stat in stats_plain.items():
        np.testing.assert_allclose(stats_fast[name], stat, atol=1e-6, err_msg=name)


def test_block_with_drop_path_matches_the_plain_layers_in_training(cpu_ops):
    """The fast block draws DropPath's factors as the plain one does and adds the
    residuals with them: outputs and gradients alike, dropped samples included."""
    plain = cvt.Block(16, 16, num_heads=2, drop_path=0.5)
    block = fast.convert(copy.deepcopy(plain), 'fast')
    assert type(block) is fast.FastBlock
    paddle.seed(3)
    factors = block.drop_path.sample_scale(paddle.ones([8, 1, 1])).flatten().numpy()
    assert (factors == 0).any() and (factors == 2).any(), 'this seed should drop some samples and keep others'
    tokens, upstream = paddle.randn([8, 1 + 16, 16]), paddle.randn([8, 1 + 16, 16])
    results = []
    for model in (block, plain):
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


def test_recording_attention_takes_the_plain_attention_and_keeps_the_logits():
    model = small_model()
    model.eval()
    images = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        logits = model(images).numpy()
        with cvt.record_attention(model) as records:
            recorded = model(images).numpy()
    np.testing.assert_allclose(recorded, logits, atol=1e-4, rtol=0)
    assert [(i, j) for i, j, _ in records] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    stage, block, weights = records[-1]
    assert list(weights.shape) == [2, 6, 1 + 4 * 4, 1 + 2 * 2]
    np.testing.assert_allclose(weights.sum(axis=-1).numpy(), 1.0, atol=1e-5)


def test_the_setting_picks_the_layers_and_print_names_them():
    plain = cvt.build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-demo.yaml'), ['MODEL.LAYERS', 'plain']))
    assert type(plain) is cvt.ConvolutionalVisionTransformer and fast.describe(plain) == 'plain'
    assert not any(type(layer) in fast.PLAIN_CLASS for layer in plain.sublayers())
    model = cvt.build_cvt(get_config(os.path.join(ROOT, 'configs', 'cvt-demo.yaml')))  # the default
    assert type(model) is fast.FastConvolutionalVisionTransformer
    isa = fast.kernel_isa() or 'none'
    assert fast.describe(model) == f'fast, CPU kernels {isa}'
    printed = str(model)
    assert printed.startswith(f'FastConvolutionalVisionTransformer(layers=fast, cpu_kernels={isa}')
    assert 'FastAttention(' in printed and 'FastLayerNorm(' in printed and 'FastMlp(' in printed
    with pytest.raises(ValueError, match="MODEL.LAYERS = 'quick' is not one of fast, plain"):
        get_config(os.path.join(ROOT, 'configs', 'cvt-demo.yaml'), ['MODEL.LAYERS', 'quick'])


def test_convert_keeps_the_weights_the_mode_and_the_hooks_and_checkpoints_move_freely(tmp_path):
    model = small_model()
    model.eval()
    parameters = {name: p for name, p in model.named_parameters()}
    called = []
    model.head.register_forward_post_hook(lambda layer, inputs, output: called.append(1))
    images = paddle.randn([2, 3, 32, 32])
    logits = eval_logits(model, images)
    assert fast.convert(model, 'plain') is model and fast.describe(model) == 'plain'
    assert not model.training and all(not layer.training for layer in model.sublayers())
    assert {name: p for name, p in model.named_parameters()}.keys() == parameters.keys()
    assert all(p is parameters[name] for name, p in model.named_parameters())  # the same tensors
    np.testing.assert_allclose(eval_logits(model, images), logits, atol=1e-4, rtol=0)
    assert called == [1, 1]
    fast.convert(model, 'fast')
    assert fast.describe(model).startswith('fast')
    # a fast model's checkpoint loads into a plain model built on its own, and back
    path = str(tmp_path / 'fast.pdparams')
    paddle.save(model.state_dict(), path)
    plain = cvt.build_cvt(small_config(layers='plain'))
    assert list(plain.state_dict()) == list(model.state_dict())
    cvt.load_pretrained(plain, path)
    np.testing.assert_allclose(eval_logits(plain, images), logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="layers 'quick'"):
        fast.convert(model, 'quick')


class LoRALinear(nn.Layer):
    """A LoRA wrapper as the PEFT libraries write it: the frozen Linear plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.weight.shape[0], rank, bias_attr=False)
        self.up = nn.Linear(rank, base.weight.shape[1], bias_attr=False)
        nn.initializer.Normal(std=0.5)(self.up.weight)  # non-zero, so that the update shows

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def with_lora(model):
    for block in (model.stages[1].blocks[0], model.stages[2].blocks[1]):
        block.mlp.fc1 = LoRALinear(block.mlp.fc1)
        block.attn.proj_q = LoRALinear(block.attn.proj_q)
    return model


def test_a_lora_wrapped_linear_runs_in_the_fast_layers(cpu_ops):
    model = small_model()
    images = paddle.randn([2, 3, 64, 64])
    without = eval_logits(model, images)
    plain = with_lora(plain_copy(model))
    with_lora(model)
    paddle.seed(5)
    for layer in model.sublayers():  # the same LoRA weights in both
        if isinstance(layer, LoRALinear):
            layer.up.weight.set_value(paddle.randn(layer.up.weight.shape) * 0.5)
    plain.set_state_dict(model.state_dict())
    got = eval_logits(model, images)
    np.testing.assert_allclose(got, eval_logits(plain, images), atol=1e-4, rtol=0)
    assert np.abs(got - without).max() > 1e-2, 'the LoRA update should change the logits'
    # and in training: the LoRA weights get the plain model's gradients
    labels = paddle.to_tensor([1, 7])
    grads_fast, _ = gradients_and_statistics(model, images, labels)
    grads_plain, _ = gradients_and_statistics(plain, images, labels)
    lora = [name for name in grads_plain if '.up.' in name or '.down.' in name]
    assert len(lora) == 8
    for name in lora:
        np.testing.assert_allclose(grads_fast[name], grads_plain[name], atol=1e-5, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize('where', ['attn.proj_k', 'attn.conv_proj_v.0', 'attn.conv_proj_v.1', 'attn.proj',
                                   'mlp.act', 'mlp.fc2', 'drop_path', 'attn', 'mlp'])
@pytest.mark.parametrize('action', ['double', 'keep'])
def test_a_forward_hook_sees_and_changes_what_it_does_in_the_plain_layers(where, action, cpu_ops):
    """A post-hook that keeps a sublayer's output, and returns it doubled or leaves it: the
    logits and what the hook kept are the plain layers' (the block's in-place residual
    addition must not write into an output a hook holds)."""
    model = small_model(DROP_PATH_RATE=[0.0, 0.0, 0.2])
    images = paddle.randn([2, 3, 64, 64])
    without = eval_logits(model, images)
    plain = plain_copy(model)
    kept = {}
    for name, net in (('fast', model), ('plain', plain)):
        # the first block: in the last one only the cls token's row reaches the logits;
        # the second, for its DropPath
        layer = net.stages[2].blocks[1 if where == 'drop_path' else 0]
        for part in where.split('.'):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)

        def hook(layer, inputs, output, name=name):
            kept[name] = output
            return output * 2 if action == 'double' else None
        layer.register_forward_post_hook(hook)
    got = eval_logits(model, images)
    np.testing.assert_allclose(got, eval_logits(plain, images), atol=1e-4, rtol=0)
    if action == 'double':
        assert np.abs(got - without).max() > 1e-4, 'the hook should change the logits'
    np.testing.assert_allclose(kept['fast'].numpy(), kept['plain'].numpy(), atol=1e-4, rtol=1e-4)


def test_a_forward_pre_hook_on_a_bypassed_linear_runs():
    model = small_model()
    seen = []
    model.stages[0].blocks[0].mlp.fc1.register_forward_pre_hook(lambda layer, inputs: seen.append(1))
    eval_logits(model, paddle.randn([1, 3, 32, 32]))
    assert seen == [1]


def test_sync_batch_norm_in_place_of_batch_norm_runs(monkeypatch, cpu_ops):
    calls = []

    def single_process_forward(self, x):
        """SyncBatchNorm's forward as it computes in one process (BatchNorm's): Paddle
        has no CPU kernel for it."""
        calls.append(1)
        mean, variance = paddle_internals.batch_norm_statistics(self)
        settings = paddle_internals.batch_norm_settings(self)
        return F.batch_norm(x, mean, variance, self.weight, self.bias, training=self.training,
                            momentum=settings.momentum, epsilon=settings.epsilon)
    monkeypatch.setattr(nn.SyncBatchNorm, 'forward', single_process_forward)
    model = small_model()
    images, labels = paddle.randn([2, 3, 64, 64]), paddle.to_tensor([1, 7])
    logits = eval_logits(model, images)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plain = plain_copy(model)
    assert any(type(layer) is nn.SyncBatchNorm for layer in model.sublayers())
    got = eval_logits(model, images)
    assert len(calls) == 3 * 5  # q, k and v of each of the 5 blocks
    np.testing.assert_allclose(got, logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, eval_logits(plain, images), atol=1e-4, rtol=0)
    grads_fast, stats_fast = gradients_and_statistics(model, images, labels)
    grads_plain, stats_plain = gradients_and_statistics(plain, images, labels)
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fast[name], grad, atol=1e-5, rtol=1e-3, err_msg=name)
    for name, stat in stats_plain.items():
        np.testing.assert_allclose(stats_fast[name], stat, atol=1e-6, err_msg=name)


def test_the_plain_layers_call_every_linear_and_conv_layer():
    """With the plain layers, forward hooks (and replaced layers: quantisation, LoRA)
    see every nn.Linear and nn.Conv2D call."""
    model = cvt.build_cvt(small_config(layers='plain'))
    layers = [layer for layer in model.sublayers() if isinstance(layer, (nn.Linear, nn.Conv2D))]
    called = []
    for layer in layers:
        layer.register_forward_post_hook(lambda layer, inputs, output: called.append(id(layer)))
    eval_logits(model, paddle.randn([1, 3, 32, 32]))
    assert sorted(called) == sorted(id(layer) for layer in layers)


def test_static_graphs_take_the_plain_layers(tmp_path):
    """paddle.jit traces a fast model through the plain forwards (the kernels run in
    dynamic mode only): the saved program gives the same logits."""
    model = small_model()
    model.eval()
    images = paddle.randn([2, 3, 32, 32])
    logits = eval_logits(model, images)
    spec = paddle.static.InputSpec([None, 3, 32, 32], 'float32', name='image')
    path = str(tmp_path / 'model')
    paddle.jit.save(model, path, input_spec=[spec])
    loaded = paddle.jit.load(path)
    loaded.eval()
    np.testing.assert_allclose(loaded(images).numpy(), logits, atol=1e-4, rtol=0)


def test_importing_the_model_changes_nothing_process_wide():
    """`import cvt` (config, engine, fast, ...) leaves the environment and the warning
    filters alone and builds nothing: runtime.configure() is for the entry points to call."""
    code = '''
import os, sys, warnings
sys.path.insert(0, '.')
import paddle  # Paddle's own import-time filters are not the project's
env, filters = dict(os.environ), list(warnings.filters)
import cvt, config, engine, fast, fast.kernels, fast.build, runtime, paddle_internals
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert list(warnings.filters) == filters
assert fast.build._load_attempted is False
runtime.configure()
assert 'MKL_NUM_THREADS' in os.environ and list(warnings.filters) != filters
print('ok')
'''
    env = {k: v for k, v in os.environ.items()
           if k not in ('MKL_NUM_THREADS', 'KMP_BLOCKTIME', 'MKL_DEBUG_CPU_TYPE')}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr
