"""Datasets and loaders: layouts, labels, bad files, CIFAR archives, sharding, reproducibility."""

import io
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

import datasets
from config import get_config

SYNSETS = ['n03', 'n01', 'n02']  # created out of order; labels follow the sorted names


def write_image(path, seed: int, mode: str = 'RGB', size=(24, 18), fmt: str = 'JPEG') -> None:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, fmt)


def make_folder_layout(root, per_class=(4, 2)) -> None:
    for split, count in zip(('train', 'val'), per_class):
        for c, synset in enumerate(SYNSETS):
            for i in range(count):
                write_image(os.path.join(root, split, synset, f'{synset}_{i}.JPEG'), seed=100 * c + i)


def make_config(root, dataset='imagenet2012', **data):
    config = get_config()
    config.defrost()
    config.DATA.DATASET = dataset
    config.DATA.DATA_PATH = str(root)
    config.DATA.IMAGE_SIZE = 16
    config.DATA.NUM_WORKERS = 0
    config.DATA.BATCH_SIZE = 2
    config.DATA.BATCH_SIZE_EVAL = 2
    for key, value in data.items():
        config.DATA[key] = value
    return config


def test_class_folders_label_by_sorted_synset_in_both_splits(tmp_path):
    make_folder_layout(tmp_path)
    train = datasets.get_dataset(make_config(tmp_path), 'train')
    val = datasets.get_dataset(make_config(tmp_path), 'val')
    assert train.classes == val.classes == ['n01', 'n02', 'n03']
    assert train.num_classes == val.num_classes == 3
    for dataset in (train, val):
        for path, label in zip(dataset.paths, dataset.labels):
            assert os.path.basename(os.path.dirname(path)) == dataset.classes[label]
    assert len(train) == 12 and len(val) == 6
    image, label, unreadable, boxes = val[0]
    assert image.shape == (3, 16, 16) and image.dtype == np.uint8 and label == 0  # normalised on the device
    assert unreadable == datasets.READ and boxes.tolist() == [[0, 0, 0, 0]]


def test_val_uses_train_class_indices_when_val_lacks_a_class(tmp_path):
    make_folder_layout(tmp_path)
    for name in os.listdir(tmp_path / 'val' / 'n01'):
        os.remove(tmp_path / 'val' / 'n01' / name)
    os.rmdir(tmp_path / 'val' / 'n01')
    val = datasets.get_dataset(make_config(tmp_path), 'val')
    assert sorted(set(val.labels)) == [1, 2] and val.num_classes == 3


def test_list_files_give_paths_and_labels(tmp_path):
    for i in range(4):
        write_image(tmp_path / 'imgs' / f'{i}.png', seed=i, fmt='PNG')
    (tmp_path / 'train_list.txt').write_text('imgs/0.png 0\nimgs/1.png 4\n\nimgs/2.png 2\n')
    (tmp_path / 'val_list.txt').write_text('imgs/3.png 4\n')
    train = datasets.get_dataset(make_config(tmp_path), 'train')
    val = datasets.get_dataset(make_config(tmp_path), 'val')
    assert train.labels == [0, 4, 2] and train.paths[1] == os.path.join(str(tmp_path), 'imgs/1.png')
    assert train.num_classes == val.num_classes == 5
    assert val[0][1] == 4


def test_list_file_with_a_bad_line_names_file_and_line(tmp_path):
    (tmp_path / 'train_list.txt').write_text('a.png 0\nb.png x\n')
    with pytest.raises(ValueError, match=r'train_list.txt:2'):
        datasets.get_dataset(make_config(tmp_path), 'train')


@pytest.mark.parametrize('entry', ['../outside.png', 'imgs/../../outside.png', '/etc/passwd'])
def test_list_entries_outside_the_data_folder_are_refused_unless_allowed(tmp_path, entry):
    data = tmp_path / 'data'
    (data / 'imgs').mkdir(parents=True)
    write_image(str(tmp_path / 'outside.png'), seed=1)
    write_image(str(data / 'imgs' / 'in.png'), seed=2)
    (data / 'train_list.txt').write_text(f'imgs/in.png 0\nimgs/./in.png 0\n{entry} 1\n')
    with pytest.raises(ValueError, match=rf'train_list.txt:3: {re.escape(repr(entry))} lies outside DATA.DATA_PATH'):
        datasets.get_dataset(make_config(data), 'train')
    allowed = make_config(data)
    allowed.DATA.ALLOW_OUTSIDE_PATHS = True
    assert len(datasets.get_dataset(allowed, 'train')) == 3


def test_val_list_label_absent_from_train_list_is_an_error(tmp_path):
    (tmp_path / 'train_list.txt').write_text('a.png 0\nb.png 1\n')
    (tmp_path / 'val_list.txt').write_text('c.png 7\n')
    with pytest.raises(ValueError, match=r'val_list.txt: label 7'):
        datasets.get_dataset(make_config(tmp_path), 'val')


def test_val_class_absent_from_train_is_an_error_naming_the_folder(tmp_path):
    make_folder_layout(tmp_path)
    write_image(tmp_path / 'val' / 'n99' / 'x.JPEG', seed=0)
    with pytest.raises(ValueError, match=r'n99: class folder absent from'):
        datasets.get_dataset(make_config(tmp_path), 'val')


def test_missing_split_empty_dataset_and_unknown_dataset_are_clear_errors(tmp_path):
    (tmp_path / 'train').mkdir()
    with pytest.raises(FileNotFoundError, match=r'val: split folder not found'):
        datasets.get_dataset(make_config(tmp_path), 'val')
    with pytest.raises(ValueError, match=r'train: no class folders'):
        datasets.get_dataset(make_config(tmp_path), 'train')
    (tmp_path / 'train' / 'n01').mkdir()
    with pytest.raises(ValueError, match=r'train: no image files'):
        datasets.get_dataset(make_config(tmp_path), 'train')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        datasets.get_dataset(make_config(tmp_path / 'nowhere'), 'train')
    with pytest.raises(ValueError, match='DATA.DATASET'):
        datasets.get_dataset(make_config(tmp_path, dataset='mnist'), 'train')
    with pytest.raises(ValueError, match='test'):
        datasets.get_dataset(make_config(tmp_path), 'test')


def test_each_kind_of_bad_file_is_skipped_with_one_warning(tmp_path):
    make_folder_layout(tmp_path, per_class=(2, 1))
    train_dir = tmp_path / 'train' / 'n01'
    good = io.BytesIO()
    Image.new('RGB', (64, 64), (9, 9, 9)).save(good, 'JPEG')
    (train_dir / 'a_truncated.JPEG').write_bytes(good.getvalue()[:300])
    (train_dir / 'b_empty.JPEG').write_bytes(b'')
    (train_dir / 'c_text.JPEG').write_text('not an image')
    datasets._warned_files.clear()
    dataset = datasets.get_dataset(make_config(tmp_path), 'train')
    bad_names = {'a_truncated.JPEG', 'b_empty.JPEG', 'c_text.JPEG'}
    with pytest.warns(RuntimeWarning) as caught:
        samples = [dataset[i] for i in range(len(dataset))] + [dataset[(1, i)] for i in range(len(dataset))]
    warned = [os.path.basename(str(w.message).split(':')[0]) for w in caught]
    assert sorted(warned) == sorted(bad_names), 'one warning per bad file, once'
    assert len(samples) == 2 * len(dataset)
    for index, path in enumerate(dataset.paths):
        if os.path.basename(path) in bad_names:
            # replaced by the next readable sample, with that sample's label
            assert samples[index][1] == dataset.labels[dataset.load_readable(index)[1]]
            assert os.path.basename(dataset.paths[dataset.load_readable(index)[1]]) not in bad_names
            assert samples[index][2] == index  # and reported
        else:
            assert samples[index][2] == datasets.READ


def test_unreadable_val_images_are_marked_by_the_loader(tmp_path):
    make_folder_layout(tmp_path, per_class=(2, 3))
    val_dir = tmp_path / 'val' / 'n01'
    (val_dir / 'a_broken.JPEG').write_bytes(b'')
    config = make_config(tmp_path)
    dataset = datasets.get_dataset(config, 'val')
    broken = dataset.paths.index(str(val_dir / 'a_broken.JPEG'))
    with pytest.warns(RuntimeWarning, match='a_broken.JPEG: left out'):
        loader = datasets.get_dataloader(config, dataset, 'val', multi_process=False)
        marks = np.concatenate([unreadable.numpy() for _, _, unreadable, _ in loader])
    assert marks.tolist() == [broken if i == broken else datasets.READ for i in range(len(dataset))]


@pytest.mark.parametrize('mode', ['CMYK', 'L', 'P', 'RGBA', 'LA', 'I;16'])
def test_non_rgb_images_become_rgb(tmp_path, mode):
    path = tmp_path / ('image.jpg' if mode == 'CMYK' else 'image.png')
    image = Image.new('RGB', (10, 8), (200, 100, 50)).convert(mode)
    if mode == 'P':
        image.info['transparency'] = 0
    image.save(path)
    loaded = datasets.load_rgb(str(path))
    assert loaded.mode == 'RGB' and loaded.size == (10, 8)
    if mode == 'L':
        gray = np.asarray(image)[0, 0]
        assert np.asarray(loaded)[0, 0].tolist() == [gray] * 3


def make_cifar_archive(root, name: str, classes: int):
    folder, parts, meta, names_key, labels_key = {
        'cifar10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'],
                    'batches.meta', b'label_names', b'labels'),
        'cifar100': ('cifar-100-python', ['train', 'test'], 'meta', b'fine_label_names', b'fine_labels'),
    }[name]
    archive = root / datasets.CIFAR_ARCHIVES[name][0]
    rng = np.random.default_rng(0)
    with tarfile.open(archive, 'w:gz') as tar:
        def add(member, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f'{folder}/{member}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add(meta, {names_key: [f'class{i}'.encode() for i in range(classes)]})
        for part in parts:
            add(part, {b'data': (rng.random((3, 3072)) * 255).astype(np.uint8),
                       labels_key: [0, classes - 1, 1]})


@pytest.mark.parametrize('name, classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_archives_are_read(tmp_path, name, classes):
    make_cifar_archive(tmp_path, name, classes)
    train = datasets.get_dataset(make_config(tmp_path, dataset=name), 'train')
    val = datasets.get_dataset(make_config(tmp_path, dataset=name), 'val')
    assert len(train) == (15 if name == 'cifar10' else 3) and len(val) == 3
    assert train.num_classes == classes and train.classes[1] == 'class1'
    assert val.labels == [0, classes - 1, 1]
    assert val[1][0].shape == (3, 16, 16)


def test_missing_cifar_archive_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'put cifar-100-python.tar.gz .* in DATA.DATA_PATH'):
        datasets.get_dataset(make_config(tmp_path, dataset='cifar100'), 'train')


def batches(loader):
    return [(images.numpy(), labels.numpy(), boxes.numpy()) for images, labels, _, boxes in loader]


def test_train_loader_shuffles_by_epoch_and_drops_the_last_batch(tmp_path):
    make_folder_layout(tmp_path, per_class=(3, 1))  # 9 samples, batch 2 -> 4 batches
    config = make_config(tmp_path)
    dataset = datasets.get_dataset(config, 'train')
    loader = datasets.get_dataloader(config, dataset, 'train', multi_process=False)
    orders = []
    for epoch in (0, 1, 0):
        datasets.set_epoch(loader, epoch)
        orders.append([index for batch in loader.batch_sampler for _, index in batch])
    assert len(loader) == 4 and all(len(order) == 8 for order in orders)
    assert orders[0] == orders[2] != orders[1]
    assert len(set(orders[0])) == 8


def test_val_shards_see_every_sample_exactly_once(tmp_path):
    make_folder_layout(tmp_path, per_class=(1, 3))  # 9 val samples
    dataset = datasets.get_dataset(make_config(tmp_path), 'val')
    seen = []
    for rank in range(4):
        sampler = datasets.EpochBatchSampler(dataset, 2, num_replicas=4, rank=rank, shuffle=False,
                                             drop_last=False, pad=False, seed=0)
        shard = [index for batch in sampler for _, index in batch]
        assert len(sampler) == -(-len(shard) // 2)
        seen += shard
    assert sorted(seen) == list(range(9))


def test_train_shards_are_padded_to_equal_length_and_cover_the_set(tmp_path):
    make_folder_layout(tmp_path, per_class=(3, 1))  # 9 samples over 2 processes
    dataset = datasets.get_dataset(make_config(tmp_path), 'train')
    shards = [datasets.EpochBatchSampler(dataset, 2, num_replicas=2, rank=rank, shuffle=True,
                                         drop_last=False, pad=True, seed=3).shard() for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(np.concatenate(shards)) == set(range(9))


def test_batches_are_identical_with_and_without_workers_and_after_resume(tmp_path):
    make_folder_layout(tmp_path, per_class=(3, 1))
    config = make_config(tmp_path)
    dataset = datasets.get_dataset(config, 'train')
    single = datasets.get_dataloader(config, dataset, 'train', multi_process=False)
    datasets.set_epoch(single, 1)
    expected = batches(single)

    config.DATA.NUM_WORKERS = 2
    workers = datasets.get_dataloader(config, datasets.get_dataset(config, 'train'), 'train', multi_process=False)
    datasets.set_epoch(workers, 0)
    first_epoch = batches(workers)
    datasets.set_epoch(workers, 1)
    resumed = batches(workers)

    assert len(resumed) == len(expected) == 4
    for (images, labels, boxes), (want_images, want_labels, want_boxes) in zip(resumed, expected):
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(boxes, want_boxes)  # the rectangles to erase too
    assert not np.array_equal(first_epoch[0][0], expected[0][0])


def test_val_loader_keeps_order_and_every_sample(tmp_path):
    make_folder_layout(tmp_path, per_class=(1, 3))
    config = make_config(tmp_path, BATCH_SIZE_EVAL=4)
    loader = datasets.get_dataloader(config, datasets.get_dataset(config, 'val'), 'val', multi_process=False)
    labels = np.concatenate([labels for _, labels, _ in batches(loader)])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_set_epoch_rejects_foreign_loaders():
    with pytest.raises(TypeError, match='get_dataloader'):
        datasets.set_epoch(object(), 0)


@pytest.mark.parametrize('cores, processes, on_gpu, expected', [
    (64, 8, True, 7), (96, 4, True, 8), (4, 1, True, 3), (2, 2, True, 1),   # GPU: the share less one, up to 8
    (16, 1, False, 1), (2, 1, False, 1), (1, 1, False, 0),                   # CPU: the cores compute
])
def test_the_default_worker_count_follows_the_cores_per_process(monkeypatch, cores, processes, on_gpu, expected):
    import runtime
    monkeypatch.setattr(runtime, 'usable_cores', lambda: cores)
    assert datasets.default_workers(processes, on_gpu) == expected


def test_launched_processes_count_the_local_ones(monkeypatch):
    monkeypatch.setenv('PADDLE_LOCAL_SIZE', '8')
    assert datasets.local_processes(world_size=16) == 8
    monkeypatch.delenv('PADDLE_LOCAL_SIZE')
    assert datasets.local_processes(world_size=4) == 4
