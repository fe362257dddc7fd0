"""Images per second of one process running the training transform, next to JPEG decoding alone.

Every pipeline starts from the same JPEG bytes in memory (no disk reads), so
the figures compare CPU work only: decode, decode + the recipe's training
transform (RandAugment and random erasing on), decode + the eval transform,
and decode + paddle.vision's plain RandomResizedCrop, flip, ColorJitter,
ToTensor and Normalize for comparison. Each figure is the best of -repeats
runs over -images images.

    python benchmarks/data_pipeline.py -images 200 -repeats 3

Synthetic photo-like 500x375 JPEGs (quality 90) are made from a seed; pass
-folder to time real images (every *.JPEG / *.jpg under it) instead.
"""

import argparse
import glob
import io
import os
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from datasets import get_train_transforms, get_val_transforms, to_rgb  # noqa: E402
from tools._common import load_config  # noqa: E402
from utils import int_at_least  # noqa: E402


def synthetic_jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0) -> List[bytes]:
    """Photo-like JPEGs: random smooth colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    images = []
    for _ in range(count):
        waves = [np.sin(x * rng.uniform(2, 12) + y * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
        pixels = np.stack(waves, axis=-1) * 100 + 128 + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
        images.append(buffer.getvalue())
    return images


def folder_jpegs(folder: str, count: int) -> List[bytes]:
    paths = sorted(glob.glob(os.path.join(folder, '**', '*.JPEG'), recursive=True)
                   + glob.glob(os.path.join(folder, '**', '*.jpg'), recursive=True))[:count]
    if not paths:
        raise SystemExit(f'{folder}: no *.JPEG or *.jpg files under it')
    images = []
    for path in paths:
        with open(path, 'rb') as infile:
            images.append(infile.read())
    return images


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


def paddle_vision_baseline(config) -> Callable:
    """paddle.vision's plain pipeline (no RandAugment, no erasing)."""
    from paddle.vision import transforms as PT
    data = config.DATA
    pipeline = PT.Compose([
        PT.RandomResizedCrop(data.IMAGE_SIZE, interpolation='bicubic'),
        PT.RandomHorizontalFlip(0.5),
        PT.ColorJitter(0.4, 0.4, 0.4),
        PT.ToTensor(),
        PT.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
    ])
    return pipeline


def images_per_second(images: List[bytes], work: Callable[[bytes], object], repeats: int) -> float:
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            work(data)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-images', type=int_at_least(1), default=200, help='images per timed run')
    parser.add_argument('-repeats', type=int_at_least(1), default=3, help='runs per pipeline; the best is reported')
    parser.add_argument('-cfg', default=os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                     'recipe-imagenet1k.yaml'))
    parser.add_argument('-folder', default=None, help='time real JPEGs under this folder instead')
    args = parser.parse_args()

    config = load_config(args.cfg)
    images = folder_jpegs(args.folder, args.images) if args.folder else synthetic_jpegs(args.images)
    train, val = get_train_transforms(config), get_val_transforms(config)
    baseline = paddle_vision_baseline(config)
    rng = np.random.default_rng(0)
    pipelines: Dict[str, Callable[[bytes], object]] = {
        'decode only (PIL)': decode,
        'decode + train transform (recipe)': lambda data: train(decode(data), rng),
        'decode + val transform': lambda data: val(decode(data)),
        'decode + paddle.vision RRC/flip/jitter': lambda data: baseline(decode(data)),
    }
    sizes = {decode(data).size for data in images[:20]}
    print(f'{len(images)} JPEGs, e.g. {sorted(sizes)[0][0]}x{sorted(sizes)[0][1]}, '
          f'{np.mean([len(d) for d in images]) / 1024:.0f} KiB on average; best of {args.repeats} runs, one process')
    print(f'train transform: {train}')
    decode_rate = None
    for name, work in pipelines.items():
        rate = images_per_second(images, work, args.repeats)
        decode_rate = decode_rate or rate
        print(f'{name:40s} {rate:8.1f} img/s  {rate / decode_rate:5.2f}x decode')


if __name__ == '__main__':
    main()
