"""What a training or evaluation run shows a person: terminal lines, a progress
bar, curves.png and VisualDL scalars.

The log file (`utils.get_logger`) keeps everything in PaddleViT's format (the
full config, a line every REPORT_FREQ steps, the validation lines), for people
and scripts that read it. The terminal gets less: where the log is, the
settings that matter, one line per epoch and, when stdout is a terminal, a
progress bar inside the epoch instead of the periodic lines. Only rank 0 shows
or writes anything.

`Reporter` is the engine's one entry point; `plot_curves` draws the curves of
a run's `history.json` on its own (tests, or a run's folder afterwards).
"""

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, TextIO

from utils import FILE_ONLY, TERMINAL_ONLY, UsageError, format_seconds

CURVES_FILE = 'curves.png'
HISTORY_FILE = 'history.json'
VISUALDL_FOLDER = 'vdl'
VISUALDL_HINT = 'pip install visualdl==2.5.3'


class ProgressBar:
    """One line redrawn in place on a terminal: `label [#####.....] done/total text`.

    Redraws at most every `interval` seconds (and at the end); `close` erases
    the line so that the next log line starts clean.
    """

    def __init__(self, total: int, label: str, stream: TextIO, width: int = 24, interval: float = 0.1):
        self.total, self.label, self.stream = max(total, 1), label, stream
        self.width, self.interval = width, interval
        self.last_draw = 0.0

    def update(self, done: int, text: str = '') -> None:
        now = time.monotonic()
        if done < self.total and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        filled = int(self.width * min(done, self.total) / self.total)
        bar = '#' * filled + '.' * (self.width - filled)
        line = f'{self.label} [{bar}] {done}/{self.total} {text}'
        columns = _terminal_columns(self.stream)
        self.stream.write('\r' + line[:columns - 1] + '\033[K')
        self.stream.flush()

    def close(self) -> None:
        self.stream.write('\r\033[K')
        self.stream.flush()


def _terminal_columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 120


def plot_curves(history: List[Dict[str, float]], path: str, title: str) -> None:
    """Draw train loss, val top-1/top-5 and LR against epochs into the PNG `path`.

    `history` holds one dict per epoch: epoch, lr, train_loss, train_acc1 and,
    after a validation, val_acc1, val_acc5, val_loss (and val_ema_acc1 with an EMA).
    """
    # the Figure API, not pyplot: no process-wide state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def series(key):
        points = [(row['epoch'], row[key]) for row in history if row.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, acc_axes, lr_axes = figure.subplots(1, 3)
    loss_axes.plot(*series('train_loss'), color='tab:blue', label='train (augmented)')
    if any(row.get('val_loss') is not None for row in history):
        loss_axes.plot(*series('val_loss'), 'o-', color='tab:orange', label='val')
    loss_axes.set_title('loss')
    for key, label, style, colour in (('val_acc1', 'val top-1', 'o-', 'tab:green'),
                                      ('val_acc5', 'val top-5', 's--', 'tab:olive'),
                                      ('val_ema_acc1', 'EMA val top-1', '^:', 'tab:purple'),
                                      ('train_acc1', 'train top-1 (augmented)', '-', 'tab:gray')):
        epochs, values = series(key)
        if values:
            acc_axes.plot(epochs, values, style, color=colour, label=label,
                          alpha=0.6 if key == 'train_acc1' else 1.0)
            if key == 'val_acc1':
                acc_axes.annotate(f'{values[-1]:.3f}', (epochs[-1], values[-1]), textcoords='offset points',
                                  xytext=(-8, -14), ha='right', color=colour)
    acc_axes.set_ylim(0, 1.02)
    acc_axes.set_title('accuracy')
    lr_axes.plot(*series('lr'), color='tab:red')
    lr_axes.set_title('learning rate (end of epoch)')
    lr_axes.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
    for axes in (loss_axes, acc_axes, lr_axes):
        axes.set_xlabel('epoch')
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc='best', fontsize='small')
    figure.suptitle(title)
    figure.tight_layout()
    tmp = f'{path}.tmp{os.getpid()}.png'
    figure.savefig(tmp)
    os.replace(tmp, path)  # a viewer never sees half a picture


def require_visualdl():
    """VisualDL's LogWriter class, or a UsageError with the install command."""
    try:
        from visualdl import LogWriter
    except ImportError:
        raise UsageError(f'-visualdl / VISUALDL: True needs VisualDL, which is not installed: '
                         f'{VISUALDL_HINT}') from None
    return LogWriter


class Reporter:
    """Rank 0's view of a run: terminal lines, the progress bar, the history
    with its curves.png, VisualDL scalars. On other ranks every method is silent.

    `interactive` (default: stdout is a terminal) picks the progress bar over
    the periodic step lines on the terminal; the log file has the latter either way.
    """

    def __init__(self, config, logger, rank: int = 0, interactive: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
        self.config, self.logger, self.active = config, logger, rank == 0
        self.stream = stream or sys.stdout
        self.interactive = self.active and (self.stream.isatty() if interactive is None else interactive)
        self.history: List[Dict[str, float]] = []
        self.bar: Optional[ProgressBar] = None
        self.bar_text = ''  # the figures of the last read-back
        self.vdl = None
        self.started, self.first_epoch = time.time(), 1

    # --- the start of a run

    def log_config(self) -> None:
        """The full config into the log file, and where that is on the terminal."""
        if not self.active:
            return
        self.logger.info(f'config:\n{self.config}', extra=FILE_ONLY)
        where = os.path.join(self.config.SAVE, 'log.txt') if self.config.SAVE else 'nowhere (no -output)'
        self.logger.info(f'log and full config: {where}', extra=TERMINAL_ONLY)

    def log_settings(self, *, train_images: Optional[int], val_images: int, num_classes: int,
                     params: int, world_size: int, device: str, layers: str, epochs_done: int = 0) -> None:
        """One line of the settings that matter, on the terminal and in the log; `layers`:
        the model's layers in words (fast.describe)."""
        if not self.active:
            return
        config = self.config
        data = (f'data {config.DATA.DATASET} {config.DATA.DATA_PATH} ({num_classes} classes, '
                + (f'{train_images} train / ' if train_images is not None else '') + f'{val_images} val images)')
        if config.EVAL:
            batch = f'batch {config.DATA.BATCH_SIZE_EVAL} x {world_size}'
            job = 'evaluate ' + (config.MODEL.PRETRAINED or config.MODEL.RESUME)
        else:
            accum = f' x {config.TRAIN.ACCUM_ITER} accumulated' if config.TRAIN.ACCUM_ITER > 1 else ''
            batch = f'batch {config.DATA.BATCH_SIZE} x {world_size}{accum}'
            epochs = (f'epochs {epochs_done + 1}-{config.TRAIN.NUM_EPOCHS}' if epochs_done
                      else f'{config.TRAIN.NUM_EPOCHS} epochs')
            job = f'train {epochs}'
        self.logger.info(f'{job} | model {config.MODEL.NAME} ({params / 1e6:.2f} M params) | {data} | '
                         f'image {config.DATA.IMAGE_SIZE} | {batch} process(es) | device {device} | layers {layers}')

    def start_training(self, epochs_done: int) -> None:
        """Continue the history of a resumed run; open VisualDL if asked for."""
        if not self.active:
            return
        self.started, self.first_epoch = time.time(), epochs_done + 1
        path = os.path.join(self.config.SAVE, HISTORY_FILE)
        if epochs_done and os.path.isfile(path):
            with open(path) as infile:
                self.history = [row for row in json.load(infile) if row['epoch'] <= epochs_done]
        if self.config.VISUALDL:
            self.vdl = require_visualdl()(logdir=os.path.join(self.config.SAVE, VISUALDL_FOLDER))

    # --- inside an epoch

    def progress(self, epoch: int, step: int, steps: int) -> None:
        """After micro-step `step` (from 1) of `steps`: move the bar (on a terminal), with
        the figures of the last read-back."""
        if not self.active or not self.interactive:
            return
        if self.bar is None:
            self.bar = ProgressBar(steps, f'epoch {epoch}/{self.config.TRAIN.NUM_EPOCHS}', self.stream)
        self.bar.update(step, self.bar_text)

    def train_step(self, epoch: int, step: int, steps: int, line: str, *, loss: float, acc1: float,
                   loss_avg: float, lr: float, images_per_s: float, seconds_left: float) -> None:
        """At a read-back of the training figures (every REPORT_FREQ optimizer steps, at
        a mid-epoch checkpoint and at the epoch's end), after micro-step `step`: `line`
        (PaddleViT's step line), the bar's figures and the VisualDL scalars."""
        if not self.active:
            return
        self.bar_text = (f'loss {loss_avg:.4f} | lr {lr:.2e} | {images_per_s:.0f} img/s | '
                         f'left {format_seconds(seconds_left)}')
        if self.bar is not None:
            self.bar.update(step, self.bar_text)
        self.logger.info(line, extra=FILE_ONLY if self.interactive else None)
        if self.vdl is not None:
            global_step = (epoch - 1) * steps + step
            for tag, value in (('train/loss', loss), ('train/acc1', acc1), ('train/lr', lr),
                               ('train/images_per_s', images_per_s)):
                self.vdl.add_scalar(tag=tag, value=value, step=global_step)

    def eval_progress(self, total: int) -> Optional[Callable[[int], None]]:
        """A callback for `engine.validate` that draws a bar over `total` batches
        (None when not on a terminal); the bar is erased after the last batch."""
        if not self.interactive:
            return None
        bar = ProgressBar(total, 'validating', self.stream)

        def progress(done: int) -> None:
            bar.update(done)
            if done >= total:
                bar.close()
        return progress

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # --- the end of an epoch, of an evaluation, of a run

    def end_epoch(self, epoch: int, *, train_loss: float, train_acc1: float, lr: float, seconds: float,
                  val: Optional[Dict[str, float]] = None, val_ema: Optional[Dict[str, float]] = None,
                  checkpoint: Optional[str] = None, unreadable: int = 0) -> None:
        """The epoch's terminal line, its history row, curves.png after a
        validation and at the last epoch, and the epoch's VisualDL scalars.
        `unreadable`: training images that others stood in for."""
        if not self.active:
            return
        self._close_bar()
        num_epochs = self.config.TRAIN.NUM_EPOCHS
        row = {'epoch': epoch, 'lr': lr, 'train_loss': train_loss, 'train_acc1': train_acc1}
        text = f'epoch {epoch:>{len(str(num_epochs))}}/{num_epochs} | train loss {train_loss:.4f}'
        if unreadable:
            text += f' ({unreadable} unreadable images replaced)'
        if val is not None:
            row.update(val_loss=val['loss'], val_acc1=val['acc1'], val_acc5=val['acc5'])
            text += f' | val top-1 {val["acc1"]:.4f} top-5 {val["acc5"]:.4f}'
            if val.get('unreadable'):
                text += f' of {val["count"]} images ({len(val["unreadable"])} unreadable left out)'
        if val_ema is not None:
            row['val_ema_acc1'] = val_ema['acc1']
            text += f' (EMA top-1 {val_ema["acc1"]:.4f})'
        left = (time.time() - self.started) / max(1, epoch - self.first_epoch + 1) * (num_epochs - epoch)
        text += f' | lr {lr:.2e} | {seconds:.1f} s'
        text += f' | left {format_seconds(left)}' if epoch < num_epochs else ''
        if checkpoint:
            text += f' | saved {os.path.basename(checkpoint)}'
        self.logger.info(text, extra=TERMINAL_ONLY)
        self.history.append(row)
        self._write_history()
        if val is not None or epoch == num_epochs:
            self.write_curves()
        if self.vdl is not None:
            for key, tag in (('val_acc1', 'val/acc1'), ('val_acc5', 'val/acc5'), ('val_loss', 'val/loss'),
                             ('val_ema_acc1', 'val/ema_acc1'), ('train_loss', 'epoch/train_loss'),
                             ('train_acc1', 'epoch/train_acc1'), ('lr', 'epoch/lr')):
                if row.get(key) is not None:
                    self.vdl.add_scalar(tag=tag, value=row[key], step=epoch)

    def _write_history(self) -> None:
        path = os.path.join(self.config.SAVE, HISTORY_FILE)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as out:
            json.dump(self.history, out, indent=1)
        os.replace(tmp, path)

    def write_curves(self) -> Optional[str]:
        """curves.png from the history so far; returns its path."""
        if not self.active or not self.history:
            return None
        path = os.path.join(self.config.SAVE, CURVES_FILE)
        plot_curves(self.history, path, f'{self.config.MODEL.NAME}: {self.config.SAVE}')
        return path

    def evaluated(self, metrics: Dict[str, float], seconds: float) -> None:
        """The result of an evaluation-only run, on the terminal."""
        if not self.active:
            return
        left_out = metrics.get('unreadable') or []
        note = f' ({len(left_out)} unreadable left out: see the log)' if left_out else ''
        self.logger.info(f'val top-1 {metrics["acc1"]:.4f} | top-5 {metrics["acc5"]:.4f} | '
                         f'loss {metrics["loss"]:.4f} | {metrics["count"]} images{note} | {seconds:.1f} s',
                         extra=TERMINAL_ONLY)

    def close(self) -> None:
        self._close_bar()
        if self.vdl is not None:
            self.vdl.close()
            self.vdl = None
