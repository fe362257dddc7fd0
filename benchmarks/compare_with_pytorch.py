"""This project's CvT against transformers' CvT on PyTorch, side by side in one run.

    python benchmarks/compare_with_pytorch.py                         # CvT-13, infer and train, 1 thread and all cores
    python benchmarks/compare_with_pytorch.py -model 21 -rounds 5
    python benchmarks/compare_with_pytorch.py -isa avx2               # both sides as on an AVX2-only CPU
    python benchmarks/compare_with_pytorch.py -modes deploy           # exported: ours as tools/infer.py runs it,
                                                              # theirs in ONNX Runtime (-deploy_reference)

A development benchmark: the figures of docs/speed.md. Runs tools/benchmark.py
and benchmarks/pytorch_cvt.py alternately, each in its
own process (so neither inherits the other's threads or allocator), for
`-rounds` rounds of every mode and thread count, and prints the median
throughput of each side, their ratio, and each side's gain from 1 thread to
all cores (work that does not spread over cores shows there, even on 2).
Alternating spreads the machine's drift (other load, clock changes) over both
sides. Mode ``deploy`` compares tools/benchmark.py -mode deploy (what
tools/infer.py runs by default: OpenVINO where installed) with transformers'
CvT exported to ONNX and run by ONNX Runtime (pytorch_cvt.py -mode onnx),
or by OpenVINO with ``-deploy_reference openvino``; it needs
requirements-deploy.txt.
PyTorch and transformers must be installed (they are in requirements-test.txt,
not in the project's requirements).

``-isa avx2`` runs both sides as an AVX2 machine would, on an AVX-512 CPU:
this project with MKL's AVX2 path (MKL_DEBUG_CPU_TYPE=5), the AVX2 build of
its CPU kernels (CVT_CPU_ISA=avx2) and oneDNN capped at AVX2; PyTorch with its
AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) and oneDNN capped at AVX2. MKL is
capped at AVX2 on both sides (MKL_ENABLE_INSTRUCTIONS=AVX2). Paddle's own
(non-MKL) CPU kernels pick their code path from the CPU and cannot be capped.
"""

import argparse
import os
import re
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runtime import usable_cores  # noqa: E402  (no Paddle: this process only starts others)
from utils import int_at_least, thread_count  # noqa: E402

# pytorch_cvt.py's counterpart of each benchmark.py mode
TORCH_MODES = {'infer': 'infer', 'train': 'train', 'deploy': 'onnx'}
MODELS = {'13': ('configs/cvt-13-224x224.yaml', ['1', '2', '10']),
          '21': ('configs/cvt-21-224x224.yaml', ['1', '4', '16'])}
COMMON_AVX2 = {'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}
EMULATION = {
    'native': ({}, {}),
    'avx2': ({**COMMON_AVX2, 'MKL_DEBUG_CPU_TYPE': '5', 'CVT_CPU_ISA': 'avx2'},
             {**COMMON_AVX2, 'ATEN_CPU_CAPABILITY': 'avx2'}),
}


def throughput(command: List[str], env: Dict[str, str]) -> float:
    """Run one benchmark process; its last line is ``throughput: X img/s``."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    found = re.search(r'throughput: ([0-9.]+) img/s\s*$', result.stdout)
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']
        sys.exit(f'error: {" ".join(command[1:3])} failed: {tail[0]}')
    return float(found.group(1))


def median(values: List[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-model', choices=sorted(MODELS), default='13', help='CvT-13 or CvT-21, at 224')
    parser.add_argument('-batch_size', type=int_at_least(1), default=16)
    parser.add_argument('-modes', nargs='+', choices=sorted(TORCH_MODES), default=['infer', 'train'])
    parser.add_argument('-threads', type=thread_count, nargs='+', default=None,
                        help='thread counts to run (default: 1 and all usable cores)')
    parser.add_argument('-isa', choices=sorted(EMULATION), default='native',
                        help='avx2: emulate an AVX2-only CPU on both sides (see above)')
    parser.add_argument('-deploy_reference', choices=('onnx', 'openvino'), default='onnx',
                        help="-modes deploy: the runtime of transformers' CvT (onnx: ONNX Runtime)")
    parser.add_argument('-rounds', type=int_at_least(1), default=3)
    parser.add_argument('-warmup', type=int_at_least(0), default=3, help='untimed steps per process')
    parser.add_argument('-iters', type=int_at_least(1), default=10, help='timed steps per process (median)')
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        sys.exit(f'error: the comparison needs PyTorch and transformers ({err}); '
                 'pip install -r requirements-test.txt')
    cores = usable_cores()
    thread_counts = sorted(set(args.threads or [1, cores]))

    cfg, depth = MODELS[args.model]
    torch_modes = {**TORCH_MODES, 'deploy': args.deploy_reference}
    paddle_env, torch_env = EMULATION[args.isa]
    steps = ['-warmup', str(args.warmup), '-iters', str(args.iters), '-batch_size', str(args.batch_size)]
    rates: Dict[tuple, List[float]] = {}
    for _ in range(args.rounds):
        for mode in args.modes:
            for threads in thread_counts:
                ours = [sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), '-cfg', cfg, *steps,
                        '-mode', mode, '-threads', str(threads)]
                theirs = [sys.executable, os.path.join(ROOT, 'benchmarks', 'pytorch_cvt.py'), '-depth', *depth,
                          *steps, '-mode', torch_modes[mode], '-threads', str(threads)]
                rates.setdefault(('paddle', mode, threads), []).append(throughput(ours, paddle_env))
                rates.setdefault(('torch', mode, threads), []).append(throughput(theirs, torch_env))

    emulated = ' emulated (' + ', '.join(f'{k}={v}' for k, v in sorted({**paddle_env, **torch_env}.items())) + ')'
    print(f'CvT-{args.model}, batch {args.batch_size}, 224px, fp32, ISA {args.isa}'
          f'{emulated if paddle_env else ""}, median of {args.rounds} alternating rounds, img/s')
    if 'deploy' in args.modes:
        print(f"deploy: ours as tools/infer.py runs it, transformers' CvT in "
              f"{'ONNX Runtime' if args.deploy_reference == 'onnx' else 'OpenVINO'}")
    print(f'{"mode":<6} {"threads":>7} {"paddle":>8} {"torch":>8} {"ratio":>6}')
    for mode in args.modes:
        for threads in thread_counts:
            mine, reference = median(rates[('paddle', mode, threads)]), median(rates[('torch', mode, threads)])
            print(f'{mode:<6} {threads:>7} {mine:>8.2f} {reference:>8.2f} {mine / reference:>5.2f}x')
    if len(thread_counts) > 1:
        low, high = thread_counts[0], thread_counts[-1]
        for mode in args.modes:
            gains = [median(rates[(side, mode, high)]) / median(rates[(side, mode, low)]) for side in ('paddle', 'torch')]
            print(f'{mode}: gain from {low} to {high} threads: paddle {gains[0]:.2f}x, torch {gains[1]:.2f}x')


if __name__ == '__main__':
    main()
