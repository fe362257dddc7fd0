"""Generate the built-in demo data set: an ImageNet-format folder of two-shape scenes.

    python tools/make_demo_data.py -output demo_data [-train_per_class 200] [-val_per_class 50]

Every image shows a filled circle and a square outline, of random light
colours and sizes, at random places on a random dark, noisy background. What tells the classes apart is
only how the two shapes are placed relative to each other:

    circle above square, square above circle, side by side,
    circle inside square, square inside circle, overlapping

So a model must find both shapes (local features: convolutions) and relate
their positions across the image (global: attention); no colour, size or
texture gives the class away, and a mirror image keeps its class (training
flips images). Writes ``train/<synset>/*.JPEG``, ``val/<synset>/*.JPEG``,
``LOC_synset_mapping.txt`` naming the classes and ``labels.txt`` (the names alone,
for the tools' -labels); the same seed gives the same files.
"""

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Box = Tuple[float, float, float]  # centre x, centre y, half size
Placer = Callable[[np.random.RandomState, int], Tuple[Box, Box]]  # -> (circle, square)


def _separated(rng: np.random.RandomState, size: int, vertical: bool) -> Tuple[Box, Box]:
    """Two shapes apart along one axis (first one first: above / left), roughly aligned on the other."""
    half = rng.uniform(0.12, 0.16, size=2) * size
    margin = 0.06 * size
    gap = rng.uniform(0.05, 0.15) * size
    span = 2 * half[0] + gap + 2 * half[1]
    start = rng.uniform(margin, size - margin - span) if span < size - 2 * margin else margin
    along = (start + half[0], start + 2 * half[0] + gap + half[1])
    centre = rng.uniform(0.3, 0.7) * size
    across = [centre + rng.uniform(-0.08, 0.08) * size for _ in range(2)]
    if vertical:
        return (across[0], along[0], half[0]), (across[1], along[1], half[1])
    return (along[0], across[0], half[0]), (along[1], across[1], half[1])


def _nested(rng: np.random.RandomState, size: int) -> Tuple[Box, Box]:
    """A big shape and a small one well inside it (outer first)."""
    outer = rng.uniform(0.25, 0.38) * size
    cx, cy = rng.uniform(outer + 0.05 * size, size - outer - 0.05 * size, size=2)
    inner = outer * rng.uniform(0.3, 0.45)
    room = outer * 0.6 - inner  # the inner shape stays inside a circle as well as a square
    dx, dy = rng.uniform(-1, 1, size=2) * max(room, 0) / 1.5
    return (cx, cy, outer), (cx + dx, cy + dy, inner)


def _overlapping(rng: np.random.RandomState, size: int) -> Tuple[Box, Box]:
    """Two similar shapes whose areas overlap by a clear part, neither inside the other."""
    half = rng.uniform(0.14, 0.2, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    distance = (half[0] + half[1]) * rng.uniform(0.45, 0.7)
    cx, cy = rng.uniform(0.4, 0.6, size=2) * size
    dx, dy = np.cos(angle) * distance / 2, np.sin(angle) * distance / 2
    return (cx - dx, cy - dy, half[0]), (cx + dx, cy + dy, half[1])


def _swap(placer: Callable[[np.random.RandomState, int], Tuple[Box, Box]]) -> Placer:
    def place(rng, size):
        first, second = placer(rng, size)
        return second, first
    return place


# each placer returns (circle, square)
CLASSES: Dict[str, Placer] = {
    'circle above square': lambda rng, size: _separated(rng, size, vertical=True),
    'square above circle': _swap(lambda rng, size: _separated(rng, size, vertical=True)),
    'side by side': lambda rng, size: (_separated(rng, size, vertical=False)[::1 if rng.rand() < 0.5 else -1]),
    'circle inside square': _swap(_nested),
    'square inside circle': _nested,
    'overlapping': _overlapping,
}


def _colours(rng: np.random.RandomState) -> Tuple[tuple, tuple, tuple]:
    """A dark background colour and two light ones for the shapes, apart enough
    that a shape drawn on the other stays visible."""
    dark = rng.randint(0, 90, size=3)
    while True:
        light = rng.randint(120, 256, size=(2, 3))
        if np.abs(light[0] - light[1]).sum() > 150:
            return tuple(tuple(int(v) for v in colour) for colour in (dark, *light))


def draw_image(placer: Placer, size: int, rng: np.random.RandomState) -> Image.Image:
    background, circle_colour, square_colour = _colours(rng)
    image = Image.new('RGB', (size, size), background)
    draw = ImageDraw.Draw(image)
    (cx, cy, cr), (sx, sy, sr) = placer(rng, size)
    circle = lambda: draw.ellipse([cx - cr, cy - cr, cx + cr, cy + cr], fill=circle_colour)  # noqa: E731
    # the square is an outline: which shape is which must be easy to see at 48x48 (a filled
    # square and a disc that small differ in a few corner pixels); where the class lies is the placement
    square = lambda: draw.rectangle([sx - sr, sy - sr, sx + sr, sy + sr], outline=square_colour,  # noqa: E731
                                    width=max(2, round(0.06 * size)))
    # the bigger shape first, so a nested one stays visible; overlapping ones in random order
    for paint in ((square, circle) if sr > cr or (sr == cr and rng.rand() < 0.5) else (circle, square)):
        paint()
    if rng.rand() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noise = rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def synset(index: int) -> str:
    """An ImageNet-style folder name for class `index`."""
    return f'n{90000000 + index:08d}'


def make_demo_data(output: str, train_per_class: int = 200, val_per_class: int = 50,
                   image_size: int = 56, seed: int = 0) -> List[str]:
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
    with open(os.path.join(output, 'labels.txt'), 'w') as labels:  # for the tools' -labels
        labels.writelines(f'{name}\n' for name in names)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-output', required=True, help='folder to write (train/ and val/ inside)')
    parser.add_argument('-train_per_class', type=int, default=200)
    parser.add_argument('-val_per_class', type=int, default=50)
    parser.add_argument('-image_size', type=int, default=56, help='side of the square JPEGs')
    parser.add_argument('-seed', type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ('train_per_class', 'val_per_class', 'image_size'):
        if getattr(args, flag) < 1:
            parser.error(f'-{flag} must be positive, got {getattr(args, flag)}')
    names = make_demo_data(args.output, args.train_per_class, args.val_per_class, args.image_size, args.seed)
    print(f'{args.output}: {len(names)} classes, {args.train_per_class} train and '
          f'{args.val_per_class} val images each')
    return 0


if __name__ == '__main__':
    sys.exit(main())
