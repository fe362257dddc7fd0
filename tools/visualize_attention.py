"""Attention maps of a CvT, overlaid on the image the model saw, as one PNG.

    python tools/visualize_attention.py -cfg configs/cvt-13-224x224.yaml -pretrained cvt-13-224x224 \\
        -image cat.jpg -output cat_attention.png [-stage 3] [-block 10] [-point 112,80] [-labels FILE]

The query: on a stage with a cls token (stage 3 of the released models) the cls
token, unless -point is given; on the other stages the token under image point
X,Y (pixels of the resized, centre-cropped image; default its centre). Its
attention over the keys -- the stride-2 convolutional projection of the tokens,
a coarser grid than the tokens -- is upsampled and drawn as a heat map over the
image: the mean over heads and, with several heads, each head. Each map is
scaled to its own maximum; the label under it gives the weight the query puts
on the cls key, which is not in the picture. The title holds the model's top-5.

The weights are the model's own (cvt.record_attention), from the same forward
that gives the top-5.
"""

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import fileio  # noqa: E402
from cvt import record_attention  # noqa: E402
from tools._common import (add_model_arguments, check_output_file, check_weights_file, fail,  # noqa: E402
                           load_model, model_config, read_image, read_labels, softmax, top_k,
                           val_transform)

TOP_K = 5
MIN_PANEL = 224  # smaller crops are enlarged so that the labels fit
MARGIN = 8
LABEL_HEIGHT = 20
LINE_HEIGHT = 18
FONT_SIZE = 14
MAX_COLUMNS = 4
HEAT_WEIGHT = 0.55  # share of the heat map in the overlay, the rest is the image
# anchors of the heat colour scale, low to high (dark purple, red, orange, pale yellow)
HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], 'float32')


def parse_point(text: str) -> Tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not X,Y in whole pixels') from None
    return x, y


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Draw the attention maps of a CvT over an image.')
    add_model_arguments(parser)
    parser.add_argument('-image', required=True, help='the image')
    parser.add_argument('-output', required=True, help='the PNG to write')
    parser.add_argument('-stage', type=int, default=None, help='stage 1..NUM_STAGES (default the last)')
    parser.add_argument('-block', type=int, default=None, help='block of the stage, 1..DEPTH (default the last)')
    parser.add_argument('-point', type=parse_point, default=None,
                        help='query at image point X,Y, in pixels of the cropped image (default its centre; '
                             'on a stage with a cls token the default query is the cls token)')
    parser.add_argument('-labels', help='class names, one a line in class-index order, for the top-5')
    return parser.parse_args(argv)


def display_image(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The resized, centre-cropped image (H, W, 3) uint8 that the normalised CHW
    `array` came from: undoing the normalisation shows exactly what the model saw."""
    chw = array * np.asarray(std, 'float32')[:, None, None] + np.asarray(mean, 'float32')[:, None, None]
    return np.clip(np.round(chw.transpose(1, 2, 0) * 255), 0, 255).astype('uint8')


def square_side(count: int, what: str) -> int:
    """The side of a square grid of `count` cells. Val crops are square, so the
    token and key grids of every stage are too."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f'{count} {what} do not form a square grid')
    return side


def query_index(num_queries: int, has_cls: bool, point: Optional[Tuple[int, int]],
                image_size: int) -> Tuple[int, Optional[Tuple[int, int]]]:
    """Row of the attention matrix to show, and the (row, col) of that token in
    the token grid (None for the cls token)."""
    if has_cls and point is None:
        return 0, None
    side = square_side(num_queries - has_cls, 'query tokens')
    x, y = point if point is not None else (image_size // 2, image_size // 2)
    row, col = min(y * side // image_size, side - 1), min(x * side // image_size, side - 1)
    return int(has_cls) + row * side + col, (row, col)


def attention_maps(weights: np.ndarray, query: int, has_cls: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Per head, the query's weights over the spatial keys as (heads, k, k) maps,
    and the weight on the cls key (heads,) or None."""
    row = weights[:, query, :]
    cls_weight = row[:, 0] if has_cls else None
    spatial = row[:, 1:] if has_cls else row
    side = square_side(spatial.shape[1], 'keys')
    return spatial.reshape(-1, side, side), cls_weight


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB (H, W, 3) float on the HEAT_ANCHORS scale."""
    position = values * (len(HEAT_ANCHORS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return HEAT_ANCHORS[low] * (1 - frac) + HEAT_ANCHORS[low + 1] * frac


def overlay(image: np.ndarray, attention: np.ndarray) -> Image.Image:
    """`attention` (k, k) upsampled bilinearly to the image, scaled to [0, 1] and
    blended over `image` (S, S, 3) uint8 in grey (the image's own colours would
    blur the colour scale)."""
    size = image.shape[1], image.shape[0]
    upsampled = np.asarray(Image.fromarray(attention.astype('float32'), 'F').resize(size, Image.BILINEAR))
    low, high = upsampled.min(), upsampled.max()
    scaled = (upsampled - low) / (high - low) if high > low else np.zeros_like(upsampled)
    grey = np.asarray(Image.fromarray(image).convert('L'), 'float32')[..., None]
    blended = (1 - HEAT_WEIGHT) * grey + HEAT_WEIGHT * heat_colours(scaled)
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype('uint8'))


def figure_layout(num_maps: int, image_size: int, header_lines: int) -> Tuple[int, int, int, Tuple[int, int]]:
    """(panel side, columns, header height, (width, height)) of a figure with the
    input image and `num_maps` maps; `draw_figure` widens it if a header line is wider."""
    panel = max(image_size, MIN_PANEL)
    panels = 1 + num_maps
    columns = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / columns)
    header = MARGIN + header_lines * LINE_HEIGHT
    width = columns * panel + (columns + 1) * MARGIN
    height = header + rows * (MARGIN + panel + LABEL_HEIGHT) + MARGIN
    return panel, columns, header, (width, height)


def mark_point(draw: ImageDraw.ImageDraw, centre: Tuple[float, float], radius: int = 5) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline='white', width=2)
    draw.ellipse([x - radius - 2, y - radius - 2, x + radius + 2, y + radius + 2], outline='black', width=1)


def draw_figure(image: np.ndarray, maps: np.ndarray, cls_weight: Optional[np.ndarray],
                header: List[str], query_cell: Optional[Tuple[int, int]], query_grid: int) -> Image.Image:
    """The input image, the mean map and (with several heads) each head's map,
    labelled, under the `header` lines. `query_cell` of a `query_grid`-sized
    token grid is marked on every panel."""
    heads = maps.shape[0]
    panels = [(Image.fromarray(image), f'input {image.shape[1]}x{image.shape[0]}')]
    cls_note = lambda w: f' · cls key {w:.2f}' if cls_weight is not None else ''
    mean_cls = float(cls_weight.mean()) if cls_weight is not None else 0.0
    mean_label = f'mean of {heads} heads' if heads > 1 else 'head 1 (the only head)'
    panels.append((overlay(image, maps.mean(axis=0)), mean_label + cls_note(mean_cls)))
    if heads > 1:
        for h in range(heads):
            weight = float(cls_weight[h]) if cls_weight is not None else 0.0
            panels.append((overlay(image, maps[h]), f'head {h + 1}{cls_note(weight)}'))

    panel, columns, top, (width, height) = figure_layout(len(panels) - 1, image.shape[0], len(header))
    font = ImageFont.load_default(size=FONT_SIZE)
    width = max(width, 2 * MARGIN + math.ceil(max(font.getlength(line) for line in header)))
    figure = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(figure)
    for i, line in enumerate(header):
        draw.text((MARGIN, MARGIN + i * LINE_HEIGHT), line, fill='black', font=font)
    for i, (picture, label) in enumerate(panels):
        x = MARGIN + (i % columns) * (panel + MARGIN)
        y = top + MARGIN + (i // columns) * (panel + LABEL_HEIGHT + MARGIN)
        figure.paste(picture.resize((panel, panel), Image.BICUBIC), (x, y))
        draw.text((x, y + panel + 3), label, fill='black', font=font)
        if query_cell is not None:
            row, col = query_cell
            mark_point(draw, (x + (col + 0.5) * panel / query_grid, y + (row + 0.5) * panel / query_grid))
    return figure


def title_lines(config, stage: int, block: int, query_cell: Optional[Tuple[int, int]], query_grid: int,
                key_grid: int, has_cls: bool, probs: Optional[np.ndarray],
                labels: Optional[List[str]]) -> List[str]:
    """What the picture shows, then the top-5 (or a note that there is no classifier)."""
    depth = config.MODEL.DEPTH[stage - 1]
    if query_cell is None:
        query = 'the cls token'
    else:
        query = f'the token at row {query_cell[0]}, column {query_cell[1]} of {query_grid}x{query_grid}'
    keys = f'{key_grid}x{key_grid} keys' + (' + cls' if has_cls else '')
    lines = [f'{config.MODEL.NAME}, stage {stage}, block {block} of {depth}',
             f'attention of {query} over {keys}']
    if probs is None:
        return lines + ['no classifier (MODEL.NUM_CLASSES = 0): no prediction']
    lines.append(f'top-{TOP_K} prediction:')
    for rank, (index, prob) in enumerate(top_k(probs, TOP_K), 1):
        name = f'  {labels[index]}' if labels else ''
        lines.append(f'  {rank}. {prob:.4f}  {index}{name}')
    return lines


def check_args(args: argparse.Namespace, config) -> Tuple[int, int]:
    """The 1-based stage and block to show; exits on a bad value."""
    stages = config.MODEL.NUM_STAGES
    stage = stages if args.stage is None else args.stage
    if not 1 <= stage <= stages:
        fail(f'-stage {stage}: the model has stages 1..{stages}')
    depth = config.MODEL.DEPTH[stage - 1]
    block = depth if args.block is None else args.block
    if not 1 <= block <= depth:
        fail(f'-block {block}: stage {stage} has blocks 1..{depth}')
    size = config.DATA.IMAGE_SIZE
    if args.point is not None and not all(0 <= v < size for v in args.point):
        fail(f'-point {args.point[0]},{args.point[1]} is outside the {size}x{size} cropped image')
    check_output_file(args.output)
    return stage, block


def main(argv=None) -> int:
    args = parse_args(argv)
    config = model_config(args)
    stage, block = check_args(args, config)
    num_classes = config.MODEL.NUM_CLASSES
    labels = read_labels(args.labels, num_classes) if num_classes else None
    if not os.path.isfile(args.image):
        fail(f'{args.image}: no such file')
    picture = read_image(args.image)
    if picture is None:
        fail(f'{args.image}: not a readable image')
    weights = check_weights_file(args.pretrained, config)  # may fetch: after the cheap checks
    array = val_transform(config)(picture)
    model = load_model(config, weights)

    with record_attention(model) as records, paddle.no_grad():
        logits = model(paddle.to_tensor(array[None]))
    weights_of = {(i, j): w for i, j, w in records}
    attention = weights_of[(stage - 1, block - 1)].numpy()[0]  # (heads, queries, keys)
    has_cls = bool(config.MODEL.CLS_TOKEN[stage - 1])

    size = config.DATA.IMAGE_SIZE
    query, query_cell = query_index(attention.shape[1], has_cls, args.point, size)
    query_grid = square_side(attention.shape[1] - has_cls, 'query tokens')
    maps, cls_weight = attention_maps(attention, query, has_cls)
    probs = softmax(logits.numpy()[0].astype('float64')) if num_classes else None
    header = title_lines(config, stage, block, query_cell, query_grid, maps.shape[1], has_cls, probs, labels)
    image = display_image(array, config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)
    figure = draw_figure(image, maps, cls_weight, header, query_cell, query_grid)
    fileio.write_atomically(args.output, lambda temporary: figure.save(temporary, format='PNG'))
    print(f'wrote {args.output} ({figure.size[0]}x{figure.size[1]})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
