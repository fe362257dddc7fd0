"""tools/convert_weights.py without PyTorch: name mapping of the full CvT-13 key sets,
safetensors conversion, and the error paths (unmapped, unfilled, mis-shaped, no torch)."""

import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from config import get_config
from cvt import build_cvt
from tools.convert_weights import (ConversionError, convert, convert_state_dict, layout_of, main,
                                   read_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')  # copies of ../shared/reference/*.state_dict.txt
CVT13 = os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')


def read_layout(name: str):
    """{key: shape} of a reference `<name>.state_dict.txt` (one `key dim dim ...` a line)."""
    shapes = {}
    with open(os.path.join(DATA, f'{name}.state_dict.txt')) as listing:
        for line in listing:
            key, *dims = line.split()
            shapes[key] = tuple(int(d) for d in dims)
    return shapes


def zeros_like_layout(shapes):
    """A state dict of zeros with the given shapes; BatchNorm step counters are int64 scalars."""
    return {k: np.zeros(s, dtype='int64' if k.endswith('num_batches_tracked') else 'float32')
            for k, s in shapes.items()}


@pytest.fixture(scope='module')
def cvt13_layout():
    with paddle.LazyGuard():
        return layout_of(build_cvt(get_config(CVT13)))


@pytest.fixture
def no_torch(monkeypatch):
    """Make `import torch` fail, as on a machine without PyTorch."""
    monkeypatch.setitem(sys.modules, 'torch', None)


@pytest.mark.parametrize('source', ['official-cvt-13', 'hf-cvt-13'])
def test_full_cvt13_key_set_maps_onto_exactly_the_reference_layout(cvt13_layout, source):
    converted = convert_state_dict(zeros_like_layout(read_layout(source)), cvt13_layout)
    assert {k: v.shape for k, v in converted.items()} == read_layout('cvt-13')


def test_linear_weights_are_transposed_and_others_kept(cvt13_layout):
    source = zeros_like_layout(read_layout('official-cvt-13'))
    source['stage2.blocks.3.mlp.fc1.weight'] = np.arange(1536 * 384, dtype='float32').reshape(1536, 384)
    source['stage0.patch_embed.proj.weight'] = np.arange(64 * 3 * 7 * 7, dtype='float32').reshape(64, 3, 7, 7)
    source['stage1.blocks.0.attn.conv_proj_v.bn.running_var'] = np.arange(192, dtype='float32')
    converted = convert_state_dict(source, cvt13_layout)
    np.testing.assert_array_equal(converted['stages.2.blocks.3.mlp.fc1.weight'],
                                  source['stage2.blocks.3.mlp.fc1.weight'].T)
    np.testing.assert_array_equal(converted['stages.0.patch_embed.proj.weight'],
                                  source['stage0.patch_embed.proj.weight'])
    np.testing.assert_array_equal(converted['stages.1.blocks.0.attn.conv_proj_v.1._variance'],
                                  source['stage1.blocks.0.attn.conv_proj_v.bn.running_var'])


def test_hf_safetensors_folder_converts_without_torch_to_a_loadable_file(tmp_path, no_torch):
    hf = tmp_path / 'hf'
    hf.mkdir()
    source = zeros_like_layout(read_layout('hf-cvt-13'))
    source['classifier.bias'] = np.linspace(-1, 1, 1000, dtype='float32')
    save_file(source, str(hf / 'model.safetensors'))
    dst = tmp_path / 'cvt-13.pdparams'
    assert convert(str(hf), str(dst), CVT13) == len(read_layout('cvt-13'))
    state = paddle.load(str(dst))
    assert {k: tuple(v.shape) for k, v in state.items()} == read_layout('cvt-13')
    np.testing.assert_array_equal(state['head.bias'].numpy(), source['classifier.bias'])
    assert sorted(os.listdir(tmp_path)) == ['cvt-13.pdparams', 'hf']  # no temporary file left


def test_unmapped_source_tensor_is_named(cvt13_layout):
    source = zeros_like_layout(read_layout('official-cvt-13'))
    source['stage2.pos_embed'] = np.zeros((1, 197, 384), 'float32')
    with pytest.raises(ConversionError, match=r'1 official tensors have no place in the model: stage2\.pos_embed'):
        convert_state_dict(source, cvt13_layout)


def test_unknown_hf_name_is_named(cvt13_layout):
    source = zeros_like_layout(read_layout('hf-cvt-13'))
    source['cvt.encoder.stages.1.layers.0.attention.attention.rotary.weight'] = np.zeros(4, 'float32')
    with pytest.raises(ConversionError, match=r'Hugging Face .*layers\.0\.attention\.attention\.rotary\.weight'):
        convert_state_dict(source, cvt13_layout)


def test_deeper_checkpoint_than_the_config_is_unmapped(cvt13_layout):
    source = zeros_like_layout(read_layout('official-cvt-13'))
    source.update({k.replace('stage2.blocks.0.', 'stage2.blocks.10.'): v
                   for k, v in list(source.items()) if k.startswith('stage2.blocks.0.')})
    with pytest.raises(ConversionError, match=r'no place in the model: stage2\.blocks\.10\.'):
        convert_state_dict(source, cvt13_layout)


def test_unfilled_model_weight_is_named(cvt13_layout):
    source = zeros_like_layout(read_layout('official-cvt-13'))
    del source['stage1.blocks.1.mlp.fc1.bias']
    with pytest.raises(ConversionError, match=r'1 model weights not in the checkpoint: stages\.1\.blocks\.1\.mlp\.fc1\.bias'):
        convert_state_dict(source, cvt13_layout)


def test_shape_mismatch_is_named(cvt13_layout):
    source = zeros_like_layout(read_layout('official-cvt-13'))
    source['head.weight'] = np.zeros((10, 384), 'float32')
    with pytest.raises(ConversionError, match=r'head\.weight \(384, 10\) -> head\.weight expects \(384, 1000\)'):
        convert_state_dict(source, cvt13_layout)


def test_torch_checkpoint_without_torch_gives_an_install_hint(tmp_path, no_torch):
    checkpoint = tmp_path / 'CvT-13-224x224-IN-1k.pth'
    checkpoint.write_bytes(b'')
    with pytest.raises(ConversionError, match=r'needs PyTorch.*pip install torch'):
        read_checkpoint(str(checkpoint))


def test_folder_without_weights_is_an_error(tmp_path):
    with pytest.raises(ConversionError, match=r'folder holds neither model\.safetensors nor pytorch_model\.bin'):
        read_checkpoint(str(tmp_path))


def test_cli_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    source = zeros_like_layout(read_layout('hf-cvt-13'))
    del source['layernorm.bias']
    save_file(source, str(tmp_path / 'model.safetensors'))
    dst = tmp_path / 'out.pdparams'
    assert main([str(tmp_path / 'model.safetensors'), str(dst), '-cfg', CVT13]) == 2
    err = capsys.readouterr().err
    assert err == 'error: 1 model weights not in the checkpoint: norm.bias\n'
    assert sorted(os.listdir(tmp_path)) == ['model.safetensors']


def test_script_run_from_the_repo_root_fails_without_a_traceback(tmp_path):
    save_file({'stage0.unknown': np.zeros(3, 'float32')}, str(tmp_path / 'bad.safetensors'))
    run = subprocess.run(
        [sys.executable, 'tools/convert_weights.py', str(tmp_path / 'bad.safetensors'),
         str(tmp_path / 'out.pdparams'), '-cfg', 'configs/cvt-13-224x224.yaml'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert 'Traceback' not in run.stderr
    assert 'error: 1 official tensors have no place in the model: stage0.unknown' in run.stderr
