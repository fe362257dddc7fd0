"""Datasets and data loaders: images on disk -> batches of normalised tensors.

``get_dataset(config, mode)`` reads DATA.DATASET under DATA.DATA_PATH:

* ``imagenet2012``: PaddleViT's list files (``train_list.txt`` / ``val_list.txt``,
  lines ``relative/path label``) when the split's list file exists, else class
  folders ``train/<synset>/*`` and ``val/<synset>/*``, where a class's index is
  the position of its synset in the sorted folder list of ``train/``.
* ``cifar10`` / ``cifar100``: the python-version archives
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in DATA_PATH.

Reproducibility: the loader's batch sampler hands the dataset keys
``(epoch, index)`` and the dataset augments each sample with a generator seeded
from (SEED, epoch, index). Samples and their augmentation are therefore the
same whatever the number of workers or processes, and a run resumed at an
epoch boundary continues exactly; the sampler's shuffle derives from (SEED,
epoch). Call ``set_epoch(loader, epoch)`` at the start of every epoch;
``set_epoch(loader, epoch, first_batch)`` continues an epoch at a batch without
reading the batches before it (resuming from a mid-epoch checkpoint).

A file that cannot be decoded (truncated, empty, not an image, missing) warns
once per file in each process (each loader worker warns on its own). Every
sample comes with the index of its unreadable file, or READ (`Sample`): in
training the next readable sample stands in for it (the epoch line counts
them); in evaluation a placeholder does, which `engine.validate` leaves out and
names, so that the evaluation is of the images it says.
"""

import functools
import math
import os
import tarfile
import warnings
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import paddle
from PIL import Image

import fileio
from preemption import loader_worker_init
from transforms import build_train_transforms, build_val_transforms

MODES = ('train', 'val')
DATASETS = ('imagenet2012', 'cifar10', 'cifar100')
LIST_FILES = {'train': 'train_list.txt', 'val': 'val_list.txt'}
CIFAR_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'),
    'cifar100': ('cifar-100-python.tar.gz', 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'),
}
# how many unreadable files in a row before giving up on the dataset
MAX_CONSECUTIVE_BAD = 100

SampleKey = Union[int, Tuple[int, int]]
# (image CHW uint8, label, index of the sample's unreadable file or READ, rectangles to erase)
Sample = Tuple[np.ndarray, int, int, np.ndarray]
READ = -1
NO_BOXES = np.zeros((1, 4), dtype=np.int32)  # (top, left, height, width): none

_warned_files: Set[str] = set()


def get_train_transforms(config) -> Callable:
    """Training augmentation of the recipe: PIL image -> (uint8 CHW array, rectangles to
    erase); the engine finishes the batch on its device (transforms.DeviceFinish)."""
    return build_train_transforms(config)


def get_val_transforms(config) -> Callable:
    """Evaluation preprocessing for the tools: PIL image -> normalised float32 CHW array.
    (The val loader's images stay uint8 until DeviceFinish.)"""
    return build_val_transforms(config)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (CMYK, L, P, RGBA, ...) as RGB; transparency is dropped."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
        image = image.convert('RGBA')
    return image.convert('RGB')


def load_rgb(path: str) -> Image.Image:
    """Decode the whole image file at `path` as RGB (raises on bad files)."""
    with open(path, 'rb') as infile:
        image = Image.open(infile)
        image.load()
        return to_rgb(image)


class AugmentedDataset(paddle.io.Dataset):
    """Base: (image, label) pairs, each transformed with its own seeded generator.

    ``dataset[i]`` is sample i at epoch 0; ``dataset[(epoch, i)]`` is sample i
    as augmented in `epoch` (what the loader's sampler asks for).
    """

    def __init__(self, labels: Sequence[int], classes: List[str], transform: Callable, seed: int):
        if seed is None or int(seed) < 0:
            raise ValueError(f'SEED must be a non-negative integer, got {seed!r}')
        self.labels = list(labels)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """The RGB image of sample `index`."""
        raise NotImplementedError

    def __getitem__(self, key: SampleKey) -> Sample:
        """Sample `key` (an index, or (epoch, index)), augmented for its epoch: see `Sample`."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'sample index {index} out of range for {len(self)} samples')
        image, used = self.load_readable(index)
        read = used == index
        if used is None:  # left out: a placeholder of the transform's output shape
            image, used = Image.new('RGB', (8, 8)), index
        out = self.transform(image, np.random.default_rng([self.seed, int(epoch), used]))
        array, boxes = out if isinstance(out, tuple) else (out, NO_BOXES)
        return array, self.labels[used], READ if read else index, boxes

    def load_readable(self, index: int) -> Tuple[Optional[Image.Image], Optional[int]]:
        """Sample `index`'s image, or the one that stands in for it: (image, its index);
        (None, None) when the sample is to be left out."""
        return self.load(index), index


class ImageFileDataset(AugmentedDataset):
    """Images in files. An unreadable file is replaced by the next readable sample with
    `replace_unreadable` (training); without, it is left out (evaluation)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: List[str],
                 transform: Callable, seed: int, replace_unreadable: bool = True):
        super().__init__(labels, classes, transform, seed)
        self.paths = list(paths)
        self.replace_unreadable = replace_unreadable
        self.bad_indices: Set[int] = set()

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def load_readable(self, index: int) -> Tuple[Optional[Image.Image], Optional[int]]:
        tries = min(MAX_CONSECUTIVE_BAD, len(self)) if self.replace_unreadable else 1
        for step in range(tries):
            candidate = (index + step) % len(self)
            if candidate in self.bad_indices:
                continue
            try:
                return self.load(candidate), candidate
            # decoders signal corrupt data with many exception types
            except Exception as err:  # noqa: BLE001
                self.bad_indices.add(candidate)
                self._warn_bad(self.paths[candidate], err, 'skipped' if self.replace_unreadable else 'left out')
        if not self.replace_unreadable:
            return None, None
        raise RuntimeError(f'{self.paths[index]}: this and the next {MAX_CONSECUTIVE_BAD - 1} '
                           f'files cannot be read as images')

    @staticmethod
    def _warn_bad(path: str, err: Exception, what: str) -> None:
        if path not in _warned_files:
            _warned_files.add(path)
            warnings.warn(f'{path}: {what}, not a readable image ({type(err).__name__}: {err})',
                          RuntimeWarning, stacklevel=2)


class ArrayDataset(AugmentedDataset):
    """Images held in memory as one uint8 array (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: List[str],
                 transform: Callable, seed: int):
        super().__init__(labels, classes, transform, seed)
        self.images = images

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


# ---------------------------------------------------------------- ImageNet

def _is_listed_file(entry: os.DirEntry) -> bool:
    return not entry.name.startswith('.') and entry.is_file()


def _class_folders(split_dir: str) -> List[str]:
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f'{split_dir}: split folder not found (expected <synset>/ image folders in it)')
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))


def scan_class_folders(data_path: str, mode: str) -> Tuple[List[str], List[int], List[str]]:
    """(paths, labels, classes) of `mode`'s class-folder layout.

    Classes are the sorted synset folders of train/ (of val/ when there is no
    train/ folder), so train and val share indices.
    """
    split_dir = os.path.join(data_path, mode)
    train_dir = os.path.join(data_path, 'train')
    split_classes = _class_folders(split_dir)
    classes = _class_folders(train_dir) if os.path.isdir(train_dir) else split_classes
    if not split_classes:
        raise ValueError(f'{split_dir}: no class folders in it')
    index_of = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in split_classes:
        if name not in index_of:
            raise ValueError(f'{os.path.join(split_dir, name)}: class folder absent from {train_dir}')
        with os.scandir(os.path.join(split_dir, name)) as entries:
            files = sorted(e.path for e in entries if _is_listed_file(e))
        paths += files
        labels += [index_of[name]] * len(files)
    return paths, labels, classes


def read_list_file(list_path: str, root: Optional[str] = None) -> Tuple[List[str], List[int]]:
    """(relative paths, labels) from a PaddleViT list file of 'path label' lines. With
    `root`, a path that leads outside it (absolute, or through '..') is a ValueError."""
    paths, labels = [], []
    with open(list_path, 'r') as infile:
        for number, line in enumerate(infile, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit() or int(parts[1]) < 0:
                raise ValueError(f'{list_path}:{number}: expected "relative/path label", got {line.strip()!r}')
            path = parts[0].strip()
            if root is not None and not _inside(root, path):
                raise ValueError(f'{list_path}:{number}: {path!r} lies outside DATA.DATA_PATH {root} (set '
                                 f'DATA.ALLOW_OUTSIDE_PATHS True to read it)')
            paths.append(path)
            labels.append(int(parts[1]))
    return paths, labels


def _inside(root: str, relative: str) -> bool:
    """Whether `relative`, joined to `root`, stays within it (judged by the names alone,
    so that a symbolic link inside the data folder keeps working)."""
    if os.path.isabs(relative):
        return False
    root = os.path.normpath(os.path.abspath(root))
    return os.path.normpath(os.path.join(root, relative)).startswith(root + os.sep)


def read_list_layout(data_path: str, mode: str, allow_outside: bool = False
                     ) -> Tuple[List[str], List[int], List[str]]:
    """(paths, labels, classes) of `mode`'s list file; classes are the label numbers.

    The class count comes from train_list.txt when it exists, so val shares it.
    Paths must stay inside `data_path` unless `allow_outside`.
    """
    list_path = os.path.join(data_path, LIST_FILES[mode])
    paths, labels = read_list_file(list_path, None if allow_outside else data_path)
    if not labels:
        raise ValueError(f'{list_path}: lists no images')
    train_list = os.path.join(data_path, LIST_FILES['train'])
    train_labels = labels if mode == 'train' or not os.path.isfile(train_list) else read_list_file(train_list)[1]
    known = set(train_labels)
    absent = sorted(set(labels) - known)
    if absent:
        raise ValueError(f'{list_path}: label {absent[0]} does not occur in {train_list}')
    num_classes = max(known) + 1
    return [os.path.join(data_path, p) for p in paths], labels, [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------- CIFAR

def read_cifar(data_path: str, dataset: str, mode: str) -> Tuple[np.ndarray, List[int], List[str]]:
    """(uint8 images N x 32 x 32 x 3, labels, class names) from the python-version archive."""
    archive_name, url = CIFAR_ARCHIVES[dataset]
    archive = os.path.join(data_path, archive_name)
    if not os.path.isfile(archive):
        raise FileNotFoundError(f'{archive}: not found; put {archive_name} (from {url}) in DATA.DATA_PATH')
    if dataset == 'cifar10':
        folder, meta, names_key, labels_key = 'cifar-10-batches-py', 'batches.meta', b'label_names', b'labels'
        parts = [f'data_batch_{i}' for i in range(1, 6)] if mode == 'train' else ['test_batch']
    else:
        folder, meta, names_key, labels_key = 'cifar-100-python', 'meta', b'fine_label_names', b'fine_labels'
        parts = ['train'] if mode == 'train' else ['test']
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            def unpickle(name):  # arrays, lists and bytes only: the archive may come from anywhere
                member = f'{folder}/{name}'
                return fileio.unpickle(tar.extractfile(member), f'{archive}:{member}', encoding='bytes')
            classes = [name.decode() for name in unpickle(meta)[names_key]]
            batches = [unpickle(part) for part in parts]
    except fileio.UnsafeFileError:
        raise
    except (tarfile.TarError, KeyError, EOFError, OSError, fileio.FileFormatError) as err:
        raise ValueError(f'{archive}: not the python-version {dataset} archive ({err})') from None
    data = np.concatenate([batch[b'data'] for batch in batches])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    labels = [int(label) for batch in batches for label in batch[labels_key]]
    return images, labels, classes


# ---------------------------------------------------------------- public API

def get_dataset(config, mode: str) -> AugmentedDataset:
    """The `mode` ('train' or 'val') split of DATA.DATASET, with the recipe's transform.

    Raises FileNotFoundError / ValueError naming the path or key at fault.
    """
    if mode not in MODES:
        raise ValueError(f'dataset mode must be one of {", ".join(MODES)}, got {mode!r}')
    name, data_path = config.DATA.DATASET, config.DATA.DATA_PATH
    if name not in DATASETS:
        raise ValueError(f'DATA.DATASET = {name!r} is not one of {", ".join(DATASETS)}')
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f'{data_path}: DATA.DATA_PATH folder not found')
    transform = get_train_transforms(config) if mode == 'train' else build_val_transforms(config, on_device=True)
    if name in CIFAR_ARCHIVES:
        images, labels, classes = read_cifar(data_path, name, mode)
        return ArrayDataset(images, labels, classes, transform, config.SEED)
    if os.path.isfile(os.path.join(data_path, LIST_FILES[mode])):
        paths, labels, classes = read_list_layout(data_path, mode, config.DATA.ALLOW_OUTSIDE_PATHS)
    else:
        paths, labels, classes = scan_class_folders(data_path, mode)
    if not paths:
        raise ValueError(f'{os.path.join(data_path, mode)}: no image files in it')
    return ImageFileDataset(paths, labels, classes, transform, config.SEED, replace_unreadable=mode == 'train')


class EpochBatchSampler(paddle.io.DistributedBatchSampler):
    """Batches of (epoch, index) keys, this process's share of the dataset.

    shuffle: a permutation seeded from (seed, epoch). pad: repeat samples so
    every process gets the same count (training); without it, process r takes
    indices r, r + world, r + 2 * world, ... so every sample is used exactly
    once overall and shards differ in length by at most one. Iteration starts at
    batch `first_batch` of the epoch (its length stays the whole epoch's).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int,
                 shuffle: bool, drop_last: bool, pad: bool, seed: int):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, drop_last=drop_last)
        self.pad = pad
        self.seed = int(seed)
        self.first_batch = 0

    def shard(self) -> np.ndarray:
        """Dataset indices of this process for the current epoch, in order."""
        count = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(count)
        else:
            order = np.arange(count)
        if self.pad:
            order = np.resize(order, math.ceil(count / self.nranks) * self.nranks)
        return order[self.local_rank::self.nranks]

    def __iter__(self):
        indices = self.shard()
        stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        for start in range(self.first_batch * self.batch_size, stop, self.batch_size):
            yield [(self.epoch, int(i)) for i in indices[start:start + self.batch_size]]

    def __len__(self) -> int:
        size = len(self.shard())
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)


def collate(samples: Sequence[Sample]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batch arrays: uint8 images, labels, for each sample the index of its unreadable file or
    READ, and the rectangles to erase. (Always one entry per sample: Paddle's loader workers
    cannot send empty arrays.)"""
    images, labels, unreadable, boxes = zip(*samples)
    return (np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(unreadable, dtype=np.int64),
            np.stack(boxes))


AUTO_WORKERS = -1  # DATA.NUM_WORKERS: `default_workers`
MAX_AUTO_WORKERS = 8


def local_processes(world_size: int) -> int:
    """The training processes on this machine: paddle.distributed.launch says so
    (PADDLE_LOCAL_SIZE); main_multi_gpu.py's processes are all on one machine."""
    return int(os.environ.get('PADDLE_LOCAL_SIZE') or world_size)


def default_workers(processes: int, on_gpu: bool) -> int:
    """Loader workers per training process for DATA.NUM_WORKERS -1: with a GPU, the process's
    share of the cores less one for itself (up to 8), which keeps up with a GPU's appetite;
    on the CPU, whose cores compute the model, one worker overlaps the decoding with it
    (none on a single core)."""
    from runtime import usable_cores
    cores = usable_cores() // max(1, processes)
    if on_gpu:
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    return 1 if cores >= 2 else 0


def get_dataloader(config, dataset: AugmentedDataset, mode: str, multi_process: bool) -> paddle.io.DataLoader:
    """Loader of (images uint8 [B, 3, H, W], labels int64 [B], unreadable int64 [B], rectangles
    to erase int32 [B, K, 4]) batches, which transforms.DeviceFinish turns into normalised
    float32 images on the batch's device; `unreadable` is READ (-1) where the sample's file
    was read, else its dataset index: in training another sample stands in for it, in
    evaluation it is a placeholder to leave out.

    train: DATA.BATCH_SIZE, shuffled from (SEED, epoch), last incomplete batch
    dropped; with multi_process each process gets an equal (padded) share.
    val: DATA.BATCH_SIZE_EVAL, in order, nothing dropped; with multi_process the
    shards are NOT padded (process r gets samples r, r + world, ...), so every
    sample is evaluated exactly once overall but processes may run one batch
    fewer than others: gather results after the loop, not per batch.
    Workers (DATA.NUM_WORKERS; -1: `default_workers`) persist across epochs and ignore stop signals
    (SIGTERM, SIGINT: the training process handles them); call
    ``set_epoch(loader, epoch)`` before each epoch.
    """
    if mode not in MODES:
        raise ValueError(f'dataloader mode must be one of {", ".join(MODES)}, got {mode!r}')
    if multi_process:
        num_replicas, rank = paddle.distributed.get_world_size(), paddle.distributed.get_rank()
    else:
        num_replicas, rank = 1, 0
    training = mode == 'train'
    batch_size = config.DATA.BATCH_SIZE if training else config.DATA.BATCH_SIZE_EVAL
    if training and len(dataset) < batch_size * num_replicas:
        raise ValueError(f'the training set has {len(dataset)} samples, fewer than one batch per process '
                         f'(DATA.BATCH_SIZE = {batch_size} x {num_replicas} processes)')
    sampler = EpochBatchSampler(dataset, batch_size, num_replicas, rank, shuffle=training,
                                drop_last=training, pad=training, seed=config.SEED)
    workers = config.DATA.NUM_WORKERS
    if workers == AUTO_WORKERS:
        workers = default_workers(local_processes(num_replicas), paddle.get_device().startswith('gpu'))
    return paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                collate_fn=collate,
                                persistent_workers=workers > 0, return_list=True,
                                worker_init_fn=functools.partial(loader_worker_init, parent=os.getpid())
                                if workers > 0 else None)


def set_epoch(loader: paddle.io.DataLoader, epoch: int, first_batch: int = 0) -> None:
    """Select `epoch`'s shuffle order and augmentation, starting at batch
    `first_batch` of it; call before iterating `loader`."""
    sampler: Optional[EpochBatchSampler] = getattr(loader, 'batch_sampler', None)
    if not isinstance(sampler, EpochBatchSampler):
        raise TypeError('set_epoch needs a loader made by datasets.get_dataloader')
    sampler.set_epoch(int(epoch))
    sampler.first_batch = int(first_batch)
