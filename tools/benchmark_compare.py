"""This project's CvT against transformers' CvT on PyTorch, side by side in one run.

    python tools/benchmark_compare.py                  # CvT-13, batch 16, infer and train
    python tools/benchmark_compare.py -model 21 -rounds 5
    python tools/benchmark_compare.py -modes deploy -rounds 5   # exported: ONNX Runtime on both sides

Runs tools/benchmark.py and tools/benchmark_torch.py alternately, each in its
own process (so neither inherits the other's threads or allocator), for
`-rounds` rounds per mode, and prints the median throughput of each side and
their ratio. Alternating spreads the machine's drift (other load, clock
changes) over both sides. Mode ``deploy`` compares tools/benchmark.py -mode
deploy (what tools/infer.py runs by default) with transformers' CvT exported to
ONNX and run by ONNX Runtime (benchmark_torch.py -mode onnx; onnxruntime and
paddle2onnx needed: requirements-deploy.txt). PyTorch and transformers must
be installed (they are in requirements-test.txt, not in the project's
requirements).
"""

import argparse
import os
import re
import subprocess
import sys
from typing import List

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
# benchmark_torch.py's counterpart of each benchmark.py mode
TORCH_MODES = {'infer': 'infer', 'train': 'train', 'deploy': 'onnx'}
MODELS = {'13': ('configs/cvt-13-224x224.yaml', ['1', '2', '10']),
          '21': ('configs/cvt-21-224x224.yaml', ['1', '4', '16'])}


def throughput(command: List[str]) -> float:
    """Run one benchmark process; its last line is ``throughput: X img/s``."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
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
    parser.add_argument('-batch_size', type=int, default=16)
    parser.add_argument('-modes', nargs='+', choices=sorted(TORCH_MODES), default=['infer', 'train'])
    parser.add_argument('-rounds', type=int, default=3)
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        sys.exit(f'error: the comparison needs PyTorch and transformers ({err}); '
                 'pip install -r requirements-test.txt')

    cfg, depth = MODELS[args.model]
    print(f'CvT-{args.model}, batch {args.batch_size}, 224px, fp32, {args.rounds} alternating rounds per mode')
    print(f'{"mode":<6} {"paddle img/s":>13} {"torch img/s":>12} {"ratio":>6}')
    for mode in args.modes:
        ours = [sys.executable, os.path.join(TOOLS, 'benchmark.py'), '-cfg', cfg,
                '-batch_size', str(args.batch_size), '-mode', mode]
        theirs = [sys.executable, os.path.join(TOOLS, 'benchmark_torch.py'), '-depth', *depth,
                  '-batch_size', str(args.batch_size), '-mode', TORCH_MODES[mode]]
        paddle_rates, torch_rates = [], []
        for _ in range(args.rounds):
            paddle_rates.append(throughput(ours))
            torch_rates.append(throughput(theirs))
        mine, reference = median(paddle_rates), median(torch_rates)
        print(f'{mode:<6} {mine:>13.2f} {reference:>12.2f} {mine / reference:>5.2f}x')


if __name__ == '__main__':
    main()
