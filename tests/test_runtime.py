"""runtime.configure(): each process's start-up decides its threads once and sets them everywhere."""

import os
import subprocess
import sys

import pytest

import paddle_internals
import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_runtime(monkeypatch):
    """runtime as in a process that has not configured itself, on 7 AVX2 AMD cores; returns
    the thread counts given to Paddle's OpenMP kernels (not this process's)."""
    monkeypatch.setattr(runtime, '_threads', None)
    monkeypatch.setattr(runtime, '_users_threads', False)
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
                            env={**clean, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected
