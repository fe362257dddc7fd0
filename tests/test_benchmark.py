"""tools/benchmark.py reports the machine it measured on, takes -threads and times the deployed
model in the runtime tools/infer.py picks (no timings checked)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fast import build
from test_export_onnx import needs_converter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(*args, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, 'tools/benchmark.py', '-cfg', 'configs/cvt-demo.yaml', '-batch_size', '2',
               '-warmup', '1', '-iters', '1', *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=300)


def test_prints_cpu_isa_mkl_path_layers_kernel_build_and_threads():
    result = benchmark('-mode', 'train', '-threads', '1')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith('cpu: ') and 'vector ISA' in lines[0] and '1 cores used' in lines[0]
    assert lines[1].startswith('threads 1, MKL code path ') and ', layers fast, CPU kernels ' in lines[1]
    assert lines[-1].startswith('throughput: ') and lines[-1].endswith(' img/s')


@pytest.mark.skipif(build.native_isa() != 'avx512' or build.load() is None,
                    reason='needs an AVX-512 CPU and a C compiler to emulate an AVX2 one')
def test_emulated_avx2_machine_is_reported():
    result = benchmark(CVT_CPU_ISA='avx2', MKL_DEBUG_CPU_TYPE='5')
    assert result.returncode == 0, result.stderr
    assert 'MKL code path AVX2 (MKL_DEBUG_CPU_TYPE=5)' in result.stdout
    assert 'layers fast, CPU kernels avx2' in result.stdout


def test_the_plain_layers_are_one_setting_away():
    result = benchmark('-mode', 'infer', '-threads', '1', '-opts', 'MODEL.LAYERS', 'plain')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[1].endswith(', layers plain')


def test_too_many_threads_is_one_line_error():
    result = benchmark('-threads', '999')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f'benchmark.py: error: argument -threads: 999: this process may use 1 to {len(os.sched_getaffinity(0))} cores')


@pytest.mark.parametrize('flag, value, minimum', [('-batch_size', '0', 1), ('-iters', '0', 1), ('-warmup', '-1', 0),
                                                  ('-threads', '0', 1)])
def test_a_count_out_of_range_is_a_one_line_usage_error(flag, value, minimum):
    result = benchmark(flag, value)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f'benchmark.py: error: argument {flag}: '
                                                       f'must be at least {minimum}, got {value}')


def test_a_missing_config_is_a_one_line_error():
    result = subprocess.run([sys.executable, 'tools/benchmark.py', '-cfg', 'configs/missing.yaml'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == 'error: configs/missing.yaml: config file not found'


def test_the_comparison_checks_its_counts_before_starting_anything():
    result = subprocess.run([sys.executable, 'benchmarks/compare_with_pytorch.py', '-rounds', '0'], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ('compare_with_pytorch.py: error: argument -rounds: '
                                                       'must be at least 1, got 0')


@needs_converter
def test_deploy_mode_runs_the_runtime_infer_picks_for_a_onnx_file():
    result = benchmark('-mode', 'deploy', '-threads', '1')
    assert result.returncode == 0, result.stderr
    expected = 'openvino' if importlib.util.find_spec('openvino') else 'onnxruntime'
    assert f'deploy: {expected} ' in result.stdout and ', 1 threads' in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith('throughput: ')


@needs_converter
@pytest.mark.skipif(importlib.util.find_spec('nncf') is None,
                    reason='nncf needed: pip install -r requirements-deploy.txt')
def test_deploy_mode_times_the_int8_model_it_quantises_and_says_so_first():
    result = benchmark('-mode', 'deploy', '-threads', '1', '-backend', 'onnxruntime', '-precision', 'int8',
                       '-force_precision')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith('precision int8 | ONNX Runtime ') and 'CPU ' in lines[0]
    assert ', int8' in lines[-3] and lines[-1].startswith('throughput: ')


@pytest.mark.parametrize('args, message', [
    (['-mode', 'deploy', '-backend', 'onnxruntime', '-precision', 'bf16'],
     'error: -precision bf16 -backend onnxruntime: ONNX Runtime has no bfloat16 kernels for x86 CPUs'),
    (['-mode', 'infer', '-precision', 'int8'],
     'benchmark.py: error: -precision and -force_precision are for -mode deploy (the eager model runs fp32 on CPU)'),
])
def test_a_precision_the_mode_or_runtime_cannot_run_is_a_one_line_error(args, message):
    result = benchmark(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
