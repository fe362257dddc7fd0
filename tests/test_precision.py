"""tools/infer.py -precision, tools/quantize.py and -data_path: each precision runs end to end
on a tiny model where the CPU (stood in through runtime.cpu_info) has it natively, falls back
to fp32 with its one line where it has not, and the accuracy printed is the model's."""

import importlib.util
import json
import os
import shutil

import numpy as np
import paddle
import pytest

import runtime
from test_export_onnx import needs_converter, needs_openvino
from test_predict import parse_top_k, write_images, write_tiny_model
from benchmarks import compare_with_pytorch as benchmark_compare
from tools import export_model, export_onnx, infer, precision, quantize

AVX2_ONLY = frozenset({'sse4_2', 'avx', 'avx2', 'fma', 'f16c'})
NATIVE = AVX2_ONLY | {'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_int8'}
CLASSES = 10  # the tiny model's


def quantizer_missing() -> str:
    """Why the int8 quantisation cannot run here, or ''."""
    missing = [name for name in ('nncf', 'onnx', 'onnxruntime') if importlib.util.find_spec(name) is None]
    return f'{", ".join(missing)} needed: pip install -r requirements-deploy.txt' if missing else ''


needs_quantizer = pytest.mark.skipif(bool(quantizer_missing()), reason=quantizer_missing() or 'installed')
ONNX_BACKENDS = [pytest.param('onnxruntime', marks=[needs_converter, needs_quantizer]),
                 pytest.param('openvino', marks=[needs_openvino, needs_quantizer])]


def stand_in_cpu(monkeypatch, flags: frozenset) -> None:
    """Make tools/precision.py see a CPU with these /proc/cpuinfo flags."""
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('GenuineIntel', flags))


def write_class_folders(root: str, per_class: int) -> None:
    """An ImageNet-format split: CLASSES synset folders of `per_class` random images each."""
    for index in range(CLASSES):
        write_images(os.path.join(root, f'n{index:08d}'), per_class)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """The tiny CvT (seeded) exported both ways, a small data set (train/ for calibration,
    val/), and the int8 model quantised from train/ by the tool: a dict of paths and the model."""
    folder = tmp_path_factory.mktemp('precision')
    cfg, weights, model = write_tiny_model(str(folder))
    data = folder / 'data'
    write_class_folders(str(data / 'train'), 1)
    write_class_folders(str(data / 'val'), 2)
    exported = str(folder / 'exported')
    assert export_model.main(['-cfg', cfg, '-pretrained', weights, '-output', exported]) == 0
    paths = {'cfg': cfg, 'weights': weights, 'model': model, 'data': str(data), 'exported': exported}
    if not quantizer_missing() and not export_onnx_missing():
        paths['onnx'] = str(folder / 'tiny.onnx')
        assert export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', paths['onnx']]) == 0
        assert quantize.main(['-model', paths['onnx'], '-calibration', str(data / 'train'), '-images', '8']) == 0
    return paths


def export_onnx_missing() -> bool:
    from test_export_onnx import converter_missing
    return bool(converter_missing())


def run_infer(capsys, *argv) -> tuple:
    """tools/infer.py with `argv`: (stdout, stderr lines)."""
    assert infer.main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err.splitlines()


def val_logits(models: dict) -> tuple:
    """The Paddle model's logits on DATA/val through its config's val transform, and the labels."""
    from config import get_config
    from datasets import load_rgb, scan_class_folders
    from tools._common import val_transform
    paths, labels, _ = scan_class_folders(models['data'], 'val')
    model, transform = models['model'], val_transform(get_config(models['cfg']))
    images = np.stack([transform(load_rgb(path)) for path in paths])
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy(), np.array(labels)


# ------------------------------------------------------------------ the rule

@pytest.mark.parametrize('flags, formats', [
    (AVX2_ONLY, {'fp32'}),
    (AVX2_ONLY | {'avx512f', 'avx512_vnni'}, {'fp32', 'int8'}),  # Cascade Lake
    (AVX2_ONLY | {'avx_vnni'}, {'fp32', 'int8'}),  # Alder Lake
    (AVX2_ONLY | {'avx512f', 'avx512_bf16', 'avx512_vnni'}, {'fp32', 'bf16', 'int8'}),  # Zen 4
    (AVX2_ONLY | {'amx_bf16', 'amx_int8'}, {'fp32', 'bf16', 'int8'}),  # Sapphire Rapids
])
def test_native_formats_follow_the_dot_product_instructions(flags, formats):
    assert precision.native_formats(frozenset(flags)) == formats


def test_a_format_the_cpu_lacks_falls_back_to_fp32_saying_why(monkeypatch):
    stand_in_cpu(monkeypatch, AVX2_ONLY)
    choice = precision.choose('int8', 'onnxruntime')
    assert (choice.run, choice.reason) == ('fp32', 'this CPU has no native int8: no AVX512_VNNI, AVX_VNNI or AMX-INT8')
    line = precision.first_line(choice, 'onnxruntime')
    assert line.startswith('precision fp32 (int8 asked: this CPU has no native int8: ')
    assert line.endswith('AVX2 FMA; no AVX-512, AVX512_VNNI, AVX_VNNI, AVX512_BF16, AMX-BF16, AMX-INT8')
    assert precision.choose('int8', 'onnxruntime', force=True).run == 'int8'  # ONNX Runtime has int8 on any CPU


def test_a_native_format_the_runtime_lacks_on_this_cpu_falls_back_naming_the_runtime(monkeypatch):
    stand_in_cpu(monkeypatch, NATIVE)
    monkeypatch.setattr(precision, 'runtime_formats', lambda backend: frozenset({'fp32'}))
    choice = precision.choose('bf16', 'openvino')
    assert (choice.run, choice.reason) == ('fp32', 'OpenVINO has no bf16 kernels for this CPU')


# ------------------------------------------------------------------ int8 quantisation

@needs_converter
@needs_quantizer
def test_quantize_writes_an_int8_model_beside_the_export_keeping_what_must_stay_float(models):
    import onnx
    from onnx import numpy_helper
    quantized = onnx.load(quantize.int8_path(models['onnx']))
    assert quantize.int8_path(models['onnx']).endswith('tiny.int8.onnx')
    graph = quantized.graph
    producer = {output: node for node in graph.node for output in node.output}
    metadata = {entry.key: entry.value for entry in quantized.metadata_props}
    assert json.loads(metadata[export_onnx.METADATA_KEY])['num_classes'] == CLASSES  # the preprocessing kept
    record = json.loads(metadata[quantize.QUANTIZATION_KEY])
    assert (record['precision'], record['calibration_images']) == ('int8', 8)
    # the weights of the matrix products are stored as int8
    int8_weights = [t for t in graph.initializer if numpy_helper.to_array(t).dtype in (np.int8, np.uint8)
                    and len(t.dims) >= 2]
    assert len(int8_weights) >= 10
    dequantized = lambda name: name in producer and producer[name].op_type == 'DequantizeLinear'
    # softmax and LayerNorm read float tensors
    for node in graph.node:
        if node.op_type in ('Softmax', 'LayerNormalization'):
            assert not dequantized(node.input[0]), node.name
    # the first embedding reads the image and its own float weights
    first = [node for node in graph.node if node.op_type == 'Conv' and node.input[0] == graph.input[0].name]
    assert len(first) == 1 and not dequantized(first[0].input[1])
    assert record['kept_in_float'] == [first[0].name]


@needs_converter
@needs_quantizer
def test_int8_weights_in_the_file_compute_what_the_float_ones_before_quantize_linear_did(models):
    """store_weights_in_int8 only moves QuantizeLinear's arithmetic into the file."""
    import onnx
    from onnx import helper, numpy_helper
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype('float32')
    scale = np.array([0.01, 0.02, 0.03], dtype='float32')
    nodes = [helper.make_node('Constant', [], ['w'], value=numpy_helper.from_array(weight)),
             helper.make_node('QuantizeLinear', ['w', 's', 'z'], ['wq'], axis=1),
             helper.make_node('DequantizeLinear', ['wq', 's', 'z'], ['wd'], axis=1),
             helper.make_node('MatMul', ['x', 'wd'], ['y'])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(scale, 's'), numpy_helper.from_array(np.zeros(3, np.int8), 'z')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    import onnxruntime
    x = {'x': np.random.default_rng(1).standard_normal((2, 4)).astype('float32')}
    before = onnxruntime.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert quantize.store_weights_in_int8(model) == 1
    assert [node.op_type for node in model.graph.node] == ['DequantizeLinear', 'MatMul']
    after = onnxruntime.InferenceSession(model.SerializeToString()).run(None, x)[0]
    np.testing.assert_array_equal(after, before)


@needs_quantizer
@pytest.mark.parametrize('make, message', [
    (lambda root: str(root / 'absent'), 'absent: no such folder'),
    (lambda root: (root / 'empty' / 'n0').mkdir(parents=True) or str(root / 'empty'), 'no image files in'),
])
def test_a_missing_or_empty_calibration_folder_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    model = tmp_path / 'm.onnx'
    model.write_bytes(b'')
    with pytest.raises(SystemExit) as exit_info:
        quantize.main(['-model', str(model), '-calibration', make(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and message in err
    assert not os.path.exists(quantize.int8_path(str(model)))


# ------------------------------------------------------------------ each precision end to end

@pytest.mark.parametrize('asked', ['fp32', 'bf16', 'int8'])
@pytest.mark.parametrize('backend', ONNX_BACKENDS)
def test_each_precision_runs_where_the_cpu_has_it_natively(models, tmp_path, capsys, monkeypatch, backend, asked):
    if precision.unsupported(asked, backend):
        pytest.skip(f'{backend} has no {asked} on any CPU (an error, tested below)')
    stand_in_cpu(monkeypatch, NATIVE)
    # what the runtime itself offers on this machine decides the rest: bf16 runs on a CPU with it
    expected = asked if asked in precision.runtime_formats(backend) else 'fp32'
    out, err = run_infer(capsys, '-model', models['onnx'], '-backend', backend, '-precision', asked,
                         '-data_path', models['data'], '-batch_size', 8)
    assert err[0].startswith(f'precision {expected}' + (' |' if expected == asked else f' ({asked} asked: '))
    lines = out.splitlines()
    assert lines[0].startswith('top-1 ') and lines[0].endswith(f' | {2 * CLASSES} images')
    if expected == 'fp32':
        assert lines[1] == 'top-1 agreement with fp32: 1.0000 (this run is fp32)'
    else:
        assert lines[1].startswith('top-1 agreement with fp32: ') and f'of {2 * CLASSES} images' in lines[1]


@pytest.mark.parametrize('asked', ['bf16', 'int8'])
@pytest.mark.parametrize('backend', ONNX_BACKENDS)
def test_without_native_instructions_the_run_is_fp32_with_one_line(models, tmp_path, capsys, monkeypatch,
                                                                  backend, asked):
    if precision.unsupported(asked, backend):
        pytest.skip(f'{backend} has no {asked} on any CPU (an error, tested below)')
    stand_in_cpu(monkeypatch, AVX2_ONLY)
    images = str(tmp_path / 'images')
    write_images(images, 3)
    fp32_out, _ = run_infer(capsys, '-model', models['onnx'], '-backend', backend, images)
    out, err = run_infer(capsys, '-model', models['onnx'], '-backend', backend, '-precision', asked, images)
    assert err[0].startswith(f'precision fp32 ({asked} asked: this CPU has no native {asked}: no ')
    assert parse_top_k(out) == parse_top_k(fp32_out)  # the fp32 model, computed as without -precision


@needs_converter
@needs_quantizer
def test_forced_int8_is_the_quantised_model_and_is_compared_with_fp32(models, capsys, monkeypatch):
    stand_in_cpu(monkeypatch, AVX2_ONLY)
    out, err = run_infer(capsys, '-model', models['onnx'], '-backend', 'onnxruntime', '-precision', 'int8',
                         '-force_precision', '-data_path', models['data'])
    assert err[0].startswith('precision int8 | ONNX Runtime ')
    logits, labels = val_logits(models)
    agreement = out.splitlines()[1]
    assert f'the fp32 model alongside: top-1 {np.mean(logits.argmax(1) == labels):.4f})' in agreement


def test_the_accuracy_printed_is_the_models_on_the_val_folder(models, capsys):
    """-data_path on the Paddle Inference export (any Paddle version): top-1 and top-5 as
    computed from the Paddle model's own logits."""
    out, err = run_infer(capsys, '-model', models['exported'], '-data_path', models['data'], '-batch_size', 3)
    logits, labels = val_logits(models)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert err[0].startswith('precision fp32 | Paddle Inference ')
    assert out.splitlines()[0] == (f'top-1 {np.mean(logits.argmax(1) == labels):.4f} | '
                                   f'top-5 {np.mean((top5 == labels[:, None]).any(1)):.4f} | {2 * CLASSES} images')


@pytest.mark.parametrize('flags', [AVX2_ONLY, NATIVE])
def test_paddle_inference_bf16_runs_where_paddle_has_it_else_fp32(models, tmp_path, capsys, monkeypatch, flags):
    stand_in_cpu(monkeypatch, flags)
    images = str(tmp_path / 'images')
    write_images(images, 2)
    expected = 'bf16' if flags == NATIVE and 'bf16' in precision.runtime_formats('paddle') else 'fp32'
    fp32_out, _ = run_infer(capsys, '-model', models['exported'], '-device', 'cpu', images)
    out, err = run_infer(capsys, '-model', models['exported'], '-device', 'cpu', '-precision', 'bf16', images)
    assert err[0].startswith(f'precision {expected}' + (' |' if expected == 'bf16' else ' (bf16 asked: '))
    got, want = parse_top_k(out), parse_top_k(fp32_out)
    assert list(got) == list(want)
    if expected == 'fp32':
        assert got == want


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize('argv, message', [
    (['-precision', 'fp16'], '-precision fp16: on a GPU only TensorRT has another format than fp32'),
    (['-precision', 'bf16', '-device', 'cpu', '-tensorrt'], '-tensorrt needs -device gpu'),
    (['-precision', 'int8'], '-precision int8 -backend paddle: Paddle Inference runs int8 only from'),
    (['-precision', 'bf16', '-disable_onednn'], "runs oneDNN's kernels: drop -disable_onednn"),
    (['-data_path', '{tmp}/nothing'], 'split folder not found'),
    (['-data_path', '{data}', '{images}'], 'give images to classify, or -data_path'),
])
def test_bad_input_to_the_paddle_export_is_one_line_and_exit_2(models, tmp_path, capsys, argv, message):
    images = str(tmp_path / 'images')
    write_images(images, 1)
    argv = [a.format(tmp=tmp_path, data=models['data'], images=images) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', models['exported'], '-device', 'cpu', *argv, *([] if '-data_path' in argv else [images])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err.strip().splitlines()[-1]
    assert not err.startswith('precision ')  # stopped before any work


def test_a_val_folder_with_other_classes_than_the_model_is_one_line(models, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(models['data'], 'val', 'n00000000'), data / 'val' / 'n00000000')
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', models['exported'], '-device', 'cpu', '-data_path', str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1] == f'error: {data}: 1 classes, but the model has {CLASSES}'


@needs_converter
@needs_quantizer
@pytest.mark.parametrize('argv, message', [
    (['-backend', 'onnxruntime', '-precision', 'bf16'], 'ONNX Runtime has no bfloat16 kernels for x86 CPUs'),
    (['-precision', 'int8', '-model', '{int8}'], 'give the exported float32 model'),
    (['-precision', 'int8', '-model', '{bare}'],
     'bare.int8.onnx: no such file; write it with python tools/quantize.py'),
])
def test_bad_input_to_the_onnx_export_is_one_line_and_exit_2(models, tmp_path, capsys, argv, message):
    bare = tmp_path / 'bare.onnx'
    shutil.copy(models['onnx'], bare)
    argv = [a.format(int8=quantize.int8_path(models['onnx']), bare=bare) for a in argv]
    image = write_images(str(tmp_path / 'images'), 1)[0]
    model = [] if '-model' in argv else ['-model', models['onnx']]
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*model, *argv, image])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and message in err


# ------------------------------------------------------------------ the speed comparison

def test_the_bf16_comparison_says_it_cannot_be_made_without_native_bf16(monkeypatch):
    stand_in_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setattr(benchmark_compare, 'cpu_info', runtime.cpu_info)
    monkeypatch.setattr('sys.argv', ['compare_with_pytorch.py', '-precision', 'bf16'])
    monkeypatch.setattr(benchmark_compare, 'throughput', lambda *a: pytest.fail('nothing may run'))
    with pytest.raises(SystemExit) as exit_info:
        benchmark_compare.main()
    assert str(exit_info.value).startswith('the bf16 comparison cannot be made on this CPU (')
    assert 'no native bfloat16 (AVX512_BF16 or AMX-BF16)' in str(exit_info.value)


def test_the_bf16_comparison_alternates_ours_in_bf16_and_int8_with_pytorch_autocast(monkeypatch, capsys):
    stand_in_cpu(monkeypatch, NATIVE)
    monkeypatch.setattr(benchmark_compare, 'cpu_info', runtime.cpu_info)
    monkeypatch.setattr('sys.argv', ['compare_with_pytorch.py', '-precision', 'bf16', '-threads', '1', '-rounds', '2'])
    runs = []
    rates = {'bf16': 40.0, 'int8': 60.0, 'torch': 16.0}

    def throughput(command, env, asked=''):
        side = asked or 'torch'
        runs.append((os.path.basename(command[1]), side, command[command.index('-precision') + 1]))
        return rates[side]
    monkeypatch.setattr(benchmark_compare, 'throughput', throughput)
    benchmark_compare.main()
    assert runs == [('benchmark.py', 'bf16', 'bf16'), ('benchmark.py', 'int8', 'int8'),
                    ('pytorch_cvt.py', 'torch', 'bf16')] * 2
    assert capsys.readouterr().out.splitlines()[-1].split() == ['1', '40.00', '60.00', '16.00', '2.50x', '1.50x']
