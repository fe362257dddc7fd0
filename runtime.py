"""Process-wide runtime set-up: `configure()`, each entry point's start-up, which loads Paddle.

Importing this module changes nothing and does not import Paddle. `configure()`
decides the process's thread count once, sets what Paddle's libraries read as
they load (MKL's thread count and its code path on AMD, OpenMP's spin time),
glibc's allocator and two warning filters, then imports Paddle and gives its own
OpenMP kernels the same thread count; the project's CPU kernels (fast/) take it
from `threads()`. The CPU tuning is for runs on the CPU: where Paddle will run on a
CUDA GPU (`gpu_host()`) the thread pools and the allocator are left as they are,
and data-loader workers give it back (`loader_worker_start()`). In a notebook or your own script, call it instead of importing
Paddle first, to get the same set-up as the project's scripts:

    import runtime
    runtime.configure()
    import paddle

Settings the user has made in the environment are left as they are.
"""

import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import sys
import warnings
from typing import FrozenSet, Optional, Tuple


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_cores(count: int) -> None:
    """Pin this process to the first `count` of its usable cores (Linux); ValueError
    for a count outside 1..usable_cores()."""
    if not hasattr(os, 'sched_setaffinity'):
        return
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= count <= len(cores):
        raise ValueError(f'{count} threads: this process may use 1 to {len(cores)} cores')
    os.sched_setaffinity(0, cores[:count])


def cpu_info() -> Tuple[str, FrozenSet[str]]:
    """The CPU's vendor id and feature flags, from /proc/cpuinfo ('' and none elsewhere)."""
    vendor, flags = '', frozenset()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('vendor_id'):
                    vendor = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = frozenset(line.split(':', 1)[1].split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, flags


def cpu_model() -> Tuple[str, str]:
    """The CPU's vendor id and its model name with family and model numbers, from
    /proc/cpuinfo ('unknown' where it is not found)."""
    keys = ('vendor_id', 'model name', 'cpu family', 'model')
    found = {}
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                key = line.split(':', 1)[0].strip()
                if key in keys and key not in found:
                    found[key] = line.split(':', 1)[1].strip()
                if len(found) == len(keys):
                    break
    except OSError:
        pass
    model = found.get('model name', 'unknown')
    if 'cpu family' in found and 'model' in found:
        model += f' (family {found["cpu family"]}, model {found["model"]})'
    return found.get('vendor_id', 'unknown'), model


# the AVX-512 subsets of Intel's Skylake server cores, which MKL's AVX-512 kernels use
_AVX512_SKYLAKE = frozenset({'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'})


def mkl_cpu_type(vendor: str, flags: FrozenSet[str]) -> Optional[str]:
    """The MKL_DEBUG_CPU_TYPE that gives MKL its fast kernels on this CPU, or None.

    MKL picks its kernels by the vendor, and on AMD processors falls back to a
    generic SSE path. The variable names the code path instead: 5 is AVX2, 7 is
    AVX-512 as on Skylake servers (Zen 4 and 5 have those subsets; 6 and 8 are
    Xeon Phi paths whose instructions AMD lacks: illegal instruction).
    """
    if vendor != 'AuthenticAMD':
        return None  # Intel: MKL chooses well itself
    if _AVX512_SKYLAKE <= flags:
        return '7'
    if {'avx2', 'fma'} <= flags:
        return '5'
    return None


def mkl_code_path() -> str:
    """MKL's code path as the environment sets it, in words (for benchmark reports)."""
    names = {'5': 'AVX2', '7': 'AVX-512'}
    chosen = os.environ.get('MKL_DEBUG_CPU_TYPE', '')
    path = f'{names.get(chosen, chosen)} (MKL_DEBUG_CPU_TYPE={chosen})' if chosen else "MKL's own choice"
    limit = os.environ.get('MKL_ENABLE_INSTRUCTIONS')
    return f'{path}, MKL_ENABLE_INSTRUCTIONS={limit}' if limit else path


# the thread count configure() chose (None: not called in this process), whether it
# was the user's own (MKL_NUM_THREADS), and whether glibc keeps freed memory
_threads: Optional[int] = None
_users_threads = False
_keeps_freed_memory = False


def gpu_host() -> bool:
    """Whether Paddle will run on a CUDA GPU in this process, judged before it loads (as
    the engine decides after: a CUDA build and a GPU visible): the paddlepaddle-gpu
    distribution installed, an NVIDIA device present, and CUDA_VISIBLE_DEVICES not
    hiding every GPU."""
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None and visible.strip() in ('', '-1'):
        return False
    if not glob.glob('/dev/nvidia[0-9]*'):
        return False
    try:
        importlib.metadata.version('paddlepaddle-gpu')
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def configure(threads: Optional[int] = None, pin: bool = True) -> int:
    """This process's start-up, before anything else imports Paddle: Paddle is imported
    last, after the environment its libraries read as they load. Returns the thread
    count.

    The count is decided once: `threads`, else the user's MKL_NUM_THREADS, else the
    cores this process may use (its CPU affinity). MKL and Paddle's own OpenMP
    kernels (AdamW's update among them) get it, and so do the project's CPU kernels
    (`threads()`); an OMP_NUM_THREADS the user set is left to Paddle's OpenMP kernels,
    unless `threads` is given. With `threads` and `pin`, the process is pinned to the
    first `threads` of its usable cores. A later call in the same process (a tool's
    module imported by a test, a notebook cell run again) changes nothing and returns
    the first count.

    On a GPU host (`gpu_host()`) only the warning filters are set, and the count is
    `threads` or the usable cores: the GPU does the work, and the cores belong to the
    data-loader workers, which MKL's spinning threads and a process that keeps its
    peak memory would crowd.
    """
    global _threads, _users_threads, _keeps_freed_memory
    if _threads is not None:
        return _threads
    # Paddle warns at import that its C++ extension builder found no ccache (this
    # project builds no extensions), and notes at every BatchNorm in training mode
    # that it tracks running statistics
    warnings.filterwarnings('ignore', message='No ccache found')
    warnings.filterwarnings('ignore', message='When training, we now always track global mean')
    if gpu_host():
        import paddle  # noqa: F401  (the entry points' promise: Paddle loaded after the start-up)
        _threads = threads or usable_cores()
        return _threads
    # Paddle sets OMP_NUM_THREADS=1 as it loads where it is unset (and warns where it is
    # above 1), which leaves its OpenMP kernels on one core; a value set before that is the user's
    users_omp = 'OMP_NUM_THREADS' in os.environ and 'paddle' not in sys.modules
    _users_threads = threads is None and 'MKL_NUM_THREADS' in os.environ
    if threads is not None:
        if pin:
            use_cores(threads)
        os.environ['MKL_NUM_THREADS'] = str(threads)
    # MKL's GEMMs take MKL_NUM_THREADS as MKL loads (and child processes inherit it).
    os.environ.setdefault('MKL_NUM_THREADS', str(usable_cores()))
    try:
        count = max(1, int(os.environ['MKL_NUM_THREADS']))
    except ValueError:  # MKL reports a malformed MKL_NUM_THREADS itself
        count = usable_cores()
    # Paddle's CPU wheel links Intel MKL, which takes a slow generic code path on
    # AMD processors unless told to use the AVX2/AVX-512 kernels (a 2048^3 sgemm
    # on 2 Zen 5 cores: 98 GFLOP/s by default, 240 with AVX2, 440 with AVX-512).
    cpu_type = mkl_cpu_type(*cpu_info())
    if cpu_type is not None:
        os.environ.setdefault('MKL_DEBUG_CPU_TYPE', cpu_type)
    # Intel OpenMP (the threads of MKL and of the CPU kernels) spins 200 ms after
    # each parallel region by default, taking the cores from single-threaded work
    # and data-loader workers for as long; at 0 every region wakes sleeping
    # threads, which costs more as cores are added. 1 ms spans the gap between
    # one kernel and the next (CvT-13 on 2 cores: inference 5%, training 7%
    # faster than at 0).
    os.environ.setdefault('KMP_BLOCKTIME', '1')
    _keeps_freed_memory = keep_freed_memory()
    import paddle_internals  # imports Paddle: MKL and OpenMP load with the settings above
    if threads is not None or not users_omp:
        # CvT-13's AdamW update took 53 ms of an 860 ms training step on 16 cores with
        # Paddle's OpenMP kernels left on one thread
        paddle_internals.set_num_threads(count)
    _threads = count
    return count


def loader_worker_start() -> None:
    """In a data-loader worker, forked from a configured process: give back the CPU
    tuning. glibc returns freed memory to the system again (a worker's peak is a batch
    of decoded images, not worth keeping), and MKL and Paddle's OpenMP kernels, should
    the worker reach them, run on one thread: the workers together are sized to the
    cores already."""
    if _keeps_freed_memory:
        _set_malloc(mmap_max=65536, trim_threshold=128 * 1024)  # glibc's defaults
    if _threads is not None and 'paddle' in sys.modules:
        import paddle_internals
        paddle_internals.set_num_threads(1)


def threads() -> int:
    """The thread count `configure()` chose; without it, MKL_NUM_THREADS or the usable cores."""
    if _threads is not None:
        return _threads
    try:
        return max(1, int(os.environ.get('MKL_NUM_THREADS', '')))
    except ValueError:
        return usable_cores()


def threads_per_process(processes: int) -> int:
    """The thread count for each of `processes` processes sharing this machine's CPU (after
    `configure()`): the user's MKL_NUM_THREADS if they set one, else an equal share of the cores."""
    return threads() if _users_threads else max(1, usable_cores() // processes)


# glibc's own environment variables for the same settings; a user who sets any
# of them keeps glibc's behaviour
_MALLOC_VARIABLES = ('MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of returning it to the OS.

    Paddle's CPU allocator takes each tensor from malloc and frees it when done;
    by default glibc serves large blocks with fresh mmaps and unmaps them on free,
    so every activation, gradient and kernel output is page-faulted in and zeroed
    by the kernel anew, at every step: a 158 MB softmax output costs 45 ms of page
    faults for 10 ms of work. With mmap off and no trimming, freed blocks stay in
    the heap and are reused. The process keeps its peak memory until it exits.
    Returns whether the setting was made.
    """
    if not sys.platform.startswith('linux') or any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    return _set_malloc(mmap_max=0, trim_threshold=2 ** 31 - 1)


def _set_malloc(mmap_max: int, trim_threshold: int) -> bool:
    """glibc's M_MMAP_MAX and M_TRIM_THRESHOLD (mallopt); False where it is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, mmap_max)) and bool(mallopt(m_trim_threshold, trim_threshold))

