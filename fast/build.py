"""The CPU kernels' C library (csrc/cpu_kernels.c): built once per machine and instruction set, cached, loaded.

The C file is compiled at first use (about two seconds) with the build for this
CPU: ``avx512`` (``-march=x86-64-v4``) on CPUs with AVX-512 F/CD/BW/DQ/VL,
``avx2`` (``-march=x86-64-v3``) on those with AVX2 and FMA; none elsewhere (the
fast layers then run Paddle's ops). ``CVT_CPU_ISA=avx2`` picks the AVX2 build on an
AVX-512 CPU, to test it or to emulate an AVX2 machine in benchmarks.

The library is cached under ``CVT_CACHE_DIR`` (default ``~/.cache/cvt-paddle``),
created private; a cache folder or library that another user could have written is
never loaded from (fileio.untrusted_reason): the kernels are then built in a fresh
private folder. A failed build warns once; the fast layers then run Paddle's ops,
and the run goes on.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Optional, Tuple

import paddle

import fileio
import runtime

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_kernels.c')
# -fno-trapping-math lets gcc turn the clamps in exp_approx into vector selects on
# AVX2 (AVX-512 has mask registers for them); without it the exp loops of softmax
# and SiLU stay scalar there, 3x slower than Paddle's ops. Values, NaN included,
# are unchanged: only floating-point exception flags, which nothing reads, differ.
# -ffp-contract=fast lets a multiply and an add become one FMA, which -std=c99 (ISO
# C) otherwise forbids: the exp polynomials run 1.25-1.35x faster, and an FMA rounds
# once instead of twice.
_FLAGS = ['-O3', '-fno-trapping-math', '-ffp-contract=fast', '-fopenmp', '-fPIC', '-std=c99']
ISA_FLAGS = {'avx512': '-march=x86-64-v4', 'avx2': '-march=x86-64-v3'}
# the CPU flags (/proc/cpuinfo) each -march level needs
_ISA_CPU_FLAGS = {
    'avx512': frozenset({'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl',
                         'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe'}),
    'avx2': frozenset({'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe'}),
}

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_isa: Optional[str] = None  # the build loaded
_load_attempted = False


def native_isa() -> Optional[str]:
    """The widest kernel build this CPU runs: 'avx512', 'avx2', or None."""
    flags = runtime.cpu_info()[1]
    for isa in ('avx512', 'avx2'):
        if _ISA_CPU_FLAGS[isa] <= flags:
            return isa
    return None


def selected_isa() -> Optional[str]:
    """The build to use: `native_isa`, or CVT_CPU_ISA where the CPU runs it; None: no kernels.

    Raises ValueError for a CVT_CPU_ISA that is unknown or that this CPU cannot run.
    """
    native = native_isa()
    wanted = os.environ.get('CVT_CPU_ISA', '')
    if not wanted:
        return native
    if wanted not in ISA_FLAGS:
        raise ValueError(f'CVT_CPU_ISA={wanted!r}: expected one of {", ".join(ISA_FLAGS)}')
    if native is None or (wanted == 'avx512' and native != 'avx512'):
        raise ValueError(f'CVT_CPU_ISA={wanted}: this CPU has no {wanted} (its best: {native or "neither"})')
    return wanted


def _paddle_openmp() -> Optional[str]:
    """Paddle's own Intel OpenMP runtime, so that the kernels share MKL's thread pool
    instead of starting a second one (GNU OpenMP) that competes for the cores."""
    path = os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libiomp5.so')
    return path if os.path.isfile(path) else None


def library_name(isa: str, compiler: str) -> str:
    """The cached library's file name: a new one whenever the source, flags, compiler or
    Paddle's OpenMP runtime change."""
    with open(SOURCE, 'rb') as source:
        key = hashlib.sha256(source.read() + ' '.join(_FLAGS + [ISA_FLAGS[isa]]).encode()
                             + compiler.encode() + str(_paddle_openmp()).encode())
    return f'cpu_kernels-{isa}-{key.hexdigest()[:16]}.so'


def _library_path(name: str) -> Tuple[str, Optional[str]]:
    """Where the library `name` is (or is to be built) for this process, and the fresh
    folder made for it (to remove once it is loaded), if any: the cache folder when
    only this user can write it, else a fresh private folder (with one warning). A
    library in the cache that others could have written is removed, not loaded."""
    folder = fileio.cache_root()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass  # `untrusted_reason` reports it
    reason = fileio.untrusted_reason(folder)
    if reason is None:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and fileio.untrusted_reason(path, is_folder=False) is not None:
            os.remove(path)  # the folder is ours: build it again
        return path, None
    fresh = tempfile.mkdtemp(prefix='cvt-kernels-')  # 0700, an unpredictable name
    warnings.warn(f'cpu_kernels: not using the cache: {reason}; building the kernels in a fresh private '
                  f'folder (set CVT_CACHE_DIR to a folder that only you can write)')
    return os.path.join(fresh, name), fresh


def _compile(compiler: str, isa: str, output: str) -> None:
    """Build the shared library at `output`, atomically (a temporary file, then a rename),
    so that processes starting together never load a half-written file."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(output))
    os.close(handle)
    objects = partial[:-3] + '.o'
    run = lambda *args: subprocess.run([compiler, *args], check=True, capture_output=True, text=True)
    try:
        run(*_FLAGS, ISA_FLAGS[isa], '-c', SOURCE, '-o', objects)
        iomp = _paddle_openmp()
        try:
            if iomp is None:
                raise FileNotFoundError('libiomp5.so')
            # Paddle's libiomp5 implements the GNU OpenMP entry points; -z defs makes
            # a missing one a link error here rather than a load error later
            run('-shared', objects, '-o', partial, iomp, '-Wl,-rpath,' + os.path.dirname(iomp),
                '-Wl,-z,defs', '-lm')
        except (OSError, subprocess.CalledProcessError):
            run('-shared', '-fopenmp', objects, '-o', partial, '-lm')
        os.chmod(partial, 0o700)  # writable by us alone, whatever the umask
        os.replace(partial, output)
    finally:
        for leftover in (partial, objects):
            if os.path.exists(leftover):
                os.remove(leftover)


def _declare(library: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        'cvt_set_threads': [ctypes.c_int],
        'cvt_dwconv2d_forward': [ptr] * 5 + [i64] * 9,
        'cvt_dwconv2d_backward': [ptr] * 5 + [i64] * 9,
        'cvt_softmax_forward': [ptr] * 2 + [i64] * 2,
        'cvt_softmax_backward': [ptr] * 3 + [i64] * 2,
        'cvt_layer_norm_forward': [ptr] * 6 + [i64] * 2 + [ctypes.c_float],
        'cvt_layer_norm_backward': [ptr] * 8 + [i64] * 2,
        'cvt_channel_sum': [ptr] * 2 + [i64] * 3,
        'cvt_add_bias': [ptr] * 3 + [i64] * 3,
        'cvt_im2col': [ptr] * 2 + [i64] * 9,
        'cvt_bias_silu_forward': [ptr] * 3 + [i64] * 2 + [ctypes.c_float],
        'cvt_bias_silu_backward': [ptr] * 4 + [i64] * 2 + [ctypes.c_float],
        'cvt_col2im': [ptr] * 2 + [i64] * 9,
        'cvt_residual_add': [ptr] * 4 + [i64] * 2,
        'cvt_transpose_batched': [ptr] * 2 + [i64] * 5,
        'cvt_batch_norm_forward': [ptr] * 9 + [i64] * 3 + [ctypes.c_float] * 2,
        'cvt_batch_norm_backward': [ptr] * 9 + [i64] * 3,
        'cvt_fold_batch_norm': [ptr] * 5 + [ctypes.c_float] + [ptr] * 2 + [i64] * 2,
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = None


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernels, building them on first use; None where they cannot be had."""
    global _library, _isa, _load_attempted
    if _load_attempted:
        return _library
    with _lock:
        if _load_attempted:
            return _library
        _load_attempted = True
        if not sys.platform.startswith('linux'):
            return None
        try:
            isa = selected_isa()
        except ValueError as error:
            warnings.warn(f'cpu_kernels: {error}; using Paddle\'s CPU ops')
            return None
        if isa is None:
            return None  # no build for this CPU: Paddle's ops
        compiler = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
        if compiler is None:
            warnings.warn('cpu_kernels: no C compiler (cc) found; using Paddle\'s slower CPU ops')
            return None
        fresh = None
        try:
            output, fresh = _library_path(library_name(isa, compiler))
            if not os.path.isfile(output):
                _compile(compiler, isa, output)
            library = ctypes.CDLL(output)
            _declare(library)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, 'stderr', '') or str(error)
            warnings.warn(f'cpu_kernels: could not build {SOURCE} ({detail.strip()[:300]}); '
                          'using Paddle\'s slower CPU ops')
            return None
        finally:
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)  # a loaded library needs no file
        library.cvt_set_threads(runtime.threads())
        _library, _isa = library, isa
    return _library


def isa() -> Optional[str]:
    """The kernel build in use ('avx512' or 'avx2'), or None (Paddle's ops), building it on first use."""
    return _isa if load() is not None else None
