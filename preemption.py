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
"""

import contextlib
import ctypes
import os
import signal
import sys
import threading
from types import FrameType
from typing import Dict, Iterator, List, Optional

import numpy as np
import paddle
import paddle.distributed as dist

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
        flag = paddle.to_tensor(np.array([self.code], dtype=np.int64))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.numpy()[0])

    @staticmethod
    def name(code: int) -> str:
        return CODE_NAMES.get(code, f'exit code {code}')


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGINT (Ctrl-C reaches the whole process
    group) and SIGUSR1 to the training process, and die with that process should
    it be killed (Linux) rather than wait for it forever.

    SIGTERM keeps the handler Paddle gives its workers (which replaces the one
    inherited from the training process): it is how that process ends them at exit.
    """
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
