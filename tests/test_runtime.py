"""runtime.configure(): each process's start-up decides its threads once and sets them everywhere."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

import paddle_internals
import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_RUN = {'CUDA_VISIBLE_DEVICES': ''}  # a CPU run also on a GPU host


@pytest.fixture
def fresh_runtime(monkeypatch):
    """runtime as in a process that has not configured itself, on 7 AVX2 AMD cores; returns
    the thread counts given to Paddle's OpenMP kernels (not this process's)."""
    monkeypatch.setattr(runtime, '_threads', None)
    monkeypatch.setattr(runtime, '_users_threads', False)
    monkeypatch.setattr(runtime, '_keeps_freed_memory', runtime._keeps_freed_memory)
    monkeypatch.setattr(runtime, 'gpu_host', lambda: False)  # a CPU host, also where the suite has a GPU
    for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'KMP_BLOCKTIME'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, 'usable_cores', lambda: 7)
    monkeypatch.setattr(runtime, 'cpu_info', lambda: ('AuthenticAMD', frozenset({'avx2', 'fma'})))
    pinned = []
    monkeypatch.setattr(runtime, 'use_cores', pinned.append)
    given = []
    monkeypatch.setattr(paddle_internals, 'set_num_threads', given.append)
    return given, pinned


def test_configure_sets_the_threads_and_mkl_path_once(fresh_runtime):
    given, pinned = fresh_runtime
    assert runtime.configure() == 7
    assert os.environ['MKL_NUM_THREADS'] == '7' and runtime.threads() == 7
    assert 'OMP_NUM_THREADS' not in os.environ  # left to the user
    assert os.environ['MKL_DEBUG_CPU_TYPE'] == '5' and os.environ['KMP_BLOCKTIME'] == '1'
    assert given == [7] and pinned == []
    # a second call (a tool's module imported by a test, a notebook cell run again) changes nothing
    assert runtime.configure(threads=2) == 7
    assert os.environ['MKL_NUM_THREADS'] == '7' and given == [7] and pinned == []


def test_configure_keeps_what_the_user_set(fresh_runtime, monkeypatch):
    given, _ = fresh_runtime
    monkeypatch.setenv('MKL_NUM_THREADS', '3')
    monkeypatch.setenv('MKL_DEBUG_CPU_TYPE', '')
    assert runtime.configure() == 3
    assert os.environ['MKL_NUM_THREADS'] == '3' and os.environ['MKL_DEBUG_CPU_TYPE'] == ''
    assert given == [3]
    assert runtime.threads_per_process(2) == 3  # each process of a multi-process run: the user's count


def test_explicit_threads_pin_unless_told_not_to(fresh_runtime, monkeypatch):
    given, pinned = fresh_runtime
    assert runtime.configure(threads=2) == 2
    assert pinned == [2] and given == [2] and os.environ['MKL_NUM_THREADS'] == '2'
    monkeypatch.setattr(runtime, '_threads', None)
    assert runtime.configure(threads=3, pin=False) == 3
    assert pinned == [2] and given == [2, 3]


def test_processes_share_the_cores(fresh_runtime):
    runtime.configure()
    assert [runtime.threads_per_process(n) for n in (1, 2, 3, 8)] == [7, 3, 2, 1]


def test_mkl_code_path_follows_the_amd_cpu_features():
    zen4 = frozenset({'avx2', 'fma', 'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl', 'avx512_bf16'})
    assert runtime.mkl_cpu_type('AuthenticAMD', zen4) == '7'
    assert runtime.mkl_cpu_type('AuthenticAMD', zen4 - {'avx512bw'}) == '5'  # a partial AVX-512 is not enough
    assert runtime.mkl_cpu_type('AuthenticAMD', frozenset({'avx2', 'fma'})) == '5'
    assert runtime.mkl_cpu_type('AuthenticAMD', frozenset({'sse4_2'})) is None
    assert runtime.mkl_cpu_type('GenuineIntel', zen4) is None


@pytest.mark.parametrize('env, threads, expected', [({}, '2', '2 2'), ({'MKL_NUM_THREADS': '2'}, 'None', '2 2'),
                                                     ({'MKL_NUM_THREADS': '2', 'OMP_NUM_THREADS': '1'}, 'None', '2 1')])
def test_paddle_openmp_kernels_get_the_configured_threads(env, threads, expected):
    """Paddle's own OpenMP kernels run on as many threads as MKL after configure()
    (without it Paddle leaves them on one), unless the user set OMP_NUM_THREADS."""
    code = f'''
import ctypes, os, sys
sys.path.insert(0, '.')
import runtime
count = runtime.configure(threads={threads})
import paddle
iomp = [p for p in open('/proc/self/maps').read().split() if os.path.basename(p).startswith('libiomp5')][0]
print(count, ctypes.CDLL(iomp).omp_get_max_threads())
'''
    if runtime.usable_cores() < 2 or not sys.platform.startswith('linux'):
        pytest.skip('needs 2 cores and Linux (/proc/self/maps)')
    clean = {k: v for k, v in os.environ.items() if k not in ('MKL_NUM_THREADS', 'OMP_NUM_THREADS')}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, **env, **CPU_RUN}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected


def test_a_gpu_host_is_a_gpu_build_with_a_visible_nvidia_device(monkeypatch):
    devices, installed = ['/dev/nvidia0'], {'paddlepaddle-gpu'}
    monkeypatch.setattr(runtime.glob, 'glob', lambda pattern: list(devices))

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return '2.6.2'

    monkeypatch.setattr(runtime.importlib.metadata, 'version', version)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    assert runtime.gpu_host()
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
    assert runtime.gpu_host()
    for hidden in ('', '-1'):
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', hidden)
        assert not runtime.gpu_host()
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    installed.clear()  # the CPU wheel on a machine with a GPU
    assert not runtime.gpu_host()
    installed.add('paddlepaddle-gpu')
    devices.clear()  # a GPU wheel on a machine without one
    assert not runtime.gpu_host()


def test_on_a_gpu_host_configure_leaves_the_thread_pools_and_the_allocator_alone(fresh_runtime, monkeypatch):
    given, pinned = fresh_runtime
    monkeypatch.setattr(runtime, 'gpu_host', lambda: True)
    kept = []
    monkeypatch.setattr(runtime, 'keep_freed_memory', lambda: kept.append(True) or True)
    assert runtime.configure() == 7
    assert not any(name in os.environ for name in ('MKL_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'KMP_BLOCKTIME'))
    assert given == [] and pinned == [] and kept == []


LOADER_WORKER = """
import ctypes, os, sys
sys.path.insert(0, '.')
import runtime
runtime.configure()
import paddle
import preemption

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p

def in_the_heap():
    block = libc.malloc(64 << 20)
    for line in open('/proc/self/maps'):
        low, high = (int(a, 16) for a in line.split()[0].split('-'))
        if low <= block < high:
            libc.free(ctypes.c_void_p(block))
            return '[heap]' in line

def kept_in_the_heap():
    # a block glibc would map on its own (64 MiB) comes from the heap while freed memory is
    # kept; else the first free gives the heap's top back and the next one is mapped
    in_the_heap()
    return in_the_heap()

def openmp_threads():
    iomp = [p for p in open('/proc/self/maps').read().split() if os.path.basename(p).startswith('libiomp5')][0]
    return ctypes.CDLL(iomp).omp_get_max_threads()

print('training process', kept_in_the_heap(), openmp_threads(), flush=True)
worker = os.fork()
if worker == 0:
    preemption.loader_worker_init(0, os.getppid())
    print('loader worker', kept_in_the_heap(), openmp_threads(), flush=True)
    os._exit(0)
os.waitpid(worker, 0)
"""


def test_loader_workers_give_back_the_cpu_tuning():
    """The training process keeps freed memory and runs MKL and OpenMP on its cores; its
    forked loader workers return freed memory and run one thread each."""
    if runtime.usable_cores() < 2 or not sys.platform.startswith('linux'):
        pytest.skip('needs 2 cores and Linux (/proc/self/maps, glibc)')
    clean = {k: v for k, v in os.environ.items() if not k.startswith(('MKL_', 'OMP_', 'MALLOC_'))}
    result = subprocess.run([sys.executable, '-c', LOADER_WORKER], cwd=ROOT, capture_output=True, text=True,
                            env={**clean, **CPU_RUN, 'MKL_NUM_THREADS': '2'}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ['training process True 2', 'loader worker False 1']
