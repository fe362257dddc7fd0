"""The fast layers: cvt.py's layers computing the same outputs with fewer passes over the activations.

Each class subclasses its plain layer in cvt.py and overrides `forward` only: the
same constructor, parameters and state-dict keys, so weights and checkpoints move
freely between the two, and `fast.convert` turns one into the other in place.
Each fast forward gives the plain forward's outputs (logits to 1e-4), gradients and
BatchNorm statistics (tests/test_fast_layers.py).

Where a fast layer takes the plain forward it calls it by its class (`cvt.Mlp.forward(self, x)`):
Paddle 2.6's static-graph conversion rewrites `forward` without the cell `super()` needs.

When a fast layer runs its own forward:
- in dynamic mode (a static graph, as export traces, takes the plain forward);
- while every sublayer it computes itself, reading its weights instead of calling
  it, is of the class the plain model builds and has no forward hook. A sublayer
  replaced (LoRA or a quantiser around a Linear, SyncBatchNorm for BatchNorm) or
  hooked makes the layer run the plain forward, which calls it as written;
- the attention takes the plain forward while `cvt.record_attention` records it.
The threaded C kernels (kernels.py) run on float32 CPU tensors where their library
is built; elsewhere (GPU, float16, no C compiler) the LayerNorms, the blocks and the
stage's last step run the plain forward, and the attention, the MLP and (on the CPU)
the token embedding their own forward through Paddle's ops.

What the fast forwards do differently, and why (figures in docs/speed.md):
- q, k and v stay channels-first (B, C, L) after their convolutions: the GEMMs read
  them transposed, so no token/map transpose is copied; the attention scale is
  folded into q's projection.
- On the CPU: the token embedding's convolution is one GEMM over the batch's patches
  (giving tokens without a transpose); fc1's bias and QuickGELU are one pass; the
  other biases go into the GEMM or a threaded pass; the tokens become the attention's
  and the stage's (B, C, H, W) map in one pass that splits off the cls token, which
  the kernels writing q, k and v put back before them (no concatenation); the
  depthwise convolutions, BatchNorm (in inference folded into the convolution),
  softmax, LayerNorm and the residual additions (DropPath's factor included) are
  threaded kernels. In inference the kernels write into the temporaries they read (the
  block into its branch only where a fast attention or MLP made it: never into a
  tensor that a hook or a replaced layer may hold).
- On a GPU under float16/bfloat16 autocast, q, k and v (float32 after their BatchNorm)
  are cast to autocast's dtype, and softmax(q k^T) v is F.scaled_dot_product_attention
  (flash attention) where `flash_attention_runs`.
"""

import functools
from typing import Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import cvt
from fast import build, kernels
from paddle_internals import (autocast_dtype, batch_norm_settings, batch_norm_statistics, conv_geometry,
                              has_forward_hooks, layer_norm_epsilon)

# QuickGELU's slope: x * sigmoid(1.702 x)
QUICK_GELU_SLOPE = 1.702


def flash_attention_runs(place, dtype: Optional[str], head_dim: int) -> bool:
    """Whether the attention runs F.scaled_dot_product_attention: on a CUDA GPU where
    FlashAttention-2 runs (compute capability 8.0 on: A100, H100, RTX 30xx and later),
    under autocast to float16 or bfloat16 (`dtype`), for heads of at most 256 channels
    in multiples of 8 (every CvT has 64). Elsewhere the explicit products run: Paddle
    2.6 picks the flash kernel by the head size alone and fails on older GPUs."""
    if dtype not in ('float16', 'bfloat16') or not place.is_gpu_place():
        return False
    return head_dim <= 256 and head_dim % 8 == 0 and gpu_capability(place.gpu_device_id()) >= (8, 0)


@functools.lru_cache(maxsize=None)
def gpu_capability(device_id: int) -> Tuple[int, int]:
    """The CUDA compute capability (major, minor) of GPU `device_id`."""
    return tuple(paddle.device.cuda.get_device_capability(device_id))


def _in_dtype_of(bias: paddle.Tensor, x: paddle.Tensor) -> paddle.Tensor:
    """`bias` in `x`'s dtype (autocast's half precision: a float32 bias would make the
    addition float32)."""
    return bias if bias.dtype == x.dtype else bias.astype(x.dtype)


def _as_built(layer: Optional[nn.Layer], *classes) -> bool:
    """Whether a fast forward may compute `layer` itself: it is of one of `classes`
    exactly (not replaced, not a subclass) and has no forward hook."""
    return type(layer) in classes and not has_forward_hooks(layer)


def _prepend(lead: Optional[paddle.Tensor], maps: paddle.Tensor) -> paddle.Tensor:
    """(B, C, L) `maps` with the (B, C, 1) column `lead` before them, if any."""
    return maps if lead is None else paddle.concat([lead, maps], axis=2)


def _square_kernel_geometry(conv: nn.Conv2D) -> Optional[Tuple[int, int]]:
    """(stride, padding) of `conv` where the CPU kernels compute it: NCHW, a square kernel,
    equal strides and equal zero paddings on all sides, no dilation; else None."""
    g = conv_geometry(conv)
    (top, bottom), (left, right) = g.padding
    plain = (g.explicit_padding and g.channels_first and g.zero_padding and g.dilation == (1, 1)
             and conv.weight.shape[2] == conv.weight.shape[3] and g.stride[0] == g.stride[1]
             and top == bottom == left == right)
    return (g.stride[0], top) if plain else None


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis through the threaded kernel."""

    def forward(self, x):
        if not (kernels.runs_on(x) and self.weight is not None and self.bias is not None
                and list(self.weight.shape) == [x.shape[-1]]):
            return nn.LayerNorm.forward(self, x)
        return kernels.layer_norm(x, self.weight, self.bias, layer_norm_epsilon(self))


class FastMlp(cvt.Mlp):
    """fc1 -> QuickGELU -> dropout -> fc2 -> dropout, with fc1's bias and QuickGELU in one pass."""

    def computes_itself(self) -> bool:
        """Whether `forward` takes its own path (see the module notes)."""
        return (paddle.in_dynamic_mode() and _as_built(self.fc1, nn.Linear) and self.fc1.bias is not None
                and _as_built(self.act, cvt.QuickGELU) and _as_built(self.fc2, nn.Linear)
                and _as_built(self.drop, nn.Dropout))

    def forward(self, x):
        if not self.computes_itself():
            return cvt.Mlp.forward(self, x)
        if kernels.runs_on(x):
            hidden = kernels.linear_silu(x, self.fc1.weight, self.fc1.bias, QUICK_GELU_SLOPE)
            fc2_weight = self.fc2.weight
        else:
            # x sigmoid(1.702 x) = silu(1.702 x) / 1.702: the slope folded into fc1's weights and
            # its inverse into fc2's leaves one SiLU op for the three passes of QuickGELU
            # (scaling the weights costs far less than passes over the widest activation)
            hidden = F.silu(kernels.linear(x, self.fc1.weight * QUICK_GELU_SLOPE, self.fc1.bias * QUICK_GELU_SLOPE))
            fc2_weight = self.fc2.weight * (1.0 / QUICK_GELU_SLOPE)
        return self.drop(kernels.linear(self.drop(hidden), fc2_weight, self.fc2.bias))


class FastAttention(cvt.Attention):
    """Multi-head attention with q, k and v channels-first from their convolutions on."""

    def computes_itself(self) -> bool:
        """Whether `forward` takes its own path (see the module notes). The convolutional
        projections need not be as built: one that is not is called as a layer."""
        return (paddle.in_dynamic_mode() and self.attention_sink is None
                and all(_as_built(p, nn.Linear) for p in (self.proj_q, self.proj_k, self.proj_v, self.proj))
                and _as_built(self.attn_drop, nn.Dropout) and _as_built(self.proj_drop, nn.Dropout))

    def forward(self, x, h: int, w: int):
        if not self.computes_itself():
            return cvt.Attention.forward(self, x, h, w)
        x_map, cls_column = kernels.tokens_to_maps(x, h, w, 1 if self.with_cls_token else 0)
        q, k, v = (self._projected(p, x_map, cls_column) for p in (self.conv_proj_q, self.conv_proj_k,
                                                                   self.conv_proj_v))
        half = autocast_dtype()
        if flash_attention_runs(x.place, half, self.dim_out // self.num_heads):
            return self.proj_drop(self.attend_flash(q, k, v, half))
        if half is not None:  # the BatchNorm of q, k and v gives float32: the products in half precision
            q, k, v = (t.astype(half) for t in (q, k, v))
        return self.proj_drop(self.attend(q, k, v))

    def _projected(self, projection: Optional[nn.Layer], x_map, lead: Optional[paddle.Tensor]):
        """The channels-first (B, C, L) map of one of q, k, v after its convolutional
        projection, after the cls column `lead` if given: a dw_bn projection as built
        through the kernels, any other one called as a layer."""
        if projection is None:
            return _prepend(lead, x_map.flatten(2))
        geometry = self._kernel_geometry(projection, x_map)
        if geometry is None:
            return _prepend(lead, projection(x_map).flatten(2))
        (stride, padding), conv, norm = geometry, projection[0], projection[1]
        settings, (mean, variance) = batch_norm_settings(norm), batch_norm_statistics(norm)
        if not norm.training and not paddle.is_grad_enabled():
            # inference: the BatchNorm folded into the depthwise weights, written after the cls column
            weight, bias = kernels.fold_batch_norm(conv.weight, norm.weight, norm.bias, mean, variance,
                                                   settings.epsilon)
            return kernels.depthwise_conv2d(x_map, weight, bias, stride, padding, lead=lead).flatten(2)
        maps = kernels.depthwise_conv2d(x_map, conv.weight, None, stride, padding)
        if norm.training and settings.batch_statistics_in_training:
            return kernels.batch_norm(maps, norm.weight, norm.bias, mean, variance, settings.momentum,
                                      settings.epsilon, lead)
        return _prepend(lead, norm(maps).flatten(2))  # eval with gradients: running statistics

    @staticmethod
    def _kernel_geometry(projection: nn.Layer, x_map) -> Optional[Tuple[int, int]]:
        """(stride, padding) where the kernels compute `projection`: a dw_bn as cvt.py
        builds it (a depthwise convolution of at most 8x8, no bias, then an affine
        channels-first BatchNorm), no hooks, on tensors the kernels run on; else None."""
        if not (kernels.runs_on(x_map) and _as_built(projection, nn.Sequential) and len(projection) == 2):
            return None
        conv, norm = projection[0], projection[1]
        if not (_as_built(conv, nn.Conv2D) and _as_built(norm, nn.BatchNorm2D)):
            return None
        channels, per_group, kernel_h, _ = (int(s) for s in conv.weight.shape)
        geometry = _square_kernel_geometry(conv)
        # one input channel per filter, as many filters as input channels: groups = channels
        depthwise = per_group == 1 and channels == int(x_map.shape[1])
        if (geometry is None or not depthwise or conv.bias is not None or kernel_h > 8 or norm.weight is None
                or norm.bias is None or not batch_norm_settings(norm).channels_first):
            return None
        return geometry

    def _scaled_q_projection(self, extra: float = 1.0):
        """proj_q's weight and bias times the attention scale (and `extra`)."""
        factor = self.scale * extra
        bias = self.proj_q.bias
        return self.proj_q.weight * factor, (None if bias is None else bias * factor)

    def attend(self, q, k, v):
        """softmax(q k^T * scale) v, projected by `proj`: channels-first (B, C, L) inputs,
        (B, Lq, C) out."""
        def heads(t, weight, bias):
            # (C_out, C_in) x (B, C_in, L) -> (B, C_out, L) -> (B, heads, head_dim, L): no copy
            t = paddle.matmul(weight, t, transpose_x=True)
            if bias is not None:
                t = kernels.add_bias(t, _in_dtype_of(bias, t), axis=1, overwrite=True)
            return t.reshape([0, self.num_heads, -1, t.shape[-1]])

        q = heads(q, *self._scaled_q_projection())
        k = heads(k, self.proj_k.weight, self.proj_k.bias)
        v = heads(v, self.proj_v.weight, self.proj_v.bias)
        weights = kernels.softmax(paddle.matmul(q, k, transpose_x=True), overwrite=True)
        out = paddle.matmul(v, self.attn_drop(weights), transpose_y=True)  # (B, heads, head_dim, Lq)
        out = paddle.matmul(out.reshape([0, self.dim_out, out.shape[-1]]), self.proj.weight, transpose_x=True)
        return out if self.proj.bias is None else kernels.add_bias(out, _in_dtype_of(self.proj.bias, out),
                                                                   overwrite=True)

    def attend_flash(self, q, k, v, dtype: Optional[str] = None):
        """The same through F.scaled_dot_product_attention, in `dtype` (the kernel's float16
        or bfloat16; None: as given), which takes (B, L, heads, head_dim) and scales by
        head_dim ** -0.5: q is pre-scaled to give CvT's dim_out ** -0.5."""
        head_dim = self.dim_out // self.num_heads

        def heads(t, weight, bias):
            dtype_in = dtype or t.dtype
            t = paddle.matmul(t.astype(dtype_in), weight.astype(dtype_in), transpose_x=True)  # (B, L, C_out)
            if bias is not None:
                t = t + _in_dtype_of(bias, t)
            return t.reshape([0, 0, self.num_heads, head_dim])

        q = heads(q, *self._scaled_q_projection(head_dim ** 0.5))
        k = heads(k, self.proj_k.weight, self.proj_k.bias)
        v = heads(v, self.proj_v.weight, self.proj_v.bias)
        # dropout only in training: Paddle 2.6's function does not pass `training` on to the kernel
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, training=self.training)
        return kernels.linear(out.reshape([0, 0, self.dim_out]), self.proj.weight, self.proj.bias)


def _output_is_private(layer: nn.Layer) -> bool:
    """Whether `layer`'s output is a temporary no one else holds (so that the block may
    write into it): a fast attention or MLP taking its own forward, without hooks."""
    return (type(layer) in (FastAttention, FastMlp) and not has_forward_hooks(layer)
            and layer.computes_itself())


class FastBlock(cvt.Block):
    """The pre-norm block with each residual addition, DropPath included, in one threaded pass."""

    def forward(self, x, h: int, w: int):
        if not (kernels.runs_on(x) and _as_built(self.drop_path, cvt.DropPath, nn.Identity)):
            return cvt.Block.forward(self, x, h, w)
        x = self._residual(x, self.attn(self.norm1(x), h, w), _output_is_private(self.attn))
        return self._residual(x, self.mlp(self.norm2(x)), _output_is_private(self.mlp))

    def _residual(self, x, branch, overwrite: bool):
        """``x + drop_path(branch)``, DropPath's factor drawn as its own forward draws it
        (the same random stream); into `branch` with `overwrite` (without gradients)."""
        scale = self.drop_path.sample_scale(branch) if isinstance(self.drop_path, cvt.DropPath) else None
        return kernels.residual_add(x, branch, scale, overwrite=overwrite)


class FastConvEmbed(cvt.ConvEmbed):
    """The token embedding with its convolution as one GEMM over the batch's patches, or
    with its bias added apart."""

    def forward(self, x) -> Tuple[paddle.Tensor, int, int]:
        conv = self.proj
        if not (paddle.in_dynamic_mode() and _as_built(conv, nn.Conv2D) and x.place.is_cpu_place()):
            return cvt.ConvEmbed.forward(self, x)
        geometry = _square_kernel_geometry(conv)
        if kernels.runs_on(x) and geometry is not None and conv.weight.shape[1] == x.shape[1]:  # groups 1
            tokens, h, w = kernels.patch_conv(x, conv.weight, conv.bias, *geometry)
            return self.norm(tokens), h, w
        g = conv_geometry(conv)
        if conv.bias is None or not (g.explicit_padding and g.zero_padding and g.channels_first):
            return cvt.ConvEmbed.forward(self, x)
        # without the kernels: Paddle's CPU convolution adds its bias shaped (1, C, 1, 1), through
        # a broadcast much slower than a (C, 1, 1) one (CvT-13's three embeddings at batch 16,
        # 2 threads: 117 against 68 ms)
        x = F.conv2d(x, conv.weight, None, g.stride, [p for pair in g.padding for p in pair], g.dilation,
                     x.shape[1] // conv.weight.shape[1])
        x = kernels.add_bias(x, conv.bias, axis=1)
        h, w = x.shape[2], x.shape[3]
        return self.norm(cvt.map_to_tokens(x)), h, w


class FastVisionTransformer(cvt.VisionTransformer):
    """The stage, ending with its tokens made the (B, C, H, W) map and the cls token in
    one threaded pass."""

    def forward(self, x):
        # cvt.VisionTransformer.forward with another last step (written out, not called:
        # Paddle 2.6's static-graph conversion would leave a called forward unconverted,
        # and its batch size unknown)
        x, h, w = self.patch_embed(x)
        if self.cls_token is not None:
            x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], axis=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, h, w)
        if not kernels.runs_on(x):
            cls_token = None
            if self.cls_token is not None:
                cls_token, x = cvt.split_cls_token(x)
            return cvt.tokens_to_map(x, h, w), cls_token
        x_map, cls_column = kernels.tokens_to_maps(x, h, w, 0 if self.cls_token is None else 1)
        # (B, C, 1) -> (B, 1, C)
        return x_map, (None if cls_column is None else cls_column.reshape([0, 1, x.shape[2]]))


class FastConvolutionalVisionTransformer(cvt.ConvolutionalVisionTransformer):
    """CvT with the fast layers; `print(model)` names them and the CPU kernels' build."""

    def extra_repr(self) -> str:
        return f'layers=fast, cpu_kernels={kernel_isa() or "none"}'


def kernel_isa() -> Optional[str]:
    """The CPU kernels' build the fast layers run ('avx512' or 'avx2', built on first use),
    or None: none for this CPU, no C compiler, or Paddle's device is not the CPU."""
    return build.isa() if paddle.get_device() == 'cpu' else None
