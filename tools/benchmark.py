"""Throughput of this project's CvT: inference or training, images per second.

    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -mode infer
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -mode train
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -threads 1
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -mode train -profile
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 64 -mode train -amp  # GPU
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -mode deploy
    python tools/benchmark.py -cfg configs/cvt-13-224x224.yaml -batch_size 16 -mode deploy -precision bf16

It builds the model from the config, warms up, then times the real code paths:
``infer`` is the eval-mode forward under ``paddle.no_grad``; ``train`` is
``engine.train_step``, the training scripts' own step (forward, the recipe's
loss on Mixup-style soft targets, backward, AdamW update) with the engine's
optimizer, LR schedule and loss scaler; ``deploy`` is what tools/infer.py runs
by default on CPU: the model exported (in the set-up, not timed) for
``-backend`` (default: infer.onnx_backend(), OpenVINO where installed; see
docs/deploy.md) and run with infer.py's runtime settings, numpy images in,
logits out; ``-precision bf16|int8`` runs it as ``infer.py -precision`` does
(where the CPU has the format natively, else fp32 with one line;
``-force_precision`` regardless), the int8 model quantised in the set-up with
the random batch as its calibration images (for speed only).
It runs under the same runtime set-up as the training and evaluation scripts
(``runtime.configure()`` before Paddle); ``-threads N`` runs on N of the
usable cores (default: all); ``-opts MODEL.LAYERS plain`` times the plain
layers. It prints the CPU, its vector ISA, MKL's code path, the layers and the
CPU kernel build, and the thread count, then the median step; the last line is
``throughput: X img/s``. ``benchmarks/pytorch_cvt.py`` prints the same for
transformers' CvT.
"""

import argparse
import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
from tools.precision import PRECISIONS  # noqa: E402  (imports no Paddle)
from utils import add_opts_argument, fail, int_at_least, thread_count  # noqa: E402

ISA_NAMES = {'avx512': 'AVX-512', 'avx2': 'AVX2', None: 'neither AVX2 nor AVX-512'}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', type=str, required=True)
    add_opts_argument(parser)
    parser.add_argument('-batch_size', type=int_at_least(1), default=16)
    parser.add_argument('-image_size', type=int_at_least(1), default=None)
    parser.add_argument('-mode', choices=('infer', 'train', 'deploy'), default='infer')
    parser.add_argument('-backend', choices=('paddle', 'openvino', 'onnxruntime'), default=None,
                        help='-mode deploy: the runtime (default: the one tools/infer.py recommends)')
    parser.add_argument('-amp', action='store_true', help='autocast to AMP_DTYPE (GPU; -opts AMP_DTYPE float16|bfloat16|auto)')
    parser.add_argument('-precision', choices=PRECISIONS, default='fp32',
                        help='-mode deploy: the number format, as tools/infer.py -precision (default fp32)')
    parser.add_argument('-force_precision', action='store_true',
                        help='-mode deploy: run -precision even where the CPU has no native instructions for it')
    parser.add_argument('-threads', type=thread_count, default=None,
                        help='run on this many cores, one thread each (default: all usable cores)')
    parser.add_argument('-warmup', type=int_at_least(0), default=3)
    parser.add_argument('-iters', type=int_at_least(1), default=10)
    parser.add_argument('-profile', action='store_true',
                        help="then run -iters more steps under Paddle's profiler and print the time per operator")
    args = parser.parse_args()
    if args.mode == 'deploy' and args.amp:
        parser.error('-amp is for -mode infer and train: -mode deploy runs the exported model on CPU (-precision)')
    if args.mode != 'deploy' and (args.precision != 'fp32' or args.force_precision):
        parser.error('-precision and -force_precision are for -mode deploy (the eager model runs fp32 on CPU)')
    return args


# the arguments first: -threads must be applied before Paddle loads
if __name__ == '__main__':
    ARGS = parse_arguments()
    runtime.configure(threads=ARGS.threads)

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

import engine  # noqa: E402
import fast  # noqa: E402
import losses  # noqa: E402
from cvt import build_cvt  # noqa: E402
from fast import build  # noqa: E402
from tools._common import model_config  # noqa: E402


def peak_memory_mb() -> float:
    """Peak memory in MiB: the device allocator's on GPU, the process' resident set on CPU."""
    if paddle.is_compiled_with_cuda() and 'gpu' in paddle.get_device():
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync() -> None:
    """Wait for queued device work, so that a step's time is all of it."""
    if paddle.is_compiled_with_cuda() and 'gpu' in paddle.get_device():
        paddle.device.cuda.synchronize()


def deploy_backend(args: argparse.Namespace) -> str:
    """The runtime -mode deploy times (default: infer.py's recommended one); exits if it cannot
    run -precision at all."""
    from tools import infer, precision
    backend = args.backend or infer.onnx_backend()
    reason = precision.unsupported(args.precision, backend)
    if reason:
        fail(f'-precision {args.precision} -backend {backend}: {reason}')
    return backend


def deploy_step(model: paddle.nn.Layer, config, images, backend: str, asked: str = 'fp32',
                force: bool = False) -> Tuple[Callable[[], None], str]:
    """One tools/infer.py batch on `images` (numpy) with `model` exported for
    `backend` into a temporary folder, in the precision `infer.py -precision asked`
    computes in on this CPU (int8: quantised with `images` as calibration data), and
    that precision."""
    from tools import export_model, export_onnx, infer, precision, quantize
    choice = precision.choose(asked, backend, force)
    print(precision.first_line(choice, backend), flush=True)
    folder = tempfile.mkdtemp(prefix='cvt-deploy-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if backend in infer.ONNX_BACKENDS:
        path = os.path.join(folder, 'model.onnx')
        fast.convert(model, 'plain')  # as tools/export_onnx.py exports it
        export_onnx.convert(model, config, path, export_onnx.DEFAULT_OPSET)
        if choice.run == 'int8':
            quantize.quantize(path, list(images), quantize.int8_path(path), 'the benchmark\'s random images')
    else:
        path = folder
        export_model.export(model, config, path)
    _, logits_of = infer.create_runner(path, backend, device='cpu', precision=choice.run)
    version = paddle.__version__ if backend == 'paddle' else importlib.metadata.version(backend)
    print(f'deploy: {backend} {version}, {infer.default_threads()} threads')
    return lambda: logits_of(images), choice.run


def describe_machine(model: paddle.nn.Layer) -> str:
    """The CPU, its vector ISA, MKL's code path, the model's layers with the CPU kernel build,
    and the threads, in words."""
    vendor, cpu = runtime.cpu_model()
    return (f'cpu: {cpu} ({vendor}), vector ISA {ISA_NAMES[build.native_isa()]}, '
            f'{runtime.usable_cores()} cores used\n'
            f'threads {runtime.threads()}, MKL code path {runtime.mkl_code_path()}, '
            f'layers {fast.describe(model)}')


def profile(step, steps: int) -> None:
    """Run `steps` steps under Paddle's profiler and print its table of time per operator
    (forward ops and backward grad nodes; nested calls count in both)."""
    import paddle.profiler as profiler
    with profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda prof: None) as prof:
        for _ in range(steps):
            step()
            sync()
            prof.step()
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit='ms')


def main(args: argparse.Namespace) -> None:
    config = model_config(args)  # -cfg with -image_size, or exit naming what is wrong
    config.defrost()
    config.AMP = args.amp
    config.freeze()
    amp = engine.amp_dtype(config)  # AMP_DTYPE (-opts) on a GPU; None: float32
    backend = deploy_backend(args) if args.mode == 'deploy' else None
    number_format = f'amp {amp}' if amp else 'fp32'

    paddle.seed(config.SEED)
    model = build_cvt(config)
    size = config.DATA.IMAGE_SIZE
    images = paddle.randn([args.batch_size, 3, size, size])
    labels = paddle.randint(0, max(config.MODEL.NUM_CLASSES, 1), [args.batch_size])

    if args.mode == 'deploy':
        model.eval()
        step, number_format = deploy_step(model, config, images.numpy(), backend, args.precision,
                                          args.force_precision)
    elif args.mode == 'infer':
        model.eval()

        @paddle.no_grad()
        def step() -> None:
            with engine.autocast(amp):
                model(images)
    else:
        model.train()
        lr_schedule = engine.build_lr_schedule(config, steps_per_epoch=1000, world_size=1)
        optimizer = engine.build_optimizer(config, model, lr_schedule)
        scaler = paddle.amp.GradScaler(enable=amp == 'float16')
        # the recipe mixes images (Mixup/CutMix), so the loss takes soft targets
        criterion = losses.build_criterion(config, mixup_active=True)
        targets = F.one_hot(labels, max(config.MODEL.NUM_CLASSES, 1))

        def step() -> None:
            engine.train_step(model, images, targets, criterion, optimizer, scaler, amp=amp)

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    # the median step resists the odd slow step that other processes cause
    step_s = sorted(times)[len(times) // 2]
    if args.profile:
        profile(step, args.iters)
    print(describe_machine(model))
    print(f'paddle {paddle.__version__} on {paddle.get_device()}, {config.MODEL.NAME}, {args.mode}, '
          f'batch {args.batch_size}, {size}px, {number_format}')
    print(f'{step_s * 1e3:.1f} ms/step (median of {args.iters}), peak memory {peak_memory_mb():.0f} MiB')
    print(f'throughput: {args.batch_size / step_s:.2f} img/s')


if __name__ == '__main__':
    main(ARGS)
