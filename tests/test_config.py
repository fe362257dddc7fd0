"""Configuration: BASE inheritance, the shipped recipes, and one-line errors."""

import argparse
import os

import pytest

from config import ConfigError, get_config, update_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('name, size, crop, depth, dims', [
    ('cvt-13-224x224', 224, 0.875, [1, 2, 10], [64, 192, 384]),
    ('cvt-13-384x384', 384, 1.0, [1, 2, 10], [64, 192, 384]),
    ('cvt-21-224x224', 224, 0.875, [1, 4, 16], [64, 192, 384]),
    ('cvt-21-384x384', 384, 1.0, [1, 4, 16], [64, 192, 384]),
    ('cvt-w24-384x384', 384, 1.0, [2, 2, 20], [192, 768, 1024]),
])
def test_shipped_configs_hold_model_and_official_recipe(name, size, crop, depth, dims):
    config = get_config(os.path.join(CONFIGS, f'{name}.yaml'))
    assert (config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT, config.DATA.INTERPOLATION) == (size, crop, 'bicubic')
    assert config.MODEL.DEPTH == depth and config.MODEL.DIM_EMBED == dims
    assert config.MODEL.CLS_TOKEN == [False, False, True]
    train = config.TRAIN
    assert (train.NUM_EPOCHS, train.WARMUP_EPOCHS, train.WARMUP_START_LR, train.END_LR) == (300, 5, 1e-6, 1e-5)
    assert (train.MIXUP_ALPHA, train.CUTMIX_ALPHA, train.MIXUP_PROB, train.MIXUP_SWITCH_PROB) == (0.8, 1.0, 1.0, 0.5)
    assert (train.SMOOTHING, train.COLOR_JITTER, train.RAND_AUGMENT) == (0.1, 0.4, 'rand-m9-mstd0.5-inc1')
    assert (train.RANDOM_ERASE_PROB, train.RANDOM_ERASE_MODE, train.RANDOM_ERASE_COUNT) == (0.25, 'pixel', 1)
    assert config.AMP is True
    if name.startswith(('cvt-w24', 'cvt-21')):  # the official CvT-21 and W24 yaml files share this recipe
        assert (train.BASE_LR, train.LINEAR_SCALED_LR, train.WEIGHT_DECAY) == (1.25e-4, 128, 0.1)
    else:
        assert (train.BASE_LR, train.LINEAR_SCALED_LR, train.WEIGHT_DECAY) == (2.5e-4, 256, 0.05)


def test_base_files_merge_first_and_child_overrides(tmp_path):
    (tmp_path / 'sub').mkdir()
    write(tmp_path / 'parent.yaml', 'DATA:\n  IMAGE_SIZE: 96\n  CROP_PCT: 0.9\nTRAIN:\n  BASE_LR: 0.1\n')
    child = write(tmp_path / 'sub' / 'child.yaml', "BASE: ['../parent.yaml']\nDATA:\n  IMAGE_SIZE: 128\n")
    config = get_config(child)
    assert (config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT, config.TRAIN.BASE_LR) == (128, 0.9, 0.1)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / 'bad.yaml', 'MODEL:\n  DEPTHS: [1, 2, 10]\n')
    with pytest.raises(ConfigError) as err:
        get_config(path)
    message = str(err.value)
    assert 'bad.yaml' in message and 'MODEL.DEPTHS' in message and '\n' not in message


def test_unknown_key_in_base_file_names_the_base_file(tmp_path):
    write(tmp_path / 'parent.yaml', 'TRAIN:\n  LR: 0.1\n')
    child = write(tmp_path / 'child.yaml', "BASE: ['parent.yaml']\n")
    with pytest.raises(ConfigError, match=r'parent\.yaml.*TRAIN\.LR'):
        get_config(child)


def test_per_stage_list_of_wrong_length_is_an_error(tmp_path):
    path = write(tmp_path / 'short.yaml', 'MODEL:\n  NUM_HEADS: [1, 3]\n')
    with pytest.raises(ConfigError, match=r'short\.yaml.*MODEL\.NUM_HEADS.*NUM_STAGES = 3'):
        get_config(path)


def test_more_stages_need_every_per_stage_key(tmp_path):
    path = write(tmp_path / 'four.yaml', 'MODEL:\n  NUM_STAGES: 4\n  DEPTH: [1, 1, 1, 1]\n')
    with pytest.raises(ConfigError, match=r'four\.yaml: MODEL\.PATCH_SIZE'):
        get_config(path)


def test_missing_file_and_bad_yaml_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match='nope.yaml: config file not found'):
        get_config(str(tmp_path / 'nope.yaml'))
    broken = write(tmp_path / 'broken.yaml', 'MODEL:\n  DEPTH: [1, 2\n')
    with pytest.raises(ConfigError, match=r'broken\.yaml: line \d+ not valid yaml'):
        get_config(broken)
    typed = write(tmp_path / 'typed.yaml', 'DATA:\n  IMAGE_SIZE: large\n')
    with pytest.raises(ConfigError, match=r'typed\.yaml.*DATA\.IMAGE_SIZE'):
        get_config(typed)


def test_unsupported_values_are_named(tmp_path):
    method = write(tmp_path / 'm.yaml', "MODEL:\n  QKV_PROJ_METHOD: ['dw_bn', 'conv', 'dw_bn']\n")
    with pytest.raises(ConfigError, match=r"QKV_PROJ_METHOD\[1\] = 'conv'"):
        get_config(method)
    heads = write(tmp_path / 'h.yaml', 'MODEL:\n  NUM_HEADS: [1, 5, 6]\n')
    with pytest.raises(ConfigError, match=r'DIM_EMBED\[1\] = 192.*NUM_HEADS\[1\] = 5'):
        get_config(heads)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / 'a.yaml', "BASE: ['b.yaml']\n")
    write(tmp_path / 'b.yaml', "BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match='cycle'):
        get_config(str(tmp_path / 'a.yaml'))


def test_update_config_applies_paddlevit_flags():
    args = argparse.Namespace(
        cfg=os.path.join(CONFIGS, 'cvt-13-224x224.yaml'), dataset='cifar10', batch_size=32,
        image_size=160, data_path='/data/x', output='/tmp/out', ngpus=2, num_classes=10,
        pretrained='w.pdparams', resume=None, last_epoch=None, eval=False, amp=True)
    config = update_config(get_config(), args)
    assert (config.DATA.DATASET, config.DATA.BATCH_SIZE, config.DATA.IMAGE_SIZE) == ('cifar10', 32, 160)
    assert (config.DATA.DATA_PATH, config.SAVE, config.NGPUS) == ('/data/x', '/tmp/out', 2)
    assert (config.MODEL.NUM_CLASSES, config.MODEL.PRETRAINED, config.AMP) == (10, 'w.pdparams', True)
    assert config.MODEL.DEPTH == [1, 2, 10] and config.MODEL.RESUME is None


def test_update_config_eval_sets_eval_batch_and_disables_amp():
    args = argparse.Namespace(cfg=None, batch_size=7, eval=True, amp=True)
    config = update_config(get_config(), args)
    assert config.EVAL and config.DATA.BATCH_SIZE_EVAL == 7 and config.AMP is False


def test_dumped_config_loads_back_equal(tmp_path):
    config = get_config(os.path.join(CONFIGS, 'cvt-w24-384x384.yaml'))
    path = write(tmp_path / 'dumped.yaml', config.dump())
    assert get_config(path) == config


def test_paddlevit_milestones_string_is_accepted(tmp_path):
    path = write(tmp_path / 'pvit.yaml', 'TRAIN:\n  LR_SCHEDULER:\n    MILESTONES: "10, 20"\n')
    assert list(get_config(path).TRAIN.LR_SCHEDULER.MILESTONES) == [10, 20]
