"""Training losses: label-smoothing and soft-target cross entropy, distillation."""

import paddle
import paddle.nn.functional as F

DISTILLATION_TYPES = ('none', 'soft', 'hard')


class LabelSmoothingCrossEntropyLoss(paddle.nn.Layer):
    """Cross entropy against (1 - smoothing) on the label plus smoothing spread evenly.

    loss = (1 - s) * -log p[label] + s * mean_k(-log p[k]), averaged over the batch.
    """

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0 <= smoothing < 1:
            raise ValueError(f'label smoothing must be in [0, 1), got {smoothing}')
        self.smoothing = smoothing

    def forward(self, logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
        log_probs = F.log_softmax(logits.astype('float32'), axis=-1)
        labels = targets.reshape([-1, 1]).astype('int64')
        nll = -paddle.take_along_axis(log_probs, labels, axis=-1).squeeze(-1)
        uniform = -log_probs.mean(axis=-1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * uniform).mean()


class SoftTargetCrossEntropyLoss(paddle.nn.Layer):
    """Cross entropy against a target distribution per sample (Mixup's soft targets)."""

    def forward(self, logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
        log_probs = F.log_softmax(logits.astype('float32'), axis=-1)
        return (-targets.astype('float32') * log_probs).sum(axis=-1).mean()


class DistillationLoss(paddle.nn.Layer):
    """DeiT-style distillation from a frozen teacher, for fine-tuning from a larger CvT.

    loss = (1 - alpha) * base + alpha * distill, where distill is, for 'soft',
    KL(teacher || student) of the tau-softened distributions times tau^2,
    averaged over every (sample, class) term as DeiT does, and for
    'hard', cross entropy against the teacher's top class. 'none' is the base
    loss alone. forward(inputs, outputs, targets): inputs feed the teacher;
    outputs are the student's logits, or (logits, distillation logits).
    """

    def __init__(self, base_criterion: paddle.nn.Layer, teacher_model: paddle.nn.Layer,
                 distillation_type: str = 'none', alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'TRAIN.DISTILLATION_TYPE = {distillation_type!r} '
                             f'is not one of {", ".join(DISTILLATION_TYPES)}')
        if distillation_type != 'none' and teacher_model is None:
            raise ValueError(f'TRAIN.DISTILLATION_TYPE = {distillation_type!r} needs a teacher model')
        if not 0 <= alpha <= 1 or tau <= 0:
            raise ValueError(f'TRAIN.DISTILLATION_ALPHA must be in [0, 1] and DISTILLATION_TAU > 0, '
                             f'got {alpha}, {tau}')
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs: paddle.Tensor, outputs, targets: paddle.Tensor) -> paddle.Tensor:
        logits, distill_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base_loss = self.base_criterion(logits, targets)
        if self.distillation_type == 'none':
            return base_loss
        self.teacher_model.eval()
        with paddle.no_grad():
            teacher_logits = self.teacher_model(inputs).astype('float32')
        distill_logits = distill_logits.astype('float32')
        if self.distillation_type == 'soft':
            student_log = F.log_softmax(distill_logits / self.tau, axis=-1)
            teacher_log = F.log_softmax(teacher_logits / self.tau, axis=-1)
            kl = (teacher_log.exp() * (teacher_log - student_log)).mean()
            distill_loss = kl * self.tau * self.tau
        else:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(axis=-1))
        return base_loss * (1.0 - self.alpha) + distill_loss * self.alpha


def build_criterion(config, mixup_active: bool) -> paddle.nn.Layer:
    """Training loss of the recipe: soft-target CE under Mixup, else smoothed CE, else CE.

    Distillation (TRAIN.DISTILLATION_*) wraps this with DistillationLoss once
    the teacher is built.
    """
    if mixup_active:
        return SoftTargetCrossEntropyLoss()
    if config.TRAIN.SMOOTHING > 0:
        return LabelSmoothingCrossEntropyLoss(config.TRAIN.SMOOTHING)
    return paddle.nn.CrossEntropyLoss()
