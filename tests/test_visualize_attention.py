"""tools/visualize_attention.py: the maps are the model's attention distributions on
the expected grids (CvT-13 at 224), the figure is written at the expected size,
and the image under the maps is the val crop the model saw."""

import os

import numpy as np
import paddle
import pytest
from PIL import Image

from config import get_config
from cvt import build_cvt, record_attention
from datasets import get_val_transforms
from test_predict import write_images, write_tiny_model
from tools import visualize_attention as va

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CvT-13 at 224: tokens 56x56, 28x28, 14x14 (+ cls); keys from the stride-2 projection
CVT13_GRIDS = {0: (56, 28, False), 1: (28, 14, False), 2: (14, 7, True)}
CVT13_HEADS = (1, 3, 6)


@pytest.fixture(scope='module')
def cvt13_attention():
    """Attention of every block of a (seeded, untrained) CvT-13 for one 224 val crop."""
    paddle.seed(0)
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    model = build_cvt(config)
    model.eval()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    with record_attention(model) as records, paddle.no_grad():
        model(paddle.to_tensor(get_val_transforms(config)(image)[None]))
    return {(i, j): w.numpy()[0] for i, j, w in records}


def test_cvt13_attention_rows_are_distributions_on_the_expected_grids(cvt13_attention):
    assert len(cvt13_attention) == 1 + 2 + 10
    for (stage, _), weights in cvt13_attention.items():
        tokens, keys, has_cls = CVT13_GRIDS[stage]
        assert weights.shape == (CVT13_HEADS[stage], tokens ** 2 + has_cls, keys ** 2 + has_cls)
        assert weights.min() >= 0
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)


def test_stage3_cls_maps_are_7x7_and_with_the_cls_key_sum_to_1(cvt13_attention):
    weights = cvt13_attention[(2, 9)]
    query, cell = va.query_index(weights.shape[1], True, None, 224)
    maps, cls_weight = va.attention_maps(weights, query, True)
    assert (query, cell) == (0, None)
    assert maps.shape == (6, 7, 7) and cls_weight.shape == (6,)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)) + cls_weight, 1.0, atol=1e-5)
    np.testing.assert_array_equal(maps.reshape(6, -1), weights[:, 0, 1:])


@pytest.mark.parametrize('point, row, col', [((0, 0), 0, 0), ((223, 223), 55, 55), ((100, 50), 12, 25)])
def test_stage1_point_selects_the_token_under_it(cvt13_attention, point, row, col):
    weights = cvt13_attention[(0, 0)]
    query, cell = va.query_index(weights.shape[1], False, point, 224)
    maps, cls_weight = va.attention_maps(weights, query, False)
    assert cell == (row, col) and query == row * 56 + col
    assert maps.shape == (1, 28, 28) and cls_weight is None
    np.testing.assert_allclose(maps.sum(), 1.0, atol=1e-5)


def test_stage3_point_query_skips_the_cls_row(cvt13_attention):
    weights = cvt13_attention[(2, 9)]
    query, cell = va.query_index(weights.shape[1], True, (223, 0), 224)
    assert cell == (0, 13) and query == 1 + 13


def test_image_under_the_maps_is_the_val_crop_the_model_saw(tmp_path):
    config = get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml'))
    image = Image.open(write_images(str(tmp_path), 1)[0]).convert('RGB')
    transform = get_val_transforms(config)
    resize_and_crop = type(transform)(transform.transforms[:-1])  # the same steps without normalising
    shown = va.display_image(transform(image), config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)
    np.testing.assert_array_equal(shown, np.asarray(resize_and_crop(image)))


# panels are 224 (the tiny config's 64 px crop enlarged); 8 px margins, 20 px labels;
# header: 2 lines of what is shown + 'top-5' + 5 classes, 18 px each
@pytest.mark.parametrize('stage, columns, rows', [
    ('3', 4, 2),  # input, mean, 3 heads
    ('2', 4, 1),  # input, mean, 2 heads
    ('1', 2, 1),  # input, the one head's map
])
def test_png_is_written_with_the_expected_size(tmp_path, capsys, stage, columns, rows):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    image = write_images(str(tmp_path), 1)[0]
    output = str(tmp_path / 'attention.png')

    assert va.main(['-cfg', cfg, '-pretrained', weights, '-image', image, '-output', output,
                    '-stage', stage, '-point', '10,50']) == 0
    with Image.open(output) as written:
        assert written.format == 'PNG'
        assert written.size == (columns * 224 + (columns + 1) * 8,
                                8 + 8 * 18 + rows * (8 + 224 + 20) + 8)


@pytest.mark.parametrize('flag, value, message', [
    ('-stage', '4', '-stage 4: the model has stages 1..3'),
    ('-block', '2', '-block 2: stage 3 has blocks 1..1'),
    ('-point', '64,3', '-point 64,3 is outside the 64x64 cropped image'),
    ('-output', 'no/such/folder/a.png', 'does not exist'),
])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys, monkeypatch, flag, value, message):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    image = write_images(str(tmp_path), 1)[0]
    monkeypatch.chdir(tmp_path)
    args = {'-cfg': cfg, '-pretrained': weights, '-image': image, '-output': 'a.png', flag: value}

    with pytest.raises(SystemExit) as exit_info:
        va.main([v for kv in args.items() for v in kv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and message in err
    assert not (tmp_path / 'a.png').exists()
