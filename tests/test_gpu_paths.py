"""The GPU paths that a CPU can check with the GPU stood in: where the attention runs
flash attention, and TensorRT's engine cache in tools/infer.py. (No Paddle GPU build runs here; docs/gpu.md says what was verified where.)"""

import os
import sys
import types

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import fast
from fast import layers as fast_layers
from test_fast_layers import plain_copy, small_model
from tools import infer
from tools.export_model import MODEL_PREFIX


class GpuPlace:
    """A place as Paddle gives a CUDA tensor's: `x.place`."""
    def is_gpu_place(self):
        return True

    def gpu_device_id(self):
        return 0


@pytest.mark.parametrize('on_gpu, dtype, capability, head_dim, runs', [
    (True, 'float16', (8, 0), 64, True),     # A100
    (True, 'bfloat16', (9, 0), 64, True),    # H100
    (True, 'float16', (8, 9), 256, True),    # L4, the largest head FlashAttention-2 takes
    (True, 'float16', (7, 0), 64, False),    # V100: no FlashAttention-2
    (True, 'float16', (7, 5), 64, False),    # T4
    (True, None, (9, 0), 64, False),         # float32: no autocast
    (True, 'float16', (9, 0), 264, False),   # heads too wide
    (True, 'float16', (9, 0), 60, False),    # not a multiple of 8
    (False, 'bfloat16', None, 64, False),    # the CPU
])
def test_flash_attention_runs_where_flashattention_2_does(monkeypatch, on_gpu, dtype, capability, head_dim, runs):
    monkeypatch.setattr(fast_layers, 'gpu_capability', lambda device_id: capability)
    place = GpuPlace() if on_gpu else paddle.zeros([1]).place  # a tensor's place, as the layer reads it
    assert fast_layers.flash_attention_runs(place, dtype, head_dim) is runs


def test_the_flash_path_computes_the_plain_attention_with_dropout_in_training_only(monkeypatch):
    """The fast attention taken through F.scaled_dot_product_attention as on a GPU (here
    in float32 on the CPU): the logits of the plain model, and attention dropout passed
    to the kernel in training only (Paddle 2.6's function does not pass `training` on)."""
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, dropout_p=0.0, training=True, **kwargs):
        calls.append((dropout_p, training))
        return real(q, k, v, dropout_p=0.0, training=training, **kwargs)

    monkeypatch.setattr(fast_layers, 'flash_attention_runs', lambda place, dtype, head_dim: True)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording)
    model = small_model(ATTN_DROP_RATE=[0.1, 0.1, 0.1])
    plain = plain_copy(model)
    images = paddle.randn([2, 3, 64, 64])
    model.eval(), plain.eval()
    with paddle.no_grad():
        np.testing.assert_allclose(model(images).numpy(), plain(images).numpy(), atol=1e-4, rtol=0)
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert calls == [(0.0, False)] * blocks
    calls.clear()
    model.train()
    model(images)
    assert calls == [(0.1, True)] * blocks


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / 'export'
    folder.mkdir()
    (folder / (MODEL_PREFIX + '.json')).write_text('{}')
    (folder / (MODEL_PREFIX + '.pdiparams')).write_bytes(b'weights')
    return str(folder)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """paddle.tensorrt as the GPU build has it, converting by writing the two files; counts builds."""
    builds = []

    class Input:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class TensorRTConfig:
        def __init__(self, inputs, precision_mode):
            self.inputs, self.precision_mode, self.save_model_dir = inputs, precision_mode, None

    def convert(source_prefix, config):
        builds.append(config.precision_mode)
        os.makedirs(os.path.dirname(config.save_model_dir), exist_ok=True)
        for suffix in ('.json', '.pdiparams'):
            with open(config.save_model_dir + suffix, 'w') as out:
                out.write(str(config.precision_mode))

    export = types.SimpleNamespace(Input=Input, TensorRTConfig=TensorRTConfig,
                                   PrecisionMode=types.SimpleNamespace(FP16='FP16', FP32='FP32'))
    monkeypatch.setitem(sys.modules, 'paddle.tensorrt', types.SimpleNamespace(convert=convert, export=export))
    monkeypatch.setitem(sys.modules, 'paddle.tensorrt.export', export)
    monkeypatch.setattr(paddle, 'tensorrt', sys.modules['paddle.tensorrt'], raising=False)
    monkeypatch.setattr(paddle.device.cuda, 'get_device_name', lambda *a: 'NVIDIA H100 80GB HBM3')
    return builds


PREPROCESS = {'image_size': 224, 'input_name': 'image'}


def test_tensorrt_engines_are_built_once_per_precision_and_batch(export_folder, fake_tensorrt):
    first = infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    again = infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    assert first == again and fake_tensorrt == ['FP16']  # the second run found the engines
    assert open(first + '.json').read() == 'FP16'
    other = infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp32')
    bigger = infer.tensorrt_program(export_folder, PREPROCESS, 32, 'fp16')
    assert len({first, other, bigger}) == 3 and fake_tensorrt == ['FP16', 'FP32', 'FP16']


def test_a_new_export_or_another_gpu_builds_anew(export_folder, fake_tensorrt, monkeypatch):
    first = infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    monkeypatch.setattr(paddle.device.cuda, 'get_device_name', lambda *a: 'Tesla V100-SXM2-16GB')
    assert infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16') != first
    with open(os.path.join(export_folder, MODEL_PREFIX + '.pdiparams'), 'wb') as out:
        out.write(b'weights of a newer export')
    infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    assert len(fake_tensorrt) == 3


def test_a_build_that_died_is_never_used(export_folder, fake_tensorrt, monkeypatch):
    real_convert = sys.modules['paddle.tensorrt'].convert

    def dies(source_prefix, config):
        real_convert(source_prefix, config)
        raise KeyboardInterrupt  # killed after writing, before the folder is renamed into place
    monkeypatch.setattr(sys.modules['paddle.tensorrt'], 'convert', dies)
    with pytest.raises(KeyboardInterrupt):
        infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    monkeypatch.setattr(sys.modules['paddle.tensorrt'], 'convert', real_convert)
    infer.tensorrt_program(export_folder, PREPROCESS, 8, 'fp16')
    assert len(fake_tensorrt) == 2  # built again, not taken from the partial folder


def test_the_gpu_check_says_in_one_line_that_it_needs_a_gpu():
    import subprocess
    result = subprocess.run([sys.executable, 'tools/check_gpu.py', '-skip_tensorrt'], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip('a GPU is here: run tools/check_gpu.py itself')
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: no CUDA GPU here (or a CPU build of Paddle): this script checks '
                                     'the GPU paths on a GPU')
