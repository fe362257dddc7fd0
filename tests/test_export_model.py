"""tools/export_model.py + tools/infer.py: the exported model computes the dynamic
model's logits, and infer prints what predict prints, without the config."""

import json
import os

import numpy as np
import paddle
import pytest

from config import get_config
from test_predict import assert_same_top_k, parse_top_k, write_images, write_tiny_model
from tools import export_model, infer, predict


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny CvT with seeded weights, exported with the tool: (folder, model, cfg, weights)."""
    folder = tmp_path_factory.mktemp('export')
    cfg, weights, model = write_tiny_model(str(folder))
    assert export_model.main(['-cfg', cfg, '-pretrained', weights, '-output', str(folder / 'model')]) == 0
    return str(folder / 'model'), model, cfg, weights


@pytest.mark.parametrize('onednn', [True, False], ids=['onednn', 'plain-cpu'])
@pytest.mark.parametrize('batch', [1, 8])
def test_exported_logits_equal_the_dynamic_model(exported, onednn, batch):
    model_dir, model, _, _ = exported
    with open(os.path.join(model_dir, export_model.PREPROCESS_FILE)) as infile:
        preprocess = json.load(infile)
    predictor = infer.create_predictor(model_dir, preprocess, 'cpu', onednn=onednn)
    images = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype('float32')

    logits = infer.logits_function(predictor)(images)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(images)).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_export_writes_the_val_preprocessing_of_the_config(exported):
    model_dir, _, cfg, _ = exported
    config = get_config(cfg)
    with open(os.path.join(model_dir, export_model.PREPROCESS_FILE)) as infile:
        preprocess = json.load(infile)
    assert (preprocess['image_size'], preprocess['crop_pct'], preprocess['interpolation']) == (
        64, config.DATA.CROP_PCT, config.DATA.INTERPOLATION)
    assert preprocess['mean'] == list(config.DATA.IMAGENET_MEAN)
    assert preprocess['std'] == list(config.DATA.IMAGENET_STD)
    assert preprocess['num_classes'] == 10
    assert os.path.isfile(os.path.join(model_dir, 'inference.pdiparams'))
    assert export_model.program_file(model_dir).endswith(('.json', '.pdmodel'))


def test_infer_prints_the_same_top_k_as_predict(exported, tmp_path, capsys):
    model_dir, _, cfg, weights = exported
    paths = write_images(str(tmp_path / 'images'), 3)

    assert predict.main(['-cfg', cfg, '-pretrained', weights, str(tmp_path / 'images'), '-topk', '4']) == 0
    from_predict = parse_top_k(capsys.readouterr().out)
    assert infer.main(['-model_dir', model_dir, str(tmp_path / 'images'), '-topk', '4',
                       '-batch_size', '2', '-device', 'cpu']) == 0
    from_infer = parse_top_k(capsys.readouterr().out)

    assert_same_top_k(from_infer, from_predict, paths)


def test_infer_without_an_exported_model_exits_2(tmp_path, capsys):
    image = write_images(str(tmp_path), 1)[0]
    with pytest.raises(SystemExit) as exit_info:
        infer.main(['-model_dir', str(tmp_path), image])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and 'no inference.json or inference.pdmodel' in err
