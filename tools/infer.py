"""Classify images with an exported CvT (tools/export_model.py) on Paddle Inference.

    python tools/infer.py -model_dir exported/cvt-13-224x224 cat.jpg photos/ \\
        [-labels imagenet_classes.txt] [-topk 5] [-batch_size 8] \\
        [-device cpu|gpu] [-disable_onednn] [-tensorrt]

Prints the same top-k as tools/predict.py. The preprocessing comes from the
model folder's preprocess.json, not from a config file. CPU runs with oneDNN
unless -disable_onednn; -device defaults to gpu where Paddle has CUDA and sees
a GPU; -tensorrt (GPU only) runs the graph with TensorRT, FP32, for batches up
to -batch_size.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import inference  # noqa: E402

from tools._common import check_topk, fail, list_images, print_predictions, read_labels, val_transform  # noqa: E402
from tools.export_model import MODEL_PREFIX, PREPROCESS_FILE, program_file  # noqa: E402

GPU_MEMORY_MB = 256  # initial pool; Paddle grows it as needed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Top-k classes of images with an exported CvT.')
    parser.add_argument('-model_dir', required=True, help='folder written by tools/export_model.py')
    parser.add_argument('images', nargs='+', help='image files and/or folders of images')
    parser.add_argument('-labels', help='class names, one a line in class-index order')
    parser.add_argument('-topk', type=int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('-batch_size', type=int, default=8, help='images per run (default 8)')
    parser.add_argument('-device', choices=('cpu', 'gpu'), default=None,
                        help='default: gpu if Paddle has CUDA and a GPU is visible, else cpu')
    parser.add_argument('-disable_onednn', action='store_true', help='plain CPU kernels instead of oneDNN')
    parser.add_argument('-tensorrt', action='store_true', help='run with TensorRT (GPU only)')
    return parser.parse_args(argv)


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


def tensorrt_program(model_dir: str, preprocess: dict, max_batch: int) -> str:
    """A PIR (.json) program has TensorRT subgraphs put in ahead of time by
    paddle.tensorrt.convert (Config.enable_tensorrt_engine only acts on .pdmodel
    programs); returns the converted program's prefix, written beside the model."""
    from paddle.tensorrt.export import Input, TensorRTConfig
    size = preprocess['image_size']
    shape = lambda batch: (batch, 3, size, size)
    inputs = Input(min_input_shape=shape(1), optim_input_shape=shape(max_batch),
                   max_input_shape=shape(max_batch), name=preprocess['input_name'])
    trt_config = TensorRTConfig(inputs=[inputs])
    trt_config.save_model_dir = os.path.join(model_dir, 'tensorrt', MODEL_PREFIX)
    paddle.tensorrt.convert(os.path.join(model_dir, MODEL_PREFIX), trt_config)
    return trt_config.save_model_dir


def create_predictor(model_dir: str, preprocess: dict, device: str = 'cpu', onednn: bool = True,
                     tensorrt: bool = False, max_batch: int = 8) -> inference.Predictor:
    """A Paddle Inference predictor for the exported model in `model_dir`."""
    program = program_file(model_dir)
    params = os.path.join(model_dir, MODEL_PREFIX + '.pdiparams')
    if tensorrt and program.endswith('.json'):
        prefix = tensorrt_program(model_dir, preprocess, max_batch)
        program, params = prefix + '.json', prefix + '.pdiparams'
    config = inference.Config(program, params)
    if device == 'gpu':
        config.enable_use_gpu(GPU_MEMORY_MB, 0)
        if tensorrt and program.endswith('.pdmodel'):
            size = preprocess['image_size']
            name = preprocess['input_name']
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=max_batch, min_subgraph_size=3,
                                          precision_mode=inference.PrecisionType.Float32,
                                          use_static=False, use_calib_mode=False)
            config.set_trt_dynamic_shape_info({name: [1, 3, size, size]}, {name: [max_batch, 3, size, size]},
                                              {name: [max_batch, 3, size, size]})
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(os.environ.get('MKL_NUM_THREADS', '1')))
        if onednn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
    config.disable_glog_info()
    return inference.create_predictor(config)


def logits_function(predictor: inference.Predictor):
    """numpy images (B, 3, H, W) -> numpy logits (B, classes) with the predictor."""
    image_input = predictor.get_input_handle(predictor.get_input_names()[0])
    logits_output = predictor.get_output_handle(predictor.get_output_names()[0])

    def logits_of(images: np.ndarray) -> np.ndarray:
        image_input.reshape(list(images.shape))
        image_input.copy_from_cpu(np.ascontiguousarray(images, dtype='float32'))
        predictor.run()
        return logits_output.copy_to_cpu()
    return logits_of


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.model_dir):
        fail(f'{args.model_dir}: no such folder')
    try:
        program_file(args.model_dir)
    except FileNotFoundError as err:
        fail(str(err))
    preprocess = read_preprocess(args.model_dir)
    device = args.device or ('gpu' if gpu_available() else 'cpu')
    if device == 'gpu' and not gpu_available():
        fail('-device gpu: this Paddle has no CUDA or sees no GPU')
    if args.tensorrt and device != 'gpu':
        fail('-tensorrt needs -device gpu')
    if args.batch_size < 1:
        fail(f'-batch_size {args.batch_size} must be positive')
    num_classes = preprocess['num_classes']
    check_topk(args.topk, num_classes)
    labels = read_labels(args.labels, num_classes)
    images = list_images(args.images)
    predictor = create_predictor(args.model_dir, preprocess, device, not args.disable_onednn,
                                 args.tensorrt, args.batch_size)
    transform = val_transform(preprocess_config(preprocess))
    done = print_predictions(images, transform, args.batch_size, logits_function(predictor), args.topk, labels)
    return 0 if done else 1


if __name__ == '__main__':
    sys.exit(main())
