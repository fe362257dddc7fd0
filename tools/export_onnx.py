"""Export a CvT to ONNX (paddle2onnx), checked with ONNX Runtime before it is kept.

    python tools/export_onnx.py -cfg configs/cvt-13-224x224.yaml -pretrained cvt-13-224x224 \\
        -output cvt-13-224x224.onnx [-num_classes N] [-image_size S] [-opset 17]

The model is built with its plain layers (MODEL.LAYERS plain: the operators of
cvt.py as written, which paddle2onnx converts), traced by
``paddle.jit.save`` into a temporary folder, converted by paddle2onnx, and run
by ONNX Runtime on random images at batch 1 and 2 against the Paddle model;
the largest logit difference is printed, and the file is written only if it is
below 1e-3. The input is ``image`` (batch, 3, IMAGE_SIZE, IMAGE_SIZE) float32
with a dynamic batch axis; the output is the logits (batch, NUM_CLASSES). The
config's val preprocessing is stored in the model's metadata (key
``cvt.preprocess``, the JSON of tools/export_model.py's preprocess.json), so
that tools/infer.py (OpenVINO or ONNX Runtime) needs nothing but the .onnx file.

Needs paddle2onnx 2.x (Paddle >= 3.0) and onnxruntime, which the project does
not otherwise need: pip install -r requirements-deploy.txt
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from tools._common import (add_model_arguments, check_weights_file, classifier_config,  # noqa: E402
                           fail, load_model)
from tools.export_model import MODEL_PREFIX, export, plain_layers, preprocess_of  # noqa: E402

METADATA_KEY = 'cvt.preprocess'
BATCH_AXIS = 'batch'
# the check's bound; the conversion itself agrees to ~1e-6 (tests hold it to 1e-4)
MAX_LOGIT_DIFFERENCE = 1e-3
# LayerNormalization is one operator from opset 17 on (ONNX Runtime: faster than its parts)
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 7, 21  # what paddle2onnx 2.1 converts to
INSTALL_HINT = 'pip install -r requirements-deploy.txt'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a CvT to ONNX and check it with ONNX Runtime.')
    add_model_arguments(parser)
    parser.add_argument('-output', required=True, help='the .onnx file to write')
    parser.add_argument('-opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})')
    return parser.parse_args(argv)


def first_sentence(err: Exception) -> str:
    """An error's message up to its first full stop (paddle2onnx's go on with URLs)."""
    return str(err).split('. ')[0].splitlines()[0] if str(err) else type(err).__name__


def import_converter():
    """paddle2onnx, or exit with the install hint (its import also refuses Paddle < 3)."""
    try:
        import onnx  # noqa: F401
        import paddle2onnx
    except (ImportError, ValueError) as err:
        fail(f'ONNX export needs paddle2onnx 2.x (Paddle >= 3.0), onnx and onnxruntime '
             f'({type(err).__name__}: {first_sentence(err)}); {INSTALL_HINT}')
    return paddle2onnx


def import_onnxruntime():
    """onnxruntime, or exit with the install hint."""
    try:
        import onnxruntime
    except ImportError as err:
        fail(f'ONNX Runtime is not installed ({err}); {INSTALL_HINT}')
    return onnxruntime


def convert(model: paddle.nn.Layer, config, onnx_file: str, opset: int) -> None:
    """Trace `model` (plain layers), convert it with paddle2onnx and write `onnx_file`,
    with a named dynamic batch axis and the preprocessing in its metadata."""
    import onnx
    paddle2onnx = import_converter()
    with tempfile.TemporaryDirectory() as folder:
        program = export(model, config, folder)
        params = os.path.join(folder, MODEL_PREFIX + '.pdiparams')
        try:
            serialized = paddle2onnx.export(program, params, None, opset_version=opset,
                                            auto_upgrade_opset=False, optimize_tool=None)
        except Exception as err:  # it logs the cause and leaves its result unbound
            fail(f'paddle2onnx could not convert {config.MODEL.NAME} ({type(err).__name__}: {err})')
    onnx_model = onnx.load_from_string(serialized)
    # paddle2onnx leaves constants that no node reads; ONNX Runtime warns about each at every load
    graph = onnx_model.graph
    read = {name for node in graph.node for name in node.input}
    constants = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(constants)
    # paddle2onnx names the batch axes DynamicDimension.N, one name per tensor
    for value in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_AXIS
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(preprocess_of(config))
    onnx.save(onnx_model, onnx_file)


def onnx_session(onnx_file: str, threads: int = 0):
    """An ONNX Runtime CPU session of `onnx_file` with all graph optimisations
    (threads 0: ONNX Runtime's default, one per physical core)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads sleep rather than spin: spinning takes the cores from whatever
    # else runs (CvT-13, batch 16, 2 shared Zen 4 cores: 3.1 img/s spinning, 4.1
    # not; docs/deploy.md)
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.log_severity_level = 3  # errors only: its warnings name unused initializers
    return ort.InferenceSession(onnx_file, options, providers=['CPUExecutionProvider'])


def check_images(image_size: int, batches=(1, 2)) -> list:
    """Random images (B, 3, S, S) float32, one array per batch size."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((b, 3, image_size, image_size)).astype('float32') for b in batches]


def paddle_logits(model: paddle.nn.Layer, images: list) -> list:
    with paddle.no_grad():
        return [model(paddle.to_tensor(x)).numpy() for x in images]


def largest_difference(session, images: list, expected: list) -> float:
    """Largest |logit| difference between the ONNX `session` on `images` and `expected`."""
    name = session.get_inputs()[0].name
    largest = 0.0
    for x, reference in zip(images, expected):
        logits = session.run(None, {name: x})[0]
        if logits.shape != reference.shape:
            return float('inf')
        largest = max(largest, float(np.abs(logits - reference).max()))
    return largest


def main(argv=None) -> int:
    args = parse_args(argv)
    config = plain_layers(classifier_config(args))
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        fail(f'-opset {args.opset}: paddle2onnx 2.1 writes opsets {MIN_OPSET} to {MAX_OPSET}')
    if os.path.isdir(args.output):
        fail(f'{args.output}: is a folder; name the .onnx file to write')
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        fail(f'{args.output}: its folder does not exist')
    import_converter()
    import_onnxruntime()
    weights = check_weights_file(args.pretrained, config)  # may fetch: after the cheap checks
    model = load_model(config, weights)

    images = check_images(config.DATA.IMAGE_SIZE)
    expected = paddle_logits(model, images)
    # a file beside the output, renamed once checked: a failed export leaves an earlier one in place
    partial = args.output + '.partial'
    convert(model, config, partial, args.opset)
    difference = largest_difference(onnx_session(partial), images, expected)
    if not difference <= MAX_LOGIT_DIFFERENCE:
        os.remove(partial)
        fail(f'{args.output}: not written: ONNX Runtime logits differ from Paddle\'s by {difference:.3g} '
             f'(more than {MAX_LOGIT_DIFFERENCE:g})', code=1)
    os.replace(partial, args.output)
    print(f'largest logit difference ONNX Runtime vs Paddle (batch 1 and 2): {difference:.3g}')
    print(f'wrote {args.output} (opset {args.opset}, input image: [{BATCH_AXIS}, 3, '
          f'{config.DATA.IMAGE_SIZE}, {config.DATA.IMAGE_SIZE}], {config.MODEL.NUM_CLASSES} classes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
