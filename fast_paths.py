"""The speed paths of CvT's layers: the same functions as cvt.py's plain forwards, faster.

cvt.py defines the layers as the paper and the official code write them. Six
of them (Attention, Mlp, LayerNorm, ConvEmbed, Block and the stage,
VisionTransformer) hand their forward, or its end, to a function here when
their ``fast_path`` flag is on (the default; `cvt.set_fast_paths`
turns it off for a whole model). Each function takes the layer itself and reads
its parameters, so the state dict is the plain layers'; each gives the plain
forward's outputs (logits to 1e-4), gradients and BatchNorm statistics, which
tests/test_fast_paths.py checks.

What they do differently, and why (measured figures in docs/speed.md):

- q, k and v stay channels-first (B, C, L) after their convolutions: the GEMMs
  read them transposed, so no token/map transpose is copied.
- The attention scale is folded into q's projection; without the CPU kernels,
  QuickGELU's slope 1.702 goes into the MLP's weights (``x sigmoid(1.702 x) =
  silu(1.702 x) / 1.702``): one SiLU op instead of scale, sigmoid and multiply.
- On the CPU, biases go into the GEMM (addmm) or, for fc1, into the QuickGELU
  pass; the token embeddings' convolutions are one GEMM over the batch's
  patches, giving tokens without a transpose; the threaded C kernels of
  cpu_kernels.py replace Paddle's single-threaded depthwise convolution,
  softmax, LayerNorm, BatchNorm (training), QuickGELU, bias additions, residual
  additions (with DropPath's per-sample factor), the token-to-map transpose
  with the cls split, and bias gradients, each only on the instruction sets
  where it measured faster (`cpu_kernels.use`). The kernels that write q, k
  and v put the cls token's column before them (no concatenation). In
  inference the kernels write into the temporaries they read.
- Elsewhere (GPU): k's and v's depthwise convolutions run as one grouped
  convolution, and under float16/bfloat16 the attention is
  F.scaled_dot_product_attention (flash attention).
"""

from typing import Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import cpu_kernels

# QuickGELU's slope: x * sigmoid(1.702 x) == silu(1.702 x) / 1.702
QUICK_GELU_SLOPE = 1.702


def on_cpu(x: paddle.Tensor) -> bool:
    place = getattr(x, 'place', None) if paddle.in_dynamic_mode() else None
    if place is None:  # a static-graph variable (to_static, export): the default device decides
        return paddle.get_device() == 'cpu'
    return place.is_cpu_place()


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor]) -> paddle.Tensor:
    """``x @ weight + bias`` over the last axis of a contiguous `x`.

    On CPU the bias goes into the GEMM (addmm, beta = 1): Paddle's F.linear adds it
    in a separate single-threaded pass that costs as much as a small matmul.
    """
    if bias is None or not on_cpu(x):
        return F.linear(x, weight, bias)
    if paddle.is_grad_enabled() and cpu_kernels.use('bias', x):
        return cpu_kernels.linear(x, weight, bias)  # the same forward, a faster bias gradient
    rows = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
    return rows.reshape(list(x.shape[:-1]) + [weight.shape[1]])


def add_bias(x: paddle.Tensor, bias: paddle.Tensor, axis: int = -1) -> paddle.Tensor:
    """`x` (a temporary of the caller's) plus a 1-D `bias` along `axis`: the threaded
    kernel, else broadcast as (C, 1, ..) (Paddle's CPU add is several times slower
    for a bias shaped (1, C, 1))."""
    if cpu_kernels.use('bias', x):
        return cpu_kernels.add_bias(x, bias, axis, overwrite=True)
    return x + bias.reshape([-1] + [1] * (len(x.shape) - 1 - axis % len(x.shape)))


# ---- LayerNorm, MLP, token embedding -------------------------------------------------

def layer_norm(norm: nn.LayerNorm, x: paddle.Tensor) -> paddle.Tensor:
    """`norm` (over the last axis) through the threaded kernel on the CPU."""
    if norm.weight is not None and norm.bias is not None and cpu_kernels.use('layer_norm', x):
        return cpu_kernels.layer_norm(x, norm.weight, norm.bias, norm._epsilon)
    return F.layer_norm(x, norm._normalized_shape, norm.weight, norm.bias, norm._epsilon)


def mlp(layer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """fc1 -> QuickGELU -> dropout -> fc2 -> dropout. On the CPU, fc1's bias and
    QuickGELU are one threaded pass over the widest activation. Elsewhere
    QuickGELU's slope is folded into the weights: fc1 scaled by 1.702 feeds one
    SiLU op, fc2 takes the 1/1.702 (scaling the small weight matrices costs far
    less than passes over the activations; gradients flow through it unchanged)."""
    fc1, fc2 = layer.fc1, layer.fc2
    if cpu_kernels.use('silu', x):
        rows = paddle.matmul(x.reshape([-1, x.shape[-1]]), fc1.weight)
        hidden = cpu_kernels.bias_silu(rows, fc1.bias, QUICK_GELU_SLOPE, overwrite=True)
        hidden = layer.drop(hidden.reshape(list(x.shape[:-1]) + [fc1.weight.shape[1]]))
        return layer.drop(linear(hidden, fc2.weight, fc2.bias))
    hidden = F.silu(linear(x, fc1.weight * QUICK_GELU_SLOPE, fc1.bias * QUICK_GELU_SLOPE))
    return layer.drop(linear(layer.drop(hidden), fc2.weight * (1.0 / QUICK_GELU_SLOPE), fc2.bias))


def conv_embed(layer: nn.Layer, x: paddle.Tensor) -> Tuple[paddle.Tensor, int, int]:
    """The token embedding. On the CPU the convolution is one GEMM over the whole
    batch's patches (cpu_kernels.patch_conv), which gives tokens without a
    transpose; else its bias is added as (C, 1, 1): Paddle's CPU add takes a slow
    path for Conv2D's (1, C, 1, 1), and its bias gradient is single-threaded."""
    conv = layer.proj
    if _patch_conv_fits(conv) and cpu_kernels.use('patch_conv', x):
        tokens, h, w = cpu_kernels.patch_conv(x, conv.weight, conv.bias, conv._stride[0],
                                              conv._updated_padding[0])
        return layer.norm(tokens), h, w
    if conv.bias is not None and on_cpu(x) and paddle.in_dynamic_mode():
        x = F.conv2d(x, conv.weight, None, conv._stride, conv._padding, conv._dilation, conv._groups)
        x = add_bias(x, conv.bias, axis=1)
    else:
        x = conv(x)
    h, w = x.shape[2], x.shape[3]
    return layer.norm(x.flatten(2).transpose([0, 2, 1])), h, w


def _patch_conv_fits(conv: nn.Conv2D) -> bool:
    """Whether cpu_kernels.patch_conv computes `conv`: no groups, a plain square convolution."""
    return conv._groups == 1 and _is_plain_square(conv)


def _is_plain_square(conv: nn.Conv2D) -> bool:
    """NCHW, a square kernel, equal strides and zero paddings on both axes, no dilation:
    the convolutions the CPU kernels compute."""
    kernel, stride, padding = list(conv._kernel_size), list(conv._stride), conv._updated_padding
    return (conv._data_format == 'NCHW' and conv._padding_mode == 'zeros'
            and list(conv._dilation) == [1, 1] and kernel[0] == kernel[1]
            and stride[0] == stride[1] and isinstance(padding, (list, tuple)) and len(padding) == 2
            and padding[0] == padding[1])


# ---- transformer block ---------------------------------------------------------------

def block(layer: nn.Layer, x: paddle.Tensor, h: int, w: int) -> paddle.Tensor:
    """`layer`'s forward (cvt.Block): each residual addition, DropPath included, is one
    threaded pass on the CPU."""
    x = _residual(layer.drop_path, x, layer.attn(layer.norm1(x), h, w))
    return _residual(layer.drop_path, x, layer.mlp(layer.norm2(x)))


def stage_output(stage: nn.Layer, x: paddle.Tensor, h: int, w: int):
    """The end of `stage`'s forward (cvt.VisionTransformer): its (B, [1 +] H*W, C) tokens
    as the (B, C, H, W) map and the (B, 1, C) cls token (or None), in one threaded pass
    on the CPU."""
    x_map, cls_column = _tokens_to_maps(x, h, w, 0 if stage.cls_token is None else 1)
    # (B, C, 1) -> (B, 1, C); the channel count from the shape: static graphs (export) cannot infer it
    return x_map, (None if cls_column is None else cls_column.reshape([0, 1, x.shape[2]]))


def _residual(drop_path: nn.Layer, x: paddle.Tensor, branch: paddle.Tensor) -> paddle.Tensor:
    """``x + drop_path(branch)``; `branch` is a temporary of the caller's. DropPath's
    factor is drawn as its own forward draws it (the same random stream)."""
    sample_scale = getattr(drop_path, 'sample_scale', None)
    if cpu_kernels.use('residual', x) and (sample_scale is not None or isinstance(drop_path, nn.Identity)):
        scale = sample_scale(branch) if sample_scale is not None else None
        return cpu_kernels.residual_add(x, branch, scale, overwrite=True)
    return x + drop_path(branch)


# ---- attention ---------------------------------------------------------------------------

def attention(attn: nn.Layer, x: paddle.Tensor, h: int, w: int) -> paddle.Tensor:
    """`attn`'s forward (cvt.Attention) with fewer passes over the activations.

    q, k and v stay channels-first (B, C, L) from the convolutions on, and the
    GEMMs read them transposed; the scale is folded into q's projection.
    """
    x_map, cls_column = _tokens_to_maps(x, h, w, 1 if attn.with_cls_token else 0)
    q, k, v = _projected_maps(attn, x_map, cls_column)
    fused = attn.fused_attention
    if fused is None:
        # Paddle's fused kernel is flash attention, for float16/bfloat16 on GPU
        # (autocast makes the projections float16); float32 keeps the GEMMs
        fused = not on_cpu(x) and q.dtype in (paddle.float16, paddle.bfloat16)
    if fused and hasattr(F, 'scaled_dot_product_attention'):
        out = _attend_fused(attn, q, k, v)
    else:
        out = _attend(attn, q, k, v)
    return attn.proj_drop(out)


def _tokens_to_maps(x: paddle.Tensor, h: int, w: int, lead: int):
    """(B, lead + H*W, C) -> (B, C, H, W) map and (B, C, 1) cls column (lead 1) or None
    (lead 0): one threaded pass on the CPU."""
    if cpu_kernels.use('transpose', x):
        return cpu_kernels.tokens_to_maps(x, h, w, lead)
    return _tokens_to_maps_with_paddle(x, h, w, lead)


def _tokens_to_maps_with_paddle(x: paddle.Tensor, h: int, w: int, lead: int):
    """`_tokens_to_maps` through Paddle's ops."""
    cls_token, tokens = paddle.split(x, [1, x.shape[1] - 1], axis=1) if lead else (None, x)
    # the channel count from the shape, not -1: static graphs with a dynamic batch cannot infer it
    x_map = tokens.transpose([0, 2, 1]).reshape([0, tokens.shape[2], h, w])
    x_map = x_map.contiguous() if hasattr(x_map, 'contiguous') else x_map
    return x_map, (None if cls_token is None else cls_token.reshape([0, x.shape[2], 1]))  # (B, 1, C) -> (B, C, 1)


def _projected_maps(attn: nn.Layer, x_map: paddle.Tensor, cls_column: Optional[paddle.Tensor]):
    """Channels-first (B, C, L) maps of q, k and v after their convolutional projections,
    each with `cls_column` (B, C, 1) before it where one is given."""
    projections = (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v)
    if cpu_kernels.use('depthwise_conv', x_map):
        return tuple(_project_with_kernel(projection, x_map, cls_column) for projection in projections)
    return tuple(_after(cls_column, t) for t in _projected_maps_without_kernels(attn, x_map))


def _after(lead: Optional[paddle.Tensor], maps: paddle.Tensor) -> paddle.Tensor:
    """(B, C, L) `maps` with the (B, C, 1) column `lead` before them, if any."""
    return maps if lead is None else paddle.concat([lead, maps], axis=2)


def _projected_maps_without_kernels(attn: nn.Layer, x_map: paddle.Tensor):
    """`_projected_maps` through Paddle's ops, without the cls column."""
    q = x_map if attn.conv_proj_q is None else attn.conv_proj_q(x_map)
    if _is_dw_bn(attn.conv_proj_k) and _is_dw_bn(attn.conv_proj_v):
        # channel c of the map gives channels 2c (k) and 2c+1 (v): one convolution
        # call instead of two (Paddle's depthwise kernel costs mostly per call)
        kv = _paired_dw_bn(attn.conv_proj_k, attn.conv_proj_v, x_map).flatten(2)
        kv = kv.reshape([0, -1, 2, kv.shape[-1]])
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = (x_map if p is None else p(x_map) for p in (attn.conv_proj_k, attn.conv_proj_v))
        k, v = k.flatten(2), v.flatten(2)
    return q.flatten(2), k, v


def _scaled_q_projection(attn: nn.Layer, extra: float = 1.0):
    """proj_q's weight and bias times the attention scale (and `extra`)."""
    factor = attn.scale * extra
    bias = attn.proj_q.bias
    return attn.proj_q.weight * factor, (None if bias is None else bias * factor)


def _attend(attn: nn.Layer, q, k, v):
    """softmax(q k^T * scale) v, projected; channels-first inputs, (B, Lq, C) out."""
    def heads(t, weight, bias):
        # (C_out, C_in) x (B, C_in, L) -> (B, C_out, L) -> (B, heads, head_dim, L): no copy
        t = paddle.matmul(weight, t, transpose_x=True)
        if bias is not None:
            t = add_bias(t, bias, axis=1)
        return t.reshape([0, attn.num_heads, -1, t.shape[-1]])

    q = heads(q, *_scaled_q_projection(attn))
    k = heads(k, attn.proj_k.weight, attn.proj_k.bias)
    v = heads(v, attn.proj_v.weight, attn.proj_v.bias)
    scores = paddle.matmul(q, k, transpose_x=True)
    if cpu_kernels.use('softmax', scores):
        weights = cpu_kernels.softmax(scores, overwrite=True)
    else:
        weights = F.softmax(scores, axis=-1)
    out = paddle.matmul(v, attn.attn_drop(weights), transpose_y=True)  # (B, heads, head_dim, Lq)
    out = paddle.matmul(out.reshape([0, attn.dim_out, out.shape[-1]]), attn.proj.weight, transpose_x=True)
    return add_bias(out, attn.proj.bias)


def _attend_fused(attn: nn.Layer, q, k, v):
    """The same through F.scaled_dot_product_attention, which takes (B, L, heads, head_dim)
    and scales by head_dim ** -0.5: q is pre-scaled to give CvT's dim_out ** -0.5."""
    head_dim = attn.dim_out // attn.num_heads

    def heads(t, weight, bias):
        t = paddle.matmul(t, weight, transpose_x=True)  # (B, L, C_out)
        if bias is not None:
            t = t + bias.astype(t.dtype)  # stay in autocast's float16 for the kernel
        return t.reshape([0, 0, attn.num_heads, head_dim])

    q = heads(q, *_scaled_q_projection(attn, head_dim ** 0.5))
    k = heads(k, attn.proj_k.weight, attn.proj_k.bias)
    v = heads(v, attn.proj_v.weight, attn.proj_v.bias)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p, training=attn.training)
    return linear(out.reshape([0, 0, attn.dim_out]), attn.proj.weight, attn.proj.bias)


# ---- the convolutional projections (dw_bn) -------------------------------------------

def _is_dw_bn(projection: Optional[nn.Layer]) -> bool:
    # exactly BatchNorm2D: SyncBatchNorm (multi-GPU) keeps the two layers apart
    return (isinstance(projection, nn.Sequential) and len(projection) == 2
            and type(projection[1]) is nn.BatchNorm2D)


def _project_with_kernel(projection: Optional[nn.Layer], x_map, lead: Optional[paddle.Tensor]):
    """One convolutional projection, flattened to (B, C, L) after `lead` (if given); a dw_bn
    one through the threaded depthwise kernel, which writes after the lead column itself
    where it can: with BatchNorm folded into it in inference, through the BatchNorm
    kernel in training."""
    if projection is None:
        return _after(lead, x_map.flatten(2))
    if not (_is_dw_bn(projection) and _kernel_fits(projection[0])):
        return _after(lead, projection(x_map).flatten(2))
    conv, norm = projection[0], projection[1]
    stride, padding = conv._stride[0], conv._updated_padding[0]
    if not norm.training and not paddle.is_grad_enabled() and norm.weight is not None and norm.bias is not None:
        weight, bias = cpu_kernels.fold_batch_norm(conv.weight, norm.weight, norm.bias, norm._mean, norm._variance,
                                                   norm._epsilon)
        return cpu_kernels.depthwise_conv2d(x_map, weight, bias, stride, padding, lead=lead).flatten(2)
    maps = cpu_kernels.depthwise_conv2d(x_map, conv.weight, None, stride, padding)
    if norm.training and _batch_norm_fits(norm) and cpu_kernels.use('batch_norm', maps):
        return cpu_kernels.batch_norm(maps, norm.weight, norm.bias, norm._mean, norm._variance,
                                      norm._momentum, norm._epsilon, lead)
    return _after(lead, norm(maps).flatten(2))


def _batch_norm_fits(norm: nn.BatchNorm2D) -> bool:
    """Whether cpu_kernels.batch_norm computes `norm` in training: batch statistics,
    an affine weight and bias, channels first."""
    return (not norm._use_global_stats and norm.weight is not None and norm.bias is not None
            and norm._data_format == 'NCHW')


def _kernel_fits(conv: nn.Conv2D) -> bool:
    """Whether cpu_kernels.depthwise_conv2d computes `conv`: depthwise, no bias, a plain
    square convolution of at most 8x8."""
    return (conv._groups == conv._in_channels == conv._out_channels and conv.bias is None
            and conv._kernel_size[0] <= 8 and _is_plain_square(conv))


def _interleave(first: paddle.Tensor, second: paddle.Tensor) -> paddle.Tensor:
    """Per-channel vectors [a0, a1, ...], [b0, b1, ...] -> [a0, b0, a1, b1, ...]."""
    return paddle.stack([first, second], axis=1).reshape([-1])


def _paired_dw_bn(first: nn.Sequential, second: nn.Sequential, x_map):
    """Two dw_bn projections of one map as one grouped convolution (2 outputs per
    group): output channel 2c is `first`'s channel c, 2c+1 is `second`'s.

    In eval each BatchNorm is folded into its convolution (weight * gamma / sigma,
    bias beta - mean * gamma / sigma). In training one BatchNorm call normalises
    the interleaved channels with the interleaved parameters and statistics, and
    the updated running statistics are written back to the two layers: per
    channel the same arithmetic as the two BatchNorms.
    """
    conv, norm_a, norm_b = first[0], first[1], second[1]
    weight = paddle.stack([first[0].weight, second[0].weight], axis=1)
    weight = weight.reshape([-1, 1] + list(conv.weight.shape[2:]))
    options = dict(stride=conv._stride, padding=conv._padding, dilation=conv._dilation, groups=conv._groups)
    if not norm_a.training:
        factors = [norm.weight / paddle.sqrt(norm._variance + norm._epsilon) for norm in (norm_a, norm_b)]
        weight = weight * _interleave(*factors).reshape([-1, 1, 1, 1])
        bias = _interleave(norm_a.bias - norm_a._mean * factors[0], norm_b.bias - norm_b._mean * factors[1])
        return F.conv2d(x_map, weight, bias, **options)
    mean = _interleave(norm_a._mean, norm_b._mean)
    variance = _interleave(norm_a._variance, norm_b._variance)
    out = F.batch_norm(F.conv2d(x_map, weight, None, **options), mean, variance,
                       weight=_interleave(norm_a.weight, norm_b.weight),
                       bias=_interleave(norm_a.bias, norm_b.bias), training=True,
                       momentum=norm_a._momentum, epsilon=norm_a._epsilon)
    # F.batch_norm updated `mean` and `variance` in place
    for column, norm in enumerate((norm_a, norm_b)):
        norm._mean.set_value(mean.reshape([-1, 2])[:, column])
        norm._variance.set_value(variance.reshape([-1, 2])[:, column])
    return out
