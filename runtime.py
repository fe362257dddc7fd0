"""Process-wide runtime set-up, applied by every entry point before Paddle loads.

Import this module before `paddle` (``import runtime`` as the first project
import). Settings the user has made in the environment are left as they are.
"""

import os
import warnings


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _is_amd_cpu() -> bool:
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('vendor_id'):
                    return 'AuthenticAMD' in line
    except OSError:
        pass
    return False


def configure_environment() -> None:
    """Set thread and math-library variables; must run before Paddle is imported."""
    # MKL's GEMMs take MKL_NUM_THREADS. OMP_NUM_THREADS is left to the user: MKL
    # does not need it, and Paddle prints a warning at import when it is above 1.
    os.environ.setdefault('MKL_NUM_THREADS', str(_usable_cores()))
    # Paddle's CPU wheel links Intel MKL, which takes a slow generic code path on
    # AMD processors unless told to use the AVX2/AVX-512 kernels.
    if _is_amd_cpu():
        os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
    # Intel OpenMP (MKL's threads) spins 200 ms after each parallel region by
    # default; most of Paddle's CPU kernels besides the GEMMs are single-threaded,
    # so the spinning threads take the cores from the work that runs between
    # GEMMs (CvT-13 CPU inference: 12.6 -> 16 img/s on 2 cores without it).
    os.environ.setdefault('KMP_BLOCKTIME', '0')


# Paddle warns at import that its C++ extension builder found no ccache; this
# project builds no extensions
warnings.filterwarnings('ignore', message='No ccache found')
configure_environment()
