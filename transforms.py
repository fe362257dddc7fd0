"""Image transforms of the CvT recipe: PIL in, CHW numpy out.

Every random transform draws from a ``numpy.random.Generator`` handed to it, so
the dataset can give each sample its own generator derived from (SEED, epoch,
sample index) and the augmentation does not depend on workers or processes.
Called without one (tools, notebooks), a transform draws a generator from
numpy's global state, so ``np.random.seed`` makes it repeatable.

Geometric and colour ops stay in PIL (its C loops are the fast path). The data
loader's transforms end in the uint8 image (and, in training, the rectangles to
erase, drawn from the sample's generator): a quarter of float32's bytes to
send from the workers and to copy to a GPU, where `DeviceFinish` normalises
and erases the batch. The tools' evaluation transform normalises on the host
(`ToNormalizedArray`), with the same arithmetic (`normalization`).
"""

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Generator = np.random.Generator

PIL_INTERPOLATION = {
    'nearest': Image.NEAREST,
    'bilinear': Image.BILINEAR,
    'bicubic': Image.BICUBIC,
    'lanczos': Image.LANCZOS,
}


def pil_interpolation(name: str) -> int:
    """PIL resampling filter for DATA.INTERPOLATION `name`."""
    if name not in PIL_INTERPOLATION:
        raise ValueError(f'DATA.INTERPOLATION = {name!r} is not one of {", ".join(PIL_INTERPOLATION)}')
    return PIL_INTERPOLATION[name]


def _generator(rng: Optional[Generator]) -> Generator:
    return rng if rng is not None else np.random.default_rng(np.random.randint(2 ** 31))


class Compose:
    """Apply transforms in order, passing one generator through all of them."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, rng: Optional[Generator] = None):
        rng = _generator(rng)
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return 'Compose(' + ', '.join(repr(t) for t in self.transforms) + ')'


class RandomResizedCrop:
    """Crop a random area and aspect ratio, resize it to `size` x `size`.

    Crop and resize are one PIL call (``resize(box=...)``), which reads only the
    crop and never copies it.
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic'):
        self.size = size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio
        self.resample = pil_interpolation(interpolation)

    def crop_box(self, width: int, height: int, rng: Generator) -> Tuple[int, int, int, int]:
        """(left, top, crop width, crop height); ten tries, then a centre crop."""
        area = width * height
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return left, top, crop_w, crop_h
        # the largest centred crop whose aspect ratio is within range
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif image_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h

    def __call__(self, image: Image.Image, rng: Generator) -> Image.Image:
        left, top, crop_w, crop_h = self.crop_box(image.width, image.height, rng)
        return image.resize((self.size, self.size), self.resample,
                            box=(left, top, left + crop_w, top + crop_h))

    def __repr__(self) -> str:
        return f'RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})'


class ResizeRandomCrop:
    """Resize to a `size + margin` square (aspect ratio not kept), then cut a random
    `size` x `size` square: the official CvT's light fine-tuning crop."""

    def __init__(self, size: int, margin: int = 32, interpolation: str = 'bicubic'):
        self.size = size
        self.margin = margin
        self.resample = pil_interpolation(interpolation)

    def __call__(self, image: Image.Image, rng: Generator) -> Image.Image:
        side = self.size + self.margin
        image = image.resize((side, side), self.resample)
        left, top = (int(v) for v in rng.integers(0, self.margin + 1, size=2))
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f'ResizeRandomCrop(size={self.size}, margin={self.margin})'


class RandomHorizontalFlip:
    """Mirror left-right with probability `prob`."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image: Image.Image, rng: Generator) -> Image.Image:
        if rng.random() < self.prob:
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f'RandomHorizontalFlip(prob={self.prob})'


class ColorJitter:
    """Brightness, contrast and saturation, each by a factor in [1 - s, 1 + s], in random order."""

    def __init__(self, strength: float):
        if strength < 0:
            raise ValueError(f'TRAIN.COLOR_JITTER must be >= 0, got {strength}')
        self.strength = strength
        self.enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)

    def __call__(self, image: Image.Image, rng: Generator) -> Image.Image:
        if self.strength == 0:
            return image
        for which in rng.permutation(len(self.enhancers)):
            factor = rng.uniform(max(0.0, 1 - self.strength), 1 + self.strength)
            image = self.enhancers[which](image).enhance(factor)
        return image

    def __repr__(self) -> str:
        return f'ColorJitter({self.strength})'


class Resize:
    """Resize the short side to `size`, keeping the aspect ratio (int() of the long side)."""

    def __init__(self, size: int, interpolation: str = 'bicubic'):
        self.size = size
        self.resample = pil_interpolation(interpolation)

    def __call__(self, image: Image.Image, rng: Optional[Generator] = None) -> Image.Image:
        width, height = image.size
        if width <= height:
            new_size = (self.size, int(self.size * height / width))
        else:
            new_size = (int(self.size * width / height), self.size)
        if new_size == image.size:
            return image
        return image.resize(new_size, self.resample)

    def __repr__(self) -> str:
        return f'Resize({self.size})'


class CenterCrop:
    """Cut the central `size` x `size` square (offsets rounded to nearest)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: Optional[Generator] = None) -> Image.Image:
        width, height = image.size
        left = int(round((width - self.size) / 2))
        top = int(round((height - self.size) / 2))
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f'CenterCrop({self.size})'


def normalization(mean: Sequence[float], std: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel such that scale * x + shift = ((x / 255) - mean) / std
    for uint8 levels x: the normalisation of every transform, on the host or a device."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f'DATA.IMAGENET_MEAN / IMAGENET_STD must be 3 values (std > 0), got {mean}, {std}')
    std = np.asarray(std, dtype=np.float64)
    return 1.0 / (255.0 * std), -np.asarray(mean, dtype=np.float64) / std


class ToUint8Array:
    """uint8 RGB PIL image -> uint8 CHW array."""

    def __call__(self, image: Image.Image, rng: Optional[Generator] = None) -> np.ndarray:
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f'expected an 8-bit RGB image, got mode {image.mode}')
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def __repr__(self) -> str:
        return 'ToUint8Array()'


class ToNormalizedArray:
    """uint8 RGB PIL image -> float32 CHW array of ((x / 255) - mean) / std.

    A 256-entry table per channel turns the conversion, scaling and
    normalisation into one gather per channel, written straight into CHW order.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        scale, shift = normalization(mean, std)
        levels = np.arange(256, dtype=np.float64)
        self.table = (levels[None, :] * scale[:, None] + shift[:, None]).astype(np.float32)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, rng: Optional[Generator] = None) -> np.ndarray:
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f'expected an 8-bit RGB image, got mode {image.mode}')
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        for channel in range(3):
            np.take(self.table[channel], pixels[:, :, channel], out=out[channel])
        return out

    def __repr__(self) -> str:
        return f'ToNormalizedArray(mean={self.mean}, std={self.std})'


class RandomErasing:
    """Replace `count` random rectangles of a normalised image with normal noise.

    With probability `prob` per image; each rectangle covers `area` (a fraction
    of the image, divided by `count`) with an aspect ratio log-uniform in
    `aspect`; ten tries per rectangle to fit it inside the image. Mode 'pixel'
    draws noise per pixel and channel, 'rand' one value per channel, 'const'
    fills zeros (the mean colour after normalisation).

    In two halves: `__call__` draws the rectangles of one uint8 CHW image in a loader
    worker, from the sample's generator, and returns (image, rectangles); `apply`
    fills them in a normalised batch on its device, drawing the noise there.
    """

    MODES = ('pixel', 'rand', 'const')

    def __init__(self, prob: float = 0.25, mode: str = 'pixel', count: int = 1,
                 area: Tuple[float, float] = (0.02, 1 / 3), aspect: Tuple[float, float] = (0.3, 1 / 0.3)):
        if not 0 <= prob <= 1:
            raise ValueError(f'TRAIN.RANDOM_ERASE_PROB must be in [0, 1], got {prob}')
        if mode not in self.MODES:
            raise ValueError(f'TRAIN.RANDOM_ERASE_MODE = {mode!r} is not one of {", ".join(self.MODES)}')
        if count < 1:
            raise ValueError(f'TRAIN.RANDOM_ERASE_COUNT must be >= 1, got {count}')
        self.prob, self.mode, self.count, self.area = prob, mode, count, area
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, array: np.ndarray, rng: Generator) -> Tuple[np.ndarray, np.ndarray]:
        """`array` and its rectangles, `count` rows of (top, left, height, width); a
        rectangle not drawn is all zeros."""
        boxes = np.zeros((self.count, 4), dtype=np.int32)
        if rng.random() >= self.prob:
            return array, boxes
        _, height, width = array.shape
        for box in boxes:
            for _ in range(10):
                target_area = rng.uniform(*self.area) * height * width / self.count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                box_h = int(round(math.sqrt(target_area * aspect)))
                box_w = int(round(math.sqrt(target_area / aspect)))
                if box_w < width and box_h < height:
                    box[:] = (int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)),
                              box_h, box_w)
                    break
        return array, boxes

    def apply(self, images, boxes):
        """Fill the rectangles `boxes` (B, count, 4) of the normalised `images` (B, C, H, W),
        Paddle tensors on one device, with this mode's noise (drawn from Paddle's generator)."""
        import paddle
        batch, channels, height, width = images.shape
        rows = paddle.arange(height, dtype='int32').reshape([1, 1, height, 1])
        cols = paddle.arange(width, dtype='int32').reshape([1, 1, 1, width])
        for k in range(boxes.shape[1]):
            top, left, box_h, box_w = (boxes[:, k, i].reshape([-1, 1, 1, 1]) for i in range(4))
            inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
            if self.mode == 'pixel':
                fill = paddle.randn([batch, channels, height, width], dtype=images.dtype)
            elif self.mode == 'rand':
                fill = paddle.randn([batch, channels, 1, 1], dtype=images.dtype).expand_as(images)
            else:
                fill = paddle.zeros_like(images)
            images = paddle.where(inside.expand_as(images), fill, images)
        return images

    def __repr__(self) -> str:
        return f'RandomErasing(prob={self.prob}, mode={self.mode}, count={self.count})'


class DeviceFinish:
    """The loader's last step, on the batch's device: uint8 images -> normalised float32,
    and in training the random erasing whose rectangles the workers drew."""

    def __init__(self, config, training: bool):
        self.scale, self.shift = normalization(config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)
        train = config.TRAIN
        self.erasing = RandomErasing(train.RANDOM_ERASE_PROB, train.RANDOM_ERASE_MODE, train.RANDOM_ERASE_COUNT) \
            if training and train.RANDOM_ERASE_PROB > 0 else None

    def __call__(self, images, boxes):
        import paddle
        scale = paddle.to_tensor(self.scale.astype(np.float32)).reshape([1, 3, 1, 1])
        shift = paddle.to_tensor(self.shift.astype(np.float32)).reshape([1, 3, 1, 1])
        images = images.astype('float32') * scale + shift
        return images if self.erasing is None else self.erasing.apply(images, boxes)


# ---------------------------------------------------------------- RandAugment
# timm's RandAugment: each op turns a magnitude in [0, 10] into its argument;
# "increasing" ops grow stronger with the magnitude (posterize keeps fewer bits,
# solarize lowers its threshold, enhance moves further from 1 either way).

MAX_LEVEL = 10.0
ROTATE_MAX_DEGREES = 30.0
SHEAR_MAX = 0.3
TRANSLATE_MAX_PCT = 0.45
SOLARIZE_ADD_MAX = 110
SOLARIZE_ADD_THRESHOLD = 128


def _signed(value: float, rng: Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix, fill, resample) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _posterize(image: Image.Image, bits: int, **_) -> Image.Image:
    # keep the top `bits` bits; 0 bits is black (newer Pillow's posterize refuses 0)
    if bits >= 8:
        return image
    mask = 0xFF & ~(2 ** (8 - max(bits, 0)) - 1)
    return image.point([level & mask for level in range(256)] * len(image.getbands()))


def _solarize_add(image: Image.Image, add: int, **_) -> Image.Image:
    table = [min(255, level + add) if level < SOLARIZE_ADD_THRESHOLD else level for level in range(256)]
    return image.point(table * len(image.getbands()))


def _enhance(enhancer):
    def apply(image: Image.Image, factor: float, **_) -> Image.Image:
        return enhancer(image).enhance(factor)
    return apply


def _enhance_increasing(level: float, rng: Generator) -> float:
    return max(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9, rng))


def _enhance_plain(level: float, rng: Generator) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


# name -> (apply(image, argument, fill=, resample=), level -> argument or None)
RAND_OPS: Dict[str, Tuple[Callable, Optional[Callable]]] = {
    'AutoContrast': (lambda image, _, **__: ImageOps.autocontrast(image), None),
    'Equalize': (lambda image, _, **__: ImageOps.equalize(image), None),
    'Invert': (lambda image, _, **__: ImageOps.invert(image), None),
    'Rotate': (lambda image, degrees, fill, resample: image.rotate(degrees, resample=resample, fillcolor=fill),
               lambda level, rng: _signed(level / MAX_LEVEL * ROTATE_MAX_DEGREES, rng)),
    'Posterize': (_posterize, lambda level, rng: int(level / MAX_LEVEL * 4)),
    'PosterizeIncreasing': (_posterize, lambda level, rng: 4 - int(level / MAX_LEVEL * 4)),
    'Solarize': (lambda image, threshold, **_: ImageOps.solarize(image, threshold),
                 lambda level, rng: int(level / MAX_LEVEL * 256)),
    'SolarizeIncreasing': (lambda image, threshold, **_: ImageOps.solarize(image, threshold),
                           lambda level, rng: 256 - int(level / MAX_LEVEL * 256)),
    'SolarizeAdd': (_solarize_add, lambda level, rng: int(level / MAX_LEVEL * SOLARIZE_ADD_MAX)),
    'Color': (_enhance(ImageEnhance.Color), _enhance_plain),
    'ColorIncreasing': (_enhance(ImageEnhance.Color), _enhance_increasing),
    'Contrast': (_enhance(ImageEnhance.Contrast), _enhance_plain),
    'ContrastIncreasing': (_enhance(ImageEnhance.Contrast), _enhance_increasing),
    'Brightness': (_enhance(ImageEnhance.Brightness), _enhance_plain),
    'BrightnessIncreasing': (_enhance(ImageEnhance.Brightness), _enhance_increasing),
    'Sharpness': (_enhance(ImageEnhance.Sharpness), _enhance_plain),
    'SharpnessIncreasing': (_enhance(ImageEnhance.Sharpness), _enhance_increasing),
    'ShearX': (lambda image, shear, fill, resample: _affine(image, (1, shear, 0, 0, 1, 0), fill, resample),
               lambda level, rng: _signed(level / MAX_LEVEL * SHEAR_MAX, rng)),
    'ShearY': (lambda image, shear, fill, resample: _affine(image, (1, 0, 0, shear, 1, 0), fill, resample),
               lambda level, rng: _signed(level / MAX_LEVEL * SHEAR_MAX, rng)),
    'TranslateXRel': (lambda image, pct, fill, resample: _affine(
                          image, (1, 0, pct * image.width, 0, 1, 0), fill, resample),
                      lambda level, rng: _signed(level / MAX_LEVEL * TRANSLATE_MAX_PCT, rng)),
    'TranslateYRel': (lambda image, pct, fill, resample: _affine(
                          image, (1, 0, 0, 0, 1, pct * image.height), fill, resample),
                      lambda level, rng: _signed(level / MAX_LEVEL * TRANSLATE_MAX_PCT, rng)),
}

_SHARED_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate']
_GEOMETRIC_OPS = ['ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
RAND_OPS_PLAIN: List[str] = _SHARED_OPS + [
    'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness'] + _GEOMETRIC_OPS
RAND_OPS_INCREASING: List[str] = _SHARED_OPS + [
    'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'] + _GEOMETRIC_OPS

# policy-string keys: name -> (parser, default); longer names first so 'mstd' is not read as 'm'
_POLICY_KEYS = {
    'mstd': (float, 0.0),
    'mmax': (float, MAX_LEVEL),
    'inc': (int, 0),
    'm': (float, 9.0),
    'n': (int, 2),
    'p': (float, 0.5),
}
_POLICY_SEGMENT = re.compile(r'^(' + '|'.join(_POLICY_KEYS) + r')(.+)$')


def parse_rand_augment(policy: str) -> Dict[str, float]:
    """Parse 'rand-m9-mstd0.5-inc1' into {'m': 9.0, 'mstd': 0.5, 'inc': 1, 'n': 2, ...}.

    Keys: m magnitude (0..mmax), n ops per image, mstd magnitude noise std
    ('inf': uniform in [0, m]), mmax magnitude cap, inc 1 for the increasing op
    set, p probability of applying each chosen op. Anything else is an error.
    """
    segments = policy.split('-')
    if segments[0] != 'rand':
        raise ValueError(f'RandAugment policy {policy!r} must start with "rand-"')
    params = {key: default for key, (_, default) in _POLICY_KEYS.items()}
    seen = set()
    for segment in segments[1:]:
        match = _POLICY_SEGMENT.match(segment)
        if not match:
            raise ValueError(f'RandAugment policy {policy!r}: unknown part {segment!r} '
                             f'(known: {", ".join(_POLICY_KEYS)})')
        key, text = match.groups()
        if key in seen:
            raise ValueError(f'RandAugment policy {policy!r}: {key!r} given twice')
        seen.add(key)
        try:
            params[key] = _POLICY_KEYS[key][0](text)
        except ValueError:
            raise ValueError(f'RandAugment policy {policy!r}: {segment!r} has a bad value {text!r}') from None
    if params['n'] < 1 or params['inc'] not in (0, 1) or not 0 <= params['p'] <= 1 \
            or params['mstd'] < 0 or not 0 <= params['m'] <= params['mmax']:
        raise ValueError(f'RandAugment policy {policy!r}: need n >= 1, inc 0 or 1, 0 <= p <= 1, '
                         f'mstd >= 0, 0 <= m <= mmax')
    return params


class RandAugment:
    """timm-style RandAugment from a policy string such as 'rand-m9-mstd0.5-inc1'.

    Per image: pick `n` ops uniformly with replacement; apply each with
    probability `p` at a magnitude drawn from N(m, mstd) (uniform [0, m] when
    mstd is inf) and clipped to [0, mmax]. Geometric ops fill uncovered pixels
    with `fill` and resample with `interpolation`.
    """

    def __init__(self, policy: str, fill: Tuple[int, int, int] = (128, 128, 128),
                 interpolation: str = 'bicubic'):
        params = parse_rand_augment(policy)
        self.policy = policy
        self.magnitude, self.magnitude_std, self.magnitude_max = params['m'], params['mstd'], params['mmax']
        self.num_ops, self.prob = params['n'], params['p']
        self.op_names = RAND_OPS_INCREASING if params['inc'] else RAND_OPS_PLAIN
        self.fill = tuple(int(v) for v in fill)
        self.resample = pil_interpolation(interpolation)

    def sample_magnitude(self, rng: Generator) -> float:
        """One op's magnitude, noisy when mstd > 0, within [0, mmax]."""
        magnitude = self.magnitude
        if self.magnitude_std == float('inf'):
            magnitude = rng.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return min(max(magnitude, 0.0), self.magnitude_max)

    def __call__(self, image: Image.Image, rng: Generator) -> Image.Image:
        for pick in rng.integers(0, len(self.op_names), size=self.num_ops):
            if self.prob < 1 and rng.random() >= self.prob:
                continue
            apply, level_to_arg = RAND_OPS[self.op_names[pick]]
            argument = level_to_arg(self.sample_magnitude(rng), rng) if level_to_arg else None
            image = apply(image, argument, fill=self.fill, resample=self.resample)
        return image

    def __repr__(self) -> str:
        return f'RandAugment({self.policy!r})'


# ---------------------------------------------------------------- recipes

def _augment_policy(config) -> str:
    """The RandAugment policy string from TRAIN.RAND_AUGMENT / TRAIN.AUTO_AUGMENT ('' if off)."""
    rand, auto = config.TRAIN.RAND_AUGMENT or '', config.TRAIN.AUTO_AUGMENT or ''
    for key, value in (('TRAIN.RAND_AUGMENT', rand), ('TRAIN.AUTO_AUGMENT', auto)):
        if not isinstance(value, str):
            raise ValueError(f'{key} must be a policy string such as "rand-m9-mstd0.5-inc1" or "", got {value!r}')
        if value and not value.startswith('rand'):
            raise ValueError(f'{key} = {value!r}: only RandAugment policies ("rand-...") are supported')
    if rand and auto and rand != auto:
        raise ValueError(f'TRAIN.RAND_AUGMENT = {rand!r} and TRAIN.AUTO_AUGMENT = {auto!r} disagree; set one')
    return rand or auto


def build_train_transforms(config) -> Compose:
    """The recipe's training transform: PIL RGB image -> (uint8 CHW array, rectangles to
    erase); `DeviceFinish` normalises and erases the batch."""
    data, train = config.DATA, config.TRAIN
    if train.CROP_MODE == 'random_resized':
        crop = RandomResizedCrop(data.IMAGE_SIZE, scale=tuple(train.CROP_SCALE), interpolation=data.INTERPOLATION)
    else:  # resize_random (validate_config admits no other)
        crop = ResizeRandomCrop(data.IMAGE_SIZE, interpolation=data.INTERPOLATION)
    steps = [crop, RandomHorizontalFlip(0.5)]
    policy = _augment_policy(config)
    if policy:
        # geometric ops fill with the dataset's mean colour, as timm's factory does
        fill = tuple(min(255, round(255 * m)) for m in data.IMAGENET_MEAN)
        steps.append(RandAugment(policy, fill=fill, interpolation=data.INTERPOLATION))
    elif train.COLOR_JITTER:
        steps.append(ColorJitter(train.COLOR_JITTER))
    normalization(data.IMAGENET_MEAN, data.IMAGENET_STD)  # checked here, applied on the device
    steps.append(ToUint8Array())
    if train.RANDOM_ERASE_SPLIT:
        raise ValueError('TRAIN.RANDOM_ERASE_SPLIT = True needs augmentation splits, which this pipeline does not make')
    # without erasing, one empty rectangle per image keeps the batch's shape
    steps.append(RandomErasing(train.RANDOM_ERASE_PROB, train.RANDOM_ERASE_MODE, train.RANDOM_ERASE_COUNT)
                 if train.RANDOM_ERASE_PROB > 0 else RandomErasing(0.0))
    return Compose(steps)


def build_val_transforms(config, on_device: bool = False) -> Compose:
    """Evaluation: short side to int(IMAGE_SIZE / CROP_PCT), centre crop IMAGE_SIZE, normalise
    (to float32 CHW), or with `on_device` leave the normalising to `DeviceFinish` (uint8 CHW)."""
    data = config.DATA
    last = ToUint8Array() if on_device else ToNormalizedArray(data.IMAGENET_MEAN, data.IMAGENET_STD)
    return Compose([Resize(int(data.IMAGE_SIZE / data.CROP_PCT), data.INTERPOLATION),
                    CenterCrop(data.IMAGE_SIZE), last])
