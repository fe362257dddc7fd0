"""The training and evaluation engine behind main_single_gpu.py and main_multi_gpu.py.

`run(config, multi_process)` does the whole job: data, model, optimizer, LR
schedule, resume, the epoch loop, validation and checkpoints. The pieces are
importable on their own: `train_step` (one forward/backward/update, which
tools/benchmark.py times), `train_one_epoch`, `validate`, `save_checkpoint`,
`resume`, `build_optimizer`, `build_lr_schedule`.

Randomness: the model is initialised from SEED; every epoch then reseeds Python,
NumPy and Paddle (dropout, drop path) from (SEED, epoch, rank), and the data
(`datasets.set_epoch`) and Mixup (`Mixup.set_epoch`) reseed from the same. An
epoch's randomness thus does not depend on the epochs before it, and a resumed
run repeats a straight one exactly without storing generator states.
"""

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

import cvt
import datasets
import losses
import mixup as mixup_lib
from config import get_config
from utils import AverageMeter, NonFiniteLossError, UsageError, format_seconds, get_logger

BATCH_NORMS = (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D)
# ops kept in float32 under float16 autocast: normalisation and attention weights
FLOAT32_OPS = {'layer_norm', 'softmax'}
TRAIN_STATE_FORMAT = 'cvt-train-state/1'


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


def build_optimizer(config, model: nn.Layer, lr_schedule) -> paddle.optimizer.AdamW:
    """AdamW with decoupled weight decay on the weights `decays_weight` picks,
    and global-norm gradient clipping when TRAIN.GRAD_CLIP is set."""
    opt = config.TRAIN.OPTIMIZER
    if opt.NAME.lower() != 'adamw':
        raise UsageError(f'TRAIN.OPTIMIZER.NAME = {opt.NAME!r}: only AdamW is implemented')
    decayed = {p.name for n, p in model.named_parameters() if decays_weight(n, p)}
    clip = nn.ClipGradByGlobalNorm(config.TRAIN.GRAD_CLIP) if config.TRAIN.GRAD_CLIP else None
    return paddle.optimizer.AdamW(
        learning_rate=lr_schedule, beta1=opt.BETAS[0], beta2=opt.BETAS[1], epsilon=opt.EPS,
        parameters=model.parameters(), weight_decay=config.TRAIN.WEIGHT_DECAY,
        apply_decay_param_fun=lambda name: name in decayed, grad_clip=clip)


class ModelEma:
    """Exponential moving average of a model's weights and BatchNorm statistics."""

    def __init__(self, model: nn.Layer, shadow: nn.Layer, decay: float):
        self.module = shadow
        self.module.set_state_dict(model.state_dict())
        self.module.eval()
        self.decay = decay

    @paddle.no_grad()
    def update(self, model: nn.Layer) -> None:
        averages = self.module.state_dict()
        for key, value in model.state_dict().items():
            average = averages[key]
            average.set_value(average * self.decay + value.detach() * (1.0 - self.decay))


def train_step(model: nn.Layer, images: paddle.Tensor, targets: paddle.Tensor, criterion: nn.Layer,
               optimizer: paddle.optimizer.Optimizer, scaler: paddle.amp.GradScaler, *,
               autocast: bool = False, accum_iter: int = 1,
               update: bool = True) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Forward and backward one (micro-)batch; with `update`, also step the optimizer.

    The loss is divided by `accum_iter` before backward so that `accum_iter`
    accumulated micro-batches give the gradient of their mean loss. Returns the
    undivided loss and the logits.
    """
    with paddle.amp.auto_cast(enable=autocast, level='O1', dtype='float16',
                              custom_black_list=FLOAT32_OPS):
        logits = model(images)
    if isinstance(criterion, losses.DistillationLoss):
        loss = criterion(images, logits.astype('float32'), targets)  # the teacher sees the images too
    else:
        loss = criterion(logits.astype('float32'), targets)
    scaler.scale(loss / accum_iter).backward()
    if update:
        scaler.step(optimizer)
        scaler.update()
        optimizer.clear_grad()
    return loss, logits


def count_correct(logits: paddle.Tensor, labels: paddle.Tensor, k: int) -> int:
    """How many rows of `logits` have their label among the top `k` classes."""
    top = paddle.topk(logits, k=min(k, logits.shape[-1]), axis=-1)[1]
    return int((top == labels.reshape([-1, 1]).astype(top.dtype)).any(axis=-1).astype('int64').sum())


def all_reduce_sums(values, world_size: int) -> np.ndarray:
    """Sum a few numbers over all processes (as float64 on the host)."""
    values = np.asarray(values, dtype=np.float64)
    if world_size > 1:
        tensor = paddle.to_tensor(values)
        dist.all_reduce(tensor)
        values = tensor.numpy()
    return values


def average_batchnorm_statistics(model: nn.Layer, world_size: int) -> None:
    """Give every process the mean of the BatchNorm running statistics, which
    each process has gathered from its own share of the data."""
    if world_size < 2:
        return
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, BATCH_NORMS):
            for stat in (layer._mean, layer._variance):
                dist.all_reduce(stat)
                stat.set_value(stat / world_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    paddle.seed(seed)


def epoch_seed(base_seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([base_seed, epoch, rank]).generate_state(1)[0])


@dataclass
class Trainer:
    """Everything one training run holds; `model` is the bare model, `net` the
    one to call (a DataParallel wrapper with several processes)."""
    config: object
    model: nn.Layer
    net: nn.Layer
    optimizer: paddle.optimizer.AdamW
    lr_schedule: WarmupCosineSchedule
    scaler: paddle.amp.GradScaler
    criterion: nn.Layer
    mixup: Optional[object]
    ema: Optional[ModelEma]
    autocast: bool
    steps_per_epoch: int
    world_size: int
    logger: object


def train_one_epoch(trainer: Trainer, loader, epoch: int) -> Tuple[float, float]:
    """Train one epoch (numbered from 1); return the mean loss and top-1 accuracy
    over all processes. Accuracy under mixup is against the unmixed labels."""
    config, logger = trainer.config, trainer.logger
    accum = config.TRAIN.ACCUM_ITER
    micro_steps = trainer.steps_per_epoch * accum  # a last incomplete accumulation is dropped
    num_epochs = config.TRAIN.NUM_EPOCHS
    trainer.net.train()
    loss_meter, acc_meter = AverageMeter(), AverageMeter()
    start = time.time()
    for step, (images, labels) in enumerate(loader):
        if step >= micro_steps:
            break
        targets = labels
        if trainer.mixup is not None:
            images, targets = trainer.mixup(images, labels)
        update = (step + 1) % accum == 0
        # between updates, processes keep their gradients local (no all-reduce)
        sync = trainer.net.no_sync() if trainer.world_size > 1 and not update else nullcontext()
        with sync:
            loss, logits = train_step(trainer.net, images, targets, trainer.criterion, trainer.optimizer,
                                      trainer.scaler, autocast=trainer.autocast, accum_iter=accum,
                                      update=update)
        if update:
            trainer.lr_schedule.step()
            if trainer.ema is not None:
                trainer.ema.update(trainer.model)
        n = images.shape[0]
        loss_sum, correct, count = all_reduce_sums(
            [float(loss) * n, count_correct(logits, labels, 1), n], trainer.world_size)
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f'the training loss is {loss_sum / count} at epoch {epoch}, step {step + 1}/{micro_steps}; '
                f'training stopped (checkpoints written before are kept in {config.SAVE})')
        loss_meter.update(loss_sum / count, int(count))
        acc_meter.update(correct / count, int(count))
        if (step + 1) % config.REPORT_FREQ == 0 or step + 1 == micro_steps:
            elapsed = time.time() - start
            left = elapsed / (step + 1) * ((micro_steps - step - 1) + micro_steps * (num_epochs - epoch))
            logger.info(
                f'Epoch[{epoch:03d}/{num_epochs:03d}], Step[{step + 1:04d}/{micro_steps:04d}], '
                f'Loss: {loss_sum / count:.4f} (avg {loss_meter.avg:.4f}), '
                f'Acc@1: {correct / count:.4f} (avg {acc_meter.avg:.4f}), '
                f'LR: {trainer.optimizer.get_lr():.6e}, {loss_meter.count / elapsed:.1f} images/s, '
                f'time left: {format_seconds(left)}')
    return loss_meter.avg, acc_meter.avg


@paddle.no_grad()
def validate(model: nn.Layer, loader, world_size: int = 1, expected_count: Optional[int] = None
             ) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy over the whole val set.

    Each process evaluates its own shard; sums are combined over processes, so
    every image counts once. `expected_count` (the val set size) guards that.
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels in loader:
        logits = model(images).astype('float32')
        labels = labels.reshape([-1])
        loss_sum += float(F.cross_entropy(logits, labels, reduction='sum'))
        correct1 += count_correct(logits, labels, 1)
        correct5 += count_correct(logits, labels, 5)
        count += labels.shape[0]
    loss_sum, correct1, correct5, count = all_reduce_sums([loss_sum, correct1, correct5, count], world_size)
    if expected_count is not None and int(count) != expected_count:
        raise RuntimeError(f'validation saw {int(count)} images, the val set has {expected_count}')
    return {'loss': loss_sum / max(count, 1), 'acc1': correct1 / max(count, 1),
            'acc5': correct5 / max(count, 1), 'count': int(count)}


def format_validation(metrics: Dict[str, float], prefix: str = '') -> str:
    """PaddleViT's validation line."""
    return (f'{prefix}Validation Loss: {metrics["loss"]:.4f}, Validation Acc@1: {metrics["acc1"]:.4f}, '
            f'Validation Acc@5: {metrics["acc5"]:.4f} ({metrics["count"]} images)')


def _rename_optimizer_state(state: dict, names: Dict[str, str]) -> dict:
    """Rename the per-parameter entries of an optimizer state dict through `names`.

    Paddle keys optimizer state by parameter names such as `linear_3.w_0`, which
    depend on how many layers the process built before; checkpoints store the
    model's structured names instead (`stages.0.patch_embed.proj.weight`).
    Keys are `<param name>_<accumulator>`, e.g. `linear_3.w_0_moment1_0`.
    """
    def rename(key: str) -> str:
        start = key.rfind('.') + 1
        for pos in (i for i, ch in enumerate(key) if ch == '_' and i >= start):
            if key[:pos] in names:
                return names[key[:pos]] + key[pos:]
        return names.get(key, key)

    renamed = {}
    for key, value in state.items():
        if key == 'master_weights' and isinstance(value, dict):
            renamed[key] = {names.get(k, k): v for k, v in value.items()}
        elif key == 'LR_Scheduler':
            renamed[key] = value
        else:
            renamed[rename(key)] = value
    return renamed


def _write_atomically(obj, path: str) -> None:
    """paddle.save to a temporary file, flush it to disk, then rename it over
    `path`: a reader (or a process killed meanwhile) never sees half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    paddle.save(obj, tmp)
    with open(tmp, 'rb') as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)


def checkpoint_prefix(config, epoch: int, loss: float) -> str:
    """PaddleViT's naming: <SAVE>/<MODEL.TYPE>-Epoch-<N>-Loss-<train loss>."""
    return os.path.join(config.SAVE, f'{config.MODEL.TYPE}-Epoch-{epoch}-Loss-{loss:.4f}')


def save_checkpoint(trainer: Trainer, epoch: int, loss: float) -> str:
    """Write `<prefix>.pdparams` (weights), `<prefix>.pdopt` (the training state)
    and with EMA `<prefix>-EMA.pdparams`; return the .pdparams path.

    Each file is written atomically and the .pdparams last, so a .pdparams file
    always has its complete companions.
    """
    prefix = checkpoint_prefix(trainer.config, epoch, loss)
    if trainer.ema is not None:
        _write_atomically(trainer.ema.module.state_dict(), prefix + '-EMA.pdparams')
    structured = {p.name: n for n, p in trainer.model.named_parameters()}
    _write_atomically({
        'format': TRAIN_STATE_FORMAT,
        'epoch': epoch,
        'optimizer': _rename_optimizer_state(trainer.optimizer.state_dict(), structured),
        'lr_schedule': trainer.lr_schedule.state_dict(),
        'scaler': trainer.scaler.state_dict(),
        'global_batch_size': global_batch_size(trainer.config, trainer.world_size),
    }, prefix + '.pdopt')
    _write_atomically(trainer.model.state_dict(), prefix + '.pdparams')
    return prefix + '.pdparams'


def _load_weights_exactly(model: nn.Layer, path: str) -> None:
    try:
        cvt.load_pretrained(model, path, allow_other_head=False)
    except ValueError as err:
        raise UsageError(str(err)) from None


def resume(trainer: Trainer, path: str, last_epoch: int = 0) -> int:
    """Restore a checkpoint written by `save_checkpoint`; return the epochs done.

    `path` may omit `.pdparams`. A PaddleViT `.pdopt` (a bare optimizer state)
    also loads, with the epoch from `last_epoch`; a nonzero `last_epoch`
    overrides the checkpoint's epoch in any case.
    """
    params_path = cvt.resolve_weights_path(path)
    prefix = params_path[:-len('.pdparams')]
    state_path = prefix + '.pdopt'
    if not os.path.isfile(state_path):
        raise UsageError(f'{state_path} not found: -resume needs the training state beside the weights '
                         f'(use -pretrained to start a new training from weights only)')
    _load_weights_exactly(trainer.model, params_path)
    state = paddle.load(state_path)
    log = trainer.logger.info
    if isinstance(state, dict) and state.get('format') == TRAIN_STATE_FORMAT:
        param_names = {n: p.name for n, p in trainer.model.named_parameters()}
        trainer.optimizer.set_state_dict(_rename_optimizer_state(state['optimizer'], param_names))
        trainer.lr_schedule.set_state_dict(state['lr_schedule'])
        if state['scaler']:
            trainer.scaler.load_state_dict(state['scaler'])
        epoch = state['epoch']
        global_batch = global_batch_size(trainer.config, trainer.world_size)
        if state['global_batch_size'] != global_batch:
            log(f'note: the checkpoint trained with a global batch of {state["global_batch_size"]}, '
                f'this run uses {global_batch}')
    else:
        if not last_epoch:
            raise UsageError(f'{state_path} holds only optimizer state (PaddleViT format): '
                             f'give the epoch it ended with -last_epoch N')
        # a key of one of this model's parameters renames to '_<accumulator>'
        renamed = _rename_optimizer_state(state, {p.name: '' for p in trainer.model.parameters()})
        if all(key.startswith('_') or key in ('LR_Scheduler', 'master_weights') for key in renamed):
            # Paddle refuses an optimizer state without the schedule's; the epoch sets its position below
            trainer.optimizer.set_state_dict({'LR_Scheduler': trainer.lr_schedule.state_dict(), **state})
        else:
            log(f'{state_path}: its parameter names are another process\'s; AdamW\'s moments restart '
                f'from zero (weights, epoch and LR schedule are restored)')
        epoch = last_epoch
    if last_epoch and last_epoch != epoch:
        log(f'-last_epoch {last_epoch} overrides the checkpoint\'s epoch {epoch}')
        epoch = last_epoch
    position = epoch * trainer.steps_per_epoch
    if trainer.lr_schedule.last_epoch != position:
        # another epoch (-last_epoch), batch or process count: the schedule follows the epoch
        trainer.lr_schedule.last_epoch = position
        trainer.lr_schedule.last_lr = trainer.lr_schedule.get_lr()
    if trainer.ema is not None:
        ema_path = prefix + '-EMA.pdparams'
        if os.path.isfile(ema_path):
            _load_weights_exactly(trainer.ema.module, ema_path)
        else:
            trainer.ema.module.set_state_dict(trainer.model.state_dict())
            log(f'{ema_path} not found: the EMA restarts from the resumed weights')
    log(f'resumed from {params_path} after epoch {epoch}')
    return epoch


def _check_data_sizes(config, train_set, val_set, world_size: int) -> None:
    if config.DATA.BATCH_SIZE_EVAL > len(val_set):
        raise UsageError(f'DATA.BATCH_SIZE_EVAL = {config.DATA.BATCH_SIZE_EVAL} is larger than the val set '
                         f'({len(val_set)} images)')
    if train_set is not None:
        needed = global_batch_size(config, world_size)
        if len(train_set) < needed:
            raise UsageError(f'the train set ({len(train_set)} images) is smaller than one optimizer step '
                             f'(batch {config.DATA.BATCH_SIZE} x {world_size} processes x ACCUM_ITER '
                             f'{config.TRAIN.ACCUM_ITER} = {needed})')


def check_paths(config) -> None:
    """Fail on missing weights or data before anything is built (cheap: a
    launcher calls it before starting processes)."""
    if not os.path.isdir(config.DATA.DATA_PATH):
        raise UsageError(f'-data_path {config.DATA.DATA_PATH}: folder not found')
    for flag, path in (('-pretrained', config.MODEL.PRETRAINED), ('-resume', config.MODEL.RESUME)):
        if path:
            try:
                cvt.resolve_weights_path(path)
            except FileNotFoundError as err:
                raise UsageError(f'{flag}: {err}') from None
    if config.EVAL and not (config.MODEL.PRETRAINED or config.MODEL.RESUME):
        raise UsageError('-eval needs the weights to evaluate: -pretrained PATH')
    if config.TRAIN.DISTILLATION_TYPE != 'none' and not config.EVAL:
        if not config.TRAIN.TEACHER_CFG or not config.TRAIN.TEACHER_PRETRAINED:
            raise UsageError(f'TRAIN.DISTILLATION_TYPE = {config.TRAIN.DISTILLATION_TYPE!r} needs '
                             f'TRAIN.TEACHER_CFG and TRAIN.TEACHER_PRETRAINED')
        if not os.path.isfile(config.TRAIN.TEACHER_CFG):
            raise UsageError(f'TRAIN.TEACHER_CFG {config.TRAIN.TEACHER_CFG}: config file not found')
        try:
            cvt.resolve_weights_path(config.TRAIN.TEACHER_PRETRAINED)
        except FileNotFoundError as err:
            raise UsageError(f'TRAIN.TEACHER_PRETRAINED: {err}') from None


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
    logger = get_logger(config.SAVE, rank)
    check_paths(config)
    logger.info(f'config:\n{config}')
    logger.info(f'{world_size} process(es) on {paddle.get_device()}')

    seed_everything(config.SEED)
    try:
        val_set = datasets.get_dataset(config, 'val')
        train_set = None if config.EVAL else datasets.get_dataset(config, 'train')
        _check_data_sizes(config, train_set, val_set, world_size)
        val_loader = datasets.get_dataloader(config, val_set, 'val', multi_process)
        train_loader = None if config.EVAL else datasets.get_dataloader(config, train_set, 'train', multi_process)
        mixup = None if config.EVAL else mixup_lib.build_mixup(config, val_set.num_classes)
    except ValueError as err:  # the data modules' way of naming a bad path, file or key
        raise UsageError(str(err)) from None
    if config.MODEL.NUM_CLASSES != val_set.num_classes:
        logger.info(f'note: the data has {val_set.num_classes} classes, MODEL.NUM_CLASSES is '
                    f'{config.MODEL.NUM_CLASSES} (set it with -num_classes)')

    model = cvt.build_cvt(config)
    if config.MODEL.PRETRAINED:
        try:
            cvt.load_pretrained(model, config.MODEL.PRETRAINED, log=logger.info)
        except ValueError as err:
            raise UsageError(str(err)) from None
        logger.info(f'loaded weights {config.MODEL.PRETRAINED}')

    if config.EVAL:
        if config.MODEL.RESUME and not config.MODEL.PRETRAINED:
            _load_weights_exactly(model, cvt.resolve_weights_path(config.MODEL.RESUME))
        start = time.time()
        metrics = validate(model, val_loader, world_size, expected_count=len(val_set))
        logger.info(f'----- {format_validation(metrics)}, time: {time.time() - start:.2f}s')
        return {'val': metrics}

    steps_per_epoch = len(train_loader) // config.TRAIN.ACCUM_ITER
    trainer = build_trainer(config, model, mixup, steps_per_epoch, world_size, logger)
    epochs_done = resume(trainer, config.MODEL.RESUME, config.TRAIN.LAST_EPOCH) if config.MODEL.RESUME else 0
    logger.info(f'training epochs {epochs_done + 1}-{config.TRAIN.NUM_EPOCHS}: {steps_per_epoch} steps of '
                f'{global_batch_size(config, world_size)} images each, peak LR {trainer.lr_schedule.peak_lr:.3e}')
    return fit(trainer, train_loader, val_loader, len(val_set), epochs_done + 1, rank)


def build_teacher(config, logger) -> nn.Layer:
    """The frozen teacher CvT of TRAIN.TEACHER_CFG with TRAIN.TEACHER_PRETRAINED, in eval
    mode; it must predict the student's classes."""
    teacher_config = get_config(config.TRAIN.TEACHER_CFG)
    teacher_config.defrost()
    teacher_config.MODEL.NUM_CLASSES = config.MODEL.NUM_CLASSES
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


def build_trainer(config, model: nn.Layer, mixup, steps_per_epoch: int, world_size: int, logger) -> Trainer:
    """Optimizer, schedule, loss, loss scaler, EMA and the process wrapper around `model`."""
    use_amp = config.AMP and _use_gpu()
    if config.AMP and not use_amp:
        logger.info('-amp: no CUDA GPU here, and Paddle\'s autocast only works on one, '
                    'so this run trains in float32')
    lr_schedule = build_lr_schedule(config, steps_per_epoch, world_size)
    ema = ModelEma(model, cvt.build_cvt(config), config.TRAIN.MODEL_EMA_DECAY) if config.TRAIN.MODEL_EMA else None
    return Trainer(
        config=config, model=model, net=paddle.DataParallel(model) if world_size > 1 else model,
        optimizer=build_optimizer(config, model, lr_schedule), lr_schedule=lr_schedule,
        scaler=paddle.amp.GradScaler(enable=use_amp),
        criterion=build_criterion(config, mixup is not None, logger), mixup=mixup, ema=ema,
        autocast=use_amp, steps_per_epoch=steps_per_epoch, world_size=world_size, logger=logger)


def fit(trainer: Trainer, train_loader, val_loader, val_size: int, first_epoch: int, rank: int
        ) -> Dict[str, object]:
    """The epoch loop from `first_epoch` to TRAIN.NUM_EPOCHS: train, validate, save."""
    config, logger, world_size = trainer.config, trainer.logger, trainer.world_size
    num_epochs = config.TRAIN.NUM_EPOCHS
    result: Dict[str, object] = {'checkpoint': None}
    for epoch in range(first_epoch, num_epochs + 1):
        seed_everything(epoch_seed(config.SEED, epoch, rank))
        datasets.set_epoch(train_loader, epoch)
        if trainer.mixup is not None:
            trainer.mixup.set_epoch(epoch)
        start = time.time()
        train_loss, train_acc = train_one_epoch(trainer, train_loader, epoch)
        average_batchnorm_statistics(trainer.model, world_size)
        if trainer.ema is not None:
            average_batchnorm_statistics(trainer.ema.module, world_size)
        logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], LR: {trainer.optimizer.get_lr():.6e}, '
                    f'Train Loss: {train_loss:.4f}, Train Acc@1: {train_acc:.4f}, '
                    f'time: {format_seconds(time.time() - start)}')
        result['train_loss'] = train_loss
        last = epoch == num_epochs
        if epoch % config.VALIDATE_FREQ == 0 or last:
            start = time.time()
            result['val'] = validate(trainer.model, val_loader, world_size, expected_count=val_size)
            logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], '
                        f'{format_validation(result["val"])}, time: {time.time() - start:.2f}s')
            if trainer.ema is not None:
                result['val_ema'] = validate(trainer.ema.module, val_loader, world_size, expected_count=val_size)
                logger.info(f'----- Epoch[{epoch:03d}/{num_epochs:03d}], '
                            f'{format_validation(result["val_ema"], prefix="EMA ")}')
        if epoch % config.SAVE_FREQ == 0 or last:
            if rank == 0:
                result['checkpoint'] = save_checkpoint(trainer, epoch, train_loss)
                logger.info(f'----- saved {result["checkpoint"]}')
            if world_size > 1:
                dist.barrier()
    return result
