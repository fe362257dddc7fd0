"""Fine-tuning: the shipped recipes, SGD and the light crop, a checkpoint fine-tuned to
another class count and image size, and ImageNet-22k's class count and held-out lists."""

import argparse
import glob
import importlib.util
import os
import re

import numpy as np
import paddle
import pytest
import yaml
from PIL import Image

import cvt
import datasets
import engine
from config import get_config, update_config, validate_config
from tiny_training import DEMO_CONFIG, ROOT, tiny_config, tiny_settings
from transforms import ResizeRandomCrop, build_train_transforms
from utils import UsageError

CONFIGS = os.path.join(ROOT, 'configs')
TRAIN_LOSS = re.compile(r'Train Loss: ([\d.]+)')


def leaf_keys(tree, prefix=''):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f'{prefix}{key}.')
        elif key != 'BASE':
            yield prefix + key


def test_every_config_loads_and_every_key_it_sets_is_read_by_the_code():
    sources = ''
    for path in glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'tools', '*.py')):
        if os.path.basename(path) != 'config.py':
            with open(path) as source:
                sources += source.read()
    for path in sorted(glob.glob(os.path.join(CONFIGS, '*.yaml'))):
        get_config(path)
        with open(path) as config_file:
            keys = set(leaf_keys(yaml.safe_load(config_file)))
        for key in keys:
            # read as config.DATA.X, data.X, train.OPTIMIZER.X, opt.X, m.X, ...
            assert re.search(r'\.' + key.split('.')[-1] + r'\b', sources), f'{path}: nothing reads {key}'


@pytest.mark.parametrize('name, depth', [('finetune-cvt-13-224to384', [1, 2, 10]),
                                         ('finetune-cvt-21-224to384', [1, 4, 16])])
def test_224_to_384_configs_hold_the_official_fine_tuning_recipe(name, depth):
    config = get_config(os.path.join(CONFIGS, f'{name}.yaml'))
    assert config.MODEL.DEPTH == depth and config.MODEL.NUM_CLASSES == 1000
    assert (config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT) == (384, 1.0)
    train = config.TRAIN
    assert (train.OPTIMIZER.NAME, train.OPTIMIZER.MOMENTUM, train.BASE_LR, train.LINEAR_SCALED_LR) == \
        ('SGD', 0.9, 0.003, 512)
    assert (train.NUM_EPOCHS, train.WEIGHT_DECAY, train.GRAD_CLIP, train.END_LR) == (8, 0.0, 1.0, 0.0)
    assert train.CROP_MODE == 'resize_random' and not train.RAND_AUGMENT and train.MIXUP_PROB == 0
    assert train.RANDOM_ERASE_PROB == 0 and train.SMOOTHING == 0 and train.COLOR_JITTER == 0


def test_22k_configs_have_21841_classes_at_224():
    for name in ('cvt-13-224x224-22k', 'cvt-21-224x224-22k', 'cvt-w24-224x224-22k'):
        config = get_config(os.path.join(CONFIGS, f'{name}.yaml'))
        assert (config.MODEL.NUM_CLASSES, config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT) == (21841, 224, 0.875)


def test_sgd_applies_momentum_and_l2_decay_to_weights_only():
    config = tiny_config('/unused', '/unused', {
        'TRAIN.OPTIMIZER.NAME': 'SGD', 'TRAIN.OPTIMIZER.MOMENTUM': 0.9, 'TRAIN.WEIGHT_DECAY': 0.1})
    model = cvt.build_cvt(config)
    optimizer = engine.build_optimizer(config, model, 0.5)
    params = dict(model.named_parameters())
    x = paddle.randn([2, 3, 32, 32])
    velocity = {}
    for _ in range(2):
        model(x).square().mean().backward()
        expected = {}
        for key in ('head.weight', 'head.bias', 'stages.0.patch_embed.proj.weight', 'stages.2.cls_token'):
            decay = 0.1 if key in ('head.weight', 'stages.0.patch_embed.proj.weight') else 0.0
            value = params[key].numpy()
            velocity[key] = 0.9 * velocity.get(key, 0.0) + params[key].grad.numpy() + decay * value
            expected[key] = value - 0.5 * velocity[key]
        optimizer.step()
        optimizer.clear_grad()
        for key, value in expected.items():
            np.testing.assert_allclose(params[key].numpy(), value, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_named():
    config = tiny_config('/unused', '/unused', {'TRAIN.OPTIMIZER.NAME': 'Lion'})
    with pytest.raises(UsageError, match="TRAIN.OPTIMIZER.NAME = 'Lion' is not one of AdamW, SGD"):
        engine.build_optimizer(config, cvt.build_cvt(config), 1e-3)


def test_resize_random_crop_is_a_random_window_of_the_resized_square():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 80, 3), dtype=np.uint8))
    crop = ResizeRandomCrop(64, interpolation='bicubic')
    resized = np.asarray(image.resize((96, 96), Image.BICUBIC))
    offsets = set()
    for seed in range(6):
        out = np.asarray(crop(image, np.random.default_rng(seed)))
        assert out.shape == (64, 64, 3)
        found = [(top, left) for top in range(33) for left in range(33)
                 if np.array_equal(resized[top:top + 64, left:left + 64], out)]
        assert found
        offsets.add(found[0])
    assert len(offsets) > 1
    config = tiny_config('/unused', '/unused', {'TRAIN.CROP_MODE': 'resize_random'})
    assert 'ResizeRandomCrop(size=32' in repr(build_train_transforms(config))
    with pytest.raises(ValueError, match="TRAIN.CROP_MODE = 'centre'"):
        validate_config(tiny_config('/unused', '/unused', {'TRAIN.CROP_MODE': 'centre'}))


def make_colour_classes(folder, colours, train_per_class=8, val_per_class=3, size=36):
    """Class folders train/<name>/ and val/<name>/ of noisy images of one colour per class."""
    rng = np.random.RandomState(len(colours))
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for name, colour in colours.items():
            os.makedirs(os.path.join(folder, split, name))
            for k in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, split, name, f'{k}.png'))
    return folder


def test_checkpoint_fine_tunes_to_another_class_count_and_image_size(tmp_path, monkeypatch):
    four = make_colour_classes(str(tmp_path / 'four'), {
        'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 60, 220), 'yellow': (230, 220, 40)})
    three = make_colour_classes(str(tmp_path / 'three'), {
        'cyan': (40, 210, 220), 'grey': (128, 128, 128), 'purple': (150, 40, 170)})
    pretrained = engine.run(tiny_config(four, str(tmp_path / 'pretrain'), {
        'MODEL.NUM_CLASSES': 4, 'TRAIN.NUM_EPOCHS': 1}))['checkpoint']

    # the fine-tuning recipe as shipped, on the tiny model; the LR made large for a few steps
    tree = {'BASE': [DEMO_CONFIG, os.path.join(CONFIGS, 'recipe-finetune.yaml')]}
    for key, value in tiny_settings(three, str(tmp_path / 'finetune'), {
            'TRAIN.NUM_EPOCHS': 4, 'TRAIN.LINEAR_SCALED_LR': None, 'TRAIN.BASE_LR': 0.05}).items():
        *parents, leaf = key.split('.')
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = tmp_path / 'finetune.yaml'
    cfg.write_text(yaml.safe_dump(tree))
    # what main_single_gpu.py makes of: -cfg finetune.yaml -pretrained CKPT -num_classes 3 -image_size 48
    args = argparse.Namespace(cfg=str(cfg), pretrained=pretrained[:-len('.pdparams')], num_classes=3,
                              image_size=48)
    config = update_config(get_config(), args)
    assert config.TRAIN.OPTIMIZER.NAME == 'SGD' and config.TRAIN.CROP_MODE == 'resize_random'

    started = {}
    build_trainer = engine.build_trainer

    def remember_start(config, model, *rest):
        started.update({k: v.numpy().copy() for k, v in model.state_dict().items()})
        return build_trainer(config, model, *rest)

    monkeypatch.setattr(engine, 'build_trainer', remember_start)
    result = engine.run(config)

    source = {k: v.numpy() for k, v in paddle.load(pretrained).items()}
    assert set(started) == set(source)
    for key, value in source.items():
        if key.startswith('head.'):
            assert started[key].shape[-1] == 3 and value.shape[-1] == 4
        else:
            np.testing.assert_array_equal(started[key], value, err_msg=key)
    # a new head, as the model initialises one: zero bias, weights of std 0.02
    assert not started['head.bias'].any()
    assert 0.01 < started['head.weight'].std() < 0.03
    log = (tmp_path / 'finetune' / 'log.txt').read_text()
    assert 'classifier head (48, 4) does not fit the model (MODEL.NUM_CLASSES = 3); left out' in log
    losses = [float(v) for v in TRAIN_LOSS.findall(log)]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert result['val']['acc1'] > 1 / 3


def test_21841_class_folders_give_21841_classes_in_sorted_synset_order(tmp_path):
    synsets = [f'n{i:08d}' for i in range(21841)]
    for synset in synsets:
        os.makedirs(tmp_path / 'train' / synset)
    picked = (0, 12345, 21840)
    image = Image.new('RGB', (40, 40), (90, 120, 150))
    for split in ('train', 'val'):
        for index in picked:
            os.makedirs(tmp_path / split / synsets[index], exist_ok=True)
            image.save(tmp_path / split / synsets[index] / f'{split}.png')
    config = get_config(os.path.join(CONFIGS, 'cvt-13-224x224-22k.yaml'))
    config.defrost()
    config.DATA.DATA_PATH = str(tmp_path)
    for split in ('train', 'val'):
        dataset = datasets.get_dataset(config, split)
        assert dataset.num_classes == config.MODEL.NUM_CLASSES == 21841
        assert dataset.labels == list(picked)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_lists_hold_out_a_val_set_that_the_list_layout_reads(tmp_path):
    tool = load_tool('make_split_lists')
    image = Image.new('RGB', (40, 40), (90, 120, 150))
    counts = {'n02': 6, 'n01': 5, 'n03': 1}
    for synset, count in counts.items():
        os.makedirs(tmp_path / 'train' / synset)
        for k in range(count):
            image.save(tmp_path / 'train' / synset / f'{k}.JPEG')
    assert tool.main(['-data_path', str(tmp_path), '-val_per_class', '2']) == 0
    assert (tmp_path / 'classes.txt').read_text().split() == ['n01', 'n02', 'n03']
    config = tiny_config(str(tmp_path), str(tmp_path))
    train, val = datasets.get_dataset(config, 'train'), datasets.get_dataset(config, 'val')
    assert train.num_classes == val.num_classes == 3
    assert sorted(val.labels) == [0, 0, 1, 1]  # two of each class; n03 keeps its only image for training
    assert sorted(train.labels) == [0, 0, 0, 1, 1, 1, 1, 2]
    assert not set(train.paths) & set(val.paths)
    assert all(os.path.isfile(path) for path in train.paths + val.paths)
    # the same seed gives the same split; existing lists are kept
    first = (tmp_path / 'val_list.txt').read_text()
    with pytest.raises(SystemExit) as stop:
        tool.main(['-data_path', str(tmp_path)])
    assert stop.value.code == 2 and (tmp_path / 'val_list.txt').read_text() == first
    os.remove(tmp_path / 'train_list.txt')
    os.remove(tmp_path / 'val_list.txt')
    os.remove(tmp_path / 'classes.txt')
    tool.main(['-data_path', str(tmp_path), '-val_per_class', '2'])
    assert (tmp_path / 'val_list.txt').read_text() == first
