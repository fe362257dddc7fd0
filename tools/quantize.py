"""Quantise an exported CvT (.onnx) to int8 after training, from a folder of calibration images.

    python tools/quantize.py -model cvt-13-224x224.onnx -calibration /data/imagenet/train [-images 300]

Writes the int8 model beside the exported one (``cvt-13-224x224.int8.onnx``),
which ``tools/infer.py -model cvt-13-224x224.onnx -precision int8`` runs and
``-data_path`` measures. ``-calibration`` is a folder of images, searched
through (ImageNet format: ``<synset>/*.JPEG`` folders, e.g. the training
split); ``-images`` of them (default 300) are drawn at random across it and go
through the export's own val preprocessing.

NNCF's post-training quantisation (``nncf.quantize``, transformer model type)
computes each activation's range on them and writes a QDQ ONNX model: int8
weights with QuantizeLinear/DequantizeLinear pairs around the GEMMs and
convolutions, which OpenVINO and ONNX Runtime (and any ONNX runtime) run in
int8 and which keeps the export's preprocessing metadata. What stays in float:
softmax, LayerNorm, GELU and the residual additions (NNCF's transformer
patterns quantise only the inputs of matrix products), and the first embedding
convolution, which reads the image itself (its 3 input channels make it cheap,
and it cost agreement with fp32 on the demo model when quantised).

Needs onnx, onnxruntime and nncf: pip install -r requirements-deploy.txt
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle (the val transform's module imports it)
import numpy as np  # noqa: E402

import fileio  # noqa: E402
from tools._common import fail, list_images, read_image, val_transform  # noqa: E402
from utils import int_at_least  # noqa: E402

INT8_SUFFIX = '.int8.onnx'
QUANTIZATION_KEY = 'cvt.quantization'  # metadata: what was quantised, from what
DEFAULT_IMAGES = 300
INSTALL_HINT = 'pip install -r requirements-deploy.txt'


def int8_path(model_path: str) -> str:
    """Where the int8 model of the exported `model_path` (a .onnx file) lives: beside it."""
    return model_path[:-len('.onnx')] + INT8_SUFFIX


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Quantise an exported CvT (.onnx) to int8 from calibration images.')
    parser.add_argument('-model', required=True, help='the .onnx file of tools/export_onnx.py')
    parser.add_argument('-calibration', required=True,
                        help='folder of calibration images, searched through (e.g. the training split)')
    parser.add_argument('-images', type=int_at_least(1), default=DEFAULT_IMAGES,
                        help=f'calibration images drawn from it at random (default {DEFAULT_IMAGES})')
    parser.add_argument('-seed', type=int, default=0, help='the draw (default 0)')
    return parser.parse_args(argv)


def import_quantizer():
    """nncf and onnx, or exit with the install hint."""
    try:
        import nncf
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        fail(f'int8 quantisation needs nncf, onnx and onnxruntime ({err}); {INSTALL_HINT}')
    nncf.set_log_level(logging.WARNING)  # not its notes on each layer it leaves in float
    onnxruntime.set_default_logger_severity(3)  # NNCF's sessions warn about each unused constant
    return nncf


def first_embedding(graph) -> List[str]:
    """The convolutions that read the model's input image (CvT's first embedding)."""
    inputs = {value.name for value in graph.input}
    return [node.name for node in graph.node if node.op_type == 'Conv' and node.input[0] in inputs]


def store_weights_in_int8(model) -> int:
    """Replace each weight that NNCF leaves in float32 before its QuantizeLinear by the int8
    tensor that QuantizeLinear computes from it (the file shrinks to about a quarter; the
    runtimes read the same numbers); returns how many."""
    import onnx
    from onnx import numpy_helper
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    folded = []
    for node in graph.node:
        if node.op_type != 'QuantizeLinear':
            continue
        weight_node = producer.get(node.input[0])
        if (weight_node is None or weight_node.op_type != 'Constant' or readers[node.input[0]] != 1
                or not set(node.input[1:]) <= set(initializers)):
            continue
        weight = numpy_helper.to_array(weight_node.attribute[0].t)
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1) % weight.ndim
        if scale.ndim == 1:  # one scale per channel along `axis`
            shape = [1] * weight.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        limits = np.iinfo(zero_point.dtype)
        # QuantizeLinear: round half to even (as np.rint), add the zero point, saturate
        quantized = np.clip(np.rint(weight / scale) + zero_point, limits.min, limits.max).astype(zero_point.dtype)
        graph.initializer.append(numpy_helper.from_array(quantized, node.output[0]))
        folded += [node, weight_node]
    for node in folded:
        graph.node.remove(node)
    onnx.checker.check_model(model)
    return len(folded) // 2


def quantize(model_path: str, images: Sequence[np.ndarray], output_path: str, source: str) -> None:
    """Quantise the .onnx model at `model_path` to int8 with `images` ((3, H, W) float32,
    preprocessed) as calibration data and write it to `output_path`; `source` (where the
    images came from) goes into its metadata."""
    import onnx
    nncf = import_quantizer()
    model = onnx.load(model_path)
    image_input = model.graph.input[0].name
    keep_float = first_embedding(model.graph)
    calibration = nncf.Dataset(list(images), lambda image: {image_input: image[None]})
    try:
        quantized = nncf.quantize(model, calibration, subset_size=len(images), model_type=nncf.ModelType.TRANSFORMER,
                                  ignored_scope=nncf.IgnoredScope(names=keep_float))
    except Exception as err:  # NNCF's own errors (an opset below 13, an operator it does not know)
        fail(f'{model_path}: NNCF cannot quantise it ({type(err).__name__}: {str(err).strip().splitlines()[0]})')
    store_weights_in_int8(quantized)
    entry = quantized.metadata_props.add()
    entry.key = QUANTIZATION_KEY
    entry.value = json.dumps({'precision': 'int8', 'from': os.path.basename(model_path),
                              'calibration': source, 'calibration_images': len(images),
                              'kept_in_float': keep_float, 'nncf': nncf.__version__})
    try:
        fileio.write_atomically(output_path, lambda temporary: onnx.save(quantized, temporary))
    except fileio.OutputError as err:
        fail(str(err))


def calibration_images(folder: str, count: int, seed: int) -> List[str]:
    """`count` image files drawn at random from under `folder` (all of them where it has
    fewer), or exit if it is missing or holds none."""
    if not os.path.isdir(folder):
        fail(f'{folder}: no such folder (-calibration: a folder of calibration images)')
    paths = list_images([folder])  # exits naming the folder when it holds no images
    if len(paths) <= count:
        return paths
    return sorted(np.random.default_rng(seed).choice(paths, count, replace=False).tolist())


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.model.endswith('.onnx') or not os.path.isfile(args.model):
        fail(f'{args.model}: no such .onnx file (-model: the export of tools/export_onnx.py)')
    if args.model.endswith(INT8_SUFFIX):
        fail(f'{args.model}: is a quantised model already; give the exported float32 one')
    paths = calibration_images(args.calibration, args.images, args.seed)
    import_quantizer()
    from tools.infer import onnxruntime_runner, preprocess_config
    preprocess, _ = onnxruntime_runner(args.model, threads=0)  # the export's preprocessing (exits if unreadable)
    transform = val_transform(preprocess_config(preprocess))
    images = [transform(image) for image in map(read_image, paths) if image is not None]
    if not images:
        fail(f'{args.calibration}: none of its {len(paths)} images could be read')
    output = int8_path(args.model)
    quantize(args.model, images, output, args.calibration)
    print(f'wrote {output} (int8, calibrated on {len(images)} images of {args.calibration})')
    print(f'measure it: python tools/infer.py -model {args.model} -precision int8 -data_path DATA '
          '(-force_precision on a CPU without VNNI or AMX)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
