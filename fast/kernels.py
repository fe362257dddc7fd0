"""The CPU kernels (csrc/cpu_kernels.c, built by build.py) as differentiable Paddle ops.

Paddle's CPU kernels for depthwise convolution, softmax, LayerNorm, BatchNorm,
SiLU, broadcast bias additions, residual additions, the token/map transpose and
bias gradients run on one thread, several times slower than the memory traffic
allows, and its convolution runs a small GEMM per image; on a CvT they cost as
much as all the matrix products. Each op here calls the C kernel through ctypes
on the tensors' own memory, wrapped in a ``PyLayer`` with its hand-written
backward where a gradient is wanted, and called directly without one (then the
ops told `overwrite` write into the caller's temporary: one pass less).

`runs_on(x)` says where the kernels run: dynamic mode, float32 tensors on the CPU,
with the library built. The ops the fast layers call on any tensor (`linear`,
`add_bias`, `softmax`, `tokens_to_maps`) run Paddle's ops elsewhere (GPU, float16, no
library); the others are called only where `runs_on` holds.
"""

from typing import Optional, Sequence, Tuple

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from fast import build

FLOAT_BYTES = 4  # the kernels take float32 only


def runs_on(x: paddle.Tensor) -> bool:
    """True where the kernels run on `x`: dynamic mode, float32, CPU, library built."""
    if not paddle.in_dynamic_mode() or x.dtype != paddle.float32 or not x.place.is_cpu_place():
        return False
    return build.load() is not None


def _lib():
    """The loaded library (the ops below are called only where `runs_on` holds)."""
    return build.load()


def _contiguous(x: paddle.Tensor) -> paddle.Tensor:
    # Paddle 3 hands out strided views (transpose, slices); the kernels read raw memory
    return x if x.is_contiguous() else x.contiguous()


def _ptr(x: Optional[paddle.Tensor]) -> Optional[int]:
    # the caller keeps `x` referenced until the kernel returns: a temporary (such as a
    # contiguous copy) made inside the call's arguments would be freed before it runs
    return None if x is None else x.data_ptr()


def _needs_grad(*inputs: paddle.Tensor) -> Tuple[bool, ...]:
    """Which inputs want a gradient: a PyLayer's backward must return None for the others."""
    return tuple(not t.stop_gradient for t in inputs)


def _only_needed(needs: Sequence[bool], *grads):
    return tuple(grad if need else None for need, grad in zip(needs, grads))


def _empty(shape: Sequence[int]) -> paddle.Tensor:
    return paddle.empty([int(s) for s in shape], dtype='float32')


class _DepthwiseConv2D(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, stride: int, padding: int):
        ctx.needs_grad = _needs_grad(x, weight)
        x, weight = _contiguous(x), _contiguous(weight)
        y, geometry = _dwconv_forward(x, weight, None, None, stride, padding)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        dy = _contiguous(dy)
        needs_x, needs_weight = ctx.needs_grad
        dx = _empty(x.shape) if needs_x else None
        dweight = _empty(weight.shape) if needs_weight else None
        _lib().cvt_dwconv2d_backward(_ptr(dy), _ptr(x), _ptr(weight), _ptr(dx), _ptr(dweight),
                                     *ctx.geometry)
        return dx, dweight


def _dwconv_forward(x, weight, bias, lead, stride: int, padding: int):
    batch, channels, height, width = (int(s) for s in x.shape)
    kernel = int(weight.shape[-1])
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    geometry = (batch, channels, height, width, kernel, stride, padding, out_h, out_w)
    y = _empty([batch, channels, out_h, out_w] if lead is None else [batch, channels, 1 + out_h * out_w])
    _lib().cvt_dwconv2d_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(lead), _ptr(y), *geometry)
    return y, geometry


def _check_lead(x: paddle.Tensor, lead: paddle.Tensor) -> paddle.Tensor:
    if list(lead.shape) != [int(x.shape[0]), int(x.shape[1]), 1]:
        raise ValueError(f'a lead column of shape {list(lead.shape)} for maps shaped {list(x.shape)}; '
                         f'expected {[int(x.shape[0]), int(x.shape[1]), 1]}')
    return _contiguous(lead)


def depthwise_conv2d(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor] = None,
                     stride: int = 1, padding: int = 0, lead: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """Depthwise convolution of (B, C, H, W) `x` with a (C, 1, K, K) `weight`, square
    kernel, the same `stride` and zero `padding` on both axes. For inference only (no
    gradient): `bias` (C,), which serves BatchNorm folded into the weights, and
    `lead` (B, C, 1), a column put before each flattened output map: the output is
    then (B, C, 1 + OH * OW), a cls token joined to q, k or v without a copy."""
    if int(weight.shape[-1]) ** 2 > 64 or int(weight.shape[1]) != 1:
        raise ValueError(f'depthwise_conv2d: kernel {list(weight.shape)} not supported (K*K <= 64, one filter per channel)')
    if bias is not None or lead is not None:
        extras = [t for t in (bias, lead) if t is not None]
        if paddle.is_grad_enabled() and not all(t.stop_gradient for t in [x, weight] + extras):
            raise ValueError('depthwise_conv2d: a bias or a lead column is for inference (no gradient)')
        lead = None if lead is None else _check_lead(x, lead)
        return _dwconv_forward(_contiguous(x), _contiguous(weight), None if bias is None else _contiguous(bias),
                               lead, stride, padding)[0]
    return _DepthwiseConv2D.apply(x, weight, stride, padding)


class _Im2Col(PyLayer):
    @staticmethod
    def forward(ctx, x, kernel: int, stride: int, padding: int):
        x = _contiguous(x)
        batch, channels, height, width = (int(s) for s in x.shape)
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        ctx.geometry = (batch, channels, height, width, kernel, stride, padding, out_h, out_w)
        cols = _empty([batch * out_h * out_w, channels * kernel * kernel])
        _lib().cvt_im2col(_ptr(x), _ptr(cols), *ctx.geometry)
        return cols

    @staticmethod
    def backward(ctx, dcols):
        batch, channels, height, width = ctx.geometry[:4]
        dx = _empty([batch, channels, height, width])
        dcols = _contiguous(dcols)
        _lib().cvt_col2im(_ptr(dcols), _ptr(dx), *ctx.geometry)
        return dx


def patch_conv(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor],
               stride: int, padding: int) -> Tuple[paddle.Tensor, int, int]:
    """A convolution of (B, C, H, W) `x` with an (O, C, K, K) `weight`, giving
    (B, OH*OW, O) tokens, OH and OW (the layout the patch embedding wants next): the K x K
    patches as rows (a threaded im2col) times the weight, one GEMM for the whole
    batch, where Paddle's CPU convolution runs a small GEMM per image."""
    kernel = int(weight.shape[-1])
    if int(weight.shape[-2]) != kernel:
        raise ValueError(f'patch_conv: a square kernel is needed, got {list(weight.shape)}')
    batch, height, width = int(x.shape[0]), int(x.shape[2]), int(x.shape[3])
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    cols = _Im2Col.apply(x, kernel, stride, padding)
    weight_t = weight.reshape([int(weight.shape[0]), -1]).transpose([1, 0])
    tokens = linear(cols, weight_t, bias)
    return tokens.reshape([batch, out_h * out_w, int(weight.shape[0])]), out_h, out_w


class _Softmax(PyLayer):
    @staticmethod
    def forward(ctx, x):
        x = _contiguous(x)
        y = _empty(x.shape)
        cols = int(x.shape[-1])
        _lib().cvt_softmax_forward(_ptr(x), _ptr(y), int(x.size) // cols, cols)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensor()
        dy = _contiguous(dy)
        dx = _empty(y.shape)
        cols = int(y.shape[-1])
        _lib().cvt_softmax_backward(_ptr(y), _ptr(dy), _ptr(dx), int(y.size) // cols, cols)
        return dx


def _reusable(x: paddle.Tensor, overwrite: bool) -> bool:
    """Whether a kernel may write its result into `x`: the caller says `x` is a
    temporary it no longer needs, and no gradient is recorded (so autograd keeps
    no reference to it)."""
    return overwrite and x.is_contiguous() and (not paddle.is_grad_enabled() or x.stop_gradient)


def softmax(x: paddle.Tensor, overwrite: bool = False) -> paddle.Tensor:
    """Softmax over the last axis (F.softmax where the kernels do not run). `overwrite`:
    `x` is a temporary the caller no longer needs; without gradients the result goes
    into it (one pass less over memory)."""
    if not runs_on(x):
        return F.softmax(x, axis=-1)
    if _reusable(x, overwrite):
        cols = int(x.shape[-1])
        _lib().cvt_softmax_forward(_ptr(x), _ptr(x), int(x.size) // cols, cols)
        return x
    return _Softmax.apply(x)


class _LayerNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, epsilon: float):
        ctx.needs_grad = _needs_grad(x, weight, bias)
        x = _contiguous(x)
        cols = int(x.shape[-1])
        rows = int(x.size) // cols
        y = _empty(x.shape)
        mean, rstd = _empty([rows]), _empty([rows])
        _lib().cvt_layer_norm_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), _ptr(mean), _ptr(rstd),
                                      rows, cols, epsilon)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensor()
        dy = _contiguous(dy)
        cols = int(x.shape[-1])
        dx, dweight, dbias = _empty(x.shape), _empty([cols]), _empty([cols])
        _lib().cvt_layer_norm_backward(_ptr(dy), _ptr(x), _ptr(weight), _ptr(mean), _ptr(rstd),
                                       _ptr(dx), _ptr(dweight), _ptr(dbias), int(x.size) // cols, cols)
        return _only_needed(ctx.needs_grad, dx, dweight, dbias)


def layer_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last axis with an affine `weight` and `bias`."""
    if not paddle.is_grad_enabled() or all(t.stop_gradient for t in (x, weight, bias)):
        x = _contiguous(x)
        cols = int(x.shape[-1])
        y = _empty(x.shape)
        weight, bias = _contiguous(weight), _contiguous(bias)
        _lib().cvt_layer_norm_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y),
                                      None, None, int(x.size) // cols, cols, epsilon)
        return y
    return _LayerNorm.apply(x, weight, bias, epsilon)


def _check_bias(x: paddle.Tensor, bias: paddle.Tensor, axis: int) -> None:
    # the kernels index the bias by channel: a wrong size would read past its end
    if list(bias.shape) != [int(x.shape[axis])]:
        raise ValueError(f'bias of shape {list(bias.shape)} for axis {axis} of an input shaped {list(x.shape)}')


class _BiasSiLU(PyLayer):
    @staticmethod
    def forward(ctx, x, bias, slope: float):
        ctx.needs_grad = _needs_grad(x, bias)
        x, bias = _contiguous(x), _contiguous(bias)
        y = _empty(x.shape)
        cols = int(x.shape[-1])
        _lib().cvt_bias_silu_forward(_ptr(x), _ptr(bias), _ptr(y), int(x.size) // cols, cols, slope)
        ctx.save_for_backward(x, bias)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensor()
        dz = _empty(x.shape)
        cols = int(x.shape[-1])
        dy = _contiguous(dy)
        _lib().cvt_bias_silu_backward(_ptr(x), _ptr(bias), _ptr(dy), _ptr(dz),
                                      int(x.size) // cols, cols, ctx.slope)
        return _only_needed(ctx.needs_grad, dz, channel_sum(dz, -1) if ctx.needs_grad[1] else None)


def bias_silu(x: paddle.Tensor, bias: paddle.Tensor, slope: float = 1.0, overwrite: bool = False) -> paddle.Tensor:
    """``z * sigmoid(slope * z)`` of ``z = x + bias``, `bias` along the last axis: a Linear
    layer's bias and its activation in one pass. Slope 1 is SiLU; 1.702 is QuickGELU,
    CvT's activation. `overwrite` as for `softmax`."""
    _check_bias(x, bias, len(x.shape) - 1)
    if _reusable(x, overwrite) and (not paddle.is_grad_enabled() or bias.stop_gradient):
        cols = int(x.shape[-1])
        bias = _contiguous(bias)
        _lib().cvt_bias_silu_forward(_ptr(x), _ptr(bias), _ptr(x), int(x.size) // cols, cols, slope)
        return x
    return _BiasSiLU.apply(x, bias, slope)


def _around_axis(shape: Sequence[int], axis: int) -> Tuple[int, int, int]:
    """(A, C, L): the sizes before `axis`, at it and after it, multiplied out."""
    outer = inner = 1
    for s in shape[:axis]:
        outer *= int(s)
    for s in shape[axis + 1:]:
        inner *= int(s)
    return outer, int(shape[axis]), inner


def channel_sum(x: paddle.Tensor, channels_axis: int) -> paddle.Tensor:
    """Sum of `x` over every axis but `channels_axis`: the gradient of a broadcast bias."""
    x = _contiguous(x)
    outer, channels, inner = _around_axis(x.shape, channels_axis % len(x.shape))
    out = _empty([channels])
    _lib().cvt_channel_sum(_ptr(x), _ptr(out), outer, channels, inner)
    return out


class _Linear(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.needs_grad = _needs_grad(x, weight, bias)
        rows = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
        ctx.save_for_backward(x, weight)
        return rows.reshape(list(x.shape[:-1]) + [weight.shape[1]])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        dy = _contiguous(dy).reshape([-1, weight.shape[1]])
        x_rows = x.reshape([-1, weight.shape[0]])
        needs_x, needs_weight, needs_bias = ctx.needs_grad
        dx = paddle.matmul(dy, weight, transpose_y=True).reshape(x.shape) if needs_x else None
        dweight = paddle.matmul(x_rows, dy, transpose_x=True) if needs_weight else None
        return dx, dweight, (channel_sum(dy, 1) if needs_bias else None)


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor]) -> paddle.Tensor:
    """``x @ weight + bias`` over the last axis of a contiguous `x`. On the CPU the bias
    goes into the GEMM (addmm: Paddle's F.linear adds it in a separate single-threaded
    pass that costs as much as a small matmul); with a gradient, through the kernels,
    its gradient is a threaded column sum."""
    if bias is None or not x.place.is_cpu_place():
        return F.linear(x, weight, bias)
    if runs_on(x) and paddle.is_grad_enabled() and not all(t.stop_gradient for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias)
    rows = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
    return rows.reshape(list(x.shape[:-1]) + [weight.shape[1]])


def linear_silu(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, slope: float) -> paddle.Tensor:
    """``z * sigmoid(slope * z)`` of ``z = x @ weight + bias`` (slope 1.702: QuickGELU): the
    GEMM, then the bias and the activation in one threaded pass (`bias_silu`)."""
    rows = paddle.matmul(x.reshape([-1, x.shape[-1]]), weight)
    return bias_silu(rows, bias, slope, overwrite=True).reshape(list(x.shape[:-1]) + [weight.shape[1]])


def _add_bias_forward(x: paddle.Tensor, bias: paddle.Tensor, axis: int, overwrite: bool = False) -> paddle.Tensor:
    x = _contiguous(x)
    y = x if overwrite else _empty(x.shape)
    bias = _contiguous(bias)
    _lib().cvt_add_bias(_ptr(x), _ptr(bias), _ptr(y), *_around_axis(x.shape, axis))
    return y


class _AddBias(PyLayer):
    @staticmethod
    def forward(ctx, x, bias, axis: int):
        ctx.needs_grad = _needs_grad(x, bias)
        ctx.axis = axis
        return _add_bias_forward(x, bias, axis)

    @staticmethod
    def backward(ctx, dy):
        needs_x, needs_bias = ctx.needs_grad
        return (dy if needs_x else None), (channel_sum(dy, ctx.axis) if needs_bias else None)


def add_bias(x: paddle.Tensor, bias: paddle.Tensor, axis: int = -1, overwrite: bool = False) -> paddle.Tensor:
    """`x` plus a 1-D `bias` broadcast along `axis`, in one threaded pass (Paddle's
    broadcasting add is single-threaded); the bias gradient is a threaded sum.
    `overwrite` as for `softmax`. Where the kernels do not run, the bias is broadcast
    as (C, 1, ..): Paddle's CPU add is several times slower for a bias shaped (1, C, 1)."""
    axis %= len(x.shape)
    _check_bias(x, bias, axis)
    if not runs_on(x):
        return x + bias.reshape([-1] + [1] * (len(x.shape) - 1 - axis))
    if not paddle.is_grad_enabled() or (x.stop_gradient and bias.stop_gradient):
        return _add_bias_forward(x, bias, axis, _reusable(x, overwrite))
    return _AddBias.apply(x, bias, axis)


def _sample_factors(scale: Optional[paddle.Tensor], batch: int) -> Optional[paddle.Tensor]:
    if scale is None:
        return None
    if int(scale.size) != batch:
        raise ValueError(f'residual_add: a per-sample scale of shape {list(scale.shape)} for a batch of {batch}')
    return _contiguous(scale.reshape([batch]))


def _residual_forward(x: Optional[paddle.Tensor], branch: paddle.Tensor, factors: Optional[paddle.Tensor],
                      out: paddle.Tensor) -> paddle.Tensor:
    batch = int(branch.shape[0])
    _lib().cvt_residual_add(_ptr(x), _ptr(branch), _ptr(factors), _ptr(out), batch, int(branch.size) // batch)
    return out


class _ResidualAdd(PyLayer):
    @staticmethod
    def forward(ctx, x, branch, factors):
        ctx.needs_grad = _needs_grad(x, branch)
        ctx.factors = factors
        x, branch = _contiguous(x), _contiguous(branch)
        return _residual_forward(x, branch, factors, _empty(x.shape))

    @staticmethod
    def backward(ctx, dout):
        needs_x, needs_branch = ctx.needs_grad
        dbranch = None
        if needs_branch:
            dout = _contiguous(dout)
            dbranch = dout if ctx.factors is None else _residual_forward(None, dout, ctx.factors, _empty(dout.shape))
        grads = ((dout if needs_x else None), dbranch)
        return grads if ctx.factors is None else grads + (None,)


def residual_add(x: paddle.Tensor, branch: paddle.Tensor, scale: Optional[paddle.Tensor] = None,
                 overwrite: bool = False) -> paddle.Tensor:
    """``x + branch * scale``, `scale` one factor per sample (DropPath's, shaped (B, 1, ..)) or
    None, in one threaded pass (Paddle's add and multiply are single-threaded). `x` and
    `branch` have the same shape. `overwrite`: `branch` is a temporary the caller no longer
    needs; without gradients the result goes into it."""
    if list(x.shape) != list(branch.shape):
        raise ValueError(f'residual_add: x {list(x.shape)} and branch {list(branch.shape)} differ in shape')
    factors = _sample_factors(scale, int(branch.shape[0]))
    if not paddle.is_grad_enabled() or (x.stop_gradient and branch.stop_gradient):
        x = _contiguous(x)
        out = branch if _reusable(branch, overwrite) else _empty(x.shape)
        return _residual_forward(x, _contiguous(branch), factors, out)
    return _ResidualAdd.apply(x, branch, factors)


def _transpose(src: int, dst: int, batch: int, rows: int, cols: int, src_stride: int, dst_stride: int) -> None:
    """dst[b, j, i] = src[b, i, j] for the (rows, cols) matrix of each batch (addresses, float strides)."""
    _lib().cvt_transpose_batched(src, dst, batch, rows, cols, src_stride, dst_stride)


def _tokens_to_maps_forward(x: paddle.Tensor, lead: int):
    batch, length, channels = (int(s) for s in x.shape)
    maps = _empty([batch, channels, length - lead])
    _transpose(_ptr(x) + lead * channels * FLOAT_BYTES, _ptr(maps), batch, length - lead, channels,
               length * channels, channels * (length - lead))
    if not lead:
        return maps, None
    leading = _empty([batch, channels, lead])
    _transpose(_ptr(x), _ptr(leading), batch, lead, channels, length * channels, channels * lead)
    return maps, leading


class _TokensToMaps(PyLayer):
    @staticmethod
    def forward(ctx, x, lead: int):
        x = _contiguous(x)
        ctx.shape, ctx.lead = [int(s) for s in x.shape], lead
        maps, leading = _tokens_to_maps_forward(x, lead)
        return (maps, leading) if lead else maps

    @staticmethod
    def backward(ctx, dmaps, dleading=None):
        batch, length, channels = ctx.shape
        lead = ctx.lead
        dx = _empty(ctx.shape)
        dmaps = _contiguous(dmaps)
        _transpose(_ptr(dmaps), _ptr(dx) + lead * channels * FLOAT_BYTES, batch, channels,
                   length - lead, channels * (length - lead), length * channels)
        if lead:
            # an unused lead output may come back without a gradient
            dleading = paddle.zeros([batch, channels, lead]) if dleading is None else _contiguous(dleading)
            _transpose(_ptr(dleading), _ptr(dx), batch, channels, lead, channels * lead, length * channels)
        return dx


def tokens_to_maps(x: paddle.Tensor, height: int, width: int,
                   lead: int = 0) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
    """(B, lead + H*W, C) tokens -> (B, C, H, W) channels-first maps of the tokens after
    the first `lead` (the cls token), and those `lead` tokens as (B, C, lead) columns
    (None for lead 0): the split and the transpose in one threaded pass each way
    (Paddle's transpose copy and the split's gradient are single-threaded)."""
    if len(x.shape) != 3 or int(x.shape[1]) != lead + height * width:
        raise ValueError(f'tokens_to_maps: tokens shaped {list(x.shape)} for {lead} lead tokens '
                         f'and a {height}x{width} map; expected (B, {lead + height * width}, C)')
    batch, channels = int(x.shape[0]), int(x.shape[2])
    if not runs_on(x):
        leading, tokens = paddle.split(x, [lead, height * width], axis=1) if lead else (None, x)
        maps = tokens.transpose([0, 2, 1]).reshape([batch, channels, height, width])
        return maps.contiguous(), (None if leading is None else leading.transpose([0, 2, 1]))
    if not paddle.is_grad_enabled() or x.stop_gradient:
        maps, leading = _tokens_to_maps_forward(_contiguous(x), lead)
    elif lead:
        maps, leading = _TokensToMaps.apply(x, lead)
    else:
        maps, leading = _TokensToMaps.apply(x, lead), None
    return maps.reshape([batch, channels, height, width]), leading


def fold_batch_norm(weight: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor, mean: paddle.Tensor,
                    variance: paddle.Tensor, epsilon: float) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """The (C_out, ...) `weight` and a bias of a convolution followed by a BatchNorm in
    inference (running statistics), as one convolution: ``weight * f`` and
    ``beta - mean * f`` with ``f = gamma / sqrt(variance + epsilon)`` per output
    channel. No gradient."""
    channels = int(weight.shape[0])
    if any(list(t.shape) != [channels] for t in (gamma, beta, mean, variance)):
        raise ValueError(f'fold_batch_norm: BatchNorm parameters shaped {[list(t.shape) for t in (gamma, beta, mean, variance)]} '
                         f'for a weight of {channels} output channels')
    folded_weight, folded_bias = _empty(weight.shape), _empty([channels])
    inputs = [_contiguous(t) for t in (weight, gamma, beta, mean, variance)]  # alive through the call
    _lib().cvt_fold_batch_norm(*(_ptr(t) for t in inputs), epsilon,
                               _ptr(folded_weight), _ptr(folded_bias), channels, int(weight.size) // channels)
    return folded_weight, folded_bias


class _BatchNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, lead, running_mean, running_variance, momentum: float, epsilon: float):
        ctx.needs_grad = _needs_grad(x, weight, bias) + ((not lead.stop_gradient,) if lead is not None else ())
        x = _contiguous(x)
        batch, channels = int(x.shape[0]), int(x.shape[1])
        length = int(x.size) // (batch * channels)
        y = _empty([batch, channels, length + (0 if lead is None else 1)])
        mean, rstd = _empty([channels]), _empty([channels])
        _lib().cvt_batch_norm_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(lead), _ptr(y), _ptr(mean),
                                      _ptr(rstd), _ptr(running_mean), _ptr(running_variance),
                                      batch, channels, length, momentum, epsilon)
        ctx.with_lead = lead is not None
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensor()
        batch, channels = int(x.shape[0]), int(x.shape[1])
        dx, dweight, dbias = _empty(x.shape), _empty([channels]), _empty([channels])
        dlead = _empty([batch, channels, 1]) if ctx.with_lead else None
        dy = _contiguous(dy)
        _lib().cvt_batch_norm_backward(_ptr(dy), _ptr(x), _ptr(weight), _ptr(mean), _ptr(rstd),
                                       _ptr(dx), _ptr(dweight), _ptr(dbias), _ptr(dlead),
                                       batch, channels, int(x.size) // (batch * channels))
        grads = (dx, dweight, dbias) + ((dlead,) if ctx.with_lead else ())
        return _only_needed(ctx.needs_grad, *grads) + (None, None)


def batch_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, running_mean: paddle.Tensor,
               running_variance: paddle.Tensor, momentum: float, epsilon: float,
               lead: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """BatchNorm of (B, C, ..) `x` in training, flattened to (B, C, L): normalised with the
    batch's statistics, and `running_mean` and `running_variance` updated in place as
    Paddle's BatchNorm updates them. `lead` (B, C, 1): a column put before each channel's
    values, as in `depthwise_conv2d` (the output is then (B, C, 1 + L)), with its gradient."""
    channels = int(x.shape[1])
    for name, t in (('weight', weight), ('bias', bias), ('running_mean', running_mean),
                    ('running_variance', running_variance)):
        if list(t.shape) != [channels]:
            raise ValueError(f'batch_norm: {name} of shape {list(t.shape)} for {channels} channels')
    lead = None if lead is None else _check_lead(x, lead)
    return _BatchNorm.apply(x, weight, bias, lead, running_mean, running_variance, float(momentum), float(epsilon))
