"""Stop signals: SIGTERM and SIGINT end training cleanly after the current step.

`StopSignals` (installed by engine.run around the epoch loop) records the first
SIGTERM or SIGINT; the training loop asks `agreed_code` after every optimizer
step, which with several processes takes the maximum over all of them, so every
process stops at the same step; rank 0 then writes a checkpoint and they exit
with 143 (SIGTERM) or 130 (SIGINT). A second SIGTERM or SIGINT ends the process
at once. SIGUSR1 asks for the same stop as SIGTERM but never counts as a second
signal: the multi-process launcher forwards stop signals with it, since a
signal sent to the whole process group (Ctrl-C, SLURM) reaches the training
processes directly as well.

Loader worker processes ignore SIGINT and SIGUSR1 (`loader_worker_init`): their
training process decides when to stop, and a worker ending mid-epoch would fail
its step. They do end on SIGTERM, so send SIGTERM to the training process (or to
main_multi_gpu.py's launcher), not to the whole process group.

Nothing outlives a run: `ended_with_the_run` wraps an entry point's whole run
(outside the epoch loop a stop signal ends it at once, with the same exit
codes) and on every way out ends the loader workers; a worker, or a training
process of the launcher, that loses its parent is killed by the kernel
(`die_with_parent`), even if the parent died before the child could ask for it.
"""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Dict, Iterator, List, Optional

import runtime


# exit codes, as a shell reports a process ended by the signal
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 143}
CODE_NAMES = {143: 'SIGTERM', 130: 'SIGINT'}
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """A context manager that turns SIGTERM / SIGINT / SIGUSR1 into a stop request."""

    def __init__(self):
        self.code = 0  # exit code of the requested stop; 0: none
        self._signalled = False  # a SIGTERM or SIGINT came
        self._owner = os.getpid()
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> 'StopSignals':
        if _in_main_thread():  # Python handles signals in the main thread only
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
            # a SIGUSR1 held back since the process started (`deferred_stop_requests`) arrives now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._owner:
            return  # a forked loader worker before `loader_worker_init` ran
        if signum != signal.SIGUSR1:
            if self._signalled:
                os.write(2, f'{signal.Signals(signum).name} again: stopping now\n'.encode())
                os._exit(EXIT_CODES[signum])
            self._signalled = True
        self.code = self.code or EXIT_CODES[signum]

    def agreed_code(self, world_size: int) -> int:
        """The stop requested in any process (0: none); a collective with several."""
        if world_size < 2:
            return self.code
        import paddle  # not at import: the entry points import this module before Paddle's start-up
        import paddle.distributed as dist
        flag = paddle.to_tensor([self.code], dtype='int64')
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.numpy()[0])

    @staticmethod
    def name(code: int) -> str:
        return CODE_NAMES.get(code, f'exit code {code}')


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent (pid `parent`) ends (Linux);
    if the parent ended already, before this could be asked, end now."""
    if not sys.platform.startswith('linux'):
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def loader_worker_init(worker_id: int, parent: int) -> None:
    """DataLoader worker_init_fn (with `parent`, the training process's pid, bound by
    functools.partial): leave SIGINT (Ctrl-C reaches the whole process group) and
    SIGUSR1 to the training process, die with that process rather than wait for it
    forever, and give back its CPU tuning (`runtime.loader_worker_start`).

    SIGTERM keeps the handler Paddle gives its workers (which replaces the one
    inherited from the training process): it is how that process ends them.
    """
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent)
    runtime.loader_worker_start()


def end_loader_workers(timeout: float = 5.0) -> None:
    """End this process's loader workers (Paddle starts them as daemonic processes,
    which would otherwise be ended during the interpreter's exit, where a stuck
    one can hang it): SIGTERM, then SIGKILL for any still there after `timeout`."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join(timeout)


@contextlib.contextmanager
def ended_with_the_run() -> Iterator[None]:
    """Around an entry point's whole run: a SIGTERM or SIGINT outside the epoch loop
    (which `StopSignals` handles) stops the run at once with exit code 143 or 130
    (TrainingStopped); whatever the way out, the loader workers are ended."""
    from utils import TrainingStopped

    def stop_now(signum: int, frame: Optional[FrameType]) -> None:
        raise TrainingStopped(f'stopped by {signal.Signals(signum).name}', EXIT_CODES[signum])

    previous = {}
    if _in_main_thread():
        previous = {signum: signal.signal(signum, stop_now) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        end_loader_workers()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_stop_requests() -> Iterator[None]:
    """Start processes meanwhile with SIGUSR1 blocked, so that a stop request
    forwarded before they handle it waits for `StopSignals` instead of killing
    them (the signal mask survives fork and exec)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ForwardStopSignals:
    """In the process that spawned the training processes: pass the first SIGTERM
    or SIGINT on to them as SIGUSR1 and remember it (`code`); a second one kills
    them and exits at once."""

    def __init__(self, pids: List[int]):
        self.pids = pids
        self.code = 0
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> 'ForwardStopSignals':
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _send(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.code:
            self._send(signal.SIGKILL)
            os._exit(EXIT_CODES[signum])
        self.code = EXIT_CODES[signum]
        self._send(signal.SIGUSR1)
