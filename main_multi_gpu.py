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

USER_SET_THREADS = 'OMP_NUM_THREADS' in os.environ or 'MKL_NUM_THREADS' in os.environ

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator

import re  # noqa: E402
import sys  # noqa: E402

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

import engine  # noqa: E402
import preemption  # noqa: E402
import utils  # noqa: E402
from config import get_config, update_config  # noqa: E402


def launched_by_paddle() -> bool:
    """True in a process that `python -m paddle.distributed.launch` started."""
    return 'PADDLE_TRAINER_ID' in os.environ and 'PADDLE_TRAINERS_NUM' in os.environ


def worker(config) -> None:
    """One training process: usage errors are the same in every process, so
    only rank 0 reports them."""
    quiet = int(os.environ.get('PADDLE_TRAINER_ID', '0')) != 0
    utils.report_errors(engine.run, config, multi_process=True, quiet=quiet)


def spawned_worker(config, launcher: int) -> None:
    """A training process started by this launcher: it ends should the launcher die."""
    preemption.die_with_parent(launcher)
    worker(config)


def process_count(requested: int) -> int:
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
    engine.check_paths(config)
    nprocs = process_count(config.NGPUS)
    on_cpu = not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)
    if on_cpu and not USER_SET_THREADS:
        # the processes share the cores instead of each claiming all of them
        threads = str(max(1, len(os.sched_getaffinity(0)) // nprocs))
        os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = threads
    with preemption.deferred_stop_requests():
        processes = dist.spawn(spawned_worker, args=(config, os.getpid()), nprocs=nprocs,
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
