"""Does the data loader keep up? Images per second of the training loader, per worker, and
the bytes each batch moves from the workers (and to a GPU).

    python tools/benchmark_loader.py -cfg configs/cvt-13-224x224.yaml -workers 1 2 4 [-data_path DIR]

Runs the real loader of the training (datasets.get_dataloader: decoding, the recipe's
augmentation, collation, the transfer from the worker processes) over -batches batches
for each worker count, after one untimed batch that starts the workers. Without
-data_path it draws a synthetic ImageNet-format folder of photo-like 500x375 JPEGs.
Compare the figure with the images per second a training step consumes
(tools/benchmark.py -mode train): a loader below it leaves the GPU waiting.
"""

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools._common import fail, load_config  # noqa: E402
from utils import add_opts_argument, int_at_least  # noqa: E402


def synthetic_folder(folder: str, images: int, classes: int = 4, seed: int = 0) -> str:
    """An ImageNet-format folder (train/<synset>/*.JPEG) of photo-like JPEGs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500] / 500
    for i in range(images):
        waves = [np.sin(x * rng.uniform(2, 12) + y * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
        pixels = np.stack(waves, axis=-1) * 100 + 128 + rng.normal(0, 12, (375, 500, 3))
        path = os.path.join(folder, 'train', f'n{i % classes:08d}', f'{i:06d}.JPEG')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
        with open(path, 'wb') as out:
            out.write(buffer.getvalue())
    return folder


def batch_bytes(batch) -> int:
    """The bytes of one batch's arrays, as the workers send them."""
    return sum(part.numpy().nbytes for part in batch)


def measure(config, workers: int, batches: int) -> tuple:
    """(images per second, bytes per batch) of the training loader with `workers` workers."""
    import datasets
    config.defrost()
    config.DATA.NUM_WORKERS = workers
    config.freeze()
    dataset = datasets.get_dataset(config, 'train')
    loader = datasets.get_dataloader(config, dataset, 'train', multi_process=False)
    datasets.set_epoch(loader, 1)
    iterator = iter(loader)
    size = batch_bytes(next(iterator))  # starts the workers, untimed
    start, done = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator, None)
        if batch is None:
            fail(f'the data has fewer than {batches + 1} batches of {config.DATA.BATCH_SIZE}: '
                 f'give fewer -batches or a smaller -batch_size')
        done += batch[0].shape[0]
    return done / (time.perf_counter() - start), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-cfg', required=True, help='config yaml (its DATA and augmentation settings)')
    add_opts_argument(parser)
    parser.add_argument('-data_path', default=None, help='ImageNet-format folder; default: synthetic JPEGs')
    parser.add_argument('-batch_size', type=int_at_least(1), default=32)
    parser.add_argument('-batches', type=int_at_least(1), default=8, help='timed batches per worker count')
    parser.add_argument('-workers', type=int_at_least(0), nargs='+', default=[1, 2])
    args = parser.parse_args()
    config = load_config(args.cfg, args.opts)
    config.defrost()
    config.DATA.BATCH_SIZE = args.batch_size
    with tempfile.TemporaryDirectory() as scratch:
        if args.data_path:
            config.DATA.DATA_PATH = args.data_path
        else:
            config.DATA.DATA_PATH = synthetic_folder(scratch, args.batch_size * (args.batches + 1))
        config.freeze()
        print(f'{config.DATA.DATA_PATH}: batch {args.batch_size}, image {config.DATA.IMAGE_SIZE}, '
              f'{runtime.usable_cores()} cores, {runtime.cpu_model()[1]}')
        for workers in args.workers:
            rate, size = measure(config, workers, args.batches)
            per_worker = f'{rate / workers:7.1f} img/s per worker' if workers else ' ' * 24
            print(f'{workers:2d} workers: {rate:7.1f} img/s, {per_worker}, {size / 2 ** 20:6.2f} MiB per batch')


if __name__ == '__main__':
    main()
