"""Training checkpoints: written whole, found again, resumed from exactly, pruned.

Files in the output folder (SAVE), named after MODEL.TYPE (here CvT):

* ``CvT-Epoch-<N>-Loss-<train loss>``: after epoch N (PaddleViT's naming);
* ``CvT-Epoch-<N>-Step-<S>``: S optimizer steps into epoch N (every SAVE_STEP_FREQ
  steps, and when a stop signal ends the run); each replaces the one before;
* ``CvT-best.pdparams``: the weights with the best validation top-1 so far.

A checkpoint is ``<prefix>.pdparams`` (weights), ``<prefix>.pdopt`` (the
training state: optimizer, LR schedule position, loss scaler, epoch, step, the
epoch's running loss and accuracy, the best top-1, and with several processes
each one's BatchNorm statistics) and with EMA ``<prefix>-EMA.pdparams``. Every
file is written under a temporary name, flushed and renamed, the .pdparams
last; deletion removes the .pdparams first. `-resume auto` takes the newest
checkpoint whose files are all there and all load, so a torn or partial one
(killed during a save, a truncated copy) is never resumed from.

The data position needs no state: the loader's order and every sample's
augmentation derive from (SEED, epoch, index), and the engine reseeds its random
generators at every step from (SEED, epoch, step, rank); the sampler starts at
the saved step (`datasets.set_epoch`).
"""

import glob
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

import cvt
import fileio
from config import PER_STAGE_KEYS
from utils import FILE_ONLY, AverageMeter, TrainingStopped, UsageError

TRAIN_STATE_FORMAT = 'cvt-train-state/1'
BATCHNORM_STATISTICS = ('._mean', '._variance')
AUTO = 'auto'  # -resume auto
# the settings that define a run: a checkpoint of other settings is another run's
RUN_KEYS = ('SEED', 'DATA.DATASET', 'DATA.IMAGE_SIZE', 'MODEL.NUM_CLASSES', 'MODEL.NUM_STAGES', 'MODEL.INIT',
            *(f'MODEL.{key}' for key in PER_STAGE_KEYS), 'TRAIN.NUM_EPOCHS', 'TRAIN.WARMUP_EPOCHS',
            'TRAIN.BASE_LR', 'TRAIN.WARMUP_START_LR', 'TRAIN.END_LR', 'TRAIN.WEIGHT_DECAY',
            'TRAIN.LINEAR_SCALED_LR', 'TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME')
# <TYPE>-Epoch-<N>-Loss-<loss> or <TYPE>-Epoch-<N>-Step-<S>, without the extension
# the files of one checkpoint, in the order of deletion (the .pdparams marks it whole)
CHECKPOINT_SUFFIXES = ('.pdparams', '.pdopt', '-EMA.pdparams', '.safetensors', '-EMA.safetensors')
# the files besides the .pdparams, longest first (-EMA.safetensors before .safetensors)
_COMPANION_SUFFIXES = sorted(CHECKPOINT_SUFFIXES[1:], key=len, reverse=True)
NAME_TAIL = re.compile(r'-Epoch-(\d+)-(?:Loss-[\d.]+|Step-(\d+))$')


class UnreadableCheckpoint(Exception):
    """A checkpoint file is missing or does not load."""


@dataclass
class ResumePoint:
    """Where a resumed run continues: `epoch` epochs done, then `step` optimizer
    steps of the next one, whose running loss and accuracy were `meters`."""
    epoch: int
    step: int = 0
    meters: Dict[str, Tuple[float, int]] = field(default_factory=dict)

    def meter(self, name: str) -> AverageMeter:
        meter = AverageMeter()
        meter.sum, meter.count = self.meters.get(name, (0.0, 0))
        return meter


@dataclass
class Checkpoint:
    """The loaded files of one checkpoint."""
    prefix: str
    state: object  # the .pdopt: our training state, or a PaddleViT optimizer state
    ema_path: Optional[str]


# ------------------------------------------------------------------ writing

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


def checkpoint_prefix(config, epoch: int, loss: float) -> str:
    """PaddleViT's naming: <SAVE>/<MODEL.TYPE>-Epoch-<N>-Loss-<train loss>."""
    return os.path.join(config.SAVE, f'{config.MODEL.TYPE}-Epoch-{epoch}-Loss-{loss:.4f}')


def step_checkpoint_prefix(config, epoch: int, step: int) -> str:
    """<SAVE>/<MODEL.TYPE>-Epoch-<N>-Step-<S>: S optimizer steps into epoch N."""
    return os.path.join(config.SAVE, f'{config.MODEL.TYPE}-Epoch-{epoch}-Step-{step}')


def best_path(config) -> str:
    return os.path.join(config.SAVE, f'{config.MODEL.TYPE}-best.pdparams')


def _buffers(layer: paddle.nn.Layer) -> Dict[str, paddle.Tensor]:
    """The BatchNorm running statistics (Paddle keeps them as parameters)."""
    return {name: value for name, value in layer.state_dict().items()
            if name.endswith(BATCHNORM_STATISTICS)}


def _gather_buffers(trainer) -> List[Dict[str, Dict[str, np.ndarray]]]:
    """Every process's buffers of the model and the EMA, by rank (a collective).

    Processes gather BatchNorm statistics from their own data and average them at
    the end of an epoch only, so mid-epoch each process's own are needed.
    """
    layers = {'model': trainer.model}
    if trainer.ema is not None:
        layers['ema'] = trainer.ema.module
    named = [(layer, name, value) for layer, module in layers.items()
             for name, value in _buffers(module).items()]
    if not named:
        return []
    flat = paddle.concat([value.astype('float64').reshape([-1]) for _, _, value in named])
    gathered: List[paddle.Tensor] = []
    dist.all_gather(gathered, flat)
    by_rank = []
    for tensor in gathered:
        values, offset, buffers = tensor.numpy(), 0, {layer: {} for layer in layers}
        for layer, name, value in named:
            size = int(np.prod(value.shape))
            buffers[layer][name] = values[offset:offset + size].reshape(value.shape).astype(
                str(value.numpy().dtype))
            offset += size
        by_rank.append(buffers)
    return by_rank


def _training_state(trainer, epoch: int, step: int, meters: Dict[str, AverageMeter]) -> dict:
    structured = {p.name: n for n, p in trainer.model.named_parameters()}
    return {
        'format': TRAIN_STATE_FORMAT,
        'epoch': epoch,
        'step': step,
        'meters': {name: (meter.sum, meter.count) for name, meter in meters.items()},
        'best_acc1': trainer.best_acc1,
        'optimizer': _rename_optimizer_state(trainer.optimizer.state_dict(), structured),
        'lr_schedule': trainer.lr_schedule.state_dict(),
        'scaler': trainer.scaler.state_dict(),
        'ema': trainer.ema is not None,
        'global_batch_size': trainer.global_batch_size,
        'run': run_settings(trainer.config),
    }


def _write_weights(config, weights: Dict[str, paddle.Tensor], stem: str) -> None:
    """`stem`.pdparams, after `stem`.safetensors with SAVE_SAFETENSORS."""
    if config.SAVE_SAFETENSORS:
        fileio.save_safetensors(weights, stem + fileio.SAFETENSORS_SUFFIX)
    fileio.save(weights, stem + '.pdparams')


def _write_checkpoint(trainer, prefix: str, state: dict) -> str:
    """The EMA and state files, then the .pdparams; return the .pdparams path."""
    if trainer.ema is not None:
        _write_weights(trainer.config, trainer.ema.module.state_dict(), prefix + '-EMA')
    fileio.save(state, prefix + '.pdopt')
    _write_weights(trainer.config, trainer.model.state_dict(), prefix)
    return prefix + '.pdparams'


def save_checkpoint(trainer, epoch: int, loss: float) -> str:
    """Write the checkpoint after epoch `epoch` (rank 0 only; every process has
    the same weights and BatchNorm statistics then); return its .pdparams path."""
    state = _training_state(trainer, epoch, 0, {})
    path = _write_checkpoint(trainer, checkpoint_prefix(trainer.config, epoch, loss), state)
    prune(trainer.config, path)
    return path


def save_step_checkpoint(trainer, epoch: int, step: int, meters: Dict[str, AverageMeter]) -> Optional[str]:
    """Write the checkpoint `step` optimizer steps into epoch `epoch` (numbered
    from 1). Every process calls it; rank 0 writes and gets the .pdparams path."""
    state = _training_state(trainer, epoch - 1, step, meters)
    if trainer.world_size > 1:
        state['rank_buffers'] = _gather_buffers(trainer) or None
    path = None
    if trainer.rank == 0:
        path = _write_checkpoint(trainer, step_checkpoint_prefix(trainer.config, epoch, step), state)
        prune(trainer.config, path)
    if trainer.world_size > 1:
        dist.barrier()
    return path


def best_record_path(config) -> str:
    return os.path.join(config.SAVE, f'{config.MODEL.TYPE}-best.json')


def read_best_record(config) -> Optional[dict]:
    """The run settings, epoch and top-1 of <TYPE>-best.pdparams, or None (no record)."""
    try:
        with open(best_record_path(config)) as infile:
            record = json.load(infile)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_best(trainer, epoch: int, acc1: float) -> None:
    """Keep the weights of the best validation top-1 so far as <TYPE>-best.pdparams, with
    <TYPE>-best.json naming the run, epoch and top-1: they are replaced only by a better
    epoch of the same run."""
    if trainer.best_acc1 is not None and acc1 <= trainer.best_acc1:
        return
    trainer.best_acc1 = acc1
    if trainer.rank != 0:
        return
    config, settings = trainer.config, run_settings(trainer.config)
    record = read_best_record(config)
    if record is not None and (record.get('run') != settings or acc1 <= record.get('acc1', -1.0)):
        return  # the file holds a better epoch of this run (resumed from an earlier point), or another run's
    path = best_path(config)
    _write_weights(config, trainer.model.state_dict(), path[:-len('.pdparams')])
    record = json.dumps({'run': settings, 'epoch': epoch, 'acc1': acc1}, indent=1)
    fileio.write_atomically(best_record_path(config), lambda temporary: _write_text(temporary, record))
    trainer.logger.info(f'----- best Acc@1 so far ({acc1:.4f}, epoch {epoch}): saved {path}', extra=FILE_ONLY)


def _write_text(path: str, text: str) -> None:
    with open(path, 'w') as out:
        out.write(text)


# ------------------------------------------------------------------ finding and pruning

def _progress(prefix: str) -> Optional[Tuple[int, int]]:
    """(epochs done, steps into the next) from a checkpoint name, or None if not one."""
    match = NAME_TAIL.search(prefix)
    if match is None:
        return None
    epoch = int(match.group(1))
    return (epoch - 1, int(match.group(2))) if match.group(2) is not None else (epoch, 0)


def list_checkpoints(folder: str, model_type: str) -> List[str]:
    """Prefixes of the checkpoints with a .pdparams in `folder`, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(model_type) + '-Epoch-*.pdparams')):
        prefix = path[:-len('.pdparams')]
        position = _progress(prefix)
        if position is not None and os.path.basename(prefix).startswith(model_type + '-Epoch-'):
            found.append((position, os.path.getmtime(path), prefix))
    return [prefix for *_, prefix in sorted(found, reverse=True)]


def _delete(prefix: str) -> None:
    """Remove a checkpoint, its .pdparams first so that it is never seen half removed."""
    for suffix in CHECKPOINT_SUFFIXES:
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def _remove_stale_temporaries(folder: str, model_type: str) -> None:
    """Temporary files of saves that a killed process left behind."""
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(model_type) + '-*.tmp*')):
        pid = path.rsplit('.tmp', 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            os.remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_mid_epoch(prefix: str) -> bool:
    return NAME_TAIL.search(prefix).group(2) is not None


def prune(config, newest: str) -> None:
    """After `newest` (a .pdparams path) is whole: delete the mid-epoch checkpoints
    before it, the files of torn saves before it and, with KEEP_CHECKPOINTS = K,
    all but the newest K epoch checkpoints."""
    newest_prefix = newest[:-len('.pdparams')]
    position = _progress(newest_prefix)
    folder, model_type = config.SAVE, config.MODEL.TYPE
    epoch_checkpoints = []
    for prefix in list_checkpoints(folder, model_type):
        if prefix == newest_prefix or _progress(prefix) > position:
            continue  # newer files are another run's: not ours to judge
        if _is_mid_epoch(prefix):
            _delete(prefix)
        else:
            epoch_checkpoints.append(prefix)
    if config.KEEP_CHECKPOINTS:
        kept = config.KEEP_CHECKPOINTS - (0 if _is_mid_epoch(newest_prefix) else 1)
        for prefix in epoch_checkpoints[kept:]:
            _delete(prefix)
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(model_type) + '-Epoch-*')):
        suffix = next((s for s in _COMPANION_SUFFIXES if path.endswith(s)), None)
        prefix = path[:-len(suffix)] if suffix else None
        if prefix and not os.path.exists(prefix + '.pdparams') and (_progress(prefix) or position) < position:
            _delete(prefix)  # the companions of a save killed before its .pdparams
    _remove_stale_temporaries(folder, model_type)


# ------------------------------------------------------------------ reading and resuming

def run_settings(config) -> Dict[str, object]:
    """The settings that define a training run (model, data, schedule, seed), as recorded
    in its checkpoints: a checkpoint whose settings differ belongs to another run."""
    settings = {}
    for key in RUN_KEYS:
        node = config
        for part in key.split('.'):
            node = node[part]
        settings[key] = list(node) if isinstance(node, (list, tuple)) else node
    return settings


def settings_differences(recorded: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """'KEY: A in the checkpoint, B now' for each run setting that differs."""
    return [f'{key} {recorded.get(key)!r} there, {value!r} now' for key, value in current.items()
            if recorded.get(key) != value]


def holds_a_run(config) -> List[str]:
    """The checkpoint and best-weights files of a training run in SAVE, if any."""
    found = [prefix + '.pdparams' for prefix in list_checkpoints(config.SAVE, config.MODEL.TYPE)]
    return found + [path for path in (best_path(config), best_record_path(config)) if os.path.isfile(path)]


def check_output_folder(config) -> None:
    """Before anything is written: SAVE can hold this run's files, and a new run (no
    -resume) does not land in the folder of another; cheap (no file is read)."""
    save = config.SAVE
    if os.path.exists(save) and not os.path.isdir(save):
        raise UsageError(f'-output {save}: is a file, not a folder')
    try:
        os.makedirs(save, exist_ok=True)
        with tempfile.TemporaryFile(dir=save):
            pass
    except OSError as err:
        raise UsageError(f'-output {save}: cannot write into it ({err.strerror or err})') from None
    if config.EVAL:
        return
    if config.OVERWRITE and config.MODEL.RESUME:
        raise UsageError('-overwrite starts a new run and -resume continues one: give one of them')
    if config.MODEL.RESUME == AUTO:
        return  # plan_run reads the checkpoints and checks that they are this run's
    found = holds_a_run(config)
    own = config.MODEL.RESUME and os.path.dirname(os.path.abspath(config.MODEL.RESUME)) == os.path.abspath(save)
    if found and not config.OVERWRITE and not own:
        raise UsageError(f'-output {save} already holds the files of a training run ({os.path.basename(found[0])}'
                         f'{f" and {len(found) - 1} more" if len(found) > 1 else ""}): continue it with '
                         f'-resume auto, write this run elsewhere with -output DIR, or replace it with -overwrite')


@dataclass
class RunPlan:
    """Where a training run starts, decided before anything is written: `checkpoint` to
    resume from (or None), `stale` files to delete (-overwrite), `notes` to log, and
    `finished`, the one line of a run that is already complete (nothing to do)."""
    checkpoint: Optional[Checkpoint] = None
    stale: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    finished: Optional[str] = None


def plan_run(config) -> RunPlan:
    """Read what -resume (or -overwrite) asks for and check it against this run's settings;
    UsageError for a -resume auto checkpoint of another run."""
    plan = RunPlan()
    settings = run_settings(config)
    if config.OVERWRITE:
        plan.stale = holds_a_run(config)
        return plan
    if not config.MODEL.RESUME:
        return plan
    if config.MODEL.RESUME == AUTO:
        for prefix in list_checkpoints(config.SAVE, config.MODEL.TYPE):
            try:
                plan.checkpoint = read_checkpoint(prefix + '.pdparams')
                break
            except UnreadableCheckpoint as err:
                plan.notes.append(f'-resume auto: skipping {os.path.basename(prefix)}, it is not whole: {err}')
        if plan.checkpoint is None:
            record = read_best_record(config)
            if record is not None and record.get('run') != settings:
                raise UsageError(f'-resume auto: {best_path(config)} is another run\'s (settings differ: '
                                 f'{"; ".join(settings_differences(record.get("run") or {}, settings))}); '
                                 f'write this run elsewhere with -output DIR, or replace it with -overwrite')
            plan.notes.append(f'-resume auto: no checkpoint in {config.SAVE}, training from scratch')
            return plan
    else:
        try:
            plan.checkpoint = read_checkpoint(cvt.resolve_weights_path(config.MODEL.RESUME))
        except (UnreadableCheckpoint, FileNotFoundError) as err:
            raise UsageError(f'-resume: {err}') from None
    state, name = plan.checkpoint.state, plan.checkpoint.prefix + '.pdparams'
    recorded = state.get('run') if isinstance(state, dict) else None
    if recorded is None:
        plan.notes.append(f'note: {name} records no run settings (written by an earlier version or by '
                          f'PaddleViT): not checked against this run\'s')
    elif recorded != settings:
        differences = '; '.join(settings_differences(recorded, settings))
        if config.MODEL.RESUME == AUTO:
            raise UsageError(f'-resume auto: {name} is another run\'s (settings differ: {differences}); continue '
                             f'it with its own settings, write this run elsewhere with -output DIR, or '
                             f'replace it with -overwrite')
        plan.notes.append(f'note: {name} trained with other settings ({differences})')
    if isinstance(state, dict) and state.get('format') == TRAIN_STATE_FORMAT and not state.get('step') \
            and state.get('epoch') >= config.TRAIN.NUM_EPOCHS and not config.TRAIN.LAST_EPOCH:
        plan.finished = (f'this run is finished: {name} is the checkpoint after epoch {state["epoch"]} of '
                         f'{config.TRAIN.NUM_EPOCHS}; nothing to train (evaluate it with -eval -pretrained '
                         f'{name}, or start another run in another -output)')
    return plan


def delete_run(config, paths: List[str], log) -> None:
    """-overwrite: remove the files of the run that was in SAVE."""
    for path in paths:
        if path.endswith('.pdparams') and NAME_TAIL.search(path[:-len('.pdparams')]):
            _delete(path[:-len('.pdparams')])
        else:
            for stem in (path,) + ((path[:-len('.pdparams')] + fileio.SAFETENSORS_SUFFIX,)
                                   if path.endswith('.pdparams') else ()):
                if os.path.exists(stem):
                    os.remove(stem)
    if paths:
        log(f'-overwrite: removed the earlier run\'s files from {config.SAVE} ({len(paths)} checkpoint(s) '
            f'and best weights)')


def read_checkpoint(params_path: str) -> Checkpoint:
    """Load the files of the checkpoint whose weights are `params_path`, checking that
    each is there and loads; raise UnreadableCheckpoint naming the file otherwise."""
    prefix = params_path[:-len('.pdparams')]
    state_path = prefix + '.pdopt'
    if not os.path.isfile(state_path):
        raise UnreadableCheckpoint(f'{state_path} not found: -resume needs the training state beside the '
                                   f'weights (use -pretrained to start a new training from weights only)')
    loaded = {}
    for path in (params_path, state_path):
        try:
            loaded[path] = fileio.load(path)
        except fileio.UnsafeFileError:
            raise  # not torn but hostile: the run stops
        except (fileio.FileFormatError, OSError) as err:
            raise UnreadableCheckpoint(str(err)) from None
    state = loaded[state_path]
    ema_path = prefix + '-EMA.pdparams'
    if isinstance(state, dict) and state.get('ema'):
        try:
            fileio.load(ema_path)
        except fileio.UnsafeFileError:
            raise
        except (fileio.FileFormatError, OSError) as err:
            raise UnreadableCheckpoint(f'{ema_path}: missing or cannot be loaded ({err})') from None
    return Checkpoint(prefix, state, ema_path if os.path.isfile(ema_path) else None)


def load_weights_exactly(model: paddle.nn.Layer, path: str) -> None:
    """Load `path` into `model`; any other key or shape is a UsageError."""
    try:
        cvt.load_pretrained(model, path, allow_other_head=False)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _restore_training_state(trainer, state: dict) -> ResumePoint:
    log = trainer.logger.info
    param_names = {n: p.name for n, p in trainer.model.named_parameters()}
    trainer.optimizer.set_state_dict(_rename_optimizer_state(state['optimizer'], param_names))
    trainer.lr_schedule.set_state_dict(state['lr_schedule'])
    if state['scaler']:
        trainer.scaler.load_state_dict(state['scaler'])
    trainer.best_acc1 = state.get('best_acc1')
    point = ResumePoint(state['epoch'], state.get('step', 0), dict(state.get('meters', {})))
    if state['global_batch_size'] != trainer.global_batch_size:
        log(f'note: the checkpoint trained with a global batch of {state["global_batch_size"]}, '
            f'this run uses {trainer.global_batch_size}')
        if point.step:  # continue at the same image of the epoch's order, as near as batches allow
            point.step = point.step * state['global_batch_size'] // trainer.global_batch_size
    point.step = min(point.step, trainer.steps_per_epoch)
    rank_buffers = state.get('rank_buffers')
    if rank_buffers and len(rank_buffers) == trainer.world_size:
        own = rank_buffers[trainer.rank]
        _set_buffers(trainer.model, own['model'])
        if trainer.ema is not None and 'ema' in own:
            _set_buffers(trainer.ema.module, own['ema'])
    elif rank_buffers:
        log(f'note: the checkpoint ran {len(rank_buffers)} processes, this run {trainer.world_size}: '
            f'every process continues with the BatchNorm statistics of its first')
    return point


def _set_buffers(layer: paddle.nn.Layer, values: Dict[str, np.ndarray]) -> None:
    buffers = _buffers(layer)
    for name, value in values.items():
        buffers[name].set_value(value)


def restore(trainer, checkpoint: Checkpoint, last_epoch: int = 0) -> ResumePoint:
    """Put a read checkpoint into `trainer`; return where training continues.

    A PaddleViT `.pdopt` (a bare optimizer state) also loads, with the epoch
    from `last_epoch`; a nonzero `last_epoch` overrides the checkpoint's epoch
    (and restarts that epoch's steps) in any case.
    """
    log = trainer.logger.info
    params_path, state = checkpoint.prefix + '.pdparams', checkpoint.state
    load_weights_exactly(trainer.model, params_path)
    if trainer.ema is not None:
        if checkpoint.ema_path:
            load_weights_exactly(trainer.ema.module, checkpoint.ema_path)
        else:
            trainer.ema.module.set_state_dict(trainer.model.state_dict())
            log(f'{checkpoint.prefix}-EMA.pdparams not found: the EMA restarts from the resumed weights')
    if isinstance(state, dict) and state.get('format') == TRAIN_STATE_FORMAT:
        point = _restore_training_state(trainer, state)
    else:
        if not last_epoch:
            raise UsageError(f'{checkpoint.prefix}.pdopt holds only optimizer state (PaddleViT format): '
                             f'give the epoch it ended with -last_epoch N')
        # a key of one of this model's parameters renames to '_<accumulator>'
        renamed = _rename_optimizer_state(state, {p.name: '' for p in trainer.model.parameters()})
        if all(key.startswith('_') or key in ('LR_Scheduler', 'master_weights') for key in renamed):
            # Paddle refuses an optimizer state without the schedule's; the epoch sets its position below
            trainer.optimizer.set_state_dict({'LR_Scheduler': trainer.lr_schedule.state_dict(), **state})
        else:
            log(f'{checkpoint.prefix}.pdopt: its parameter names are another process\'s; AdamW\'s moments '
                f'restart from zero (weights, epoch and LR schedule are restored)')
        point = ResumePoint(last_epoch)
    if last_epoch and last_epoch != point.epoch:
        log(f'-last_epoch {last_epoch} overrides the checkpoint\'s epoch {point.epoch}')
        point = ResumePoint(last_epoch)
    position = point.epoch * trainer.steps_per_epoch + point.step
    if trainer.lr_schedule.last_epoch != position:
        # another epoch (-last_epoch), batch or process count: the schedule follows the position
        trainer.lr_schedule.last_epoch = position
        trainer.lr_schedule.last_lr = trainer.lr_schedule.get_lr()
    where = f'epoch {point.epoch + 1}, step {point.step}' if point.step else f'after epoch {point.epoch}'
    log(f'resumed from {params_path} ({where})')
    return point


# ------------------------------------------------------------------ the training loop's calls

def step_checkpoint_due(trainer, epoch: int, step: int) -> bool:
    """Whether a mid-epoch checkpoint is due after optimizer step `step` of epoch `epoch`."""
    every = trainer.config.SAVE_STEP_FREQ
    global_step = (epoch - 1) * trainer.steps_per_epoch + step
    return every > 0 and global_step % every == 0 and step < trainer.steps_per_epoch


def after_optimizer_step(trainer, epoch: int, step: int, meters: Dict[str, AverageMeter], stop_code: int) -> None:
    """Called by every process after the optimizer steps at which the training figures
    are read back (`step` of epoch `epoch`, both from 1; `meters` up to date): writes the
    mid-epoch checkpoint every SAVE_STEP_FREQ steps and, when `stop_code` (the stop signal
    that any process got, agreed on at the read-back) is set, writes it and raises
    TrainingStopped in all of them at this same step."""
    due = step_checkpoint_due(trainer, epoch, step)
    if not (due or stop_code):
        return
    path = save_step_checkpoint(trainer, epoch, step, meters)
    if stop_code:
        stop(trainer, stop_code, f'epoch {epoch}, step {step}/{trainer.steps_per_epoch}', path)


def stop(trainer, code: int, where: str, path: Optional[str]) -> None:
    """Log the one line of a stopped run and raise TrainingStopped."""
    trainer.logger.info(f'----- stopped by {trainer.stop.name(code)} at {where}: saved {path}; '
                        f'run the same command with -resume auto to continue')
    if trainer.world_size > 1:
        dist.barrier()  # rank 0 has logged: the launcher may now end the others
    raise TrainingStopped(f'stopped by {trainer.stop.name(code)}', code)


def end_of_epoch(trainer, epoch: int, train_loss: float, val_acc1: Optional[float]) -> Optional[str]:
    """After epoch `epoch` is trained and maybe validated (`val_acc1`): keep the
    best weights, write the epoch checkpoint when SAVE_FREQ asks for it, at the
    last epoch, or when a stop signal came meanwhile (then raise TrainingStopped).
    Returns the checkpoint's path on rank 0."""
    config = trainer.config
    if val_acc1 is not None:
        save_best(trainer, epoch, val_acc1)
    last = epoch == config.TRAIN.NUM_EPOCHS
    stop_code = trainer.stop.agreed_code(trainer.world_size) if trainer.stop is not None and not last else 0
    path = None
    if epoch % config.SAVE_FREQ == 0 or last or stop_code:
        if trainer.rank == 0:
            path = save_checkpoint(trainer, epoch, train_loss)
            trainer.logger.info(f'----- saved {path}', extra=FILE_ONLY)
        if trainer.world_size > 1:
            dist.barrier()
    if stop_code:
        stop(trainer, stop_code, f'the end of epoch {epoch}', path)
    return path
