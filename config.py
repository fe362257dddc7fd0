"""Configuration of CvT models, data and training.

Defaults live here; the recipe of each released model lives in its yaml file
under ``configs/``; command-line flags override both (``update_config``).
Key names follow PaddleViT's CvT config, plus the official microsoft/CvT
per-stage model keys that PaddleViT dropped (MLP_RATIO, QKV_BIAS, ...).

A yaml file may name parent files with ``BASE: [a.yaml, ...]`` (paths relative
to the file); parents are merged first, in order, then the file itself.
"""

import os

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']

# data settings
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 8  # per process
_C.DATA.BATCH_SIZE_EVAL = 8  # per process
_C.DATA.DATA_PATH = '/dataset/imagenet/'
_C.DATA.DATASET = 'imagenet2012'  # imagenet2012, cifar10 or cifar100
_C.DATA.IMAGE_SIZE = 224
_C.DATA.CROP_PCT = 0.875  # eval: resize short side to IMAGE_SIZE / CROP_PCT, centre crop
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.NUM_WORKERS = 4
_C.DATA.IMAGENET_MEAN = [0.485, 0.456, 0.406]
_C.DATA.IMAGENET_STD = [0.229, 0.224, 0.225]

# model settings; every list below holds one entry per stage
_C.MODEL = CN()
_C.MODEL.TYPE = 'CvT'
_C.MODEL.NAME = 'CvT-13-224x224'
_C.MODEL.RESUME = None
_C.MODEL.PRETRAINED = None
_C.MODEL.NUM_CLASSES = 1000  # 0: the model returns pooled features
_C.MODEL.INIT = 'trunc_norm'  # trunc_norm or xavier (Linear weights)
_C.MODEL.NUM_STAGES = 3
_C.MODEL.PATCH_SIZE = [7, 3, 3]
_C.MODEL.PATCH_STRIDE = [4, 2, 2]
_C.MODEL.PATCH_PADDING = [2, 1, 1]
_C.MODEL.DIM_EMBED = [64, 192, 384]
_C.MODEL.NUM_HEADS = [1, 3, 6]
_C.MODEL.DEPTH = [1, 2, 10]
_C.MODEL.MLP_RATIO = [4.0, 4.0, 4.0]
_C.MODEL.QKV_BIAS = [True, True, True]
_C.MODEL.DROP_RATE = [0.0, 0.0, 0.0]
_C.MODEL.ATTN_DROP_RATE = [0.0, 0.0, 0.0]
_C.MODEL.DROP_PATH_RATE = [0.0, 0.0, 0.1]
_C.MODEL.CLS_TOKEN = [False, False, True]
_C.MODEL.QKV_PROJ_METHOD = ['dw_bn', 'dw_bn', 'dw_bn']  # dw_bn, avg or linear
_C.MODEL.KERNEL_QKV = [3, 3, 3]
_C.MODEL.PADDING_Q = [1, 1, 1]
_C.MODEL.PADDING_KV = [1, 1, 1]
_C.MODEL.STRIDE_Q = [1, 1, 1]
_C.MODEL.STRIDE_KV = [2, 2, 2]

# training settings
_C.TRAIN = CN()
_C.TRAIN.LAST_EPOCH = 0
_C.TRAIN.NUM_EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 5
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 2.5e-4
_C.TRAIN.WARMUP_START_LR = 1e-6
_C.TRAIN.END_LR = 1e-5
_C.TRAIN.GRAD_CLIP = None  # max global gradient norm; None: no clipping
_C.TRAIN.ACCUM_ITER = 1
_C.TRAIN.MODEL_EMA = False
_C.TRAIN.MODEL_EMA_DECAY = 0.99996
# the LRs above are for this global batch size and scale linearly with the
# real one (batch x processes x ACCUM_ITER); None: used as they are
_C.TRAIN.LINEAR_SCALED_LR = None

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'warmupcosine'
# PaddleViT's step-scheduler settings, accepted so its yaml files load; the
# engine implements warmupcosine only. A list, so that yacs' parsing of
# PaddleViT's "30, 60, 90" string (a tuple) and a dumped config both load.
_C.TRAIN.LR_SCHEDULER.MILESTONES = [30, 60, 90]
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'AdamW'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# train augmentation
_C.TRAIN.MIXUP_ALPHA = 0.8
_C.TRAIN.CUTMIX_ALPHA = 1.0
_C.TRAIN.CUTMIX_MINMAX = None
_C.TRAIN.MIXUP_PROB = 1.0
_C.TRAIN.MIXUP_SWITCH_PROB = 0.5
_C.TRAIN.MIXUP_MODE = 'batch'  # batch, pair or elem

_C.TRAIN.SMOOTHING = 0.1
_C.TRAIN.COLOR_JITTER = 0.4
_C.TRAIN.AUTO_AUGMENT = ''  # a policy string such as 'rand-m9-mstd0.5-inc1'; '' is off
_C.TRAIN.RAND_AUGMENT = 'rand-m9-mstd0.5-inc1'  # '' is off (then COLOR_JITTER applies)

_C.TRAIN.RANDOM_ERASE_PROB = 0.25
_C.TRAIN.RANDOM_ERASE_MODE = 'pixel'
_C.TRAIN.RANDOM_ERASE_COUNT = 1
_C.TRAIN.RANDOM_ERASE_SPLIT = False

# knowledge distillation from a teacher's logits (losses.DistillationLoss), for fine-tuning
_C.TRAIN.DISTILLATION_TYPE = 'none'  # none, soft or hard
_C.TRAIN.DISTILLATION_ALPHA = 0.5  # weight of the distillation term; 1 - alpha on the label loss
_C.TRAIN.DISTILLATION_TAU = 1.0  # softmax temperature of soft distillation
_C.TRAIN.TEACHER_CFG = ''  # yaml of the teacher CvT, when DISTILLATION_TYPE is soft or hard
_C.TRAIN.TEACHER_PRETRAINED = ''  # the teacher's weights (.pdparams optional)

# misc
_C.SAVE = './output'
_C.TAG = 'default'
_C.SAVE_FREQ = 1  # epochs between checkpoints
_C.SAVE_STEP_FREQ = 0  # optimizer steps between mid-epoch checkpoints (each replaces the last); 0: none
_C.KEEP_CHECKPOINTS = 0  # epoch checkpoints kept, the newest (besides <TYPE>-best.pdparams); 0: all
_C.REPORT_FREQ = 50  # steps between log lines
_C.VALIDATE_FREQ = 10  # epochs between validations
_C.SEED = 0
_C.EVAL = False  # evaluate only
_C.AMP = False  # mixed precision training
_C.LOCAL_RANK = 0
_C.NGPUS = -1

PER_STAGE_KEYS = (
    'PATCH_SIZE', 'PATCH_STRIDE', 'PATCH_PADDING', 'DIM_EMBED', 'NUM_HEADS',
    'DEPTH', 'MLP_RATIO', 'QKV_BIAS', 'DROP_RATE', 'ATTN_DROP_RATE',
    'DROP_PATH_RATE', 'CLS_TOKEN', 'QKV_PROJ_METHOD', 'KERNEL_QKV',
    'PADDING_Q', 'PADDING_KV', 'STRIDE_Q', 'STRIDE_KV')
QKV_PROJ_METHODS = ('dw_bn', 'avg', 'linear')
INIT_METHODS = ('trunc_norm', 'xavier')


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names which."""


def _read_yaml(cfg_file):
    if not os.path.isfile(cfg_file):
        raise ConfigError(f'{cfg_file}: config file not found')
    try:
        with open(cfg_file, 'r') as infile:
            data = yaml.safe_load(infile)
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark is not None else ''
        raise ConfigError(f'{cfg_file}:{where} not valid yaml ({getattr(err, "problem", err)})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{cfg_file}: expected a mapping of config keys at the top level')
    return data


def _update_config_from_file(config, cfg_file, _seen=()):
    """Merge `cfg_file` (after its BASE files) into `config`."""
    cfg_file = os.path.normpath(cfg_file)
    if cfg_file in _seen:
        raise ConfigError(f'{cfg_file}: BASE files include each other in a cycle')
    data = _read_yaml(cfg_file)
    bases = data.pop('BASE', [''])
    if isinstance(bases, str):
        bases = [bases]
    config.defrost()
    for base in bases or []:
        if base:
            _update_config_from_file(
                config, os.path.join(os.path.dirname(cfg_file), base), _seen + (cfg_file,))
    try:
        config.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError) as err:
        # yacs says 'Non-existent config key: X' or 'Type mismatch ... for config key: X'
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f'{cfg_file}: {message}') from None
    try:
        validate_config(config)
    except ConfigError as err:
        raise ConfigError(f'{cfg_file}: {err}') from None
    config.freeze()


def validate_config(config):
    """Check values that yacs' type check cannot; raise ConfigError naming the key."""
    model = config.MODEL
    stages = model.NUM_STAGES
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f'MODEL.NUM_STAGES must be a positive integer, got {stages!r}')
    for key in PER_STAGE_KEYS:
        value = model[key]
        if not isinstance(value, (list, tuple)) or len(value) != stages:
            raise ConfigError(
                f'MODEL.{key} must list one value per stage (MODEL.NUM_STAGES = {stages}), got {value!r}')
    for i, (dim, heads) in enumerate(zip(model.DIM_EMBED, model.NUM_HEADS)):
        if heads < 1 or dim % heads:
            raise ConfigError(
                f'MODEL.DIM_EMBED[{i}] = {dim} must be divisible by MODEL.NUM_HEADS[{i}] = {heads}')
    for i, method in enumerate(model.QKV_PROJ_METHOD):
        if method not in QKV_PROJ_METHODS:
            raise ConfigError(
                f'MODEL.QKV_PROJ_METHOD[{i}] = {method!r} is not one of {", ".join(QKV_PROJ_METHODS)}')
    if model.INIT not in INIT_METHODS:
        raise ConfigError(f'MODEL.INIT = {model.INIT!r} is not one of {", ".join(INIT_METHODS)}')
    if model.NUM_CLASSES < 0:
        raise ConfigError(f'MODEL.NUM_CLASSES must be >= 0, got {model.NUM_CLASSES}')
    if not 0 < config.DATA.CROP_PCT <= 1:
        raise ConfigError(f'DATA.CROP_PCT must be in (0, 1], got {config.DATA.CROP_PCT}')
    for key in ('BATCH_SIZE', 'BATCH_SIZE_EVAL', 'IMAGE_SIZE'):
        if config.DATA[key] < 1:
            raise ConfigError(f'DATA.{key} must be positive, got {config.DATA[key]}')
    if config.TRAIN.ACCUM_ITER < 1:
        raise ConfigError(f'TRAIN.ACCUM_ITER must be >= 1, got {config.TRAIN.ACCUM_ITER}')
    for key in ('SAVE_STEP_FREQ', 'KEEP_CHECKPOINTS'):
        if not isinstance(config[key], int) or config[key] < 0:
            raise ConfigError(f'{key} must be an integer >= 0, got {config[key]!r}')


def update_config(config, args):
    """Override `config` with the command-line `args` (PaddleViT's flags).

    Flags that are absent or unset leave the config as it is.
    """
    def arg(name):
        return getattr(args, name, None)

    if arg('cfg'):
        _update_config_from_file(config, args.cfg)
    config.defrost()
    if arg('dataset'):
        config.DATA.DATASET = args.dataset
    if arg('batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if arg('image_size'):
        config.DATA.IMAGE_SIZE = args.image_size
    if arg('num_classes') is not None:
        config.MODEL.NUM_CLASSES = args.num_classes
    if arg('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if arg('output') is not None:
        config.SAVE = args.output
    if arg('ngpus'):
        config.NGPUS = args.ngpus
    if arg('eval'):
        config.EVAL = True
        if arg('batch_size'):
            config.DATA.BATCH_SIZE_EVAL = args.batch_size
    if arg('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if arg('resume'):
        config.MODEL.RESUME = args.resume
    if arg('last_epoch'):
        config.TRAIN.LAST_EPOCH = args.last_epoch
    if arg('amp'):
        # mixed precision is a training option; evaluation runs in float32
        config.AMP = not config.EVAL
    validate_config(config)
    return config


def get_config(cfg_file=None):
    """Return a copy of the defaults, merged with `cfg_file` if given."""
    config = _C.clone()
    if cfg_file:
        _update_config_from_file(config, cfg_file)
    return config
