"""Hold out a val set from a data set that has only class folders (as ImageNet-22k ships).

    python tools/make_split_lists.py -data_path /dataset/imagenet22k [-folder train] \
        [-val_per_class 10] [-seed 0]

reads the class folders DATA_PATH/<folder>/<class>/* and writes, in DATA_PATH,
the list files the training reads instead of folders (datasets.py, PaddleViT's
format, one `relative/path label` a line): `train_list.txt` and `val_list.txt`,
with `-val_per_class` images of each class drawn for val (seeded; a class keeps
at least one training image), and `classes.txt`, the class folder names in label
order (the sorted folder names, as for the class-folder layout; usable as
`-labels` of tools/predict.py). Existing list files are never overwritten.
"""

import argparse
import os
import sys
from typing import List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import fail  # noqa: E402

OUTPUTS = ('train_list.txt', 'val_list.txt', 'classes.txt')


def class_files(root: str) -> List[Tuple[str, List[str]]]:
    """(class folder name, sorted file names) for every class folder of `root`, sorted by name."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    result = []
    for name in classes:
        with os.scandir(os.path.join(root, name)) as entries:
            result.append((name, sorted(e.name for e in entries if e.is_file() and not e.name.startswith('.'))))
    return result


def write_split_lists(data_path: str, folder: str = 'train', val_per_class: int = 10,
                      seed: int = 0) -> Tuple[int, int, int]:
    """Write train_list.txt, val_list.txt and classes.txt in `data_path`; return
    (classes, train images, val images). Raises FileExistsError / ValueError."""
    root = os.path.join(data_path, folder)
    if not os.path.isdir(root):
        raise ValueError(f'{root}: folder not found (expected <class>/ image folders in it)')
    existing = [os.path.join(data_path, name) for name in OUTPUTS if os.path.exists(os.path.join(data_path, name))]
    if existing:
        raise FileExistsError(f'{existing[0]} exists; move it away to write new lists')
    classes = class_files(root)
    if not classes:
        raise ValueError(f'{root}: no class folders in it')
    train, val = [], []
    for label, (name, files) in enumerate(classes):
        held_out = min(val_per_class, len(files) - 1)
        chosen = set(np.random.default_rng([seed, label]).choice(len(files), held_out, replace=False).tolist()) \
            if held_out > 0 else set()
        for k, file_name in enumerate(files):
            (val if k in chosen else train).append(f'{folder}/{name}/{file_name} {label}')
    # written under temporary names, then renamed: an interrupted run leaves no partial lists
    for name, lines in zip(OUTPUTS, (train, val, [name for name, _ in classes])):
        temporary = os.path.join(data_path, f'.{name}.tmp{os.getpid()}')
        with open(temporary, 'w') as out:
            out.writelines(line + '\n' for line in lines)
        os.replace(temporary, os.path.join(data_path, name))
    return len(classes), len(train), len(val)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-data_path', required=True, help='the data folder; the lists are written in it')
    parser.add_argument('-folder', default='train', help='the folder of class folders, inside -data_path')
    parser.add_argument('-val_per_class', type=int, default=10, help='images of each class held out for val')
    parser.add_argument('-seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.val_per_class < 1:
        fail(f'-val_per_class must be at least 1, got {args.val_per_class}')
    try:
        count, train, val = write_split_lists(args.data_path, args.folder, args.val_per_class, args.seed)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    print(f'{args.data_path}: {count} classes, {train} train and {val} val images in train_list.txt, '
          f'val_list.txt (class names in classes.txt)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
