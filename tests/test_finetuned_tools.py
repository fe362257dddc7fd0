"""The tools on a model fine-tuned to another class count and image size: 7 classes at
96 px, from the tiny 10-class 64 px config. predict and visualize_attention take
both from the config's overrides (-num_classes, -image_size), infer from the
export; without a names file the classes are printed as indices."""

import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from config import get_config
from cvt import build_cvt
from test_export_onnx import ONNX_BACKENDS
from test_predict import expected_top_k, parse_top_k, write_images, write_tiny_model
from tools import export_model, export_onnx, infer, predict
from tools import visualize_attention as va

CLASSES, SIZE = 7, 96
OVERRIDES = ['-num_classes', str(CLASSES), '-image_size', str(SIZE)]


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
    """(base cfg, weights, model, its config, images): seeded weights of the base
    config's architecture with a 7-class head, for 96 px images."""
    folder = tmp_path_factory.mktemp('finetuned')
    cfg, _, _ = write_tiny_model(str(folder))
    config = get_config(cfg)
    config.defrost()
    config.MODEL.NUM_CLASSES, config.DATA.IMAGE_SIZE = CLASSES, SIZE
    paddle.seed(2)
    model = build_cvt(config)
    model.eval()
    weights = str(folder / 'finetuned.pdparams')
    paddle.save(model.state_dict(), weights)
    images = write_images(str(folder / 'images'), 3)
    return cfg, weights, model, config, images


def check_printed(printed: dict, expected: dict) -> None:
    assert list(printed) == list(expected)
    for path, classes in expected.items():
        assert [i for i, _, _ in printed[path]] == [i for i, _ in classes]
        assert all(name is None for _, _, name in printed[path])  # indices, no names
        np.testing.assert_allclose([p for _, p, _ in printed[path]], [p for _, p in classes], atol=1.1e-4)


def test_predict_reads_classes_and_size_from_the_overrides(finetuned, capsys):
    cfg, weights, model, config, images = finetuned
    assert predict.main(['-cfg', cfg, '-pretrained', weights, *images, '-topk', str(CLASSES), *OVERRIDES]) == 0
    check_printed(parse_top_k(capsys.readouterr().out), expected_top_k(model, config, images, CLASSES))


def test_predict_without_the_overrides_names_the_head_that_does_not_fit(finetuned, capsys):
    cfg, weights, _, _, images = finetuned
    with pytest.raises(SystemExit) as exit_info:
        predict.main(['-cfg', cfg, '-pretrained', weights, images[0]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and 'does not fit MODEL.NUM_CLASSES = 10' in err


@pytest.mark.parametrize('backend', ['paddle', *ONNX_BACKENDS])
def test_infer_reads_classes_and_size_from_the_export(finetuned, tmp_path, capsys, backend):
    cfg, weights, model, config, images = finetuned
    if backend == 'paddle':
        exported = str(tmp_path / 'model')
        assert export_model.main(['-cfg', cfg, '-pretrained', weights, '-output', exported, *OVERRIDES]) == 0
        with open(os.path.join(exported, export_model.PREPROCESS_FILE)) as infile:
            stored = json.load(infile)
        assert (stored['num_classes'], stored['image_size']) == (CLASSES, SIZE)
    else:
        exported = str(tmp_path / 'model.onnx')
        assert export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', exported, *OVERRIDES]) == 0
    capsys.readouterr()

    assert infer.main(['-model', exported, *images, '-topk', str(CLASSES), '-backend', backend]
                      + (['-device', 'cpu'] if backend == 'paddle' else [])) == 0
    check_printed(parse_top_k(capsys.readouterr().out), expected_top_k(model, config, images, CLASSES))

    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model', exported, images[0], '-topk', str(CLASSES + 1)])
    assert exit_info.value.code == 2
    assert f'-topk {CLASSES + 1} must be between 1 and the number of classes, {CLASSES}' in capsys.readouterr().err


@pytest.mark.parametrize('backend', ONNX_BACKENDS)
def test_infer_reads_classes_and_size_from_an_onnx_graph_without_metadata(finetuned, tmp_path, capsys, backend):
    import onnx
    cfg, weights, model, config, images = finetuned
    exported = str(tmp_path / 'model.onnx')
    assert export_onnx.main(['-cfg', cfg, '-pretrained', weights, '-output', exported, *OVERRIDES]) == 0
    graph = onnx.load(exported)
    del graph.metadata_props[:]
    # a fixed batch, as exporters other than ours often write
    for value in list(graph.graph.input) + list(graph.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(graph, exported)
    capsys.readouterr()

    # batches of 3 run one by one
    assert infer.main(['-model', exported, *images, '-topk', '3', '-backend', backend]) == 0
    out, err = capsys.readouterr()
    check_printed(parse_top_k(out), expected_top_k(model, config, images, 3))  # the default preprocessing
    assert f'{SIZE}px input and {CLASSES} classes from the graph' in err


def test_visualize_attention_reads_classes_and_size_from_the_overrides(finetuned, tmp_path, capsys):
    cfg, weights, _, _, images = finetuned
    output = str(tmp_path / 'attention.png')
    assert va.main(['-cfg', cfg, '-pretrained', weights, '-image', images[0], '-output', output,
                    '-stage', '3', *OVERRIDES]) == 0
    with Image.open(output) as written:
        # as for the 64 px model: a 224 px panel (the crop enlarged), input + mean + 3 heads in 2 rows
        assert written.size == (4 * 224 + 5 * 8, 8 + 8 * 18 + 2 * (8 + 224 + 20) + 8)
