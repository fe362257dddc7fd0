"""The private parts of Paddle this project reads, in one place, each with its reason.

Paddle's layers keep their settings (a convolution's stride, a BatchNorm's epsilon
and running statistics, the forward hooks) in attributes with a leading underscore
and offer no public way to read them. The speed layers (fast/) read them to compute
what a layer computes without calling it, tools/model_info.py to count a
convolution's work, the engine to average BatchNorm statistics over processes, and
runtime.py to give Paddle's own OpenMP kernels their threads. Nothing else in the
project touches a private Paddle name. Each one here has the same meaning in Paddle
2.6 and 3.x (tests/test_paddle_internals.py checks them on the installed Paddle).

Importing this module imports Paddle: runtime.py imports it only after its start-up.
"""

from typing import NamedTuple, Optional, Tuple

import paddle
import paddle.nn as nn


class ConvGeometry(NamedTuple):
    """How an nn.Conv2D slides over its input (its kernel size and groups show in its
    weight's shape, (out channels, in channels / groups, kernel height, kernel width))."""
    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]  # (top, bottom), (left, right)
    dilation: Tuple[int, int]
    explicit_padding: bool  # False for padding 'SAME' / 'VALID' (then `padding` is not the rule)
    channels_first: bool  # NCHW
    zero_padding: bool  # padding_mode 'zeros'


def padding_pairs(padding) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(top, bottom), (left, right) from Paddle's padding forms: an int, [ph, pw] or [t, b, l, r]."""
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return (padding[0], padding[0]), (padding[1], padding[1])
    if len(padding) == 4:
        return (padding[0], padding[1]), (padding[2], padding[3])
    raise ValueError(f'padding {padding!r}: expected an int, 2 or 4 ints')


def conv_geometry(conv: nn.Conv2D) -> ConvGeometry:
    """The geometry nn.Conv2D was built with: it keeps its arguments as `_stride`,
    `_dilation`, `_data_format`, `_padding_mode`, and its padding, normalised to per-axis
    values, as `_updated_padding` (with `_padding_algorithm`)."""
    stride, dilation = (tuple(int(v) for v in value) for value in (conv._stride, conv._dilation))
    explicit = getattr(conv, '_padding_algorithm', 'EXPLICIT') == 'EXPLICIT'
    padding = padding_pairs(conv._updated_padding) if explicit else ((0, 0), (0, 0))
    return ConvGeometry(stride, padding, dilation, explicit, conv._data_format == 'NCHW',
                        conv._padding_mode == 'zeros')


class BatchNormSettings(NamedTuple):
    momentum: float
    epsilon: float
    batch_statistics_in_training: bool  # not use_global_stats=True
    channels_first: bool  # NCHW


def batch_norm_settings(norm: nn.BatchNorm2D) -> BatchNormSettings:
    """nn.BatchNorm2D's arguments, kept as `_momentum`, `_epsilon`, `_use_global_stats`
    (None or False: batch statistics in training) and `_data_format`."""
    return BatchNormSettings(float(norm._momentum), float(norm._epsilon), not norm._use_global_stats,
                             norm._data_format == 'NCHW')


def batch_norm_statistics(norm: nn.Layer) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """A BatchNorm's running mean and variance: Paddle's BatchNorm layers hold them as
    `_mean` and `_variance` (also their state-dict names), with no public attribute."""
    return norm._mean, norm._variance


def layer_norm_epsilon(norm: nn.LayerNorm) -> float:
    """nn.LayerNorm's epsilon, kept as `_epsilon`."""
    return float(norm._epsilon)


def has_forward_hooks(layer: nn.Layer) -> bool:
    """Whether `layer` has a forward pre- or post-hook: Paddle keeps them in the dicts
    `_forward_pre_hooks` and `_forward_post_hooks` and has no public query."""
    return bool(layer._forward_pre_hooks) or bool(layer._forward_post_hooks)


def set_num_threads(count: int) -> None:
    """Give MKL and Paddle's own OpenMP kernels `count` threads: the setter lives in
    `paddle.base.core`, Paddle's compiled core, and is not exported elsewhere."""
    try:
        paddle.base.core.set_num_threads(count)
    except (RuntimeError, NotImplementedError):  # a Paddle built with neither MKL nor OpenBLAS
        pass


def autocast_dtype() -> Optional[str]:
    """The dtype autocast computes in where this runs ('float16' or 'bfloat16'), None
    outside autocast: `paddle.amp.auto_cast` keeps its state on the dynamic graph's
    tracer (`_amp_level`, `_amp_dtype`) and offers no public query."""
    tracer = paddle.base.framework._dygraph_tracer()
    if tracer is None or tracer._amp_level == paddle.base.core.AmpLevel.O0:
        return None
    return str(tracer._amp_dtype)


def loss_scale(scaler: paddle.amp.GradScaler) -> paddle.Tensor:
    """A float16 GradScaler's current loss scale, on the device: kept as `_scale`; the
    only public reader, `state_dict()`, copies it to the host, which a step must not wait for."""
    return scaler._scale


def overflow_found(scaler: paddle.amp.GradScaler) -> paddle.Tensor:
    """Whether the scaler's last `step` found an inf or NaN gradient (and skipped the
    update), on the device: kept as `_found_inf`, with no public reader."""
    return scaler._found_inf
