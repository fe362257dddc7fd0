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


def test_update_config_eval_sets_eval_batch_and_keeps_amp():
    args = argparse.Namespace(cfg=None, batch_size=7, eval=True, amp=True)
    config = update_config(get_config(), args)
    assert config.EVAL and config.DATA.BATCH_SIZE_EVAL == 7 and config.AMP is True  # evaluation under autocast


def test_dumped_config_loads_back_equal(tmp_path):
    config = get_config(os.path.join(CONFIGS, 'cvt-w24-384x384.yaml'))
    path = write(tmp_path / 'dumped.yaml', config.dump())
    assert get_config(path) == config


def test_paddlevit_milestones_string_is_accepted(tmp_path):
    path = write(tmp_path / 'pvit.yaml', 'TRAIN:\n  LR_SCHEDULER:\n    MILESTONES: "10, 20"\n')
    assert list(get_config(path).TRAIN.LR_SCHEDULER.MILESTONES) == [10, 20]


# -opts: any key from the command line, checked like a yaml file's keys

def test_opts_set_keys_with_yaml_types():
    config = get_config(os.path.join(CONFIGS, 'cvt-13-224x224.yaml'), [
        'TRAIN.BASE_LR', '5e-4', 'DATA.NUM_WORKERS', '8', 'MODEL.DEPTH', '[1, 1, 2]', 'AMP', 'false',
        'TRAIN.RAND_AUGMENT', '', 'TRAIN.AUTO_AUGMENT', 'rand-m7-mstd0.5', 'TRAIN.GRAD_CLIP', '5',
        'TRAIN.WARMUP_START_LR', '0'])
    assert config.TRAIN.BASE_LR == 5e-4 and config.DATA.NUM_WORKERS == 8 and config.AMP is False
    assert config.MODEL.DEPTH == [1, 1, 2]
    assert config.TRAIN.RAND_AUGMENT == '' and config.TRAIN.AUTO_AUGMENT == 'rand-m7-mstd0.5'
    assert config.TRAIN.GRAD_CLIP == 5 and config.TRAIN.WARMUP_START_LR == 0.0
    assert isinstance(config.TRAIN.WARMUP_START_LR, float)  # an integer where a float belongs is a float


def test_int_where_a_float_belongs_in_yaml_is_a_float(tmp_path):
    path = write(tmp_path / 'lr.yaml', 'TRAIN:\n  BASE_LR: 1\n')
    assert get_config(path).TRAIN.BASE_LR == 1.0


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.LR', '0.1'], r'^-opts: Non-existent config key: TRAIN\.LR$'),
    (['DATA.IMAGE_SIZE', 'large'], r'^-opts: Type mismatch .* for config key: DATA\.IMAGE_SIZE$'),
    (['DATA.BATCH_SIZE', '0.5'], r'^-opts: Type mismatch .* for config key: DATA\.BATCH_SIZE$'),
    (['TRAIN.BASE_LR', '1e-3', 'SEED'], r"^-opts takes KEY VALUE pairs; 'SEED' has no value$"),
    (['BASE', 'x.yaml'], r'^-opts: BASE can only be set in a yaml file$'),
    (['TRAIN.BASE_LR', '-1'], r'^-opts: TRAIN\.BASE_LR must be > 0, got -1\.0$'),
])
def test_bad_opts_are_named_in_one_line(opts, message):
    with pytest.raises(ConfigError, match=message):
        get_config(None, opts)


def test_yaml_and_opts_report_an_unknown_key_alike(tmp_path):
    path = write(tmp_path / 'bad.yaml', 'TRAIN:\n  LR: 0.1\n')
    with pytest.raises(ConfigError) as from_yaml:
        get_config(path)
    with pytest.raises(ConfigError) as from_opts:
        get_config(None, ['TRAIN.LR', '0.1'])
    assert str(from_yaml.value).replace(path, '-opts') == str(from_opts.value)


def test_opts_come_after_the_file_and_before_the_flags():
    args = argparse.Namespace(cfg=os.path.join(CONFIGS, 'cvt-13-224x224.yaml'), batch_size=16,
                              opts=['DATA.BATCH_SIZE', '4', 'DATA.IMAGE_SIZE', '160'])
    config = update_config(get_config(), args)
    assert (config.DATA.BATCH_SIZE, config.DATA.IMAGE_SIZE) == (16, 160)


# range checks: every numeric key, one line naming it

@pytest.mark.parametrize('key, value, message', [
    ('DATA.BATCH_SIZE', '0', r'DATA\.BATCH_SIZE must be >= 1, got 0'),
    ('DATA.NUM_WORKERS', '-2', r'DATA\.NUM_WORKERS must be >= -1, got -2'),
    ('DATA.CROP_PCT', '1.5', r'DATA\.CROP_PCT must be in \(0, 1\], got 1\.5'),
    ('TRAIN.NUM_EPOCHS', '-3', r'TRAIN\.NUM_EPOCHS must be >= 1, got -3'),
    ('TRAIN.WARMUP_EPOCHS', '-1', r'TRAIN\.WARMUP_EPOCHS must be >= 0'),
    ('TRAIN.BASE_LR', '0', r'TRAIN\.BASE_LR must be > 0, got 0\.0'),
    ('TRAIN.WEIGHT_DECAY', '-0.1', r'TRAIN\.WEIGHT_DECAY must be >= 0'),
    ('TRAIN.MIXUP_PROB', '1.2', r'TRAIN\.MIXUP_PROB must be in \[0, 1\], got 1\.2'),
    ('TRAIN.RANDOM_ERASE_PROB', '-0.5', r'TRAIN\.RANDOM_ERASE_PROB must be in \[0, 1\]'),
    ('TRAIN.SMOOTHING', '1.0', r'TRAIN\.SMOOTHING must be in \[0, 1\), got 1\.0'),
    ('TRAIN.MODEL_EMA_DECAY', '1.5', r'TRAIN\.MODEL_EMA_DECAY must be in \[0, 1\]'),
    ('TRAIN.OPTIMIZER.BETAS', '[0.9, 1.0]', r'TRAIN\.OPTIMIZER\.BETAS\[1\] must be in \[0, 1\), got 1\.0'),
    ('TRAIN.OPTIMIZER.BETAS', '[0.9]', r'TRAIN\.OPTIMIZER\.BETAS must hold 2 numbers'),
    ('TRAIN.GRAD_CLIP', 'abc', r"TRAIN\.GRAD_CLIP must be a number, got 'abc'"),
    ('TRAIN.GRAD_CLIP', '0', r'TRAIN\.GRAD_CLIP must be > 0, got 0'),
    ('TRAIN.CROP_SCALE', '[0.9, 0.3]', r'TRAIN\.CROP_SCALE must be \[low, high\] with low <= high'),
    ('TRAIN.MIXUP_MODE', 'row', r"TRAIN\.MIXUP_MODE = 'row' is not one of batch, pair, elem"),
    ('MODEL.DEPTH', '[1, 0, 2]', r'MODEL\.DEPTH\[1\] must be >= 1, got 0'),
    ('MODEL.DROP_PATH_RATE', '[0.0, 0.0, 1.0]', r'MODEL\.DROP_PATH_RATE\[2\] must be in \[0, 1\)'),
    ('REPORT_FREQ', '0', r'REPORT_FREQ must be >= 1, got 0'),
    ('SAVE_FREQ', '0', r'SAVE_FREQ must be >= 1, got 0'),
    ('VALIDATE_FREQ', '-1', r'VALIDATE_FREQ must be >= 1, got -1'),
    ('SEED', '-1', r'SEED must be >= 0, got -1'),
    ('NGPUS', '0', r'NGPUS must be -1 \(every visible GPU\) or a positive count, got 0'),
])
def test_out_of_range_values_are_named_in_one_line(key, value, message):
    with pytest.raises(ConfigError, match=f'^-opts: {message}'):
        get_config(None, [key, value])


def test_out_of_range_value_in_a_yaml_file_names_the_file(tmp_path):
    path = write(tmp_path / 'neg.yaml', 'TRAIN:\n  NUM_EPOCHS: 0\n')
    with pytest.raises(ConfigError, match=r'neg\.yaml: TRAIN\.NUM_EPOCHS must be >= 1, got 0'):
        get_config(path)


@pytest.mark.parametrize('flag, value, message', [
    ('batch_size', 0, r'^command line: DATA\.BATCH_SIZE must be >= 1, got 0$'),
    ('image_size', -32, r'^command line: DATA\.IMAGE_SIZE must be >= 1, got -32$'),
    ('num_classes', -1, r'^command line: MODEL\.NUM_CLASSES must be >= 0, got -1$'),
    ('last_epoch', -2, r'^command line: TRAIN\.LAST_EPOCH must be >= 0, got -2$'),
    ('ngpus', 0, r'^command line: NGPUS must be -1'),
])
def test_bad_numeric_flags_are_named(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        update_config(get_config(), argparse.Namespace(**{flag: value}))


def test_tools_taking_cfg_take_opts_too(tmp_path, capsys):
    from tools import model_info, predict
    demo = os.path.join(CONFIGS, 'cvt-demo.yaml')
    assert model_info.main(['-cfg', demo, '-opts', 'MODEL.DIM_EMBED', '[16, 32, 64]',
                            'MODEL.NUM_HEADS', '[1, 1, 1]']) == 0
    smaller = capsys.readouterr().out
    assert model_info.main(['-cfg', demo]) == 0
    assert smaller != capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        predict.main(['-cfg', demo, '-pretrained', 'none', 'x.jpg', '-opts', 'DATA.IMAGE_SIZE', '0'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'error: -opts: DATA.IMAGE_SIZE must be >= 1, got 0\n'
