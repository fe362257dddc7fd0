"""Mixup / CutMix: target sums, lambda against the pixels actually mixed, modes, odd batches."""

import numpy as np
import paddle
import pytest

import mixup
from config import get_config

CLASSES = 6


def constant_batch(batch: int, size: int = 16):
    """Sample i is filled with the value i, so each mixed pixel tells its source."""
    images = paddle.to_tensor(np.arange(batch, dtype=np.float32).reshape(-1, 1, 1, 1)
                              * np.ones((1, 3, size, size), dtype=np.float32))
    labels = paddle.to_tensor(np.arange(batch) % CLASSES, dtype='int64')
    return images, labels


def own_share(images: np.ndarray, batch: int) -> np.ndarray:
    """Per sample, the mean weight of its own image (pixel = w * i + (1 - w) * (B - 1 - i))."""
    own = np.arange(batch, dtype=np.float32)
    partner = own[::-1]
    spread = np.where(own == partner, 1.0, own - partner)  # the middle of an odd batch is its own partner
    return (images.mean(axis=(1, 2, 3)) - partner) / spread


@pytest.mark.parametrize('mode', mixup.MODES)
@pytest.mark.parametrize('batch', [4, 5])
def test_soft_targets_sum_to_one_and_follow_the_image_mix(mode, batch):
    mix = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode=mode,
                      label_smoothing=0.1, num_classes=CLASSES, seed=1)
    for _ in range(8):
        images, labels = constant_batch(batch)
        mixed, targets = mix(images, labels)
        targets = targets.numpy()
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
        assert targets.shape == (batch, CLASSES) and mixed.shape == images.shape
        # weight on the own label (smoothing removed) equals the own image's pixel share
        own = np.arange(batch) % CLASSES
        partner = own[::-1]
        share = own_share(mixed.numpy(), batch)
        for i in range(batch):
            if own[i] != partner[i]:
                on_own = (targets[i, own[i]] - 0.1 / CLASSES) / 0.9
                assert on_own == pytest.approx(share[i], abs=1e-5)


def test_odd_batch_middle_sample_is_left_as_it_is():
    mix = mixup.Mixup(mode='pair', num_classes=CLASSES, label_smoothing=0.0)
    images, labels = constant_batch(5)
    mixed, targets = mix(images, labels)
    np.testing.assert_allclose(mixed.numpy()[2], 2.0, atol=1e-6)
    assert targets.numpy()[2].tolist() == pytest.approx([0, 0, 1, 0, 0, 0])


def test_cutmix_lambda_is_corrected_to_the_clipped_box():
    mix = mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode='elem', label_smoothing=0.0,
                      num_classes=CLASSES, seed=2)
    clipped = 0
    for _ in range(20):
        images, labels = constant_batch(6, size=20)
        mixed, targets = mix(images, labels)
        mixed = mixed.numpy()
        for i in range(3):
            pasted = (mixed[i, 0] == 5 - i).mean()
            assert targets.numpy()[i, i] == pytest.approx(1 - pasted, abs=1e-6)
            box = np.argwhere(mixed[i, 0] == 5 - i)
            if len(box) and (box.min() == 0 or box.max() == 19):
                clipped += 1
    assert clipped > 0, 'some boxes reached the border, so clipping was exercised'


def test_cutmix_minmax_bounds_box_sides():
    mix = mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.25, 0.5), mode='elem',
                      label_smoothing=0.0, num_classes=CLASSES)
    images, labels = constant_batch(6, size=40)
    mixed = mix(images, labels)[0].numpy()
    for i in range(3):
        rows, cols = np.nonzero(mixed[i, 0] == 5 - i)
        assert 10 <= rows.max() - rows.min() + 1 < 20 and 10 <= cols.max() - cols.min() + 1 < 20


def test_batch_mode_mixup_uses_one_lambda_for_the_whole_batch():
    mix = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, mode='batch', label_smoothing=0.0,
                      num_classes=CLASSES, seed=4)
    images, labels = constant_batch(4)
    share = own_share(mix(images, labels)[0].numpy(), 4)
    assert np.allclose(share, share[0], atol=1e-5) and 0 < share[0] < 1


def test_unmixed_targets_are_label_smoothed_one_hot():
    mix = mixup.Mixup(prob=0.0, label_smoothing=0.1, num_classes=4)
    images, _ = constant_batch(2)
    mixed, targets = mix(images, paddle.to_tensor([3, 0], dtype='int64'))
    np.testing.assert_allclose(targets.numpy(), [[0.025, 0.025, 0.025, 0.925], [0.925, 0.025, 0.025, 0.025]],
                               atol=1e-6)
    np.testing.assert_array_equal(mixed.numpy(), images.numpy())


def test_set_epoch_replays_the_same_draws():
    mix = mixup.Mixup(num_classes=CLASSES, seed=5)
    images, labels = constant_batch(4)
    first = [mix(images, labels)[1].numpy() for _ in range(3)]
    mix.set_epoch(0)
    again = [mix(images, labels)[1].numpy() for _ in range(3)]
    mix.set_epoch(1)
    other = mix(images, labels)[1].numpy()
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(first[0], other)


def test_build_mixup_follows_the_config():
    config = get_config('configs/recipe-imagenet1k.yaml')
    built = mixup.build_mixup(config, 10)
    assert (built.mixup_alpha, built.cutmix_alpha, built.prob, built.switch_prob, built.label_smoothing) == (
        0.8, 1.0, 1.0, 0.5, 0.1) and built.num_classes == 10
    config.defrost()
    config.TRAIN.MIXUP_PROB = 0.0
    assert mixup.build_mixup(config, 10) is None
    config.TRAIN.MIXUP_PROB = 1.0
    config.TRAIN.MIXUP_ALPHA = config.TRAIN.CUTMIX_ALPHA = 0.0
    assert mixup.build_mixup(config, 10) is None


@pytest.mark.parametrize('kwargs, key', [({'mode': 'row'}, 'MIXUP_MODE'), ({'prob': 2.0}, 'MIXUP_PROB'),
                                         ({'cutmix_minmax': (0.5, 0.2)}, 'CUTMIX_MINMAX'),
                                         ({'mixup_alpha': -1.0}, 'MIXUP_ALPHA')])
def test_bad_settings_are_errors_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        mixup.Mixup(num_classes=CLASSES, **kwargs)
