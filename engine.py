"""The training and evaluation engine behind main_single_gpu.py and main_multi_gpu.py.

`run(config, multi_process)` does the whole job: data, model, optimizer, LR
schedule, resume, the epoch loop, validation and checkpoints (checkpoint.py),
stopping cleanly on SIGTERM / SIGINT (preemption.py). The pieces are importable
on their own: `train_step` (one forward/backward/update, which
tools/benchmark.py times), `train_one_epoch`, `validate`, `build_optimizer`,
`build_lr_schedule`.

Randomness: the model is initialised from SEED; every (micro-)step then reseeds
Python, NumPy, Paddle (dropout, drop path) and Mixup (`Mixup.set_epoch`) from
(SEED, epoch, step, rank), and the data order and augmentation derive from
(SEED, epoch) (`datasets.set_epoch`). A step's randomness thus does not depend
on the steps before it, and a run resumed at any step repeats a straight one
exactly without storing generator states.
"""

import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

import checkpoint
import cvt
import datasets
import fast
import fileio
import losses
import mixup as mixup_lib
import paddle_internals
import preemption
import reporting
from config import get_config
from transforms import DeviceFinish
from utils import (FILE_ONLY, AverageMeter, NonFiniteLossError, UsageError, check_attention_memory, format_seconds,
                   get_logger)

BATCH_NORMS = (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D)
# ops kept in float32 under autocast: normalisation and attention weights
FLOAT32_OPS = {'layer_norm', 'softmax'}
# a float16 run stops when this many optimizer steps in a row overflowed (nothing was learnt)
MAX_SKIPPED_STEPS = 100


def amp_dtype(config, capability: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """The autocast dtype of a run: None (float32) without AMP or without a CUDA GPU, else
    AMP_DTYPE, where `auto` is bfloat16 on GPUs with bfloat16 units (compute capability
    8.0 and newer: A100, H100, RTX 30xx on) and float16 before them (V100, T4).
    `capability`: the GPU's (major, minor), read from the device when not given."""
    if not config.AMP or (capability is None and not _use_gpu()):
        return None
    if config.AMP_DTYPE != 'auto':
        return config.AMP_DTYPE
    major, _ = capability or paddle.device.cuda.get_device_capability()
    return 'bfloat16' if major >= 8 else 'float16'


def autocast(dtype: Optional[str]):
    """Paddle's O1 autocast to `dtype`, or nothing for None (float32)."""
    if dtype is None:
        return nullcontext()
    return paddle.amp.auto_cast(enable=True, level='O1', dtype=dtype, custom_black_list=FLOAT32_OPS)


class WarmupCosineSchedule(paddle.optimizer.lr.LRScheduler):
    """Linear warm-up from `warmup_start_lr` to `peak_lr`, then cosine decay to `end_lr`.

    Counted in optimizer steps (`step()` after every update), like timm's
    scheduler with per-iteration updates.
    """

    def __init__(self, peak_lr: float, warmup_start_lr: float, end_lr: float,
                 warmup_steps: int, total_steps: int):
        self.peak_lr = peak_lr
        self.warmup_start_lr = warmup_start_lr
        self.end_lr = end_lr
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, warmup_steps + 1)
        super().__init__(learning_rate=peak_lr)

    def get_lr(self) -> float:
        step = self.last_epoch
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.end_lr + 0.5 * (self.peak_lr - self.end_lr) * (1 + math.cos(math.pi * progress))


def global_batch_size(config, world_size: int) -> int:
    return config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUM_ITER


def build_lr_schedule(config, steps_per_epoch: int, world_size: int) -> WarmupCosineSchedule:
    """The warm-up + cosine schedule of `config`, stepped once per optimizer update.

    BASE_LR is for a global batch of LINEAR_SCALED_LR images and scales linearly
    with the real one; WARMUP_START_LR and END_LR stay absolute, as in the
    official CvT (timm's scheduler).
    """
    train = config.TRAIN
    if train.LR_SCHEDULER.NAME != 'warmupcosine':
        raise UsageError(f'TRAIN.LR_SCHEDULER.NAME = {train.LR_SCHEDULER.NAME!r}: '
                         f'only warmupcosine is implemented')
    peak_lr = train.BASE_LR
    if train.LINEAR_SCALED_LR:
        peak_lr *= global_batch_size(config, world_size) / train.LINEAR_SCALED_LR
    return WarmupCosineSchedule(peak_lr, train.WARMUP_START_LR, train.END_LR,
                                warmup_steps=train.WARMUP_EPOCHS * steps_per_epoch,
                                total_steps=train.NUM_EPOCHS * steps_per_epoch)


def decays_weight(name: str, param: paddle.Tensor) -> bool:
    """Weight decay applies to weight matrices and kernels, not to biases, norm
    layers (all 1-D) or the cls token."""
    return len(param.shape) > 1 and not name.endswith('cls_token')


def build_optimizer(config, model: nn.Layer, lr_schedule) -> paddle.optimizer.Optimizer:
    """TRAIN.OPTIMIZER.NAME: AdamW (the training recipe) with decoupled weight
    decay, or SGD with momentum TRAIN.OPTIMIZER.MOMENTUM (the fine-tuning
    recipe) with L2 weight decay; either decays only the weights `decays_weight`
    picks. Global-norm gradient clipping when TRAIN.GRAD_CLIP is set."""
    opt = config.TRAIN.OPTIMIZER
    clip = nn.ClipGradByGlobalNorm(config.TRAIN.GRAD_CLIP) if config.TRAIN.GRAD_CLIP else None
    if opt.NAME.lower() == 'adamw':
        decayed = {p.name for n, p in model.named_parameters() if decays_weight(n, p)}
        return paddle.optimizer.AdamW(
            learning_rate=lr_schedule, beta1=opt.BETAS[0], beta2=opt.BETAS[1], epsilon=opt.EPS,
            parameters=model.parameters(), weight_decay=config.TRAIN.WEIGHT_DECAY,
            apply_decay_param_fun=lambda name: name in decayed, grad_clip=clip)
    if opt.NAME.lower() == 'sgd':
        named = list(model.named_parameters())
        groups = [{'params': [p for n, p in named if decays_weight(n, p)],
                   'weight_decay': config.TRAIN.WEIGHT_DECAY},
                  {'params': [p for n, p in named if not decays_weight(n, p)], 'weight_decay': 0.0}]
        return paddle.optimizer.Momentum(learning_rate=lr_schedule, momentum=opt.MOMENTUM,
                                         parameters=[g for g in groups if g['params']], grad_clip=clip)
    raise UsageError(f'TRAIN.OPTIMIZER.NAME = {opt.NAME!r} is not one of AdamW, SGD')


class ModelEma:
    """Exponential moving average of a model's weights and BatchNorm statistics."""

    def __init__(self, model: nn.Layer, shadow: nn.Layer, decay: float):
        self.module = shadow
        self.module.set_state_dict(model.state_dict())
        self.module.eval()
        self.decay = decay

    @paddle.no_grad()
    def update(self, model: nn.Layer) -> None:
        """average = decay * average + (1 - decay) * weight, in place on the device (set_value
        would copy through host memory on Paddle 2.6)."""
        averages = self.module.state_dict()
        for key, value in model.state_dict().items():
            average = averages[key]
            paddle.assign(average * self.decay + value.detach() * (1.0 - self.decay), output=average)


def train_step(model: nn.Layer, images: paddle.Tensor, targets: paddle.Tensor, criterion: nn.Layer,
               optimizer: paddle.optimizer.Optimizer, scaler: paddle.amp.GradScaler, *,
               amp: Optional[str] = None, accum_iter: int = 1,
               update: bool = True) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Forward and backward one (micro-)batch; with `update`, also step the optimizer.

    The model and a distillation teacher run under autocast to `amp` (a dtype, or None:
    float32); the loss is computed in float32 and divided by `accum_iter` before backward
    so that `accum_iter` accumulated micro-batches give the gradient of their mean loss.
    Returns the undivided loss and the logits, on the device (nothing is read back).
    """
    with autocast(amp):
        logits = model(images)
        if isinstance(criterion, losses.DistillationLoss):
            loss = criterion(images, logits.astype('float32'), targets)  # the teacher sees the images too
        else:
            loss = criterion(logits.astype('float32'), targets)
    scaler.scale(loss / accum_iter).backward()
    if update:
        scaler.step(optimizer)
        scaler.update()
        # release the gradients (as PyTorch's set_to_none): the next backward writes fresh ones
        # instead of zero-filling every gradient here and adding into the zeros there
        optimizer.clear_grad(set_to_zero=False)
    return loss, logits


def in_top_k(logits: paddle.Tensor, labels: paddle.Tensor, k: int) -> paddle.Tensor:
    """1.0 for each row of `logits` whose label is among its top `k` classes, else 0.0."""
    top = paddle.topk(logits, k=min(k, logits.shape[-1]), axis=-1)[1]
    return (top == labels.reshape([-1, 1]).astype(top.dtype)).any(axis=-1).astype('float32')


def average_batchnorm_statistics(model: nn.Layer, world_size: int) -> None:
    """Give every process the mean of the BatchNorm running statistics, which
    each process has gathered from its own share of the data."""
    if world_size < 2:
        return
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, BATCH_NORMS):
            for stat in paddle_internals.batch_norm_statistics(layer):
                dist.all_reduce(stat)
                paddle.assign(stat / world_size, output=stat)  # on the device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    paddle.seed(seed)


def step_seed(base_seed: int, epoch: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([base_seed, epoch, step, rank]).generate_state(1)[0])


@dataclass
class Trainer:
    """Everything one training run holds; `model` is the bare model, `net` the
    one to call (a DataParallel wrapper with several processes)."""
    config: object
    model: nn.Layer
    net: nn.Layer
    optimizer: paddle.optimizer.Optimizer
    lr_schedule: WarmupCosineSchedule
    scaler: paddle.amp.GradScaler
    criterion: nn.Layer
    mixup: Optional[object]
    ema: Optional[ModelEma]
    amp: Optional[str]  # the autocast dtype, None: float32
    finish: Callable  # the loader's uint8 batch -> the model's input, on the device (DeviceFinish)
    steps_per_epoch: int
    world_size: int
    logger: object
    rank: int = 0
    stop: Optional[preemption.StopSignals] = None  # set while the epoch loop runs
    best_acc1: Optional[float] = None  # the best validation top-1 so far
    reporter: Optional[reporting.Reporter] = None  # default: rank 0 reports, on stdout

    def __post_init__(self):
        if self.reporter is None:
            self.reporter = reporting.Reporter(self.config, self.logger, self.rank)

    @property
    def global_batch_size(self) -> int:
        return global_batch_size(self.config, self.world_size)


class StepSums:
    """What the micro-steps since the last read-back add up to, kept on the device so that
    no step waits for one: loss x images, top-1 hits, unreadable images, and with a
    float16 loss scaler the current run of skipped (overflowed) updates. The image count
    is known on the host."""

    def __init__(self):
        self.sums = paddle.zeros([3], dtype='float64')
        self.images = 0
        self.skipped_run = paddle.zeros([1], dtype='float64')

    def add(self, loss: paddle.Tensor, logits: paddle.Tensor, labels: paddle.Tensor,
            unreadable: paddle.Tensor) -> None:
        n = logits.shape[0]
        self.sums += paddle.concat([
            loss.detach().astype('float64').reshape([1]) * n,
            in_top_k(logits.detach(), labels, 1).sum().astype('float64').reshape([1]),
            (unreadable >= 0).astype('float64').sum().reshape([1])])
        self.images += n

    def after_update(self, scaler: paddle.amp.GradScaler) -> None:
        if scaler.is_enable():  # one more skipped update in a row, or none
            found_inf = paddle_internals.overflow_found(scaler).astype('float64').reshape([1])
            self.skipped_run = (self.skipped_run + 1) * found_inf

    def read(self, trainer, stop_code: int) -> Dict[str, float]:
        """The sums over every process (one read-back and, with several, one all-reduce),
        the loss scale, and the stop code any process asked for; then start afresh."""
        scaler = trainer.scaler
        scale = (paddle_internals.loss_scale(scaler).astype('float64').reshape([1]) if scaler.is_enable()
                 else paddle.ones([1], dtype='float64'))
        stops = paddle.to_tensor([float(self.images), float(stop_code == 143), float(stop_code == 130)],
                                 dtype='float64')
        values = paddle.concat([self.sums, stops, scale, self.skipped_run])
        if trainer.world_size > 1:
            dist.all_reduce(values)
        loss, correct, unreadable, images, sigterm, sigint, scale, skipped = values.numpy().tolist()
        self.sums, self.images = paddle.zeros([3], dtype='float64'), 0
        return {'loss_sum': loss, 'correct': correct, 'unreadable': unreadable, 'images': images,
                'stop': 143 if sigterm else 130 if sigint else 0, 'scale': scale / trainer.world_size,
                'skipped': skipped / trainer.world_size}


def train_one_epoch(trainer: Trainer, loader, epoch: int,
                    resumed: Optional[checkpoint.ResumePoint] = None) -> Tuple[float, float, int]:
    """Train one epoch (numbered from 1); return the mean loss and top-1 accuracy
    over all processes, and how many unreadable images other samples stood in for.
    Accuracy under mixup is against the unmixed labels.

    The step runs on the device without waiting for it: the loss and accuracy are
    summed there and read back (and checked, and summed over processes, and the stop
    signals agreed on) only every REPORT_FREQ optimizer steps, before a mid-epoch
    checkpoint and at the epoch's end. A single process stops at the step a signal
    came; several at the next read-back.

    `resumed`: continue the epoch after its first `resumed.step` optimizer steps,
    with their loss and accuracy (the loader must start there: `datasets.set_epoch`).
    """
    config = trainer.config
    accum = config.TRAIN.ACCUM_ITER
    micro_steps = trainer.steps_per_epoch * accum  # a last incomplete accumulation is dropped
    num_epochs = config.TRAIN.NUM_EPOCHS
    trainer.net.train()
    first_step = resumed.step * accum if resumed else 0
    loss_meter = resumed.meter('loss') if resumed else AverageMeter()
    acc_meter = resumed.meter('acc1') if resumed else AverageMeter()
    start, start_count = time.time(), loss_meter.count
    sums, window_start, unreadable = StepSums(), first_step, 0
    for step, (images, labels, unreadable_files, erase_boxes) in enumerate(loader, first_step):
        if step >= micro_steps:
            break
        seed_everything(step_seed(config.SEED, epoch, step, trainer.rank))
        images = trainer.finish(images, erase_boxes)
        if trainer.mixup is not None:
            trainer.mixup.set_epoch(epoch, step)
        targets = labels
        if trainer.mixup is not None:
            images, targets = trainer.mixup(images, labels)
        update = (step + 1) % accum == 0
        # between updates, processes keep their gradients local (no all-reduce)
        sync = trainer.net.no_sync() if trainer.world_size > 1 and not update else nullcontext()
        with sync:
            loss, logits = train_step(trainer.net, images, targets, trainer.criterion, trainer.optimizer,
                                      trainer.scaler, amp=trainer.amp, accum_iter=accum, update=update)
        sums.add(loss, logits, labels, unreadable_files)
        trainer.reporter.progress(epoch, step + 1, micro_steps)
        if not update:
            continue
        trainer.lr_schedule.step()
        sums.after_update(trainer.scaler)
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        optimizer_step = (step + 1) // accum
        local_stop = trainer.stop.code if trainer.stop is not None else 0
        if not (optimizer_step % config.REPORT_FREQ == 0 or step + 1 == micro_steps
                or checkpoint.step_checkpoint_due(trainer, epoch, optimizer_step)
                or (local_stop and trainer.world_size == 1)):
            continue
        window = sums.read(trainer, local_stop)
        unreadable += int(window['unreadable'])
        _check_window(trainer, window, epoch, window_start, step + 1, micro_steps)
        count = int(window['images'])
        loss_meter.update(window['loss_sum'] / count, count)
        acc_meter.update(window['correct'] / count, count)
        elapsed = time.time() - start
        left = elapsed / (step + 1 - first_step) * ((micro_steps - step - 1) + micro_steps * (num_epochs - epoch))
        lr, images_per_s = trainer.optimizer.get_lr(), (loss_meter.count - start_count) / elapsed
        scale = f', loss scale {window["scale"]:g}' if trainer.scaler.is_enable() else ''
        trainer.reporter.train_step(
            epoch, step + 1, micro_steps,
            f'Epoch[{epoch:03d}/{num_epochs:03d}], Step[{step + 1:04d}/{micro_steps:04d}], '
            f'Loss: {window["loss_sum"] / count:.4f} (avg {loss_meter.avg:.4f}), '
            f'Acc@1: {window["correct"] / count:.4f} (avg {acc_meter.avg:.4f}), '
            f'LR: {lr:.6e}{scale}, {images_per_s:.1f} images/s, time left: {format_seconds(left)}',
            loss=window['loss_sum'] / count, acc1=window['correct'] / count, loss_avg=loss_meter.avg, lr=lr,
            images_per_s=images_per_s, seconds_left=left)
        window_start = step + 1
        checkpoint.after_optimizer_step(trainer, epoch, optimizer_step, {'loss': loss_meter, 'acc1': acc_meter},
                                        window['stop'] if trainer.world_size > 1 else local_stop)
    return loss_meter.avg, acc_meter.avg, unreadable


def _check_window(trainer, window: Dict[str, float], epoch: int, first: int, last: int, steps: int) -> None:
    """Stop when the loss of micro-steps `first`+1..`last` is not finite, or when a float16
    loss scale has collapsed (every update skipped: the weights no longer change)."""
    where = f'epoch {epoch}, steps {first + 1}-{last}/{steps}'
    kept = f'training stopped (checkpoints written before are kept in {trainer.config.SAVE})'
    if not math.isfinite(window['loss_sum']):
        raise NonFiniteLossError(f'the training loss is {window["loss_sum"] / max(window["images"], 1)} '
                                 f'at {where}; {kept}')
    if trainer.scaler.is_enable() and (window['scale'] < 1 or window['skipped'] >= MAX_SKIPPED_STEPS):
        raise NonFiniteLossError(
            f'float16 overflows every step: the loss scale is {window["scale"]:g} and the last '
            f'{int(window["skipped"])} updates were skipped at {where}; {kept}; AMP_DTYPE bfloat16 (GPUs '
            f'of compute capability 8.0 and newer) or a lower TRAIN.BASE_LR avoids it')


@paddle.no_grad()
def validate(model: nn.Layer, loader, finish: Callable, world_size: int = 1, expected_count: Optional[int] = None,
             progress: Optional[Callable[[int], None]] = None, amp: Optional[str] = None) -> Dict[str, object]:
    """Cross-entropy loss, top-1 and top-5 accuracy over the whole val set, the model
    under autocast to `amp` (None: float32); `finish` turns the loader's uint8 images into
    the model's input (transforms.DeviceFinish).

    Each process evaluates its own shard; sums are combined over processes, so
    every image counts once. Images that cannot be read are left out, and
    named (`unreadable`: their paths); `count` is the number evaluated.
    `expected_count` (the val set size) guards that every image was either.
    `progress` is called with the number of batches done after each one. The sums
    stay on the device and are read back once, at the end.
    """
    model.eval()
    sums = paddle.zeros([5], dtype='float64')  # loss, top-1, top-5, images, unreadable images
    marks = []
    for batch, (images, labels, unreadable, boxes) in enumerate(loader, 1):
        with autocast(amp):
            logits = model(finish(images, boxes))
        logits, labels, unreadable = logits.astype('float32'), labels.reshape([-1]), unreadable.reshape([-1])
        read = (unreadable < 0).astype('float32')  # placeholders of unreadable files count nowhere
        losses = F.cross_entropy(logits, labels, reduction='none').reshape([-1])
        sums += paddle.stack([(losses * read).sum(), (in_top_k(logits, labels, 1) * read).sum(),
                              (in_top_k(logits, labels, 5) * read).sum(), read.sum(),
                              (1 - read).sum()]).astype('float64')
        marks.append(unreadable)
        if progress is not None:
            progress(batch)
    if world_size > 1:
        dist.all_reduce(sums)
    loss_sum, correct1, correct5, count, missing = sums.numpy().tolist()
    left_out = []
    if missing:  # rare: read every process's left-out indices, for the names
        own = [int(i) for i in paddle.concat(marks).numpy() if i >= 0]
        flags = np.zeros(len(loader.dataset), dtype=np.int32)
        flags[own] = 1
        if world_size > 1:
            flags = paddle.to_tensor(flags)
            dist.all_reduce(flags)
            flags = flags.numpy()
        left_out = np.flatnonzero(flags).tolist()
    if expected_count is not None and int(count) + int(missing) != expected_count:
        raise RuntimeError(f'validation saw {int(count) + int(missing)} images, the val set has {expected_count}')
    paths = getattr(loader.dataset, 'paths', None)
    return {'loss': loss_sum / max(count, 1), 'acc1': correct1 / max(count, 1),
            'acc5': correct5 / max(count, 1), 'count': int(count),
            'unreadable': [paths[i] if paths else str(i) for i in left_out]}


def format_validation(metrics: Dict[str, object], prefix: str = '') -> str:
    """PaddleViT's validation line, with the unreadable images left out, if any."""
    return (f'{prefix}Validation Loss: {metrics["loss"]:.4f}, Validation Acc@1: {metrics["acc1"]:.4f}, '
            f'Validation Acc@5: {metrics["acc5"]:.4f} ({metrics["count"]} images{left_out_note(metrics)})')


def left_out_note(metrics: Dict[str, object]) -> str:
    """'; 2 unreadable left out: a.jpg, b.jpg', or '' when every image was read."""
    names = metrics.get('unreadable') or []
    if not names:
        return ''
    more = f' (+{len(names) - 5} more)' if len(names) > 5 else ''
    return f'; {len(names)} unreadable left out: {", ".join(names[:5])}{more}'


def _check_data_sizes(config, train_set, world_size: int) -> None:
    if train_set is not None:
        needed = global_batch_size(config, world_size)
        if len(train_set) < needed:
            raise UsageError(f'the train set ({len(train_set)} images) is smaller than one optimizer step '
                             f'(batch {config.DATA.BATCH_SIZE} x {world_size} processes x ACCUM_ITER '
                             f'{config.TRAIN.ACCUM_ITER} = {needed})')


def check_paths(config) -> None:
    """Fail on missing weights or data before anything is built (cheap: a
    launcher calls it before starting processes). Weights given by name are
    fetched here, once, after the other checks (hub.py)."""
    if not os.path.isdir(config.DATA.DATA_PATH):
        raise UsageError(f'-data_path {config.DATA.DATA_PATH}: folder not found')
    if config.EVAL and config.MODEL.RESUME == checkpoint.AUTO:
        raise UsageError('-resume auto is for training; -eval takes the weights with -pretrained PATH')
    if config.EVAL and not (config.MODEL.PRETRAINED or config.MODEL.RESUME):
        raise UsageError('-eval needs the weights to evaluate: -pretrained PATH')
    checkpoint.check_output_folder(config)
    if config.VISUALDL and not config.EVAL:
        reporting.require_visualdl()
    if config.TRAIN.DISTILLATION_TYPE != 'none' and not config.EVAL:
        if not config.TRAIN.TEACHER_CFG or not config.TRAIN.TEACHER_PRETRAINED:
            raise UsageError(f'TRAIN.DISTILLATION_TYPE = {config.TRAIN.DISTILLATION_TYPE!r} needs '
                             f'TRAIN.TEACHER_CFG and TRAIN.TEACHER_PRETRAINED')
        if not os.path.isfile(config.TRAIN.TEACHER_CFG):
            raise UsageError(f'TRAIN.TEACHER_CFG {config.TRAIN.TEACHER_CFG}: config file not found')
    weights = [('-pretrained', config.MODEL.PRETRAINED, config), ('-resume', config.MODEL.RESUME, None)]
    if config.TRAIN.DISTILLATION_TYPE != 'none' and not config.EVAL:
        weights.append(('TRAIN.TEACHER_PRETRAINED', config.TRAIN.TEACHER_PRETRAINED,
                        get_config(config.TRAIN.TEACHER_CFG)))
    for flag, path, model_config in weights:
        if path and not (flag == '-resume' and path == checkpoint.AUTO):
            try:
                fileio.check_header(cvt.resolve_weights_path(path, model_config))
            except (FileNotFoundError, fileio.FileFormatError) as err:
                raise UsageError(f'{flag}: {err}') from None


def _check_classes(config, data_classes: int, logger) -> None:
    """The model must have a logit for every class of the data; more is allowed (noted)."""
    classes = config.MODEL.NUM_CLASSES
    if classes < data_classes:
        what = 'no classifier' if classes == 0 else f'{classes} classes'
        raise UsageError(f'MODEL.NUM_CLASSES = {classes}: the model has {what}, the data {data_classes} '
                         f'(labels 0-{data_classes - 1}); set -num_classes {data_classes}')
    if classes > data_classes:
        logger.info(f'note: the data has {data_classes} classes, MODEL.NUM_CLASSES is {classes} '
                    f'(set it with -num_classes)')


def _device_memory() -> Optional[int]:
    """The GPU's memory where training runs on one; None: the machine's memory."""
    if not _use_gpu():
        return None
    return paddle.device.cuda.get_device_properties().total_memory


def _check_disk_space(config, model: nn.Layer, with_ema: bool) -> None:
    """A checkpoint (weights, AdamW's two moments, EMA, .safetensors copies) must fit in
    SAVE: stop before training rather than at the first save."""
    weights = sum(int(np.prod(p.shape)) for p in model.state_dict().values()) * 4
    copies = (1 + with_ema) * (2 if config.SAVE_SAFETENSORS else 1) + 2
    needed, free = weights * copies, shutil.disk_usage(config.SAVE).free
    if needed > free:
        raise UsageError(f'-output {config.SAVE}: a checkpoint needs about {needed / 2 ** 20:.0f} MB, '
                         f'{free / 2 ** 20:.0f} MB are free there')


def _use_gpu() -> bool:
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def run(config, multi_process: bool = False) -> Dict[str, object]:
    """Train (or with config.EVAL, only evaluate) as `config` says.

    With `multi_process`, this is one of several processes (spawned or started
    by paddle.distributed.launch); only rank 0 logs and saves. Returns the last
    validation metrics (`val`, `val_ema`), the last train loss and the last
    checkpoint path, for callers and tests.
    """
    if _use_gpu():
        # each process owns the GPU that spawn or launch selected for it (NCCL)
        paddle.set_device(f'gpu:{dist.ParallelEnv().device_id}' if multi_process else 'gpu')
    else:
        paddle.set_device('cpu')  # processes talk through gloo
    if multi_process:
        dist.init_parallel_env()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if multi_process else (0, 1)
    check_paths(config)
    plan = checkpoint.RunPlan() if config.EVAL else checkpoint.plan_run(config)
    if plan.finished:  # nothing is written
        if rank == 0:
            print(plan.finished, flush=True)
        return {'val': None, 'checkpoint': plan.checkpoint.prefix + '.pdparams', 'finished': True}
    logger = get_logger(config.SAVE, rank)
    for note in plan.notes:
        logger.info(note)
    if rank == 0:
        checkpoint.delete_run(config, plan.stale, logger.info)
    reporter = reporting.Reporter(config, logger, rank)
    reporter.log_config()
    logger.info(f'{world_size} process(es) on {paddle.get_device()}', extra=FILE_ONLY)

    seed_everything(config.SEED)
    try:
        val_set = datasets.get_dataset(config, 'val')
        train_set = None if config.EVAL else datasets.get_dataset(config, 'train')
        _check_data_sizes(config, train_set, world_size)
        val_loader = datasets.get_dataloader(config, val_set, 'val', multi_process)
        train_loader = None if config.EVAL else datasets.get_dataloader(config, train_set, 'train', multi_process)
        mixup = None if config.EVAL else mixup_lib.build_mixup(config, val_set.num_classes)
    except ValueError as err:  # the data modules' way of naming a bad path, file or key
        raise UsageError(str(err)) from None
    _check_classes(config, val_set.num_classes, logger)
    batch = config.DATA.BATCH_SIZE_EVAL if config.EVAL else config.DATA.BATCH_SIZE
    check_attention_memory(config, batch, training=not config.EVAL, available=_device_memory())

    model = cvt.build_cvt(config)
    if config.MODEL.PRETRAINED:
        try:
            cvt.load_pretrained(model, config.MODEL.PRETRAINED, log=logger.info)
        except ValueError as err:
            raise UsageError(str(err)) from None
        logger.info(f'loaded weights {config.MODEL.PRETRAINED}', extra=FILE_ONLY)
    settings = dict(train_images=None if train_set is None else len(train_set), val_images=len(val_set),
                    num_classes=val_set.num_classes, params=sum(int(np.prod(p.shape)) for p in model.parameters()),
                    world_size=world_size, device=paddle.get_device(), layers=fast.describe(model))

    if config.EVAL:
        reporter.log_settings(**settings)
        if config.MODEL.RESUME and not config.MODEL.PRETRAINED:
            checkpoint.load_weights_exactly(model, cvt.resolve_weights_path(config.MODEL.RESUME))
        start = time.time()
        metrics = validate(model, val_loader, DeviceFinish(config, training=False), world_size, expected_count=len(val_set),
                           progress=reporter.eval_progress(len(val_loader)), amp=amp_dtype(config))
        logger.info(f'----- {format_validation(metrics)}, time: {time.time() - start:.2f}s', extra=FILE_ONLY)
        reporter.evaluated(metrics, time.time() - start)
        return {'val': metrics}

    _check_disk_space(config, model, config.TRAIN.MODEL_EMA)
    steps_per_epoch = len(train_loader) // config.TRAIN.ACCUM_ITER
    trainer = build_trainer(config, model, mixup, steps_per_epoch, world_size, logger, rank)
    trainer.reporter = reporter
    resumed = checkpoint.restore(trainer, plan.checkpoint, config.TRAIN.LAST_EPOCH) if plan.checkpoint else None
    epochs_done = resumed.epoch if resumed else 0
    reporter.log_settings(**settings, epochs_done=epochs_done)
    logger.info(f'training epochs {epochs_done + 1}-{config.TRAIN.NUM_EPOCHS}: {steps_per_epoch} steps of '
                f'{global_batch_size(config, world_size)} images each, peak LR {trainer.lr_schedule.peak_lr:.3e}',
                extra=FILE_ONLY)
    reporter.start_training(epochs_done)
    try:
        with preemption.StopSignals() as trainer.stop:
            return fit(trainer, train_loader, val_loader, len(val_set), epochs_done + 1, resumed)
    finally:
        reporter.close()


def build_teacher(config, logger) -> nn.Layer:
    """The frozen teacher CvT of TRAIN.TEACHER_CFG with TRAIN.TEACHER_PRETRAINED, in eval
    mode; it must predict the student's classes."""
    teacher_config = get_config(config.TRAIN.TEACHER_CFG)
    teacher_config.defrost()
    teacher_config.MODEL.NUM_CLASSES = config.MODEL.NUM_CLASSES
    teacher_config.MODEL.LAYERS = config.MODEL.LAYERS  # the run's one choice of layers
    teacher = cvt.build_cvt(teacher_config)
    try:
        cvt.load_pretrained(teacher, config.TRAIN.TEACHER_PRETRAINED, allow_other_head=False)
    except ValueError as err:
        raise UsageError(f'teacher: {err}') from None
    for param in teacher.parameters():
        param.stop_gradient = True
    teacher.eval()
    logger.info(f'distillation ({config.TRAIN.DISTILLATION_TYPE}, alpha {config.TRAIN.DISTILLATION_ALPHA}, '
                f'tau {config.TRAIN.DISTILLATION_TAU}) from {teacher_config.MODEL.NAME} '
                f'{config.TRAIN.TEACHER_PRETRAINED}')
    return teacher


def build_criterion(config, mixup_active: bool, logger) -> nn.Layer:
    """The recipe's loss, wrapped in DistillationLoss when TRAIN.DISTILLATION_TYPE asks for it."""
    criterion = losses.build_criterion(config, mixup_active)
    if config.TRAIN.DISTILLATION_TYPE == 'none':
        return criterion
    return losses.DistillationLoss(criterion, build_teacher(config, logger), config.TRAIN.DISTILLATION_TYPE,
                                   config.TRAIN.DISTILLATION_ALPHA, config.TRAIN.DISTILLATION_TAU)


def build_trainer(config, model: nn.Layer, mixup, steps_per_epoch: int, world_size: int, logger,
                  rank: int = 0) -> Trainer:
    """Optimizer, schedule, loss, loss scaler, EMA and the process wrapper around `model`."""
    amp = amp_dtype(config)
    if config.AMP and amp is None:
        logger.info('-amp: no CUDA GPU here, and Paddle\'s autocast only works on one, '
                    'so this run trains in float32')
    lr_schedule = build_lr_schedule(config, steps_per_epoch, world_size)
    ema = ModelEma(model, cvt.build_cvt(config), config.TRAIN.MODEL_EMA_DECAY) if config.TRAIN.MODEL_EMA else None
    return Trainer(
        config=config, model=model, net=paddle.DataParallel(model) if world_size > 1 else model,
        optimizer=build_optimizer(config, model, lr_schedule), lr_schedule=lr_schedule,
        scaler=paddle.amp.GradScaler(enable=amp == 'float16'),  # bfloat16 has float32's range
        criterion=build_criterion(config, mixup is not None, logger), mixup=mixup, ema=ema,
        amp=amp, finish=DeviceFinish(config, training=True), steps_per_epoch=steps_per_epoch, world_size=world_size, logger=logger, rank=rank)


def fit(trainer: Trainer, train_loader, val_loader, val_size: int, first_epoch: int,
        resumed: Optional[checkpoint.ResumePoint] = None) -> Dict[str, object]:
    """The epoch loop from `first_epoch` to TRAIN.NUM_EPOCHS: train, validate, save.

    `resumed`: where in `first_epoch` a mid-epoch checkpoint left off."""
    config, logger, world_size = trainer.config, trainer.logger, trainer.world_size
    num_epochs = config.TRAIN.NUM_EPOCHS
    val_finish = DeviceFinish(config, training=False)
    result: Dict[str, object] = {'checkpoint': None}
    for epoch in range(first_epoch, num_epochs + 1):
        # a mid-epoch checkpoint continues its epoch at the next batch
        resumed_here = resumed if epoch == first_epoch and resumed and resumed.step else None
        first_batch = resumed_here.step * config.TRAIN.ACCUM_ITER if resumed_here else 0
        datasets.set_epoch(train_loader, epoch, first_batch)
        start = time.time()
        train_loss, train_acc, unreadable = train_one_epoch(trainer, train_loader, epoch, resumed_here)
        average_batchnorm_statistics(trainer.model, world_size)
        if trainer.ema is not None:
            average_batchnorm_statistics(trainer.ema.module, world_size)
        train_seconds, lr = time.time() - start, trainer.optimizer.get_lr()
        replaced = f', {unreadable} unreadable images replaced by others' if unreadable else ''
        logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], LR: {lr:.6e}, '
                    f'Train Loss: {train_loss:.4f}, Train Acc@1: {train_acc:.4f}, '
                    f'time: {format_seconds(train_seconds)}{replaced}', extra=FILE_ONLY)
        result['train_loss'] = train_loss
        last = epoch == num_epochs
        validated = epoch % config.VALIDATE_FREQ == 0 or last
        if validated:
            start = time.time()
            result['val'] = validate(trainer.model, val_loader, val_finish, world_size, expected_count=val_size,
                                     progress=trainer.reporter.eval_progress(len(val_loader)), amp=trainer.amp)
            logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], '
                        f'{format_validation(result["val"])}, time: {time.time() - start:.2f}s', extra=FILE_ONLY)
            if trainer.ema is not None:
                result['val_ema'] = validate(trainer.ema.module, val_loader, val_finish, world_size, expected_count=val_size,
                                             amp=trainer.amp)
                logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], '
                            f'{format_validation(result["val_ema"], prefix="EMA ")}', extra=FILE_ONLY)
        saved = checkpoint.end_of_epoch(trainer, epoch, train_loss, result['val']['acc1'] if validated else None)
        result['checkpoint'] = saved or result['checkpoint']
        trainer.reporter.end_epoch(epoch, train_loss=train_loss, train_acc1=train_acc, lr=lr,
                                   seconds=train_seconds, val=result['val'] if validated else None,
                                   val_ema=result.get('val_ema') if validated else None, checkpoint=saved,
                                   unreadable=unreadable)
    return result
