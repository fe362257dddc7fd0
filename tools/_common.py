"""What the tools share: exiting on bad input, config (+ overrides) + model + weights, the val
transform, image listing and batching, top-k printing.

The tools import this after ``runtime.configure()`` (which must run before Paddle loads).
"""

import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils import add_opts_argument, fail  # noqa: F401  (the tools stop on bad input as the training scripts do)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.jfif')


def load_config(cfg_file: str, opts: Optional[Sequence[str]] = None):
    """The config of `cfg_file` with the -opts KEY VALUE pairs `opts` set, or
    exit naming what is wrong with it."""
    from config import ConfigError, get_config
    try:
        return get_config(cfg_file, opts or ())
    except ConfigError as err:
        fail(str(err))


def add_model_arguments(parser) -> None:
    """The model a tool runs: -cfg, -opts, -pretrained, and the overrides of a model
    fine-tuned to other classes or another input size (-num_classes, -image_size),
    run with the config it was fine-tuned from; `model_config` reads them."""
    parser.add_argument('-cfg', required=True, help='model config yaml')
    add_opts_argument(parser)
    parser.add_argument('-pretrained', required=True,
                        help='weights (.pdparams or .safetensors; the suffix may be left out), or released '
                             'weights by name: cvt-13-224, ..., hf-hub:ORG/REPO (docs/tools.md)')
    parser.add_argument('-num_classes', type=int, default=None,
                        help='classes of the model (default MODEL.NUM_CLASSES of the config)')
    parser.add_argument('-image_size', type=int, default=None,
                        help='input image size (default DATA.IMAGE_SIZE of the config)')


def model_config(args):
    """The config of `args.cfg` with the -opts and overrides of `add_model_arguments`, or exit
    naming what is wrong."""
    import argparse
    from config import ConfigError, update_config
    config = load_config(args.cfg, getattr(args, 'opts', None))
    overrides = argparse.Namespace(num_classes=getattr(args, 'num_classes', None),
                                   image_size=getattr(args, 'image_size', None))
    from utils import UsageError, check_attention_memory
    try:
        config = update_config(config, overrides)
        check_attention_memory(config, batch=1)
    except ConfigError as err:
        fail(f'{args.cfg}: {err}')
    except UsageError as err:
        fail(str(err))
    return config


def classifier_config(args):
    """`model_config(args)`, or exit when that model has no classifier (NUM_CLASSES 0)."""
    config = model_config(args)
    if config.MODEL.NUM_CLASSES < 1:
        fail(f'{args.cfg}: MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}: the model has no classifier')
    return config


def check_output_file(path: str) -> str:
    """`path` as a file this tool may write (not a folder, in a folder that exists and that
    this user can write), or exit."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f'{path}: is a folder; name the file to write')
    if not os.path.isdir(folder):
        fail(f'{path}: its folder {folder} does not exist')
    if not os.access(folder, os.W_OK):
        fail(f'{path}: its folder {folder} cannot be written')
    return path


def check_weights_file(path: str, config=None) -> str:
    """The weights file `path` names (with or without `.pdparams`), or exit; released
    weights by name are fetched and converted for the model of `config` (hub.py)."""
    from cvt import resolve_weights_path
    from fileio import FileFormatError, check_header
    try:
        return check_header(resolve_weights_path(path, config))
    except (FileNotFoundError, FileFormatError) as err:
        fail(str(err))


def load_model(config, weights: str):
    """The CvT of `config` with the weights of `weights`, in eval mode; exits if
    they do not fit (a classifier head of another size included: its scores
    would be meaningless here)."""
    from cvt import build_cvt, load_pretrained
    model = build_cvt(config)
    try:
        skipped = load_pretrained(model, weights, log=lambda _: None)
    except ValueError as err:
        fail(str(err))
    except Exception as err:  # paddle.load on a file that is not a weights file
        fail(f'{weights}: cannot read weights ({type(err).__name__}: {err})')
    if skipped:
        fail(f'{weights}: its classifier head does not fit MODEL.NUM_CLASSES = {config.MODEL.NUM_CLASSES} '
             '(a fine-tuned model: give its config, or -num_classes)')
    model.eval()
    return model


def val_transform(config) -> Callable[[Image.Image], np.ndarray]:
    """The evaluation transform: PIL RGB image -> normalised float32 CHW array."""
    from datasets import get_val_transforms
    return get_val_transforms(config)


def read_labels(path: Optional[str], num_classes: int) -> Optional[List[str]]:
    """Class names, one a line in class-index order, or None without a file; exits
    if the file is missing or does not name exactly `num_classes` classes."""
    if path is None:
        return None
    try:
        with open(path, encoding='utf-8') as lines:
            names = [line.strip() for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        fail(f'{path}: cannot read labels ({err})')
    if len(names) != num_classes:
        fail(f'{path}: {len(names)} class names, but the model has {num_classes} classes')
    return names


def check_topk(topk: int, num_classes: int) -> int:
    if not 1 <= topk <= num_classes:
        fail(f'-topk {topk} must be between 1 and the number of classes, {num_classes}')
    return topk


def list_images(paths: Sequence[str]) -> List[str]:
    """Files named, plus the image files (by extension) under folders named, sorted."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                images += [os.path.join(folder, f) for f in sorted(files)
                           if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path):
            images.append(path)
        else:
            fail(f'{path}: no such file or folder')
    if not images:
        fail(f'no image files in {", ".join(paths)}')
    return images


def read_image(path: str) -> Optional[Image.Image]:
    """The image at `path` in RGB, or None (reported on stderr) if unreadable."""
    from datasets import load_rgb  # the data pipeline's decoding (transparency, CMYK, ...)
    try:
        return load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        # PIL names the file object rather than the format when it knows no format
        reason = 'unknown format' if isinstance(err, UnidentifiedImageError) else str(err)
        print(f'skipped {path}: not a readable image ({reason})', file=sys.stderr)
        return None


def image_batches(paths: Sequence[str], transform: Callable[[Image.Image], np.ndarray],
                  batch_size: int) -> Iterator[Tuple[List[str], np.ndarray]]:
    """Transformed images in batches (paths, (B, 3, H, W) float32); unreadable files skipped."""
    batch_paths, arrays = [], []
    for path in paths:
        image = read_image(path)
        if image is None:
            continue
        batch_paths.append(path)
        arrays.append(transform(image))
        if len(arrays) == batch_size:
            yield batch_paths, np.stack(arrays)
            batch_paths, arrays = [], []
    if arrays:
        yield batch_paths, np.stack(arrays)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> List[Tuple[int, float]]:
    """The k most probable (class index, probability), most probable first."""
    order = np.argsort(-probs, kind='stable')[:k]
    return [(int(i), float(probs[i])) for i in order]


def format_top_k(path: str, probs: np.ndarray, k: int, labels: Optional[List[str]]) -> str:
    """`path` then one line per class: rank, probability, class index, name."""
    lines = [path]
    for rank, (index, prob) in enumerate(top_k(probs, k), 1):
        name = f'  {labels[index]}' if labels else ''
        lines.append(f'  {rank}. {prob:.4f}  {index:>4d}{name}')
    return '\n'.join(lines)


def print_predictions(paths: Sequence[str], transform: Callable[[Image.Image], np.ndarray],
                      batch_size: int, logits_of: Callable[[np.ndarray], np.ndarray],
                      k: int, labels: Optional[List[str]]) -> int:
    """Classify `paths` batch by batch and print each image's top k; returns how
    many images were classified."""
    done = 0
    for batch_paths, images in image_batches(paths, transform, batch_size):
        for path, probs in zip(batch_paths, softmax(logits_of(images).astype('float64'))):
            print(format_top_k(path, probs, k, labels), flush=True)
            done += 1
    return done
