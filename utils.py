"""Command line, logging and error reporting shared by the training entry points."""

import argparse
import logging
import os
import sys
from typing import Callable, NoReturn, Optional

from config import ConfigError, attention_bytes
from fileio import FileFormatError, OutputError


class UsageError(Exception):
    """A problem with the command line, a file or the data, found before training starts."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingStopped(Exception):
    """A stop signal ended training after a checkpoint; `code` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# `extra=` of a log call that only the log file gets (the full config, step lines
# under a progress bar), or only the terminal (its short summaries)
FILE_ONLY = {'destination': 'file'}
TERMINAL_ONLY = {'destination': 'terminal'}


class _DestinationFilter(logging.Filter):
    """Passes the records not reserved for the other destination."""

    def __init__(self, other: str):
        super().__init__()
        self.other = other

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, 'destination', None) != self.other


# errors that the entry points report in one line (exit code 2), without a traceback
USAGE_ERRORS = (UsageError, ConfigError, FileFormatError, OutputError, FileNotFoundError, NotADirectoryError)


def get_arguments(description: str) -> argparse.Namespace:
    """PaddleViT's command-line flags; each one given overrides the yaml config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('-cfg', type=str, default=None, help='yaml config file')
    parser.add_argument('-dataset', type=str, default=None, help='imagenet2012, cifar10 or cifar100')
    parser.add_argument('-batch_size', type=int, default=None,
                        help='images per process and step (with -eval: the eval batch)')
    parser.add_argument('-image_size', type=int, default=None)
    parser.add_argument('-data_path', type=str, default=None, help='folder holding train/ and val/')
    parser.add_argument('-output', type=str, default=None, help='folder for log.txt and checkpoints')
    parser.add_argument('-ngpus', type=int, default=None,
                        help='processes to start (main_multi_gpu.py); default: every visible GPU')
    parser.add_argument('-num_classes', type=int, default=None)
    parser.add_argument('-pretrained', type=str, default=None,
                        help='weights to evaluate or fine-tune from (.pdparams optional), or released '
                             'weights by name: cvt-13-224, ..., hf-hub:ORG/REPO (fetched on first use)')
    parser.add_argument('-resume', type=str, default=None,
                        help='checkpoint to continue training from (.pdparams optional), or auto: '
                             'the newest whole one in -output, if any')
    parser.add_argument('-last_epoch', type=int, default=None,
                        help='epoch the -resume checkpoint ended; default: read from the checkpoint')
    parser.add_argument('-overwrite', action='store_true',
                        help='start a new training run in an -output folder that holds another, deleting '
                             'its checkpoints')
    parser.add_argument('-eval', action='store_true', help='only evaluate -pretrained on the val set')
    parser.add_argument('-amp', action='store_true', help='mixed precision training (float16, GPU)')
    parser.add_argument('-visualdl', action='store_true',
                        help='write loss, accuracy, LR and images/s to <output>/vdl for VisualDL')
    add_opts_argument(parser)
    return parser.parse_args()


def memory_bytes() -> int:
    """This machine's physical memory (0 where it cannot be read)."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 0


def check_attention_memory(config, batch: int, training: bool = False, available: Optional[int] = None) -> None:
    """UsageError when the attention scores of one batch alone (kept two or, in training,
    three times over: scores, weights, their gradient) exceed `available` bytes (default:
    this machine's memory): the run would be killed for memory, without a word."""
    available = memory_bytes() if available is None else available
    needed = attention_bytes(config.MODEL, config.DATA.IMAGE_SIZE) * batch * (3 if training else 2)
    if available and needed > available:
        raise UsageError(f'DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE} with batch {batch}: the attention alone '
                         f'needs about {needed / 2 ** 30:.1f} GiB, more than the {available / 2 ** 30:.1f} GiB '
                         f'here; use a smaller image size or batch')


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` for a count: an integer of at least `minimum`, else argparse's
    one-line usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value
    return parse


def thread_count(text: str) -> int:
    """An argparse `type` for -threads: 1 to the cores this process may use."""
    from runtime import usable_cores
    count = int_at_least(1)(text)
    if count > usable_cores():
        raise argparse.ArgumentTypeError(f'{count}: this process may use 1 to {usable_cores()} cores')
    return count


def add_opts_argument(parser: argparse.ArgumentParser) -> None:
    """-opts KEY VALUE [KEY VALUE ...]: any config key, after the yaml file (config.merge_opts)."""
    parser.add_argument('-opts', nargs='+', default=None, metavar='KEY VALUE',
                        help='config keys to set after the yaml file, e.g. -opts TRAIN.BASE_LR 5e-4 '
                             'DATA.NUM_WORKERS 8')


def get_logger(output_dir: Optional[str], rank: int = 0, name: str = 'cvt') -> logging.Logger:
    """A logger writing to stdout and `output_dir`/log.txt on rank 0, silent elsewhere.

    A record logged with `extra=FILE_ONLY` skips stdout, one with `extra=TERMINAL_ONLY` the file.
    """
    logger = logging.getLogger(f'{name}.rank{rank}')
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    terminal = logging.StreamHandler(sys.stdout)
    terminal.addFilter(_DestinationFilter('file'))
    handlers = [terminal]
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
        log_file.addFilter(_DestinationFilter('terminal'))
        handlers.append(log_file)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class AverageMeter:
    """Running sum and mean of a value weighted by the number of samples."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def fail(message: str, code: int = 2, quiet: bool = False) -> NoReturn:
    """End the program the project's way for an expected problem: one line on
    stderr (unless `quiet`), no traceback, exit `code` (2: bad input)."""
    if not quiet:
        print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


def report_errors(func: Callable[..., None], *args, quiet: bool = False, **kwargs) -> None:
    """Run `func`; turn the expected errors into one line on stderr and an exit code.

    Usage errors exit with 2, a non-finite loss with 1, a run stopped by a signal
    (its line already logged) with 143 or 130; anything else is a bug and keeps
    its traceback. `quiet` leaves the message of a usage error to another
    process that hits the same (deterministic) problem.
    """
    from preemption import ended_with_the_run  # preemption imports utils: here, not at the top
    try:
        with ended_with_the_run():
            func(*args, **kwargs)
    except USAGE_ERRORS as err:
        fail(str(err), quiet=quiet)
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    except TrainingStopped as err:
        sys.exit(err.code)
