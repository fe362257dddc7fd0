"""Check this project's GPU paths on your GPU and measure them: one command, a report to keep.

    python tools/check_gpu.py [-batch_size 64] [-steps 20] [-skip_tensorrt]

Nothing in this repository could be run on a GPU where it was written (docs/gpu.md).
This script runs, on the first visible GPU, what the GPU paths promise, and prints one
line per check (PASS / FAIL / SKIP, with figures) and a summary to paste into an issue:

1. the GPU, its compute capability, Paddle and CUDA;
2. the autocast dtype that AMP_DTYPE auto picks (bfloat16 from compute capability 8.0);
3. the attention: which path a forward under autocast takes (the fused kernel where
   the GPU and Paddle support it, else the explicit softmax) and that its logits agree
   with float32's;
4. training steps of CvT-13 in float32 and under AMP: images per second, a finite loss,
   and no read back to the host inside the steps;
5. the loader: images per second of the training loader with the default workers,
   against what a training step consumes;
6. TensorRT (unless -skip_tensorrt): the exported model in float16, its engines built
   once and found again (the second start's time).

Exit code 0 when every check passed, 1 when one failed, 2 without a CUDA GPU.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from config import get_config  # noqa: E402
from utils import fail, int_at_least  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')
HOST_READS = ('numpy', 'item', 'tolist', '__float__', '__int__', '__bool__')


class Report:
    """The check lines, as they are printed, and whether all passed."""

    def __init__(self):
        self.lines: List[str] = []
        self.failed = False

    def add(self, status: str, name: str, detail: str) -> None:
        line = f'{status:4s}  {name}: {detail}'
        self.failed |= status == 'FAIL'
        self.lines.append(line)
        print(line, flush=True)


def timed_steps(step: Callable[[], None], steps: int) -> float:
    """Seconds per step, the median of `steps` after two untimed ones."""
    for _ in range(2):
        step()
    paddle.device.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        paddle.device.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_attention(report: Report, amp: str) -> None:
    import cvt
    config = get_config(CONFIG)
    model = cvt.build_cvt(config)
    model.eval()
    images = paddle.randn([8, 3, 224, 224])
    calls = []
    fused = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **k: (calls.append(1), fused(*a, **k))[1]
    try:
        with paddle.no_grad():
            reference = model(images).astype('float32')
            import engine
            with engine.autocast(amp):
                logits = model(images).astype('float32')
    finally:
        F.scaled_dot_product_attention = fused
    from fast.layers import flash_attention_runs
    blocks = sum(config.MODEL.DEPTH)
    head_dim = config.MODEL.DIM_EMBED[0] // config.MODEL.NUM_HEADS[0]
    expected = blocks if flash_attention_runs(images.place, amp, head_dim) else 0
    difference = float((logits - reference).abs().max())
    path = f'fused kernel in {len(calls)} of {blocks} blocks' if calls else 'explicit softmax in every block'
    path += f' (expected: {"the fused kernel" if expected else "the explicit softmax"})'
    status = 'PASS' if difference < 0.5 and len(calls) == expected else 'FAIL'
    report.add(status, 'attention under autocast', f'{path}; logits within {difference:.3g} of float32')


def check_training(report: Report, amp: str, batch: int, steps: int) -> float:
    import engine
    import losses
    import cvt
    config = get_config(CONFIG)
    rates = {}
    for dtype in (None, amp):
        model = cvt.build_cvt(config)
        model.train()
        optimizer = engine.build_optimizer(config, model, 1e-4)
        scaler = paddle.amp.GradScaler(enable=dtype == 'float16')
        criterion = losses.build_criterion(config, mixup_active=False)
        images = paddle.randn([batch, 3, 224, 224])
        labels = paddle.randint(0, 1000, [batch])
        losses_seen = []

        def step():
            loss, _ = engine.train_step(model, images, labels, criterion, optimizer, scaler, amp=dtype)
            losses_seen.append(loss)

        seconds = timed_steps(step, steps)
        finite = all(np.isfinite(float(loss)) for loss in losses_seen)
        rates[dtype] = batch / seconds
        report.add('PASS' if finite else 'FAIL', f'training step, {dtype or "float32"}',
                   f'{rates[dtype]:.1f} img/s (batch {batch}), loss finite: {finite}')
    reads = count_host_reads(lambda: engine.train_step(model, images, labels, criterion, optimizer, scaler,
                                                       amp=amp))
    # Paddle's float16 loss scaler decides on the host whether the step overflowed: one read
    allowed = 1 if amp == 'float16' else 0
    note = "; 1 is Paddle's float16 loss scaler" if allowed else ''
    report.add('PASS' if reads <= allowed else 'FAIL', 'host reads in a training step',
               f'{reads} (the loss and accuracy are read back only every REPORT_FREQ steps{note})')
    return rates[amp]


def count_host_reads(step: Callable[[], None]) -> int:
    """How often one call of `step` reads a tensor's value back to the host."""
    reads, originals = [], {}
    for name in HOST_READS:
        originals[name] = getattr(paddle.Tensor, name)
        setattr(paddle.Tensor, name, lambda self, *a, _o=originals[name], **k: (reads.append(1), _o(self, *a, **k))[1])
    try:
        step()
    finally:
        for name, original in originals.items():
            setattr(paddle.Tensor, name, original)
    return len(reads)


def check_loader(report: Report, consumed: float) -> None:
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'benchmark_loader.py'), '-cfg', CONFIG,
                             '-workers', str(default_workers()), '-batches', '8'],
                            capture_output=True, text=True, cwd=ROOT)
    line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else result.stderr.strip()[-200:]
    rate = float(line.split('img/s')[0].split(':')[-1]) if result.returncode == 0 else 0.0
    status = 'PASS' if rate >= consumed else 'FAIL'
    report.add(status, 'loader', f'{line.strip()} against {consumed:.0f} img/s a step consumes '
                                 '(FAIL: raise DATA.NUM_WORKERS, or give the container more CPU and --shm-size)')


def default_workers() -> int:
    import datasets
    return datasets.default_workers(1, on_gpu=True)


def check_tensorrt(report: Report) -> None:
    with tempfile.TemporaryDirectory() as folder:
        export = os.path.join(folder, 'cvt-13')
        exported = subprocess.run([sys.executable, 'tools/export_model.py', '-cfg', CONFIG, '-pretrained',
                                   write_random_weights(folder), '-output', export],
                                  capture_output=True, text=True, cwd=ROOT)
        if exported.returncode != 0:
            report.add('FAIL', 'TensorRT', f'export failed: {exported.stderr.strip()[-300:]}')
            return
        image = os.path.join(folder, 'image.png')
        from PIL import Image
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(image)
        command = [sys.executable, 'tools/infer.py', '-model', export, '-device', 'gpu', '-tensorrt',
                   '-precision', 'fp16', image]
        times = []
        for _ in range(2):
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            times.append(time.perf_counter() - start)
            if run.returncode != 0:
                report.add('FAIL', 'TensorRT float16', run.stderr.strip()[-300:])
                return
        cached = os.path.isdir(os.path.join(export, 'tensorrt'))
        report.add('PASS' if cached and times[1] < times[0] else 'FAIL', 'TensorRT float16',
                   f'first start {times[0]:.0f} s (builds the engines), second {times[1]:.0f} s (cached: {cached})')


def write_random_weights(folder: str) -> str:
    import cvt
    path = os.path.join(folder, 'random.pdparams')
    paddle.save(cvt.build_cvt(get_config(CONFIG)).state_dict(), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-batch_size', type=int_at_least(1), default=64)
    parser.add_argument('-steps', type=int_at_least(1), default=20, help='timed training steps per precision')
    parser.add_argument('-skip_tensorrt', action='store_true', help='skip the TensorRT check (minutes)')
    args = parser.parse_args()
    if not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        fail('no CUDA GPU here (or a CPU build of Paddle): this script checks the GPU paths on a GPU')
    paddle.set_device('gpu:0')
    import engine
    report = Report()
    major, minor = paddle.device.cuda.get_device_capability()
    report.add('INFO', 'GPU', f'{paddle.device.cuda.get_device_name()}, compute capability {major}.{minor}, '
                              f'Paddle {paddle.__version__}, CUDA {paddle.version.cuda()}')
    config = get_config(CONFIG, ['AMP', 'True'])
    amp = engine.amp_dtype(config)
    report.add('PASS' if amp == ('bfloat16' if major >= 8 else 'float16') else 'FAIL', 'AMP_DTYPE auto', amp)
    check_attention(report, amp)
    consumed = check_training(report, amp, args.batch_size, args.steps)
    check_loader(report, consumed)
    if not args.skip_tensorrt:
        check_tensorrt(report)
    print('\n--- summary (paste into an issue) ---')
    print('\n'.join(report.lines))
    return 1 if report.failed else 0


if __name__ == '__main__':
    sys.exit(main())
