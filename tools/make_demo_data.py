"""Generate the built-in demo data set: an ImageNet-format folder of drawn patterns.

    python tools/make_demo_data.py -output demo_data [-train_per_class 120] [-val_per_class 30]

writes ``train/<synset>/*.JPEG`` and ``val/<synset>/*.JPEG`` for 10 classes of
procedurally drawn patterns (stripes, checkerboard, rings, ...) with random
colours, scale, phase and position, plus ``LOC_synset_mapping.txt`` naming the
classes. The same seed always gives the same files. The classes survive the
training augmentations (random crops, flips, RandAugment): each is a pattern
that fills the image, not an object a crop could cut away.
"""

import argparse
import math
import os
import sys
from typing import Callable, Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Painter = Callable[[ImageDraw.ImageDraw, int, np.random.RandomState, tuple], None]


def _stripes(angle_deg: float) -> Painter:
    def paint(draw, size, rng, fg):
        period = rng.uniform(size / 9, size / 4)
        width = period * rng.uniform(0.35, 0.6)
        angle = math.radians(angle_deg + rng.uniform(-8, 8))
        # lines perpendicular to the stripe direction, swept across the diagonal
        dx, dy = math.cos(angle), math.sin(angle)
        offset = rng.uniform(0, period)
        for k in range(-int(2 * size / period) - 2, int(2 * size / period) + 2):
            c = k * period + offset
            cx, cy = size / 2 + c * -dy, size / 2 + c * dx
            draw.line([(cx - 2 * size * dx, cy - 2 * size * dy), (cx + 2 * size * dx, cy + 2 * size * dy)],
                      fill=fg, width=max(1, int(width)))
    return paint


def _grid(draw, size, rng, fg):
    _stripes(0)(draw, size, rng, fg)
    _stripes(90)(draw, size, rng, fg)


def _checkerboard(draw, size, rng, fg):
    cell = rng.uniform(size / 8, size / 3)
    ox, oy = rng.uniform(0, cell, size=2)
    n = int(size / cell) + 2
    for i in range(-1, n):
        for j in range(-1, n):
            if (i + j) % 2 == 0:
                x, y = ox + i * cell, oy + j * cell
                draw.rectangle([x, y, x + cell, y + cell], fill=fg)


def _dots(draw, size, rng, fg):
    step = rng.uniform(size / 7, size / 4)
    radius = step * rng.uniform(0.2, 0.32)
    ox, oy = rng.uniform(0, step, size=2)
    n = int(size / step) + 2
    for i in range(-1, n):
        for j in range(-1, n):
            x, y = ox + i * step, oy + j * step
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fg)


def _rings(draw, size, rng, fg):
    cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
    period = rng.uniform(size / 10, size / 5)
    width = max(1, int(period * rng.uniform(0.35, 0.55)))
    for k in range(int(1.5 * size / period), 0, -1):
        r = k * period
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)


def _disc(draw, size, rng, fg):
    r = rng.uniform(0.3, 0.45) * size
    cx, cy = rng.uniform(0.4 * size, 0.6 * size, size=2)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)


def _triangle(draw, size, rng, fg):
    r = rng.uniform(0.38, 0.5) * size
    cx, cy = rng.uniform(0.4 * size, 0.6 * size, size=2)
    turn = rng.uniform(0, 2 * math.pi)
    draw.polygon([(cx + r * math.cos(turn + k * 2 * math.pi / 3), cy + r * math.sin(turn + k * 2 * math.pi / 3))
                  for k in range(3)], fill=fg)


def _speckle(draw, size, rng, fg):
    for _ in range(int(size * size / rng.uniform(18, 30))):
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(0.6, 1.6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fg)


# flip-symmetric pairs are avoided on purpose: training flips images horizontally
CLASSES: Dict[str, Painter] = {
    'horizontal stripes': _stripes(0),
    'vertical stripes': _stripes(90),
    'grid': _grid,
    'checkerboard': _checkerboard,
    'dots': _dots,
    'rings': _rings,
    'disc': _disc,
    'triangle': _triangle,
    'speckle': _speckle,
    'blank': lambda draw, size, rng, fg: None,
}


def _colour_pair(rng: np.random.RandomState):
    """Two random colours far enough apart to tell the pattern from the ground."""
    while True:
        bg, fg = rng.randint(0, 256, size=(2, 3))
        if np.abs(bg - fg).sum() > 180:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def draw_image(painter: Painter, size: int, rng: np.random.RandomState) -> Image.Image:
    bg, fg = _colour_pair(rng)
    image = Image.new('RGB', (size, size), bg)
    painter(ImageDraw.Draw(image), size, rng, fg)
    if rng.rand() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noise = rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def synset(index: int) -> str:
    """An ImageNet-style folder name for class `index`."""
    return f'n{90000000 + index:08d}'


def make_demo_data(output: str, train_per_class: int = 120, val_per_class: int = 30,
                   image_size: int = 72, seed: int = 0) -> List[str]:
    """Write the data set under `output`; return the class names in label order."""
    names = list(CLASSES)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for index, name in enumerate(names):
            folder = os.path.join(output, split, synset(index))
            os.makedirs(folder, exist_ok=True)
            # one stream per (split, class): changing one count leaves the other images as they were
            rng = np.random.RandomState([seed, index, 0 if split == 'train' else 1])
            for k in range(count):
                image = draw_image(CLASSES[name], image_size, rng)
                image.save(os.path.join(folder, f'{synset(index)}_{split}_{k:05d}.JPEG'), quality=90)
    with open(os.path.join(output, 'LOC_synset_mapping.txt'), 'w') as mapping:
        for index, name in enumerate(names):
            mapping.write(f'{synset(index)} {name}\n')
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-output', required=True, help='folder to write (train/ and val/ inside)')
    parser.add_argument('-train_per_class', type=int, default=120)
    parser.add_argument('-val_per_class', type=int, default=30)
    parser.add_argument('-image_size', type=int, default=72, help='side of the square JPEGs')
    parser.add_argument('-seed', type=int, default=0)
    args = parser.parse_args(argv)
    names = make_demo_data(args.output, args.train_per_class, args.val_per_class, args.image_size, args.seed)
    print(f'{args.output}: {len(names)} classes, {args.train_per_class} train and '
          f'{args.val_per_class} val images each')
    return 0


if __name__ == '__main__':
    sys.exit(main())
