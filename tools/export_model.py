"""Export a CvT as a static inference model for Paddle Inference (tools/infer.py).

    python tools/export_model.py -cfg configs/cvt-13-224x224.yaml -pretrained cvt-13-224x224 \\
        -output exported/cvt-13-224x224 [-num_classes N] [-image_size S]

Writes into the -output folder, with ``paddle.jit.save``:
    inference.json (Paddle 3.x, PIR) or inference.pdmodel (Paddle 2.6)   the program
    inference.pdiparams                                                   the weights
    preprocess.json    image size, crop fraction, interpolation, mean and std of the
                       config's val transform, so that infer.py needs no config
The input is ``image`` (batch, 3, IMAGE_SIZE, IMAGE_SIZE) float32, any batch size;
the output is the logits (batch, NUM_CLASSES). The model is built with its plain
layers (MODEL.LAYERS plain): a static program holds cvt.py's operators as written.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import paddle  # noqa: E402
from paddle.static import InputSpec  # noqa: E402

from tools._common import (add_model_arguments, check_weights_file, classifier_config,  # noqa: E402
                           fail, load_model)

MODEL_PREFIX = 'inference'
PREPROCESS_FILE = 'preprocess.json'
INPUT_NAME = 'image'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a CvT as a Paddle Inference model.')
    add_model_arguments(parser)
    parser.add_argument('-output', required=True, help='folder to write the inference model into')
    return parser.parse_args(argv)


def program_file(model_dir: str) -> str:
    """The saved program: `.json` where Paddle saved a PIR program (3.x), else `.pdmodel`."""
    for suffix in ('.json', '.pdmodel'):
        path = os.path.join(model_dir, MODEL_PREFIX + suffix)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f'{model_dir}: no {MODEL_PREFIX}.json or {MODEL_PREFIX}.pdmodel in it')


def preprocess_of(config) -> dict:
    """What tools/infer.py needs besides the program: the model's classes and
    input size, and the config's val preprocessing."""
    return {
        'model_name': config.MODEL.NAME,
        'num_classes': config.MODEL.NUM_CLASSES,
        'image_size': config.DATA.IMAGE_SIZE,
        'crop_pct': config.DATA.CROP_PCT,
        'interpolation': config.DATA.INTERPOLATION,
        'mean': list(config.DATA.IMAGENET_MEAN),
        'std': list(config.DATA.IMAGENET_STD),
        'input_name': INPUT_NAME,
        'paddle_version': paddle.__version__,
    }


def plain_layers(config):
    """`config` with MODEL.LAYERS plain: what the exporters build and trace."""
    config = config.clone()
    config.defrost()
    config.MODEL.LAYERS = 'plain'
    return config


def export(model: paddle.nn.Layer, config, output_dir: str) -> str:
    """Save `model` (eval mode) traced for (any batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    images, and the preprocessing of `config`, into `output_dir`; returns the program file."""
    size = config.DATA.IMAGE_SIZE
    os.makedirs(output_dir, exist_ok=True)
    spec = InputSpec([None, 3, size, size], 'float32', name=INPUT_NAME)
    paddle.jit.save(model, os.path.join(output_dir, MODEL_PREFIX), input_spec=[spec])
    with open(os.path.join(output_dir, PREPROCESS_FILE), 'w') as out:
        json.dump(preprocess_of(config), out, indent=2)
    return program_file(output_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = plain_layers(classifier_config(args))
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        fail(f'{args.output}: exists and is not a folder')
    weights = check_weights_file(args.pretrained, config)  # may fetch: after the cheap checks
    model = load_model(config, weights)
    path = export(model, config, args.output)
    print(f'wrote {path}, {os.path.join(args.output, MODEL_PREFIX)}.pdiparams and '
          f'{os.path.join(args.output, PREPROCESS_FILE)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
