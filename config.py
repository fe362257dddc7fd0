"""Configuration of CvT models, data and training.

Defaults live here; the recipe of each released model lives in its yaml file
under ``configs/``; command-line flags override both (``update_config``).
Key names follow PaddleViT's CvT config, plus the official microsoft/CvT
per-stage model keys that PaddleViT dropped (MLP_RATIO, QKV_BIAS, ...).
``-opts KEY VALUE ...`` on the command line sets any key, checked as a yaml
file's keys are (``merge_opts``); ``validate_config`` checks every value's range.

A yaml file may name parent files with ``BASE: [a.yaml, ...]`` (paths relative
to the file); parents are merged first, in order, then the file itself.
"""

import math
import os
from typing import List, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']

# data settings
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 8  # per process
_C.DATA.BATCH_SIZE_EVAL = 64  # per process; a GPU's batch (inference keeps no activations)
_C.DATA.DATA_PATH = '/dataset/imagenet/'
_C.DATA.DATASET = 'imagenet2012'  # imagenet2012, cifar10 or cifar100
_C.DATA.IMAGE_SIZE = 224
_C.DATA.CROP_PCT = 0.875  # eval: resize short side to IMAGE_SIZE / CROP_PCT, centre crop
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.NUM_WORKERS = -1  # loader processes per training process; -1: by the cores and device (datasets.py)
_C.DATA.ALLOW_OUTSIDE_PATHS = False  # list files may name images outside DATA_PATH (absolute, ../)
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
# fast: the speed layers of fast/ (threaded CPU kernels; flash attention in float16 on GPU),
# the same model and weights as the plain layers, which each layer runs where it has
# nothing faster; plain: cvt.py's layers as written (docs/speed.md)
_C.MODEL.LAYERS = 'fast'
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
_C.TRAIN.OPTIMIZER.NAME = 'AdamW'  # AdamW or SGD (with MOMENTUM)
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# train augmentation
# random_resized: a random area (CROP_SCALE) and aspect ratio, resized to IMAGE_SIZE;
# resize_random: resize to IMAGE_SIZE + 32 square, then a random IMAGE_SIZE crop (fine-tuning)
_C.TRAIN.CROP_MODE = 'random_resized'
_C.TRAIN.CROP_SCALE = [0.08, 1.0]  # the share of the image area that a RandomResizedCrop keeps
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
_C.SAVE_SAFETENSORS = False  # also write each checkpoint's weights as .safetensors (no pickle)
_C.KEEP_CHECKPOINTS = 0  # epoch checkpoints kept, the newest (besides <TYPE>-best.pdparams); 0: all
_C.REPORT_FREQ = 50  # optimizer steps between log lines (and reads of the figures from the device)
_C.VALIDATE_FREQ = 10  # epochs between validations
_C.SEED = 0
_C.EVAL = False  # evaluate only
_C.OVERWRITE = False  # -overwrite: a new run replaces the training run already in SAVE
_C.AMP = False  # mixed precision (autocast) on a GPU, in training and validation
_C.AMP_DTYPE = 'auto'  # float16, bfloat16, or auto: bfloat16 on GPUs that have it (sm80 and newer), else float16
_C.VISUALDL = False  # write scalars to <SAVE>/vdl for VisualDL (pip install visualdl)
_C.LOCAL_RANK = 0
_C.NGPUS = -1

# beyond this, CvT-13's first-stage attention scores alone take over 1 TB for one image
MAX_IMAGE_SIZE = 4096

PER_STAGE_KEYS = (
    'PATCH_SIZE', 'PATCH_STRIDE', 'PATCH_PADDING', 'DIM_EMBED', 'NUM_HEADS',
    'DEPTH', 'MLP_RATIO', 'QKV_BIAS', 'DROP_RATE', 'ATTN_DROP_RATE',
    'DROP_PATH_RATE', 'CLS_TOKEN', 'QKV_PROJ_METHOD', 'KERNEL_QKV',
    'PADDING_Q', 'PADDING_KV', 'STRIDE_Q', 'STRIDE_KV')
QKV_PROJ_METHODS = ('dw_bn', 'avg', 'linear')
LAYERS = ('fast', 'plain')  # MODEL.LAYERS: the speed layers of fast/, or cvt.py's as written
INIT_METHODS = ('trunc_norm', 'xavier')


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names which."""


def _read_yaml(cfg_file):
    if not os.path.isfile(cfg_file):
        raise ConfigError(f'{cfg_file}: config file not found')
    try:
        with open(cfg_file, 'r', encoding='utf-8') as infile:
            data = yaml.safe_load(infile)
    except UnicodeDecodeError:
        raise ConfigError(f'{cfg_file}: not a yaml text file (it holds bytes that are not UTF-8 text)') from None
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
    _merge(config, data, cfg_file)
    config.freeze()


def _floats_where_floats_belong(data: dict, defaults: CN) -> dict:
    """`data` with integers turned into floats where the default is a float
    (`BASE_LR: 1` means 1.0; yacs would call it a type mismatch)."""
    fixed = {}
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, CN) else None
        if isinstance(value, dict) and isinstance(default, CN):
            value = _floats_where_floats_belong(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        fixed[key] = value
    return fixed


def _merge(config: CN, data: dict, source: str) -> None:
    """Merge the nested dict `data` into the (unfrozen) `config` and validate;
    errors name `source` (a file, or -opts) and the key."""
    try:
        config.merge_from_other_cfg(CN(_floats_where_floats_belong(data, config)))
    except (KeyError, ValueError) as err:
        # yacs says 'Non-existent config key: X' or 'Type mismatch ... for config key: X'
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f'{source}: {message}') from None
    try:
        validate_config(config)
    except ConfigError as err:
        raise ConfigError(f'{source}: {err}') from None


def _parse_value(text: str):
    """A command-line value as yaml would read it, except that a number such
    as 5e-4 is a number (PyYAML reads it as a string)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if not text.strip():
        return text  # '' switches a string setting off (TRAIN.RAND_AUGMENT '')
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_opts(config: CN, opts: Sequence[str]) -> None:
    """Set `opts` = [KEY, VALUE, KEY, VALUE, ...] (dotted keys such as
    TRAIN.BASE_LR, values written as in yaml) in `config`, with the checks and
    error messages of a yaml file's keys."""
    if len(opts) % 2:
        raise ConfigError(f'-opts takes KEY VALUE pairs; {opts[-1]!r} has no value')
    data: dict = {}
    for key, text in zip(opts[0::2], opts[1::2]):
        if key == 'BASE':
            raise ConfigError('-opts: BASE can only be set in a yaml file')
        *parents, leaf = key.split('.')
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f'-opts: {key} sets a key inside a value given earlier')
        node[leaf] = _parse_value(text)
    config.defrost()
    _merge(config, data, '-opts')
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
    for key, low, high in RANGES:
        _check_range(config, key, low, high)
    for key, choices in CHOICES:
        value = _lookup(config, key)
        if value not in choices:
            raise ConfigError(f'{key} = {value!r} is not one of {", ".join(choices)}')
    for key, size in (('DATA.IMAGENET_MEAN', 3), ('DATA.IMAGENET_STD', 3), ('TRAIN.OPTIMIZER.BETAS', 2),
                      ('TRAIN.CUTMIX_MINMAX', 2), ('TRAIN.CROP_SCALE', 2)):
        value = _lookup(config, key)
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != size):
            raise ConfigError(f'{key} must hold {size} numbers, got {value!r}')
    for key in ('TRAIN.CUTMIX_MINMAX', 'TRAIN.CROP_SCALE'):
        value = _lookup(config, key)
        if value is not None and value[0] > value[1]:
            raise ConfigError(f'{key} must be [low, high] with low <= high, got {list(value)}')
    if config.NGPUS == 0 or config.NGPUS < -1:
        raise ConfigError(f'NGPUS must be -1 (every visible GPU) or a positive count, got {config.NGPUS}')
    for key, value in _numbers(config):
        if not math.isfinite(value):
            raise ConfigError(f'{key} must be a finite number, got {value!r}')
    smallest = smallest_image_size(model)
    if config.DATA.IMAGE_SIZE < smallest:
        raise ConfigError(f'DATA.IMAGE_SIZE = {config.DATA.IMAGE_SIZE} is too small for the model: its '
                          f'strides leave no pixel; it takes {smallest} or more')
    if config.DATA.IMAGE_SIZE > MAX_IMAGE_SIZE:
        raise ConfigError(f'DATA.IMAGE_SIZE = {config.DATA.IMAGE_SIZE} is beyond {MAX_IMAGE_SIZE}: the first '
                          f'stage\'s attention alone would need more memory than any machine has')


def _numbers(node: CN, prefix: str = ''):
    """(dotted key, float) of every float setting, list entries included."""
    for key, value in node.items():
        name = f'{prefix}{key}'
        if isinstance(value, CN):
            yield from _numbers(value, name + '.')
        for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, float):
                yield (f'{name}[{i}]' if isinstance(value, (list, tuple)) else name), item


def stage_sizes(model: CN, image_size: int) -> List[Tuple[int, int]]:
    """Per stage, the side of its token map and of its key/value map for square
    `image_size` inputs (the convolutions' arithmetic; 0 where nothing is left)."""
    def out(side: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
        span = side + 2 * padding - kernel
        return 0 if span < 0 else (-(-span // stride) if ceil else span // stride) + 1

    sizes, side = [], image_size
    for i in range(model.NUM_STAGES):
        side = out(side, model.PATCH_SIZE[i], model.PATCH_STRIDE[i], model.PATCH_PADDING[i])
        method = model.QKV_PROJ_METHOD[i]
        kv = side if method == 'linear' else out(side, model.KERNEL_QKV[i], model.STRIDE_KV[i],
                                                  model.PADDING_KV[i], ceil=method == 'avg')
        if method == 'dw_bn':  # q has its own convolution
            kv = min(kv, out(side, model.KERNEL_QKV[i], model.STRIDE_Q[i], model.PADDING_Q[i]))
        sizes.append((side, kv))
    return sizes


def attention_bytes(model: CN, image_size: int) -> int:
    """The largest attention-score tensor of one image (float32), over the stages."""
    largest = 0
    for i, (side, kv) in enumerate(stage_sizes(model, image_size)):
        extra = 1 if model.CLS_TOKEN[i] else 0
        largest = max(largest, 4 * model.NUM_HEADS[i] * (side * side + extra) * (kv * kv + extra))
    return largest


def smallest_image_size(model: CN) -> int:
    """The smallest input side for which every stage's maps keep at least one pixel."""
    size = 1
    while min(min(pair) for pair in stage_sizes(model, size)) < 1:
        size += 1
    return size


# (key, lowest, highest) of every numeric key; a bound in a tuple is excluded
# from the range, None is no bound. A key whose value may be None skips the
# check when it is None; per-stage and list keys check every entry.
RANGES = (
    ('DATA.BATCH_SIZE', 1, None), ('DATA.BATCH_SIZE_EVAL', 1, None), ('DATA.IMAGE_SIZE', 1, None),
    ('DATA.CROP_PCT', (0,), 1), ('DATA.NUM_WORKERS', -1, None), ('DATA.IMAGENET_STD', (0,), None),
    ('MODEL.NUM_CLASSES', 0, None),
    ('MODEL.PATCH_SIZE', 1, None), ('MODEL.PATCH_STRIDE', 1, None), ('MODEL.PATCH_PADDING', 0, None),
    ('MODEL.DIM_EMBED', 1, None), ('MODEL.NUM_HEADS', 1, None), ('MODEL.DEPTH', 1, None),
    ('MODEL.MLP_RATIO', (0,), None), ('MODEL.DROP_RATE', 0, (1,)), ('MODEL.ATTN_DROP_RATE', 0, (1,)),
    ('MODEL.DROP_PATH_RATE', 0, (1,)), ('MODEL.KERNEL_QKV', 1, None), ('MODEL.PADDING_Q', 0, None),
    ('MODEL.PADDING_KV', 0, None), ('MODEL.STRIDE_Q', 1, None), ('MODEL.STRIDE_KV', 1, None),
    ('TRAIN.LAST_EPOCH', 0, None), ('TRAIN.NUM_EPOCHS', 1, None), ('TRAIN.WARMUP_EPOCHS', 0, None),
    ('TRAIN.WEIGHT_DECAY', 0, None), ('TRAIN.BASE_LR', (0,), None), ('TRAIN.WARMUP_START_LR', 0, None),
    ('TRAIN.END_LR', 0, None), ('TRAIN.GRAD_CLIP', (0,), None), ('TRAIN.ACCUM_ITER', 1, None),
    ('TRAIN.MODEL_EMA_DECAY', 0, 1), ('TRAIN.LINEAR_SCALED_LR', 1, None),
    ('TRAIN.OPTIMIZER.EPS', (0,), None), ('TRAIN.OPTIMIZER.BETAS', 0, (1,)), ('TRAIN.OPTIMIZER.MOMENTUM', 0, 1),
    ('TRAIN.MIXUP_ALPHA', 0, None), ('TRAIN.CUTMIX_ALPHA', 0, None), ('TRAIN.CUTMIX_MINMAX', 0, 1),
    ('TRAIN.MIXUP_PROB', 0, 1), ('TRAIN.MIXUP_SWITCH_PROB', 0, 1), ('TRAIN.SMOOTHING', 0, (1,)),
    ('TRAIN.COLOR_JITTER', 0, None), ('TRAIN.CROP_SCALE', (0,), 1), ('TRAIN.RANDOM_ERASE_PROB', 0, 1),
    ('TRAIN.RANDOM_ERASE_COUNT', 1, None),
    ('TRAIN.DISTILLATION_ALPHA', 0, 1), ('TRAIN.DISTILLATION_TAU', (0,), None),
    ('SAVE_FREQ', 1, None), ('REPORT_FREQ', 1, None), ('VALIDATE_FREQ', 1, None), ('SEED', 0, None),
    ('SAVE_STEP_FREQ', 0, None), ('KEEP_CHECKPOINTS', 0, None),
)
CHOICES = (
    ('TRAIN.MIXUP_MODE', ('batch', 'pair', 'elem')),
    ('TRAIN.RANDOM_ERASE_MODE', ('const', 'rand', 'pixel')),
    ('TRAIN.DISTILLATION_TYPE', ('none', 'soft', 'hard')),
    ('TRAIN.CROP_MODE', ('random_resized', 'resize_random')),
    ('AMP_DTYPE', ('float16', 'bfloat16', 'auto')),
    ('MODEL.LAYERS', LAYERS),
)


def _lookup(config: CN, key: str):
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def _check_range(config: CN, key: str, low, high) -> None:
    """Raise ConfigError unless every number of `key` lies within [low, high]
    (a bound given as a 1-tuple is excluded)."""
    value = _lookup(config, key)
    if value is None and _lookup(_C, key) is None:
        return  # an optional key left unset
    values = value if isinstance(value, (list, tuple)) else [value]
    for i, number in enumerate(values):
        name = f'{key}[{i}]' if isinstance(value, (list, tuple)) else key
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f'{name} must be a number, got {number!r}')
        too_low = low is not None and (number <= low[0] if isinstance(low, tuple) else number < low)
        too_high = high is not None and (number >= high[0] if isinstance(high, tuple) else number > high)
        if too_low or too_high:
            raise ConfigError(f'{name} must be {_describe_range(low, high)}, got {number!r}')


def _describe_range(low, high) -> str:
    if high is None:
        return f'> {low[0]}' if isinstance(low, tuple) else f'>= {low}'
    left = f'({low[0]}' if isinstance(low, tuple) else f'[{low}'
    right = f'{high[0]})' if isinstance(high, tuple) else f'{high}]'
    return f'in {left}, {right}'


def update_config(config, args):
    """Override `config` with the command-line `args`: the -cfg file, then the
    -opts pairs, then PaddleViT's flags.

    Flags that are absent or unset leave the config as it is.
    """
    def arg(name):
        return getattr(args, name, None)

    if arg('cfg'):
        _update_config_from_file(config, args.cfg)
    if arg('opts'):
        merge_opts(config, args.opts)
    config.defrost()
    # a flag given with a bad number (-batch_size 0) reaches validate_config below
    if arg('dataset'):
        config.DATA.DATASET = args.dataset
    if arg('batch_size') is not None:
        config.DATA.BATCH_SIZE = args.batch_size
    if arg('image_size') is not None:
        config.DATA.IMAGE_SIZE = args.image_size
    if arg('num_classes') is not None:
        config.MODEL.NUM_CLASSES = args.num_classes
    if arg('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if arg('output') is not None:
        config.SAVE = args.output
    if arg('ngpus') is not None:
        config.NGPUS = args.ngpus
    if arg('eval'):
        config.EVAL = True
        if arg('batch_size') is not None:
            config.DATA.BATCH_SIZE_EVAL = args.batch_size
    if arg('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if arg('resume'):
        config.MODEL.RESUME = args.resume
    if arg('last_epoch') is not None:
        config.TRAIN.LAST_EPOCH = args.last_epoch
    if arg('amp'):
        config.AMP = True
    if arg('visualdl'):
        config.VISUALDL = True
    if arg('overwrite'):
        config.OVERWRITE = True
    try:
        validate_config(config)
    except ConfigError as err:
        raise ConfigError(f'command line: {err}') from None
    return config


def get_config(cfg_file=None, opts: Sequence[str] = ()):
    """Return a copy of the defaults, merged with `cfg_file` if given, then `opts`
    (KEY VALUE pairs, see `merge_opts`)."""
    config = _C.clone()
    if cfg_file:
        _update_config_from_file(config, cfg_file)
    if opts:
        merge_opts(config, opts)
    return config
