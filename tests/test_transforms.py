"""Transforms: val preprocessing against PIL, RandAugment policy and ops, erasing, crops."""

import math
import re

import numpy as np
import paddle
import pytest
from PIL import Image

import transforms as T
from config import get_config

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def config_with(**train):
    config = get_config('configs/recipe-imagenet1k.yaml')
    config.defrost()
    config.DATA.IMAGE_SIZE = 64
    for key, value in train.items():
        config.TRAIN[key] = value
    return config


@pytest.mark.parametrize('size', [(150, 100), (90, 200), (73, 73)])
def test_val_transform_matches_pil_resize_then_centre_crop(size):
    config = config_with()
    image = smooth_image(*size)
    short = int(64 / config.DATA.CROP_PCT)
    width, height = size
    scale = short / min(width, height)
    resized = image.resize((short, int(height * scale)) if width <= height else (int(width * scale), short),
                           Image.BICUBIC)
    left = int(round((resized.width - 64) / 2))
    top = int(round((resized.height - 64) / 2))
    pixels = np.asarray(resized, dtype=np.float64)[top:top + 64, left:left + 64] / 255
    expected = ((pixels - MEAN) / STD).transpose(2, 0, 1)

    out = T.build_val_transforms(config)(image)

    assert out.dtype == np.float32 and out.shape == (3, 64, 64)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_to_normalized_array_is_scaled_and_normalised_chw():
    image = smooth_image(7, 5)
    out = T.ToNormalizedArray(MEAN, STD)(image)
    expected = ((np.asarray(image) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_increasing_policy_uses_timms_increasing_op_set():
    expected = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
                'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
    assert T.RandAugment('rand-m9-mstd0.5-inc1').op_names == expected
    assert 'Posterize' in T.RandAugment('rand-m9').op_names


def test_recipe_policy_string_is_parsed():
    params = T.parse_rand_augment('rand-m9-mstd0.5-inc1')
    assert params == {'m': 9.0, 'mstd': 0.5, 'inc': 1, 'n': 2, 'p': 0.5, 'mmax': 10.0}
    assert T.parse_rand_augment('rand-n3-m5-mstdinf-p1')['mstd'] == float('inf')


@pytest.mark.parametrize('policy', ['rnd-m9', 'rand-m9-foo1', 'rand-mx', 'rand-m9-m8', 'rand-m11',
                                    'rand-inc2', 'rand-n0', 'rand-m9--inc1', 'rand-mstd-1'])
def test_malformed_policy_is_an_error_naming_it(policy):
    with pytest.raises(ValueError, match=policy):
        T.RandAugment(policy)


def test_magnitude_noise_has_the_policy_mean_and_std_and_stays_in_range():
    rng = np.random.default_rng(0)
    noisy = np.array([T.RandAugment('rand-m9-mstd0.5').sample_magnitude(rng) for _ in range(4000)])
    assert abs(noisy.mean() - 9.0) < 0.05 and abs(noisy.std() - 0.5) < 0.05
    assert noisy.max() <= 10.0
    assert {T.RandAugment('rand-m9').sample_magnitude(rng) for _ in range(50)} == {9.0}
    uniform = np.array([T.RandAugment('rand-m6-mstdinf').sample_magnitude(rng) for _ in range(4000)])
    assert uniform.min() >= 0 and uniform.max() <= 6 and abs(uniform.mean() - 3) < 0.15
    clipped = [T.RandAugment('rand-m10-mstd100').sample_magnitude(rng) for _ in range(200)]
    assert min(clipped) == 0.0 and max(clipped) == 10.0


def test_op_arguments_at_given_magnitudes():
    rng = np.random.default_rng(0)

    def arg(name, level):
        return T.RAND_OPS[name][1](level, rng)

    assert abs(arg('Rotate', 10)) == 30.0
    assert abs(arg('ShearX', 10)) == pytest.approx(0.3)
    assert abs(arg('TranslateYRel', 5)) == pytest.approx(0.225)
    assert arg('PosterizeIncreasing', 9) == 1 and arg('PosterizeIncreasing', 0) == 4
    assert arg('SolarizeIncreasing', 0) == 256 and arg('SolarizeIncreasing', 10) == 0
    assert arg('SolarizeAdd', 10) == 110
    assert arg('ColorIncreasing', 0) == 1.0 and arg('Brightness', 10) == pytest.approx(1.9)
    assert {round(abs(arg('ContrastIncreasing', 10) - 1), 6) for _ in range(20)} == {0.9}
    signs = {np.sign(arg('Rotate', 5)) for _ in range(50)}
    assert signs == {-1.0, 1.0}


def test_translate_moves_by_the_image_fraction_and_fills_with_fill_colour():
    image = smooth_image(40, 20)
    apply = T.RAND_OPS['TranslateXRel'][0]
    moved = np.asarray(apply(image, 0.25, fill=(1, 2, 3), resample=Image.NEAREST))
    np.testing.assert_array_equal(moved[:, :30], np.asarray(image)[:, 10:])
    assert (moved[:, 30:] == (1, 2, 3)).all()


def test_solarize_add_raises_only_dark_levels():
    image = Image.fromarray(np.array([[[10, 127, 128]]], dtype=np.uint8))
    out = np.asarray(T.RAND_OPS['SolarizeAdd'][0](image, 110))
    assert out.tolist() == [[[120, 237, 128]]]


@pytest.mark.parametrize('bits, expected', [(0, [0, 0, 0]), (1, [0, 128, 128]), (4, [0, 192, 240]), (8, [5, 200, 250])])
def test_posterize_keeps_the_top_bits_down_to_zero(bits, expected):
    image = Image.fromarray(np.array([[[5, 200, 250]]], dtype=np.uint8))
    assert np.asarray(T.RAND_OPS['PosterizeIncreasing'][0](image, bits)).tolist() == [[expected]]


def test_every_op_runs_at_the_extreme_magnitudes():
    image = smooth_image(20, 16)
    rng = np.random.default_rng(0)
    for name, (apply, level_to_arg) in T.RAND_OPS.items():
        for level in (0.0, 10.0):
            argument = level_to_arg(level, rng) if level_to_arg else None
            out = apply(image, argument, fill=(1, 2, 3), resample=Image.BICUBIC)
            assert out.size == image.size and out.mode == 'RGB', name


def test_rand_augment_with_zero_op_probability_leaves_image_unchanged():
    image = smooth_image(32, 32)
    out = T.RandAugment('rand-m9-p0-n4')(image, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_random_erasing_statistics():
    """Rectangles drawn per image (in the workers), filled with noise in the batch (on the device)."""
    erase = T.RandomErasing(prob=0.25, mode='pixel', count=1)
    rng = np.random.default_rng(0)
    trials = 2000
    boxes = np.stack([erase(np.zeros((3, 40, 40), dtype=np.uint8), rng)[1] for _ in range(trials)])
    out = erase.apply(paddle.zeros([trials, 3, 40, 40]), paddle.to_tensor(boxes)).numpy()
    erased_fraction, noise = [], []
    for image in out:
        mask = image != 0
        if mask.any():
            rows, cols = np.nonzero(mask.any(axis=0))
            box = mask[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all(), 'the erased region is one rectangle across all channels'
            erased_fraction.append(mask[0].mean())
            noise.append(image[mask])
    assert abs(len(erased_fraction) / trials - 0.25) < 0.03
    assert min(erased_fraction) >= 0.015 and max(erased_fraction) <= 1 / 3 + 0.03
    values = np.concatenate(noise)
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02


@pytest.mark.parametrize('mode', ['rand', 'const'])
def test_random_erasing_modes_fill_a_value_per_channel_or_zeros(mode):
    erase = T.RandomErasing(prob=1.0, mode=mode, count=2)
    rng = np.random.default_rng(1)
    boxes = np.stack([erase(np.zeros((3, 30, 30), dtype=np.uint8), rng)[1] for _ in range(20)])
    assert boxes.shape == (20, 2, 4) and (boxes[:, :, 2:] > 0).all()
    out = erase.apply(paddle.full([20, 3, 30, 30], 5.0), paddle.to_tensor(boxes)).numpy()
    for image, (first, second) in zip(out, boxes):
        top, left, height, width = second  # drawn last, it shows where the two overlap
        patch = image[:, top:top + height, left:left + width]
        assert (patch == patch[:, :1, :1]).all() and (patch != 5.0).all()
        if mode == 'const':
            assert (patch == 0).all()


def test_the_device_normalises_as_the_host_does():
    config = config_with()
    image = smooth_image(40, 30)
    val_host = T.build_val_transforms(config)(image)
    val_device = T.build_val_transforms(config, on_device=True)(image)
    assert val_device.dtype == np.uint8
    finished = T.DeviceFinish(config, training=False)(paddle.to_tensor(val_device[None]),
                                                      paddle.to_tensor(np.zeros((1, 1, 4), np.int32)))
    np.testing.assert_allclose(finished.numpy()[0], val_host, atol=1e-6)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    crop = T.RandomResizedCrop(32)
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, width, height = crop.crop_box(500, 375, rng)
        assert 0 <= left and left + width <= 500 and 0 <= top and top + height <= 375
        assert 0.08 - 0.01 <= width * height / (500 * 375) <= 1.0
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
    # no random box fits a 1000 x 10 strip: the fallback is the widest centred 4:3 box
    assert crop.crop_box(1000, 10, rng) == (493, 0, 13, 10)


def test_train_transform_is_reproducible_per_generator():
    image = smooth_image(120, 90)
    transform = T.build_train_transforms(config_with())
    first, first_boxes = transform(image, np.random.default_rng(7))
    again, again_boxes = transform(image, np.random.default_rng(7))
    other, _ = transform(image, np.random.default_rng(8))
    assert first.shape == (3, 64, 64) and first.dtype == np.uint8 and first_boxes.shape == (1, 4)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_boxes, again_boxes)
    assert not np.array_equal(first, other)


def test_recipe_uses_rand_augment_and_erasing_else_color_jitter():
    names = [type(t).__name__ for t in T.build_train_transforms(config_with()).transforms]
    assert names == ['RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment', 'ToUint8Array', 'RandomErasing']
    plain = T.build_train_transforms(config_with(RAND_AUGMENT='', RANDOM_ERASE_PROB=0.0))
    assert [type(t).__name__ for t in plain.transforms] == [
        'RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter', 'ToUint8Array', 'RandomErasing']
    assert plain.transforms[-1].prob == 0.0  # an empty rectangle per image keeps the batch's shape
    from_auto = T.build_train_transforms(config_with(RAND_AUGMENT='', AUTO_AUGMENT='rand-m5'))
    assert from_auto.transforms[2].magnitude == 5


def test_rand_augment_fills_with_the_mean_colour():
    rand_augment = T.build_train_transforms(config_with()).transforms[2]
    assert rand_augment.fill == (124, 116, 104)


@pytest.mark.parametrize('key, value', [('AUTO_AUGMENT', 'v0'), ('RAND_AUGMENT', 'rand-m9-x'),
                                        ('RANDOM_ERASE_MODE', 'noise'), ('COLOR_JITTER', -1.0)])
def test_bad_augmentation_settings_are_errors_naming_them(key, value):
    overrides = {key: value}
    if key == 'COLOR_JITTER':
        overrides['RAND_AUGMENT'] = ''
    with pytest.raises(ValueError, match=re.escape(str(value))):
        T.build_train_transforms(config_with(**overrides))


def test_color_jitter_factors_stay_within_strength():
    image = Image.new('RGB', (8, 8), (100, 100, 100))
    rng = np.random.default_rng(0)
    jitter = T.ColorJitter(0.4)
    levels = [np.asarray(jitter(image, rng)).mean() for _ in range(300)]
    # brightness scales a flat grey by its factor; contrast and saturation keep it grey
    assert 100 * 0.6 - 1 <= min(levels) < 75 and 125 < max(levels) <= 100 * 1.4 + 1
    assert math.isclose(np.mean(levels), 100, rel_tol=0.05)
