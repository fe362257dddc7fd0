"""Classify images with an exported CvT, or measure its accuracy: Paddle Inference, OpenVINO or ONNX Runtime.

    python tools/infer.py -model exported/cvt-13-224x224 cat.jpg photos/       # tools/export_model.py
    python tools/infer.py -model cvt-13-224x224.onnx cat.jpg photos/           # tools/export_onnx.py
        [-backend paddle|openvino|onnxruntime] [-labels imagenet_classes.txt] [-topk 5] [-batch_size 8]
        [-threads N] [-device cpu|gpu] [-disable_onednn] [-tensorrt]
        [-precision fp32|bf16|int8|fp16] [-force_precision]
    python tools/infer.py -model cvt-13-224x224.onnx -data_path /data/imagenet [-precision int8]

Prints the same top-k as tools/predict.py; with -data_path, instead, the
accuracy on the ImageNet-format folder DATA/val (``top-1 X | top-5 Y | N
images``) and, for bf16 and int8, the share of images whose top-1 class is the
fp32 model's (run alongside, in the same runtime). The backend follows the
model: a folder of tools/export_model.py runs on Paddle Inference, a .onnx file
of tools/export_onnx.py on OpenVINO where it is installed and on ONNX Runtime
otherwise. The .onnx file in OpenVINO is the recommended path on CPU, chosen by
measurement (docs/deploy.md; tools/benchmark.py -mode deploy times it).
-precision (default fp32) bf16 and int8 run where the CPU has them natively
(tools/precision.py) and fall back to fp32 with one line where it has not; int8
runs the model tools/quantize.py wrote beside the .onnx file. The run's first
line (on stderr) names the precision, the runtime and the CPU's instruction sets.
The class count, input size and preprocessing come from the export (the
folder's preprocess.json, the .onnx file's metadata), not from a config file.
Paddle Inference on CPU runs with oneDNN unless -disable_onednn; -device
defaults to gpu where Paddle has CUDA and sees a GPU; -tensorrt (GPU only) runs
the graph with TensorRT for batches up to -batch_size, in FP32 or with -precision
fp16 in float16; its engines are built once and kept beside the export
(`tensorrt/`), for this GPU, Paddle and batch size. -threads defaults to one per
usable core (MKL_NUM_THREADS where set).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from typing import Callable, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import inference  # noqa: E402

from tools import precision as precisions  # noqa: E402
from tools._common import (check_topk, fail, list_images, print_predictions, read_image,  # noqa: E402
                           read_labels, val_transform)
from tools.export_model import MODEL_PREFIX, PREPROCESS_FILE, program_file  # noqa: E402
from tools.quantize import INT8_SUFFIX, int8_path  # noqa: E402
from utils import int_at_least, thread_count  # noqa: E402

BACKENDS = ('paddle', 'openvino', 'onnxruntime')
TENSORRT_FP16 = 'fp16'  # -precision for TensorRT on a GPU; the others are the CPU's (tools/precision.py)
ONNX_BACKENDS = ('openvino', 'onnxruntime')  # they run a .onnx file, on CPU
STATIC_SHAPES = 2  # input shapes with an OpenVINO model compiled for them alone
GPU_MEMORY_MB = 256  # initial pool; Paddle grows it as needed
# OpenVINO's precision hint for each precision; an int8 model's layers that stay in
# float (tools/quantize.py) run in float32, as they were measured
OPENVINO_HINTS = {'fp32': 'f32', 'bf16': 'bf16', 'int8': 'f32'}

LogitsFunction = Callable[[np.ndarray], np.ndarray]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Top-k classes of images with an exported CvT, or its accuracy.')
    parser.add_argument('-model', '-model_dir', dest='model', required=True,
                        help='folder written by tools/export_model.py, or .onnx file by tools/export_onnx.py')
    parser.add_argument('images', nargs='*', help='image files and/or folders of images')
    parser.add_argument('-data_path', default=None,
                        help='measure the accuracy on DATA_PATH/val (ImageNet format: class folders) instead')
    parser.add_argument('-backend', choices=BACKENDS, default=None,
                        help='default: paddle for an export folder; for a .onnx file, openvino where '
                             'installed, else onnxruntime')
    parser.add_argument('-labels', help='class names, one a line in class-index order')
    parser.add_argument('-topk', type=int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('-batch_size', type=int_at_least(1), default=8, help='images per run (default 8)')
    parser.add_argument('-threads', type=thread_count, default=None,
                        help='CPU threads (default MKL_NUM_THREADS, which is one per usable core unless set)')
    parser.add_argument('-device', choices=('cpu', 'gpu'), default=None,
                        help='paddle backend: default gpu if Paddle has CUDA and a GPU is visible, else cpu')
    parser.add_argument('-disable_onednn', action='store_true', help='plain CPU kernels instead of oneDNN')
    parser.add_argument('-tensorrt', action='store_true', help='run with TensorRT (GPU only)')
    parser.add_argument('-precision', choices=precisions.PRECISIONS + (TENSORRT_FP16,), default='fp32',
                        help='number format on CPU (default fp32); bf16 and int8 where the CPU has them natively, '
                             'else fp32 (tools/precision.py); int8 runs the model of tools/quantize.py; '
                             'fp16: TensorRT on a GPU (-tensorrt)')
    parser.add_argument('-force_precision', action='store_true',
                        help='run -precision even where the CPU has no native instructions for it '
                             '(to measure its accuracy; slower than fp32)')
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.data_path):
        parser.error('give images to classify, or -data_path to measure the accuracy (one of them)')
    return args


def default_threads() -> int:
    """One per usable core, or MKL_NUM_THREADS where the user set it (runtime sets it
    to the usable cores otherwise)."""
    return int(os.environ.get('MKL_NUM_THREADS') or runtime.usable_cores())


def onnx_backend() -> str:
    """The runtime for a .onnx file: OpenVINO where it is installed (the fastest CPU
    inference measured for this model, docs/deploy.md), else ONNX Runtime. What
    tools/benchmark.py -mode deploy times."""
    return 'openvino' if importlib.util.find_spec('openvino') else 'onnxruntime'


def backend_of(model_path: str) -> str:
    """The backend an export is for: `onnx_backend()` for a .onnx file (a missing one too, so that
    the error names the file), paddle for an export folder."""
    return onnx_backend() if model_path.endswith('.onnx') and not os.path.isdir(model_path) else 'paddle'


def gpu_available() -> bool:
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def read_preprocess(model_dir: str) -> dict:
    path = os.path.join(model_dir, PREPROCESS_FILE)
    try:
        with open(path) as infile:
            return json.load(infile)
    except (OSError, ValueError) as err:
        fail(f'{path}: cannot read the exported preprocessing ({err}); export with tools/export_model.py')


def preprocess_config(preprocess: dict):
    """A config whose DATA section is the exported one, for the shared val transform."""
    from config import get_config
    config = get_config()
    config.DATA.IMAGE_SIZE = preprocess['image_size']
    config.DATA.CROP_PCT = preprocess['crop_pct']
    config.DATA.INTERPOLATION = preprocess['interpolation']
    config.DATA.IMAGENET_MEAN = preprocess['mean']
    config.DATA.IMAGENET_STD = preprocess['std']
    return config


def tensorrt_cache(model_dir: str, precision: str, max_batch: int) -> str:
    """The folder of the TensorRT engines built for this export, precision, largest batch,
    GPU and Paddle: an engine is built for one GPU model and TensorRT version, and the
    export's files (size and time) name the model it was built from."""
    program = program_file(model_dir)
    params = os.path.join(model_dir, MODEL_PREFIX + '.pdiparams')
    source = [(os.path.getsize(path), os.stat(path).st_mtime_ns) for path in (program, params)]
    key = json.dumps([source, precision, max_batch, paddle.__version__, paddle.device.cuda.get_device_name()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(model_dir, 'tensorrt', f'{precision}-batch{max_batch}-{digest}')


def tensorrt_program(model_dir: str, preprocess: dict, max_batch: int, precision: str) -> str:
    """A PIR (.json) program with its TensorRT engines built in ahead of time by
    paddle.tensorrt.convert (Config.enable_tensorrt_engine only acts on .pdmodel
    programs); returns the converted program's prefix. The conversion, which builds
    the engines (minutes), runs once: a later run finds it in `tensorrt_cache`."""
    from paddle.tensorrt.export import Input, PrecisionMode, TensorRTConfig
    folder = tensorrt_cache(model_dir, precision, max_batch)
    prefix = os.path.join(folder, MODEL_PREFIX)
    if os.path.isfile(prefix + '.json') and os.path.isfile(prefix + '.pdiparams'):
        return prefix
    print(f'building TensorRT engines ({precision}, batches up to {max_batch}) into {folder}; once',
          file=sys.stderr, flush=True)
    size = preprocess['image_size']
    shape = lambda batch: (batch, 3, size, size)
    inputs = Input(min_input_shape=shape(1), optim_input_shape=shape(max_batch),
                   max_input_shape=shape(max_batch), name=preprocess['input_name'])
    building = folder + f'.partial{os.getpid()}'  # renamed when whole: a killed build is never used
    trt_config = TensorRTConfig(inputs=[inputs], precision_mode=PrecisionMode.FP16 if precision == 'fp16'
                                else PrecisionMode.FP32)
    trt_config.save_model_dir = os.path.join(building, MODEL_PREFIX)
    paddle.tensorrt.convert(os.path.join(model_dir, MODEL_PREFIX), trt_config)
    os.replace(building, folder)
    return prefix


def create_predictor(model_dir: str, preprocess: dict, device: str = 'cpu', onednn: bool = True,
                     tensorrt: bool = False, max_batch: int = 8, threads: int = 0,
                     precision: str = 'fp32') -> inference.Predictor:
    """A Paddle Inference predictor for the exported model in `model_dir` (threads 0:
    `default_threads()`; precision fp32 or, on CPU with oneDNN, bf16, or with TensorRT fp16)."""
    threads = threads or default_threads()
    program = program_file(model_dir)
    params = os.path.join(model_dir, MODEL_PREFIX + '.pdiparams')
    if tensorrt and program.endswith('.json'):
        prefix = tensorrt_program(model_dir, preprocess, max_batch, precision)
        program, params = prefix + '.json', prefix + '.pdiparams'
    config = inference.Config(program, params)
    if device == 'gpu':
        config.enable_use_gpu(GPU_MEMORY_MB, 0)
        if tensorrt and program.endswith('.pdmodel'):
            size = preprocess['image_size']
            name = preprocess['input_name']
            # use_static: the engines are serialised into the cache folder and loaded from it next time
            config.set_optim_cache_dir(tensorrt_cache(model_dir, precision, max_batch))
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=max_batch, min_subgraph_size=3,
                                          precision_mode=inference.PrecisionType.Half if precision == 'fp16'
                                          else inference.PrecisionType.Float32,
                                          use_static=True, use_calib_mode=False)
            config.set_trt_dynamic_shape_info({name: [1, 3, size, size]}, {name: [max_batch, 3, size, size]},
                                              {name: [max_batch, 3, size, size]})
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        if onednn:
            config.enable_mkldnn()
            if precision == 'bf16':  # oneDNN's bf16 kernels for the ops that have them (3.x name, 2.6 name)
                (getattr(config, 'enable_onednn_bfloat16', None) or config.enable_mkldnn_bfloat16)()
        else:
            config.disable_mkldnn()
    config.disable_glog_info()
    return inference.create_predictor(config)


def logits_function(predictor: inference.Predictor) -> LogitsFunction:
    """numpy images (B, 3, H, W) -> numpy logits (B, classes) with the predictor."""
    image_input = predictor.get_input_handle(predictor.get_input_names()[0])
    logits_output = predictor.get_output_handle(predictor.get_output_names()[0])

    def logits_of(images: np.ndarray) -> np.ndarray:
        image_input.reshape(list(images.shape))
        image_input.copy_from_cpu(np.ascontiguousarray(images, dtype='float32'))
        predictor.run()
        return logits_output.copy_to_cpu()
    return logits_of


def onnx_preprocess(stored: Optional[str], image: Tuple[str, list], logits_shape: list, path: str) -> dict:
    """The preprocessing tools/export_onnx.py stored in the model's metadata (`stored`);
    for another ONNX classifier, its input size and class count from the graph
    (`image`: the input's name and shape; dimensions are ints or None) with the
    default (ImageNet) val preprocessing of config.py."""
    from tools.export_onnx import METADATA_KEY
    if stored is not None:
        return json.loads(stored)
    from config import get_config
    data = get_config().DATA
    name, shape = image
    size, classes = shape[-1], logits_shape[-1]
    if len(shape) != 4 or not isinstance(size, int) or shape[-2] != size or not isinstance(classes, int):
        fail(f'{path}: no {METADATA_KEY} metadata, and its input {shape} / output {logits_shape} are not '
             'a fixed-size square image / a fixed class count; export with tools/export_onnx.py')
    print(f'{path}: no {METADATA_KEY} metadata: {size}px input and {classes} classes from the graph, '
          'config.py\'s default val preprocessing', file=sys.stderr)
    return {'num_classes': classes, 'image_size': size, 'crop_pct': data.CROP_PCT,
            'interpolation': data.INTERPOLATION, 'mean': list(data.IMAGENET_MEAN),
            'std': list(data.IMAGENET_STD), 'input_name': name}


def batched_logits(run: LogitsFunction, input_batch: Optional[int], path: str) -> LogitsFunction:
    """numpy images (B, 3, H, W) -> numpy logits (B, classes) with `run`; a graph
    exported for batch 1 (`input_batch`, as some exporters write) gets one image a run."""
    if input_batch not in (None, 1):
        fail(f'{path}: its input batch is fixed at {input_batch}; export with a dynamic batch (tools/export_onnx.py)')

    def logits_of(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype='float32')
        runs = [images] if input_batch is None else np.split(images, len(images))
        return np.concatenate([run(images_of_run) for images_of_run in runs])
    return logits_of


def onnxruntime_runner(model_path: str, threads: int) -> Tuple[dict, LogitsFunction]:
    """The .onnx file's preprocessing and its logits function in ONNX Runtime."""
    from tools.export_onnx import METADATA_KEY, onnx_session
    try:
        session = onnx_session(model_path, threads)
    except Exception as err:  # onnxruntime's own errors (not an ONNX file, unsupported operator)
        fail(f'{model_path}: ONNX Runtime cannot load it ({type(err).__name__}: {str(err).splitlines()[0]})')
    image, logits = session.get_inputs()[0], session.get_outputs()[0]
    static = lambda shape: [d if isinstance(d, int) else None for d in shape]
    preprocess = onnx_preprocess(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY),
                                 (image.name, static(image.shape)), static(logits.shape), model_path)
    run = lambda images: session.run(None, {image.name: images})[0]
    return preprocess, batched_logits(run, static(image.shape)[0], model_path)


def openvino_runner(model_path: str, threads: int, precision: str = 'fp32') -> Tuple[dict, LogitsFunction]:
    """The .onnx file's preprocessing and its logits function in OpenVINO (CPU), computing
    in `precision` (bf16: its precision hint; int8: the file is a quantised model). The
    first `STATIC_SHAPES` input shapes get a compiled model each (infer.py runs two:
    the batch and the last, shorter one); any other shape shares one compiled for the
    file's own, dynamic shape, so a caller with ever-new batch sizes neither
    recompiles nor holds a model per size."""
    from tools.export_onnx import INSTALL_HINT, METADATA_KEY
    try:
        import openvino
    except ImportError as err:
        fail(f'OpenVINO is not installed ({err}); {INSTALL_HINT}')
    core = precisions.openvino_core()
    try:
        model = core.read_model(model_path)
    except Exception as err:  # OpenVINO's own errors (not an ONNX file)
        fail(f'{model_path}: OpenVINO cannot load it ({type(err).__name__}: {str(err).strip().splitlines()[0]})')
    static = lambda shape: [d.get_length() if d.is_static else None for d in shape]
    image, logits = model.inputs[0], model.outputs[0]
    key = ['framework', METADATA_KEY]  # where OpenVINO keeps an ONNX file's metadata
    stored = model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None
    preprocess = onnx_preprocess(stored, (image.get_any_name(), static(image.get_partial_shape())),
                                 static(logits.get_partial_shape()), model_path)
    # the precision always named: OpenVINO would otherwise run bfloat16 on CPUs that have it
    # (AMX, AVX512_BF16), which moves the logits by ~1e-2; one stream that uses every thread
    settings = {'INFERENCE_NUM_THREADS': threads, 'INFERENCE_PRECISION_HINT': OPENVINO_HINTS[precision],
                'PERFORMANCE_HINT': 'LATENCY'}
    # OpenVINO picks faster kernels for a static shape than for a dynamic batch (CvT-13,
    # batch 16, 2 threads: 6%)
    own_shape = image.get_partial_shape()
    requests = {}

    def request_for(shape) -> 'openvino.InferRequest':
        key = tuple(shape) if len(requests) < STATIC_SHAPES or tuple(shape) in requests else 'dynamic'
        if key not in requests:
            model.reshape({image: own_shape if key == 'dynamic' else list(shape)})
            try:
                requests[key] = core.compile_model(model, 'CPU', settings).create_infer_request()
            except Exception as err:  # an operator or shape OpenVINO cannot compile
                fail(f'{model_path}: OpenVINO cannot compile it for input {list(shape)} '
                     f'({type(err).__name__}: {str(err).strip().splitlines()[0]})')
        return requests[key]

    def run(images: np.ndarray) -> np.ndarray:
        return request_for(images.shape).infer([images])[0].copy()  # the request reuses its output buffer
    return preprocess, batched_logits(run, static(own_shape)[0], model_path)


def create_runner(model_path: str, backend: str, device: str = 'cpu', onednn: bool = True,
                  tensorrt: bool = False, max_batch: int = 8, threads: int = 0,
                  precision: str = 'fp32') -> Tuple[dict, LogitsFunction]:
    """The exported model's preprocessing and its logits function on `backend` (threads 0:
    `default_threads()`), computing in `precision` as asked (the caller has chosen it with
    tools/precision.py); int8 runs the quantised model beside `model_path`."""
    threads = threads or default_threads()
    if backend in ONNX_BACKENDS and precision == 'int8':
        model_path = int8_path(model_path)
    if backend == 'onnxruntime':
        return onnxruntime_runner(model_path, threads)
    if backend == 'openvino':
        return openvino_runner(model_path, threads, precision)
    preprocess = read_preprocess(model_path)
    predictor = create_predictor(model_path, preprocess, device, onednn, tensorrt, max_batch, threads, precision)
    return preprocess, logits_function(predictor)


def check_precision(args: argparse.Namespace, backend: str, device: str) -> None:
    """Exit if -precision cannot run with this backend, device or model at all."""
    if args.precision == 'fp32':
        return
    if device != 'cpu' or args.precision == TENSORRT_FP16:
        if not (device == 'gpu' and args.tensorrt and args.precision == TENSORRT_FP16):
            fail(f'-precision {args.precision}: on a GPU only TensorRT has another format than fp32 '
                 f'(-device gpu -tensorrt -precision fp16); bf16 and int8 are for the CPU')
        return
    reason = precisions.unsupported(args.precision, backend)
    if reason:
        fail(f'-precision {args.precision} -backend {backend}: {reason}')
    if backend == 'paddle' and args.disable_onednn:
        fail(f'-precision {args.precision} on Paddle Inference runs oneDNN\'s kernels: drop -disable_onednn')
    if args.precision == 'int8':
        if args.model.endswith(INT8_SUFFIX):
            fail(f'{args.model}: give the exported float32 model; -precision int8 runs its {INT8_SUFFIX} beside it')
        quantized = int8_path(args.model)
        if not os.path.isfile(quantized):
            fail(f'{quantized}: no such file; write it with python tools/quantize.py -model {args.model} '
                 '-calibration FOLDER')


def val_images(data_path: str) -> Tuple[list, list, int]:
    """(paths, labels, class count) of DATA/val in ImageNet format (class folders, indexed
    as in training), or exit naming what is wrong."""
    from datasets import scan_class_folders
    try:
        paths, labels, classes = scan_class_folders(data_path, 'val')
    except (OSError, ValueError) as err:
        fail(str(err))
    if not paths:
        fail(f'{os.path.join(data_path, "val")}: no images in its class folders')
    return paths, labels, len(classes)


def evaluate(paths: list, labels: list, transform, batch_size: int, logits_of: LogitsFunction,
             reference_of: Optional[LogitsFunction], k: int) -> dict:
    """Top-1 and top-`k` accuracy of `logits_of` on the images (unreadable ones skipped, on
    stderr), and where `reference_of` (the fp32 model) is given, its top-1 accuracy and the
    share of images both give the same top-1 class."""
    counts = dict.fromkeys(('images', 'top1', 'topk', 'reference_top1', 'agree'), 0)
    for start in range(0, len(paths), batch_size):
        pairs = [(read_image(path), label) for path, label in zip(paths[start:start + batch_size],
                                                                  labels[start:start + batch_size])]
        pairs = [(transform(image), label) for image, label in pairs if image is not None]
        if not pairs:
            continue
        images, truth = np.stack([image for image, _ in pairs]), np.array([label for _, label in pairs])
        ranked = np.argsort(-logits_of(images), axis=1, kind='stable')[:, :k]
        counts['images'] += len(truth)
        counts['top1'] += int((ranked[:, 0] == truth).sum())
        counts['topk'] += int((ranked == truth[:, None]).any(axis=1).sum())
        if reference_of is not None:
            reference = np.argmax(reference_of(images), axis=1)
            counts['reference_top1'] += int((reference == truth).sum())
            counts['agree'] += int((reference == ranked[:, 0]).sum())
    return counts


def print_accuracy(counts: dict, k: int, compared: bool) -> None:
    """`top-1 X | top-5 Y | N images`, then the agreement with fp32."""
    share = lambda key: counts[key] / counts['images']
    print(f'top-1 {share("top1"):.4f} | top-{k} {share("topk"):.4f} | {counts["images"]} images')
    if compared:
        print(f'top-1 agreement with fp32: {share("agree"):.4f} ({counts["agree"]} of {counts["images"]} images; '
              f'the fp32 model alongside: top-1 {share("reference_top1"):.4f})')
    else:
        print('top-1 agreement with fp32: 1.0000 (this run is fp32)')


def check_model(args: argparse.Namespace) -> str:
    """The backend for `args.model` (exits if the model does not fit it)."""
    backend = args.backend or backend_of(args.model)
    if backend in ONNX_BACKENDS:
        if not os.path.isfile(args.model):
            fail(f'{args.model}: no such file (-backend {backend} runs a .onnx file of tools/export_onnx.py)')
        if args.device == 'gpu' or args.tensorrt or args.disable_onednn:
            fail(f'-device gpu, -tensorrt and -disable_onednn are for -backend paddle; {backend} runs on CPU')
        return backend
    if not os.path.isdir(args.model):
        fail(f'{args.model}: no such folder (-backend paddle runs a folder of tools/export_model.py)')
    try:
        program_file(args.model)
    except FileNotFoundError as err:
        fail(str(err))
    return backend


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = check_model(args)
    device = 'cpu' if backend in ONNX_BACKENDS else args.device or ('gpu' if gpu_available() else 'cpu')
    if device == 'gpu' and not gpu_available():
        fail('-device gpu: this Paddle has no CUDA or sees no GPU')
    if args.tensorrt and device != 'gpu':
        fail('-tensorrt needs -device gpu')
    check_precision(args, backend, device)
    data = val_images(args.data_path) if args.data_path else None
    images = list_images(args.images) if args.images else None
    choice = precisions.choose(args.precision, backend, args.force_precision) if device == 'cpu' \
        else precisions.Choice(args.precision, args.precision)  # a GPU runs what check_precision let through
    runner = lambda precision: create_runner(args.model, backend, device, not args.disable_onednn, args.tensorrt,
                                             args.batch_size, args.threads or 0, precision)
    preprocess, logits_of = runner(choice.run)  # exits on a model the runtime cannot load, before any output
    if device == 'cpu':
        print(precisions.first_line(choice, backend), file=sys.stderr, flush=True)
    else:
        print(f'precision {choice.run} | Paddle Inference{" with TensorRT" if args.tensorrt else ""} | '
              f'GPU {paddle.device.cuda.get_device_name()}', file=sys.stderr, flush=True)
    if args.backend is None and backend == 'onnxruntime':
        print(f'{args.model}: running in ONNX Runtime; OpenVINO, the faster CPU runtime here, is not installed '
              '(pip install -r requirements-deploy.txt)', file=sys.stderr)
    num_classes = preprocess['num_classes']
    transform = val_transform(preprocess_config(preprocess))
    if data is not None:
        paths, truth, classes = data
        if classes != num_classes:
            fail(f'{args.data_path}: {classes} classes, but the model has {num_classes}')
        reference_of = runner('fp32')[1] if choice.run != 'fp32' else None
        k = min(5, num_classes)
        counts = evaluate(paths, truth, transform, args.batch_size, logits_of, reference_of, k)
        if not counts['images']:
            fail(f'{os.path.join(args.data_path, "val")}: none of its {len(paths)} images could be read')
        print_accuracy(counts, k, reference_of is not None)
        return 0
    check_topk(args.topk, num_classes)
    labels = read_labels(args.labels, num_classes)
    done = print_predictions(images, transform, args.batch_size, logits_of, args.topk, labels)
    return 0 if done else 1


if __name__ == '__main__':
    sys.exit(main())
