"""Process-wide runtime set-up: `configure()`, which every entry point calls before Paddle loads.

Importing this module changes nothing; `configure()` sets the thread count
(MKL's and that of Paddle's own OpenMP kernels), MKL's code path on AMD,
OpenMP's spin time and glibc's allocator, and silences two of Paddle's notices.
In a notebook or your own script, call it before ``import paddle`` to get the
same set-up as the project's scripts:

    import runtime
    runtime.configure()
    import paddle

Settings the user has made in the environment are left as they are.
"""

import ctypes
import ctypes.util
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


def configure(threads: Optional[int] = None) -> None:
    """Set threads, MKL's code path, OpenMP's spin time and the allocator for this
    process, and filter two of Paddle's notices; must run before Paddle is imported
    (the environment variables are read when its libraries load).

    `threads`: run on that many of the usable cores (the process is pinned to
    them; MKL and the CPU kernels use as many threads), overriding MKL_NUM_THREADS;
    default: all usable cores, or the user's MKL_NUM_THREADS.
    """
    if threads is not None:
        use_cores(threads)
        os.environ['MKL_NUM_THREADS'] = str(threads)
    # Paddle warns at import that its C++ extension builder found no ccache (this
    # project builds no extensions), and notes at every BatchNorm in training mode
    # that it tracks running statistics
    warnings.filterwarnings('ignore', message='No ccache found')
    warnings.filterwarnings('ignore', message='When training, we now always track global mean')
    # MKL's GEMMs take MKL_NUM_THREADS. OMP_NUM_THREADS is left to the user: MKL
    # does not need it, and Paddle prints a warning at import when it is above 1.
    os.environ.setdefault('MKL_NUM_THREADS', str(usable_cores()))
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
    keep_freed_memory()
    if 'OMP_NUM_THREADS' not in os.environ:  # the user's, else Paddle sets it to 1 at import
        share_threads_with_paddle(os.environ['MKL_NUM_THREADS'])


def share_threads_with_paddle(threads: str) -> None:
    """Import Paddle and give its own OpenMP kernels (AdamW's update among them) `threads`
    threads, as MKL has. Paddle sets OMP_NUM_THREADS=1 at import where it is unset (and
    warns where it is above 1), which leaves those kernels on one core: CvT-13's AdamW
    update took 53 ms of an 860 ms training step on 16 cores."""
    try:
        count = int(threads)
    except ValueError:  # MKL reports a malformed MKL_NUM_THREADS itself
        return
    import paddle  # after the environment above, as the entry points import it next
    try:
        paddle.base.core.set_num_threads(count)  # MKL's and OpenMP's
    except (RuntimeError, NotImplementedError):  # a Paddle built with neither MKL nor OpenBLAS
        pass


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
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))

