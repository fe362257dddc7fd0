"""Train or evaluate CvT in several processes, one per GPU (or on the CPU).

    python main_multi_gpu.py -cfg ... -data_path ... [-ngpus N]
        starts N processes on this machine (paddle.distributed.spawn); default:
        one per visible GPU; without a CUDA GPU, N processes (default 1) on the
        CPU, which communicate through gloo. SIGTERM or SIGINT to this process
        reaches the training processes, which stop together after a checkpoint.
    python -m paddle.distributed.launch --nnodes 2 --master IP:PORT --nproc_per_node 8 \\
        main_multi_gpu.py -cfg ... -data_path ...
        runs each launched process directly (one or several machines).
"""

import os
import re
import sys
from typing import Optional

import runtime
import utils
from config import get_config, update_config

# Each process calls runtime.configure() once: this launcher in main(), each training
# process in worker(), with its share of the cores. Spawned processes inherit the
# launcher's environment (MKL's code path, OpenMP's spin time), which their Paddle,
# loaded by the spawn machinery before worker() runs, reads as it loads.


def launched_by_paddle() -> bool:
    """True in a process that `python -m paddle.distributed.launch` started."""
    return 'PADDLE_TRAINER_ID' in os.environ and 'PADDLE_TRAINERS_NUM' in os.environ


def worker(config, threads: Optional[int] = None) -> None:
    """One training process: its start-up (`threads`: its share of the cores, not pinned;
    None: the runtime's default), then the engine. Usage errors are the same in every
    process, so only rank 0 reports them."""
    if threads is None:
        runtime.configure()
    else:
        runtime.configure(threads, pin=False)  # the processes share the cores without pinning
    import engine  # after the start-up: it imports Paddle
    quiet = int(os.environ.get('PADDLE_TRAINER_ID', '0')) != 0
    utils.report_errors(engine.run, config, multi_process=True, quiet=quiet)


def spawned_worker(config, threads: Optional[int], launcher: int) -> None:
    """A training process started by this launcher: it ends should the launcher die."""
    import preemption  # Paddle is loaded already: the spawn machinery loaded it
    preemption.die_with_parent(launcher)
    worker(config, threads)


def process_count(requested: int) -> int:
    import paddle
    gpus = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
    if requested and requested > 0:
        if gpus and requested > gpus:
            raise utils.UsageError(f'-ngpus {requested}: only {gpus} GPU(s) visible')
        return requested
    if gpus:
        return gpus
    print('no CUDA GPU and no -ngpus: one process on the CPU (-ngpus N starts N)', flush=True)
    return 1


def main() -> None:
    args = utils.get_arguments('Train or evaluate CvT in several processes')
    config = update_config(get_config(), args)
    if launched_by_paddle():
        worker(config)
        return
    runtime.configure()  # this launcher's own start-up; it computes nothing itself
    import paddle
    import paddle.distributed as dist
    import engine
    import preemption
    engine.check_paths(config)
    nprocs = process_count(config.NGPUS)
    on_cpu = not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)
    # on the CPU the processes share the cores instead of each claiming all of them
    threads = runtime.threads_per_process(nprocs) if on_cpu else None  # GPU: the runtime's default
    with preemption.deferred_stop_requests():
        processes = dist.spawn(spawned_worker, args=(config, threads, os.getpid()), nprocs=nprocs,
                               backend='gloo' if on_cpu else 'nccl', join=False)
    with preemption.ForwardStopSignals([p.pid for p in processes.processes]) as stop:
        try:
            while not processes.join():
                pass
        except Exception as err:  # spawn reports a child's exit code only in the message
            code = re.search(r'terminated with exit code (\d+)', str(err))
            if code is None:
                raise
            sys.exit(stop.code or int(code.group(1)))
    if stop.code:
        sys.exit(stop.code)


if __name__ == '__main__':
    utils.report_errors(main)
