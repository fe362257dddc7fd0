"""tools/export_onnx.py + tools/infer.py on OpenVINO and ONNX Runtime: the ONNX model
computes the Paddle model's logits at any batch size, and infer prints what predict prints."""

import importlib.util
import os
import sys

import numpy as np
import paddle
import pytest

from test_predict import assert_same_top_k, parse_top_k, write_images, write_tiny_model
from tools import export_onnx, infer, predict
from tools.export_onnx import first_sentence


def converter_missing() -> str:
    """Why the conversion cannot run here, or '' (paddle2onnx 2.x refuses Paddle < 3 at import)."""
    try:
        import onnxruntime  # noqa: F401
        import paddle2onnx  # noqa: F401
    except (ImportError, ValueError) as err:
        return f'paddle2onnx 2.x (Paddle >= 3) and onnxruntime needed: {first_sentence(err)}'
    return ''


def openvino_missing() -> str:
    """Why the exported model cannot run in OpenVINO here, or ''."""
    try:
        import openvino  # noqa: F401
    except ImportError as err:
        return f'openvino needed: {err}'
    return converter_missing()


needs_converter = pytest.mark.skipif(bool(converter_missing()), reason=converter_missing() or 'installed')
needs_openvino = pytest.mark.skipif(bool(openvino_missing()), reason=openvino_missing() or 'installed')
# tools/infer.py's runtimes of a .onnx file
ONNX_BACKENDS = [pytest.param('onnxruntime', marks=needs_converter), pytest.param('openvino', marks=needs_openvino)]


@pytest.fixture(scope='module')
def onnx_model(tmp_path_factory):
    """A tiny CvT with seeded weights, exported with the tool: (onnx file, model, cfg, weights)."""
    folder = tmp_path_factory.mktemp('onnx')
    cfg, weights, model = write_tiny_model(str(folder))
    output = str(folder / 'tiny.onnx')
    assert export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', output]) == 0
    return output, model, cfg, weights


@pytest.mark.parametrize('backend', ONNX_BACKENDS)
@pytest.mark.parametrize('batch', [1, 8])
def test_onnx_logits_equal_the_paddle_model(onnx_model, backend, batch):
    path, model, _, _ = onnx_model
    preprocess, logits_of = infer.create_runner(path, backend)
    images = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype('float32')

    logits = logits_of(images)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(images)).numpy()  # fast paths on: the model as trained
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    assert (preprocess['num_classes'], preprocess['image_size']) == (10, 64)


@needs_openvino
def test_openvino_compiles_a_bounded_number_of_models_for_any_batch_sizes(onnx_model, monkeypatch):
    import openvino
    path, model, _, _ = onnx_model
    compiled = []
    compile_model = openvino.Core.compile_model
    monkeypatch.setattr(openvino.Core, 'compile_model',
                        lambda core, *args, **kwargs: compiled.append(1) or compile_model(core, *args, **kwargs))
    _, logits_of = infer.create_runner(path, 'openvino')
    for batch in (4, 1, 3, 2, 5, 3, 4):
        images = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype('float32')
        with paddle.no_grad():
            expected = model(paddle.to_tensor(images)).numpy()
        np.testing.assert_allclose(logits_of(images), expected, rtol=0, atol=1e-4)
    # batches 4 and 1 each a static model, 3, 2 and 5 share the dynamic one
    assert len(compiled) == infer.STATIC_SHAPES + 1 == 3


@needs_converter
def test_onnx_model_has_a_named_dynamic_batch_axis(onnx_model):
    path = onnx_model[0]
    session = export_onnx.onnx_session(path)
    assert session.get_inputs()[0].shape == ['batch', 3, 64, 64]
    assert session.get_outputs()[0].shape == ['batch', 10]
    assert not os.path.exists(path + '.partial')


@pytest.mark.parametrize('backend', ONNX_BACKENDS)
def test_infer_prints_the_same_top_k_as_predict(onnx_model, tmp_path, capsys, backend):
    path, _, cfg, weights = onnx_model
    paths = write_images(str(tmp_path / 'images'), 3)

    assert predict.main(['-cfg', cfg, '-pretrained', weights, str(tmp_path / 'images'), '-topk', '4']) == 0
    from_predict = parse_top_k(capsys.readouterr().out)
    assert infer.main(['-model', path, '-backend', backend, str(tmp_path / 'images'), '-topk', '4',
                       '-batch_size', '2']) == 0
    from_infer = parse_top_k(capsys.readouterr().out)

    assert_same_top_k(from_infer, from_predict, paths)


@needs_converter
def test_a_model_whose_onnx_logits_differ_is_not_written(tmp_path, monkeypatch, capsys):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    output = tmp_path / 'tiny.onnx'
    monkeypatch.setattr(export_onnx, 'MAX_LOGIT_DIFFERENCE', -1.0)  # no conversion is that exact
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', str(output)])
    assert exit_info.value.code == 1
    assert 'not written' in capsys.readouterr().err
    assert list(tmp_path.glob('tiny.onnx*')) == []


def test_without_the_converter_export_exits_2_with_the_install_hint(tmp_path, monkeypatch, capsys):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    monkeypatch.setitem(sys.modules, 'paddle2onnx', None)  # import fails as when not installed
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'tiny.onnx')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and 'pip install -r requirements-deploy.txt' in err
    assert not (tmp_path / 'tiny.onnx').exists()


@pytest.mark.parametrize('change, message', [
    # the weights are read after the converter is found (a name may fetch them): these need it
    pytest.param(lambda a: a.__setitem__(3, 'missing.pdparams'), 'missing.pdparams', marks=needs_converter),
    pytest.param(lambda a: a.extend(['-num_classes', '7']), 'does not fit MODEL.NUM_CLASSES = 7',
                 marks=needs_converter),
    (lambda a: a.__setitem__(5, '/no/such/folder/m.onnx'), 'its folder does not exist'),
])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys, change, message):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    argv = ['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'tiny.onnx')]
    change(argv)
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and message in err


@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino', None])
def test_infer_without_the_file_exits_2(tmp_path, capsys, backend):
    image = write_images(str(tmp_path), 1)[0]
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', str(tmp_path / 'none.onnx'), *(['-backend', backend] if backend else []), image])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and 'none.onnx: no such file' in err


@pytest.mark.parametrize('backend, runtime_name', [pytest.param('onnxruntime', 'ONNX Runtime', marks=needs_converter),
                                                   pytest.param('openvino', 'OpenVINO', marks=needs_openvino)])
def test_infer_of_a_file_that_is_not_onnx_exits_2_naming_it(tmp_path, capsys, backend, runtime_name):
    image = write_images(str(tmp_path), 1)[0]
    broken = tmp_path / 'broken.onnx'
    broken.write_bytes(b'not a model')
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', str(broken), '-backend', backend, image])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and f'broken.onnx: {runtime_name} cannot load it' in err


def test_a_onnx_file_runs_in_openvino_where_installed_else_onnx_runtime(tmp_path, monkeypatch):
    model = tmp_path / 'model.onnx'
    model.write_bytes(b'')
    installed = importlib.util.find_spec('openvino') is not None
    assert infer.backend_of(str(model)) == ('openvino' if installed else 'onnxruntime')
    assert infer.backend_of(str(tmp_path)) == 'paddle'  # an export folder
    monkeypatch.setitem(sys.modules, 'openvino', None)  # import fails as when not installed
    assert infer.backend_of(str(model)) == 'onnxruntime'


@needs_converter
def test_infer_with_openvino_not_installed_exits_2_with_the_install_hint(onnx_model, tmp_path, monkeypatch, capsys):
    image = write_images(str(tmp_path), 1)[0]
    monkeypatch.setitem(sys.modules, 'openvino', None)
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', onnx_model[0], '-backend', 'openvino', image])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and 'OpenVINO is not installed' in err and 'requirements-deploy.txt' in err


@needs_converter
def test_infer_without_openvino_runs_onnx_runtime_and_says_so(onnx_model, tmp_path, monkeypatch, capsys):
    image = write_images(str(tmp_path), 1)[0]
    monkeypatch.setitem(sys.modules, 'openvino', None)
    assert infer.main(['-model', onnx_model[0], image, '-topk', '2']) == 0
    captured = capsys.readouterr()
    assert 'running in ONNX Runtime; OpenVINO' in captured.err and 'requirements-deploy.txt' in captured.err
    assert len(parse_top_k(captured.out)) == 1
