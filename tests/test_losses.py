"""Losses against hand-computed values."""

import math

import numpy as np
import paddle
import pytest

import losses
from config import get_config

LOGITS = [[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]]
LABELS = [2, 0]


def log_softmax(row):
    top = math.log(sum(math.exp(v) for v in row))
    return [v - top for v in row]


def tensor(values, dtype='float32'):
    return paddle.to_tensor(values, dtype=dtype)


def test_label_smoothing_loss_by_hand():
    smoothing = 0.1
    expected = np.mean([(1 - smoothing) * -log_softmax(row)[label] + smoothing * -np.mean(log_softmax(row))
                        for row, label in zip(LOGITS, LABELS)])
    loss = losses.LabelSmoothingCrossEntropyLoss(smoothing)(tensor(LOGITS), tensor(LABELS, 'int64'))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_zero_is_plain_cross_entropy():
    loss = losses.LabelSmoothingCrossEntropyLoss(0.0)(tensor(LOGITS), tensor(LABELS, 'int64'))
    plain = paddle.nn.CrossEntropyLoss()(tensor(LOGITS), tensor(LABELS, 'int64'))
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)
    assert float(loss) == pytest.approx((-log_softmax(LOGITS[0])[2] - log_softmax(LOGITS[1])[0]) / 2, rel=1e-6)


def test_soft_target_loss_by_hand_and_equal_to_smoothing_on_smoothed_one_hot():
    targets = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    expected = np.mean([-sum(t * lp for t, lp in zip(target, log_softmax(row)))
                        for row, target in zip(LOGITS, targets)])
    loss = losses.SoftTargetCrossEntropyLoss()(tensor(LOGITS), tensor(targets))
    assert float(loss) == pytest.approx(expected, rel=1e-6)

    off = 0.1 / 3
    smoothed = [[off, off, 0.9 + off], [0.9 + off, off, off]]
    soft = losses.SoftTargetCrossEntropyLoss()(tensor(LOGITS), tensor(smoothed))
    hard = losses.LabelSmoothingCrossEntropyLoss(0.1)(tensor(LOGITS), tensor(LABELS, 'int64'))
    assert float(soft) == pytest.approx(float(hard), rel=1e-6)


class FixedTeacher(paddle.nn.Layer):
    """Returns the same logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = tensor(logits)

    def forward(self, inputs):
        return self.logits


TEACHER = [[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]


def test_soft_distillation_by_hand():
    tau, alpha = 2.0, 0.4
    kl_terms = []
    for student, teacher in zip(LOGITS, TEACHER):
        log_s = log_softmax([v / tau for v in student])
        log_t = log_softmax([v / tau for v in teacher])
        kl_terms += [math.exp(t) * (t - s) for s, t in zip(log_s, log_t)]
    distill = sum(kl_terms) / len(kl_terms) * tau * tau
    base = (-log_softmax(LOGITS[0])[2] - log_softmax(LOGITS[1])[0]) / 2
    criterion = losses.DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'soft', alpha, tau)
    loss = criterion(tensor([0.0]), tensor(LOGITS), tensor(LABELS, 'int64'))
    assert float(loss) == pytest.approx((1 - alpha) * base + alpha * distill, rel=1e-5)


def test_hard_distillation_uses_the_teachers_top_class():
    criterion = losses.DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'hard', 1.0, 1.0)
    loss = criterion(tensor([0.0]), (tensor([[9.0, 9.0, 9.0]] * 2), tensor(LOGITS)), tensor(LABELS, 'int64'))
    expected = (-log_softmax(LOGITS[0])[0] - log_softmax(LOGITS[1])[2]) / 2  # teacher picks 0 then 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_no_distillation_is_the_base_loss():
    criterion = losses.DistillationLoss(paddle.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    loss = criterion(tensor([0.0]), tensor(LOGITS), tensor(LABELS, 'int64'))
    assert float(loss) == pytest.approx(float(paddle.nn.CrossEntropyLoss()(tensor(LOGITS), tensor(LABELS, 'int64'))))


@pytest.mark.parametrize('kind, teacher, alpha, match', [
    ('kl', FixedTeacher(TEACHER), 0.5, 'DISTILLATION_TYPE'), ('soft', None, 0.5, 'needs a teacher'),
    ('hard', FixedTeacher(TEACHER), 1.5, 'DISTILLATION_ALPHA')])
def test_bad_distillation_settings_are_errors(kind, teacher, alpha, match):
    with pytest.raises(ValueError, match=match):
        losses.DistillationLoss(paddle.nn.CrossEntropyLoss(), teacher, kind, alpha, 1.0)


def test_build_criterion_follows_mixup_and_smoothing():
    config = get_config('configs/recipe-imagenet1k.yaml')
    assert isinstance(losses.build_criterion(config, mixup_active=True), losses.SoftTargetCrossEntropyLoss)
    smoothing = losses.build_criterion(config, mixup_active=False)
    assert isinstance(smoothing, losses.LabelSmoothingCrossEntropyLoss) and smoothing.smoothing == 0.1
    config.defrost()
    config.TRAIN.SMOOTHING = 0.0
    assert isinstance(losses.build_criterion(config, mixup_active=False), paddle.nn.CrossEntropyLoss)
