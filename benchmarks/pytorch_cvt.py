"""Throughput of Hugging Face transformers' CvT on PyTorch, for side-by-side comparison.

This tool is a measuring stick only: it imports torch and transformers (which the
project's runtime code never does) and runs ``CvtForImageClassification`` built
from ``CvtConfig`` with the microsoft/cvt-13 (or -21) architecture, randomly
initialised, nothing downloaded. Modes and output match ``tools/benchmark.py``
so the two can be run back to back:

    python benchmarks/pytorch_cvt.py -depth 1 2 10 -batch_size 16 -mode infer
    python benchmarks/pytorch_cvt.py -depth 1 2 10 -batch_size 16 -mode train -threads 1
    python benchmarks/pytorch_cvt.py -depth 1 2 10 -batch_size 16 -mode onnx
    python benchmarks/pytorch_cvt.py -depth 1 2 10 -batch_size 16 -mode openvino
    python benchmarks/pytorch_cvt.py -depth 1 2 10 -batch_size 16 -mode infer -precision bf16

PyTorch keeps its own default threading (one intra-op thread per core) and the
project's runtime set-up is not used, so this measures PyTorch as users get it;
``-threads N`` pins the process to N cores and sets PyTorch's thread count.
Set ATEN_CPU_CAPABILITY=avx2 (and ONEDNN_MAX_CPU_ISA=AVX2) before it starts to
run PyTorch's AVX2 code on an AVX-512 CPU (benchmarks/compare_with_pytorch.py -isa avx2).
``onnx`` is the model exported by ``torch.onnx.export`` (opset 17, dynamic
batch; in the set-up, not timed) and run by ONNX Runtime on the CPU with the
settings of ``tools/infer.py -backend onnxruntime``: one intra-op thread per
usable core, all graph optimisations, no spinning; the counterpart of
``tools/benchmark.py -mode deploy -backend onnxruntime``. ``openvino`` runs that
export in OpenVINO with the settings of ``tools/infer.py -backend openvino``
(compiled for the batch's shape, float32, one stream, one thread per usable
core); the counterpart of
``tools/benchmark.py -mode deploy`` where OpenVINO is installed.
``-precision bf16`` runs ``infer`` and ``train`` under ``torch.autocast('cpu',
dtype=torch.bfloat16)``, as PyTorch users reach for bfloat16 on the CPU
(benchmarks/compare_with_pytorch.py -precision bf16).
"""

import argparse
import atexit
import os
import shutil
import tempfile
import time
from typing import Callable, List

import torch
from transformers import CvtConfig, CvtForImageClassification


def build_model(depth: List[int], num_classes: int) -> CvtForImageClassification:
    """CvT with the released CvT-13/21 widths and heads (depth picks the model)."""
    config = CvtConfig(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=list(depth),
                       num_labels=num_classes)
    return CvtForImageClassification(config)


def onnx_step(model: CvtForImageClassification, images: torch.Tensor, runtime: str) -> Callable[[], None]:
    """One run of `model` exported to ONNX, on `images`, in `runtime` (onnx: ONNX Runtime; openvino)."""
    class Logits(torch.nn.Module):  # the logits tensor alone, not the model's output dataclass
        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier

        def forward(self, pixel_values):
            return self.classifier(pixel_values=pixel_values).logits

    folder = tempfile.mkdtemp(prefix='cvt-torch-onnx-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, 'model.onnx')
    batch = {0: 'batch'}
    # the TorchScript-based exporter: the dynamo one needs onnxscript, which nothing else here does
    torch.onnx.export(Logits(model), (images[:1],), path, input_names=['pixel_values'], output_names=['logits'],
                      dynamic_axes={'pixel_values': batch, 'logits': batch}, opset_version=17, dynamo=False)
    threads = len(os.sched_getaffinity(0))
    if runtime == 'openvino':
        import openvino
        core = openvino.Core()
        onnx_model = core.read_model(path)
        onnx_model.reshape({onnx_model.inputs[0]: list(images.shape)})  # static, as infer.py compiles it
        settings = {'INFERENCE_NUM_THREADS': threads, 'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
        compiled = core.compile_model(onnx_model, 'CPU', settings)
        request, pixels = compiled.create_infer_request(), images.numpy()
        print(f'openvino {openvino.__version__}, {threads} threads')
        return lambda: request.infer([pixels])
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {'pixel_values': images.numpy()}
    print(f'onnxruntime {onnxruntime.__version__}, {options.intra_op_num_threads} threads')
    return lambda: session.run(None, feed)


def peak_memory_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-depth', type=int, nargs=3, default=[1, 2, 10], help='1 2 10: CvT-13; 1 4 16: CvT-21')
    parser.add_argument('-batch_size', type=int, default=16)
    parser.add_argument('-image_size', type=int, default=224)
    parser.add_argument('-mode', choices=('infer', 'train', 'onnx', 'openvino'), default='infer')
    parser.add_argument('-warmup', type=int, default=3)
    parser.add_argument('-iters', type=int, default=10)
    parser.add_argument('-num_classes', type=int, default=1000)
    parser.add_argument('-threads', type=int, default=None, help='run on this many cores (default: all)')
    parser.add_argument('-precision', choices=('fp32', 'bf16'), default='fp32',
                        help="infer, train: bf16 runs under torch.autocast('cpu', dtype=torch.bfloat16)")
    args = parser.parse_args()
    if args.precision != 'fp32' and args.mode not in ('infer', 'train'):
        parser.error('-precision bf16 is for -mode infer and train (autocast)')
    # (this harness imports nothing of the project, so not utils.int_at_least)
    for flag, minimum in (('batch_size', 1), ('image_size', 1), ('warmup', 0), ('iters', 1), ('num_classes', 1)):
        if getattr(args, flag) < minimum:
            parser.error(f'argument -{flag}: must be at least {minimum}, got {getattr(args, flag)}')
    if args.threads is not None:
        cores = sorted(os.sched_getaffinity(0))
        if not 1 <= args.threads <= len(cores):
            raise SystemExit(f'error: -threads {args.threads}: this process may use 1 to {len(cores)} cores')
        os.sched_setaffinity(0, cores[:args.threads])
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(args.depth, args.num_classes)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))

    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.precision == 'bf16')
    if args.mode in ('onnx', 'openvino'):
        model.eval()
        step = onnx_step(model, images, args.mode)
    elif args.mode == 'infer':
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast:
                model(pixel_values=images).logits.sum().item()
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.05)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step() -> None:
            with autocast:
                loss = criterion(model(pixel_values=images).logits.float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # the median step resists the odd slow step that other processes cause
    step_s = sorted(times)[len(times) // 2]
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, ATen CPU capability '
          f'{torch.backends.cpu.get_cpu_capability()}, oneDNN ISA limit {os.environ.get("ONEDNN_MAX_CPU_ISA", "none")}, '
          f'depth {args.depth}, {args.mode}, batch {args.batch_size}, {args.image_size}px, {args.precision}')
    print(f'{step_s * 1e3:.1f} ms/step (median of {args.iters}), peak memory {peak_memory_mb():.0f} MiB')
    print(f'throughput: {args.batch_size / step_s:.2f} img/s')


if __name__ == '__main__':
    main()
