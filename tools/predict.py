"""Classify images with a CvT: the top-k classes and their probabilities per image.

    python tools/predict.py -cfg configs/cvt-13-224x224.yaml -pretrained cvt-13-224x224 \\
        cat.jpg photos/ -labels imagenet_classes.txt -topk 5

Images go through the val transform of the config (resize, centre crop,
normalise); folders are searched recursively for image files and classified in
batches of -batch_size. Unreadable files are reported on stderr and skipped.
Exit code 0 when at least one image was classified, 1 when none, 2 on bad input.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from tools._common import (add_model_arguments, check_topk, check_weights_file, fail,  # noqa: E402
                           classifier_config, list_images, load_model, print_predictions,
                           read_labels, val_transform)
from utils import UsageError, check_attention_memory, int_at_least  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Top-k classes of images with a CvT model.')
    add_model_arguments(parser)
    parser.add_argument('images', nargs='+', help='image files and/or folders of images')
    parser.add_argument('-labels', help='class names, one a line in class-index order')
    parser.add_argument('-topk', type=int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('-batch_size', type=int_at_least(1), default=None,
                        help='images per forward (default DATA.BATCH_SIZE_EVAL of the config)')
    return parser.parse_args(argv)


def logits_function(model: paddle.nn.Layer):
    """numpy images (B, 3, H, W) -> numpy logits (B, classes) with the dynamic-graph model."""
    def logits_of(images: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()
    return logits_of


def main(argv=None) -> int:
    args = parse_args(argv)
    config = classifier_config(args)
    num_classes = config.MODEL.NUM_CLASSES
    check_topk(args.topk, num_classes)
    batch_size = args.batch_size or config.DATA.BATCH_SIZE_EVAL
    try:
        check_attention_memory(config, batch_size)
    except UsageError as err:
        fail(str(err))
    labels = read_labels(args.labels, num_classes)
    images = list_images(args.images)
    weights = check_weights_file(args.pretrained, config)  # may fetch: after the cheap checks
    model = load_model(config, weights)
    done = print_predictions(images, val_transform(config), batch_size, logits_function(model),
                             args.topk, labels)
    return 0 if done else 1


if __name__ == '__main__':
    sys.exit(main())
