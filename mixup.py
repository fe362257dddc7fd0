"""Mixup and CutMix on a batch, with label smoothing folded into the soft targets.

Each sample i is mixed with its partner B - 1 - i (the batch reversed), with
weight lam on itself. Mixup blends whole images; CutMix pastes a box of the
partner, and lam is then the share of the image outside the box after the box
is clipped to the image. Modes: 'batch' draws one lam (and one box) for the
batch, 'pair' one per partner pair, 'elem' one per sample. With an odd batch
the middle sample is its own partner, so it stays as it is.

Random draws come from a generator seeded from (seed, epoch, step, rank): call
``set_epoch(epoch, step)`` before every batch so a resumed run, even one resumed
in the middle of an epoch, mixes the same way.
"""

from typing import Optional, Tuple

import numpy as np
import paddle

MODES = ('batch', 'pair', 'elem')


def smoothed_one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """float32 [B, num_classes]: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    one_hot = paddle.nn.functional.one_hot(labels.reshape([-1]).astype('int64'), num_classes)
    return one_hot.astype('float32') * (1.0 - smoothing) + off


def cutmix_box(height: int, width: int, lam: float, minmax: Optional[Tuple[float, float]],
               rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a CutMix box, clipped to the image.

    Without `minmax`: sides sqrt(1 - lam) of the image's, centred anywhere in
    it. With it: each side a random fraction of the image's in [min, max).
    """
    if minmax is not None:
        box_h = int(rng.integers(int(height * minmax[0]), max(int(height * minmax[1]), int(height * minmax[0]) + 1)))
        box_w = int(rng.integers(int(width * minmax[0]), max(int(width * minmax[1]), int(width * minmax[0]) + 1)))
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        return top, top + box_h, left, left + box_w
    ratio = np.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([centre_y - box_h // 2, centre_y + box_h // 2], 0, height)
    left, right = np.clip([centre_x - box_w // 2, centre_x + box_w // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


class Mixup:
    """Mix a batch of images and turn its int labels into soft targets.

    mixup_alpha / cutmix_alpha: Beta(alpha, alpha) parameters of lam (0: off);
    cutmix_minmax: (min, max) box side fractions, which turns CutMix on and
    makes the box ignore lam; prob: chance a batch / pair / sample is mixed at
    all; switch_prob: chance of CutMix rather than Mixup when both are on;
    mode: 'batch', 'pair' or 'elem'; label_smoothing: folded into the targets.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: Optional[Tuple[float, float]] = None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = 'batch', label_smoothing: float = 0.1,
                 num_classes: int = 1000, seed: int = 0, rank: int = 0):
        if mode not in MODES:
            raise ValueError(f'TRAIN.MIXUP_MODE = {mode!r} is not one of {", ".join(MODES)}')
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f'TRAIN.MIXUP_ALPHA / CUTMIX_ALPHA must be >= 0, got {mixup_alpha}, {cutmix_alpha}')
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0 <= cutmix_minmax[0] <= cutmix_minmax[1] <= 1:
                raise ValueError(f'TRAIN.CUTMIX_MINMAX must be [min, max] within [0, 1], got {cutmix_minmax}')
            cutmix_alpha = cutmix_alpha or 1.0  # the box size comes from minmax; alpha only picks the op
        for key, value in (('MIXUP_PROB', prob), ('MIXUP_SWITCH_PROB', switch_prob), ('SMOOTHING', label_smoothing)):
            if not 0 <= value <= 1:
                raise ValueError(f'TRAIN.{key} must be in [0, 1], got {value}')
        if num_classes < 1:
            raise ValueError(f'Mixup needs num_classes >= 1, got {num_classes}')
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.seed, self.rank = int(seed), int(rank)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Restart the random draws for batch `step` of `epoch`."""
        self.rng = np.random.default_rng([self.seed, int(epoch), int(step), self.rank])

    def draw(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """(lam, use_cutmix) for `count` independent mixes; lam = 1 means unmixed."""
        lam = np.ones(count)
        use_cutmix = np.zeros(count, dtype=bool)
        mixed = self.rng.random(count) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self.rng.random(count) < self.switch_prob
        elif self.cutmix_alpha > 0:
            use_cutmix[:] = True
        lam_cutmix = self.rng.beta(self.cutmix_alpha, self.cutmix_alpha, count) if self.cutmix_alpha > 0 else lam
        lam_mixup = self.rng.beta(self.mixup_alpha, self.mixup_alpha, count) if self.mixup_alpha > 0 else lam
        lam = np.where(mixed, np.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
        return lam, use_cutmix & mixed

    def weights(self, batch: int, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
        """(per-pixel weight of each sample on itself [B or 1, 1, H, W], effective lam [B])."""
        count = {'batch': 1, 'pair': (batch + 1) // 2, 'elem': batch}[self.mode]
        lam, use_cutmix = self.draw(count)
        weight = np.empty((count, 1, height, width), dtype=np.float32)
        for i in range(count):
            weight[i] = lam[i]
            if use_cutmix[i]:
                top, bottom, left, right = cutmix_box(height, width, lam[i], self.cutmix_minmax, self.rng)
                weight[i] = 1.0
                weight[i, :, top:bottom, left:right] = 0.0
                lam[i] = 1.0 - (bottom - top) * (right - left) / (height * width)
        if self.mode == 'batch':
            return weight, np.repeat(lam, batch)
        if self.mode == 'pair':
            # sample B-1-i shares the pair's draw, seen from the other side
            return np.concatenate([weight, weight[:batch // 2][::-1]]), \
                np.concatenate([lam, lam[:batch // 2][::-1]])
        return weight, lam

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """images [B, C, H, W], int labels [B] -> mixed images, soft targets [B, num_classes]."""
        batch, _, height, width = images.shape
        weight, lam = self.weights(batch, height, width)
        weight = paddle.to_tensor(weight, dtype=images.dtype)
        mixed = images * weight + images.flip(axis=[0]) * (1.0 - weight)
        targets = smoothed_one_hot(labels, self.num_classes, self.label_smoothing)
        lam = paddle.to_tensor(lam, dtype='float32').unsqueeze(1)
        return mixed, targets * lam + targets.flip(axis=[0]) * (1.0 - lam)


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    """The recipe's Mixup / CutMix from TRAIN.*, or None when it would never mix."""
    train = config.TRAIN
    if (train.MIXUP_ALPHA <= 0 and train.CUTMIX_ALPHA <= 0 and train.CUTMIX_MINMAX is None) \
            or train.MIXUP_PROB <= 0:
        return None
    return Mixup(mixup_alpha=train.MIXUP_ALPHA, cutmix_alpha=train.CUTMIX_ALPHA,
                 cutmix_minmax=train.CUTMIX_MINMAX, prob=train.MIXUP_PROB,
                 switch_prob=train.MIXUP_SWITCH_PROB, mode=train.MIXUP_MODE,
                 label_smoothing=train.SMOOTHING, num_classes=num_classes,
                 seed=config.SEED, rank=paddle.distributed.get_rank())
