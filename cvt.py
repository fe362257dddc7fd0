"""CvT: Convolutional vision Transformer (Wu et al., 2021) in PaddlePaddle.

The architecture follows the official microsoft/CvT code detail by detail; the
parameter names follow PaddleViT's released ``.pdparams`` files, so that those
files load with ``set_dict``:

    stages.{i}.patch_embed.{proj,norm}           convolutional token embedding
    stages.{i}.cls_token                         only where CLS_TOKEN[i]
    stages.{i}.blocks.{j}.norm1 / norm2          LayerNorms of the pre-norm block
    stages.{i}.blocks.{j}.attn.conv_proj_{q,k,v}.0 / .1
                                                 depthwise conv / BatchNorm (dw_bn)
    stages.{i}.blocks.{j}.attn.proj_{q,k,v} / proj
    stages.{i}.blocks.{j}.mlp.fc1 / fc2
    norm, head

Linear weights are stored [in, out] (Paddle's layout).

This file is the model as the paper and the official code write it: each layer
has one forward, which calls its sublayers. The speed layers (fast/: subclasses of
these with the same constructors and weights, computing the same with threaded CPU
kernels) are chosen by MODEL.LAYERS when `build_cvt` builds the model; nothing
here depends on them.
"""

import math
import os
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import fileio

# The official init is timm's trunc_normal_(std=0.02), truncated at +-2 absolute
# (100 std): a plain normal in effect. Paddle's TruncatedNormal truncates at +-2
# std in 2.6 (narrowing the spread) and +-2 absolute in 3.x, so a Normal is the
# same on both.
_trunc_normal = nn.initializer.Normal(mean=0.0, std=0.02)
_xavier_uniform = nn.initializer.XavierUniform()
_zeros = nn.initializer.Constant(0.0)
_ones = nn.initializer.Constant(1.0)


class QuickGELU(nn.Layer):
    """GELU approximated as ``x * sigmoid(1.702 x)``, as the official CvT uses."""

    def forward(self, x):
        return x * F.sigmoid(1.702 * x)


class DropPath(nn.Layer):
    """Stochastic depth: drop the residual branch per sample with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def sample_scale(self, x) -> Optional[paddle.Tensor]:
        """A fresh per-sample factor for `x`, shaped (B, 1, ..): 0 (dropped) or 1 / keep_prob;
        None when nothing is dropped (eval mode, or drop_prob 0)."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep_prob = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        return paddle.floor(keep_prob + paddle.rand(shape, dtype=x.dtype)) / keep_prob

    def forward(self, x):
        scale = self.sample_scale(x)
        return x if scale is None else x * scale

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


class Mlp(nn.Layer):
    """Linear -> QuickGELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def tokens_to_map(x, h: int, w: int):
    """(B, H*W, C) tokens -> (B, C, H, W) feature map, contiguous."""
    # the channel count from the shape, not -1: static graphs (export) with a
    # dynamic batch cannot infer it
    x = x.transpose([0, 2, 1]).reshape([0, x.shape[2], h, w])
    # Paddle 3 returns a strided view here; copy it once, not in each convolution that reads it
    # (static graphs, export: no strided views, and no contiguous() to call)
    return x.contiguous() if paddle.in_dynamic_mode() and hasattr(x, 'contiguous') else x


def split_cls_token(x) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """(B, 1 + N, C) -> the (B, 1, C) cls token and the (B, N, C) other tokens.

    One split rather than two slices: each slice's gradient is a zero-filled
    full-size tensor that backward then adds up, the split's is one concat.
    """
    cls_token, tokens = paddle.split(x, [1, x.shape[1] - 1], axis=1)
    return cls_token, tokens


def map_to_tokens(x):
    """(B, C, H, W) feature map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose([0, 2, 1])


def conv_projection(method: str, dim: int, kernel: int, stride: int, padding: int):
    """The convolutional projection of q, k or v: a Sequential, or None for `linear`."""
    if method == 'dw_bn':
        return nn.Sequential(
            nn.Conv2D(dim, dim, kernel, stride=stride, padding=padding, groups=dim, bias_attr=False),
            nn.BatchNorm2D(dim, momentum=0.9, epsilon=1e-5))
    if method == 'avg':
        # padding counts in the average, as in PyTorch (the official model)
        return nn.Sequential(nn.AvgPool2D(kernel, stride=stride, padding=padding, ceil_mode=True, exclusive=False))
    if method == 'linear':
        return None
    raise ValueError(f'unknown QKV_PROJ_METHOD {method!r} (dw_bn, avg or linear)')


class Attention(nn.Layer):
    """Multi-head attention with convolutional projections of q, k and v.

    The scale is ``dim_out ** -0.5`` (the full width, not the head width), as in
    the official code the released weights were trained with.
    """

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, method: str = 'dw_bn',
                 kernel_size: int = 3, stride_kv: int = 2, stride_q: int = 1,
                 padding_kv: int = 1, padding_q: int = 1, with_cls_token: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.scale = dim_out ** -0.5
        self.with_cls_token = with_cls_token
        # with `avg`, the official model leaves q unprojected
        self.conv_proj_q = conv_projection('linear' if method == 'avg' else method,
                                           dim_in, kernel_size, stride_q, padding_q)
        self.conv_proj_k = conv_projection(method, dim_in, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = conv_projection(method, dim_in, kernel_size, stride_kv, padding_kv)
        bias = None if qkv_bias else False
        self.proj_q = nn.Linear(dim_in, dim_out, bias_attr=bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias_attr=bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias_attr=bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)
        # set by `record_attention`: called with each forward's attention weights
        self.attention_sink: Optional[Callable[[paddle.Tensor], None]] = None

    def _project(self, conv, x_map, tokens):
        return tokens if conv is None else map_to_tokens(conv(x_map))

    def _split_heads(self, x):
        return x.reshape([0, 0, self.num_heads, -1]).transpose([0, 2, 1, 3])

    def forward(self, x, h: int, w: int):
        if self.with_cls_token:
            cls_token, tokens = split_cls_token(x)
        else:
            tokens = x
        x_map = tokens_to_map(tokens, h, w)
        q = self._project(self.conv_proj_q, x_map, tokens)
        k = self._project(self.conv_proj_k, x_map, tokens)
        v = self._project(self.conv_proj_v, x_map, tokens)
        if self.with_cls_token:
            q = paddle.concat([cls_token, q], axis=1)
            k = paddle.concat([cls_token, k], axis=1)
            v = paddle.concat([cls_token, v], axis=1)
        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))

        attn = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        if self.attention_sink is not None:
            self.attention_sink(attn.detach())
        attn = self.attn_drop(attn)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([0, 0, self.dim_out])
        return self.proj_drop(self.proj(out))


class Block(nn.Layer):
    """Pre-norm transformer block: attention and MLP, each with a residual."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_in, epsilon=1e-5)
        self.attn = Attention(dim_in, dim_out, num_heads, qkv_bias, attn_drop, drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, epsilon=1e-5)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), drop)

    def forward(self, x, h: int, w: int):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Layer):
    """Convolutional token embedding: Conv2D then LayerNorm over channels."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2D(in_chans, embed_dim, patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, epsilon=1e-5)

    def forward(self, x) -> Tuple[paddle.Tensor, int, int]:
        """(B, C, H, W) map -> (B, H'*W', D) tokens, H', W'."""
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        return self.norm(map_to_tokens(x)), h, w


class VisionTransformer(nn.Layer):
    """One CvT stage: token embedding, optional cls token, then `depth` blocks."""

    def __init__(self, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 patch_size: int, patch_stride: int, patch_padding: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 cls_token: bool = False, init: str = 'trunc_norm', **attn_kwargs):
        super().__init__()
        self.patch_embed = ConvEmbed(patch_size, in_chans, embed_dim, patch_stride, patch_padding)
        if cls_token:
            self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=_trunc_normal)
        else:
            self.cls_token = None
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.LayerList([
            Block(embed_dim, embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                  drop_paths[i], with_cls_token=cls_token, **attn_kwargs)
            for i in range(depth)])
        init_weights(self, init)

    def forward(self, x):
        """(B, C, H, W) map -> (B, D, H', W') map and the (B, 1, D) cls token or None."""
        x, h, w = self.patch_embed(x)
        if self.cls_token is not None:
            x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], axis=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, h, w)
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = split_cls_token(x)
        return tokens_to_map(x, h, w), cls_token


def init_weights(layer: nn.Layer, method: str = 'trunc_norm'):
    """The official init: Linear weights trunc-normal(0.02) or xavier, zero bias;
    norms weight 1, bias 0; convolutions keep PyTorch's default (uniform in
    +-1/sqrt(fan_in) for weight and bias)."""
    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, nn.Linear):
            (_trunc_normal if method == 'trunc_norm' else _xavier_uniform)(sub.weight)
            if sub.bias is not None:
                _zeros(sub.bias)
        elif isinstance(sub, (nn.LayerNorm, nn.BatchNorm2D)):
            _ones(sub.weight)
            _zeros(sub.bias)
        elif isinstance(sub, nn.Conv2D):
            fan_in = sub.weight.shape[1] * sub.weight.shape[2] * sub.weight.shape[3]
            bound = 1.0 / math.sqrt(fan_in)
            nn.initializer.Uniform(-bound, bound)(sub.weight)
            if sub.bias is not None:
                nn.initializer.Uniform(-bound, bound)(sub.bias)


class ConvolutionalVisionTransformer(nn.Layer):
    """CvT: stages of convolutional embedding + transformer blocks, then a head.

    `forward` maps images (B, 3, H, W), any H and W, to logits (B, num_classes),
    or to pooled features (B, D) when num_classes is 0 (see `forward_features`).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, init: str = 'trunc_norm',
                 patch_size: Sequence[int] = (7, 3, 3), patch_stride: Sequence[int] = (4, 2, 2),
                 patch_padding: Sequence[int] = (2, 1, 1), dim_embed: Sequence[int] = (64, 192, 384),
                 num_heads: Sequence[int] = (1, 3, 6), depth: Sequence[int] = (1, 2, 10),
                 mlp_ratio: Sequence[float] = (4.0, 4.0, 4.0), qkv_bias: Sequence[bool] = (True,) * 3,
                 drop_rate: Sequence[float] = (0.0,) * 3, attn_drop_rate: Sequence[float] = (0.0,) * 3,
                 drop_path_rate: Sequence[float] = (0.0, 0.0, 0.1),
                 cls_token: Sequence[bool] = (False, False, True),
                 qkv_proj_method: Sequence[str] = ('dw_bn',) * 3, kernel_qkv: Sequence[int] = (3,) * 3,
                 padding_q: Sequence[int] = (1,) * 3, padding_kv: Sequence[int] = (1,) * 3,
                 stride_q: Sequence[int] = (1,) * 3, stride_kv: Sequence[int] = (2,) * 3):
        super().__init__()
        self.num_classes = num_classes
        stages = []
        for i in range(len(dim_embed)):
            stages.append(VisionTransformer(
                in_chans=in_chans, embed_dim=dim_embed[i], depth=depth[i], num_heads=num_heads[i],
                patch_size=patch_size[i], patch_stride=patch_stride[i], patch_padding=patch_padding[i],
                mlp_ratio=mlp_ratio[i], qkv_bias=qkv_bias[i], drop_rate=drop_rate[i],
                attn_drop_rate=attn_drop_rate[i], drop_path_rate=drop_path_rate[i],
                cls_token=cls_token[i], init=init, method=qkv_proj_method[i],
                kernel_size=kernel_qkv[i], padding_q=padding_q[i], padding_kv=padding_kv[i],
                stride_q=stride_q[i], stride_kv=stride_kv[i]))
            in_chans = dim_embed[i]
        self.stages = nn.LayerList(stages)
        self.num_features = dim_embed[-1]
        self.norm = nn.LayerNorm(self.num_features, epsilon=1e-5)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _trunc_normal(self.head.weight)
            _zeros(self.head.bias)

    def forward_features(self, x):
        """Images -> pooled features (B, D): the normed cls token of the last stage,
        or the mean of its normed tokens when it has none."""
        cls_token = None
        for stage in self.stages:
            x, cls_token = stage(x)
        if cls_token is not None:
            return self.norm(cls_token).flatten(1)
        return self.norm(map_to_tokens(x)).mean(axis=1)

    def forward_intermediates(self, x, indices: Optional[Sequence[int]] = None) -> List[paddle.Tensor]:
        """Images (B, 3, H, W) -> the output maps (B, C_i, H_i, W_i) of the stages
        in `indices` (default: all; negative indices count from the last), at
        strides 4, 8 and 16 for the released configurations.

        The maps leave the cls token out; the final norm and the head are not
        used, so a model built with NUM_CLASSES 0 serves as a backbone. Stages
        after the last one asked for are not run.
        """
        count = len(self.stages)
        indices = list(range(count) if indices is None else indices)
        bad = [i for i in indices if not -count <= i < count]
        if bad or not indices:
            raise ValueError(f'stage indices {indices}: the model has stages 0-{count - 1}')
        wanted = sorted({i % count for i in indices})
        maps = []
        for i, stage in enumerate(self.stages[:wanted[-1] + 1]):
            x, _ = stage(x)
            if i in wanted:
                maps.append(x)
        return maps

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_cvt(config) -> ConvolutionalVisionTransformer:
    """Build the CvT model that `config` (see config.py) describes, with the layers
    MODEL.LAYERS names: `plain` (this file's) or `fast` (fast/: the same model, faster)."""
    m = config.MODEL
    model = ConvolutionalVisionTransformer(
        in_chans=3, num_classes=m.NUM_CLASSES, init=m.INIT,
        patch_size=m.PATCH_SIZE, patch_stride=m.PATCH_STRIDE, patch_padding=m.PATCH_PADDING,
        dim_embed=m.DIM_EMBED, num_heads=m.NUM_HEADS, depth=m.DEPTH, mlp_ratio=m.MLP_RATIO,
        qkv_bias=m.QKV_BIAS, drop_rate=m.DROP_RATE, attn_drop_rate=m.ATTN_DROP_RATE,
        drop_path_rate=m.DROP_PATH_RATE, cls_token=m.CLS_TOKEN, qkv_proj_method=m.QKV_PROJ_METHOD,
        kernel_qkv=m.KERNEL_QKV, padding_q=m.PADDING_Q, padding_kv=m.PADDING_KV,
        stride_q=m.STRIDE_Q, stride_kv=m.STRIDE_KV)
    if m.LAYERS == 'plain':
        return model
    import fast  # the speed layers: only named here, so that this file is the plain model
    return fast.convert(model, m.LAYERS)


@contextmanager
def record_attention(model: nn.Layer):
    """Collect the attention weights of every block during the forwards run inside.

    Yields a list of (stage index, block index, weights); weights has the shape
    (B, heads, queries, keys), each query's row summing to 1. Outside the context
    the model stores nothing, so normal forwards do not pay for it.
    """
    records: List[Tuple[int, int, paddle.Tensor]] = []
    attentions = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            block.attn.attention_sink = (
                lambda weights, i=i, j=j: records.append((i, j, weights)))
            attentions.append(block.attn)
    try:
        yield records
    finally:
        for attn in attentions:
            attn.attention_sink = None


HEAD_KEYS = ('head.weight', 'head.bias')
WEIGHTS_SUFFIXES = ('.pdparams', fileio.SAFETENSORS_SUFFIX)


def resolve_weights_path(path: str, target=None) -> str:
    """PaddleViT style: `path` may omit the `.pdparams` (or `.safetensors`) suffix.

    A `path` that is no file but names released weights (`cvt-13-224`, `hf-hub:ORG/REPO`)
    gives their converted file, fetched on first use (hub.py) for `target`: the config of
    the model they are for, or the model (None: a zoo name's own config)."""
    for candidate in (path,) + tuple(path + suffix for suffix in WEIGHTS_SUFFIXES):
        if os.path.isfile(candidate):
            return candidate
    import hub  # weights by name (hub.weights_path raises hub.WeightsUnavailable, a FileNotFoundError)
    if hub.is_weights_name(path):
        return hub.weights_path(path, target)
    raise FileNotFoundError(f'weights file not found: {path} (nor {path}.pdparams, {path}.safetensors)'
                            + hub.names_hint(path))


def load_pretrained(model: nn.Layer, path: str, log=print, allow_other_head: bool = True) -> List[str]:
    """Load weights from `path` (.pdparams or .safetensors) into `model`, strictly.

    The file is read without running code (fileio.load): a pickle that asks for
    anything but tensors is refused. A classifier head of another size (another
    NUM_CLASSES) is left out with one message (with `allow_other_head`; else it
    is an error like any other); any other missing, unexpected or mis-shaped key
    is a ValueError that lists them. Returns the keys left out.
    """
    path = resolve_weights_path(path, model)
    state = fileio.load_state_dict(path)
    own = model.state_dict()
    shape = lambda t: tuple(int(s) for s in t.shape)
    skipped = [k for k in HEAD_KEYS if allow_other_head and k in state
               and (k not in own or shape(state[k]) != shape(own[k]))]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own and k not in skipped]
    mismatched = [f'{k} {shape(state[k])} vs model {shape(own[k])}'
                  for k in own if k in state and k not in skipped and shape(state[k]) != shape(own[k])]
    problems = []
    for name, keys in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', mismatched)):
        if keys:
            more = f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''
            problems.append(f'{len(keys)} {name}: {", ".join(keys[:5])}{more}')
    if problems:
        raise ValueError(f'{path} does not fit the model: ' + '; '.join(problems))
    if skipped:
        if getattr(model, 'num_classes', None) == 0:
            log(f'{path}: classifier head left out (MODEL.NUM_CLASSES = 0: the model has none)')
        else:
            log(f'{path}: classifier head {shape(state[skipped[0]])} does not fit the model '
                f'(MODEL.NUM_CLASSES = {getattr(model, "num_classes", "?")}); left out, trained from scratch')
    # the model's own head stands in for a skipped one, so nothing is reported missing
    model.set_state_dict({k: (own[k] if k in skipped else v) for k, v in state.items() if k in own})
    return skipped
