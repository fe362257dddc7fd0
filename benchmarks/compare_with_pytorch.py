"""This project's CvT against transformers' CvT on PyTorch, side by side in one run.

    python benchmarks/compare_with_pytorch.py                         # CvT-13, infer and train, 1 thread and all cores
    python benchmarks/compare_with_pytorch.py -model 21 -rounds 5
    python benchmarks/compare_with_pytorch.py -isa avx2               # both sides as on an AVX2-only CPU
    python benchmarks/compare_with_pytorch.py -modes deploy           # exported: ours as tools/infer.py runs it,
                                                              # theirs in ONNX Runtime (-deploy_reference)
    python benchmarks/compare_with_pytorch.py -precision bf16         # ours deployed in bf16 and int8, theirs
                                                              # under PyTorch autocast(bfloat16)

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
``-precision bf16`` compares the low-precision paths on a CPU with native
bfloat16 (tools/precision.py): ours deployed (tools/benchmark.py -mode deploy)
in bf16, and in int8 where the CPU has native int8 too, against transformers'
CvT in PyTorch eager inference under ``autocast(bfloat16)``; it prints bf16
deploy / PyTorch bf16 and int8 / bf16. Each of our runs must compute in the
format asked (its first line says so), else the comparison stops. On a CPU
without native bf16 it prints that the comparison cannot be made and exits 1.
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

from runtime import cpu_info, cpu_model, usable_cores  # noqa: E402  (no Paddle: this process only starts others)
from tools.precision import isa_summary, native_formats, native_instructions  # noqa: E402
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


def throughput(command: List[str], env: Dict[str, str], precision: str = '') -> float:
    """Run one benchmark process; its last line is ``throughput: X img/s``. With `precision`
    (tools/benchmark.py -mode deploy), its first line must say it ran in that precision."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    found = re.search(r'throughput: ([0-9.]+) img/s\s*$', result.stdout)
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']
        sys.exit(f'error: {" ".join(command[1:3])} failed: {tail[0]}')
    first = result.stdout.splitlines()[0]
    if precision and not first.startswith(f'precision {precision} |'):
        sys.exit(f'error: {" ".join(command[1:])} did not run in {precision}: {first}')
    return float(found.group(1))


def median(values: List[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def compare_low_precision(args: argparse.Namespace, cfg: str, depth: List[str], thread_counts: List[int],
                          steps: List[str]) -> None:
    """Ours deployed in bf16 (and int8 where native) against transformers' CvT under PyTorch
    autocast(bfloat16), alternating; or, without native bf16, say that it cannot be made."""
    flags = cpu_info()[1]
    formats = native_formats(flags)
    cpu = f'{cpu_model()[1]}: {isa_summary(flags)}'
    if 'bf16' not in formats:
        sys.exit(f'the bf16 comparison cannot be made on this CPU ({cpu}): it has no native bfloat16 '
                 f'({native_instructions("bf16")}), so both sides would be emulated or run fp32')
    ours = ['bf16'] + (['int8'] if 'int8' in formats else [])
    rates: Dict[tuple, List[float]] = {}
    for _ in range(args.rounds):
        for threads in thread_counts:
            for precision in ours:
                command = [sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), '-cfg', cfg, *steps,
                           '-mode', 'deploy', '-precision', precision, '-threads', str(threads)]
                rates.setdefault((precision, threads), []).append(throughput(command, {}, precision))
            command = [sys.executable, os.path.join(ROOT, 'benchmarks', 'pytorch_cvt.py'), '-depth', *depth, *steps,
                       '-mode', 'infer', '-precision', 'bf16', '-threads', str(threads)]
            rates.setdefault(('torch', threads), []).append(throughput(command, {}))
    print(f'CvT-{args.model}, batch {args.batch_size}, 224px, CPU {cpu}, median of {args.rounds} alternating '
          "rounds, img/s; ours deployed as tools/infer.py -precision runs it, transformers' CvT in PyTorch "
          'eager under autocast(bfloat16)')
    if 'int8' not in formats:
        print(f'int8: not compared, this CPU has no native int8 ({native_instructions("int8")})')
    print(f'{"threads":>7} {"bf16":>8} {"int8":>8} {"torch":>8} {"bf16/torch":>10} {"int8/bf16":>9}')
    for threads in thread_counts:
        bf16, torch_bf16 = median(rates[('bf16', threads)]), median(rates[('torch', threads)])
        int8 = median(rates[('int8', threads)]) if 'int8' in formats else None
        print(f'{threads:>7} {bf16:>8.2f} {int8 or float("nan"):>8.2f} {torch_bf16:>8.2f} '
              f'{bf16 / torch_bf16:>9.2f}x {(int8 or float("nan")) / bf16:>8.2f}x')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-model', choices=sorted(MODELS), default='13', help='CvT-13 or CvT-21, at 224')
    parser.add_argument('-batch_size', type=int_at_least(1), default=16)
    parser.add_argument('-modes', nargs='+', choices=sorted(TORCH_MODES), default=None,
                        help='default: infer train (-precision fp32); -precision bf16 compares deployed inference')
    parser.add_argument('-precision', choices=('fp32', 'bf16'), default='fp32',
                        help='bf16: ours deployed in bf16 and int8 against PyTorch autocast(bfloat16) (see above)')
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
    if args.precision == 'bf16' and (args.modes or args.isa != 'native'):
        parser.error('-precision bf16 compares deployed inference on the CPU as it is: no -modes, no -isa')
    args.modes = args.modes or ['infer', 'train']
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
    if args.precision == 'bf16':
        compare_low_precision(args, cfg, depth, thread_counts, steps)
        return
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
