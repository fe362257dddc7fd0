"""Official microsoft/CvT and Hugging Face CvT weights in this project's (PaddleViT's) layout.

`read_checkpoint` reads an official PyTorch checkpoint (`.pth`: a state dict,
bare or under 'state_dict' / 'model', keys possibly prefixed 'module.'), a
Hugging Face `CvtForImageClassification` checkpoint (`model.safetensors`,
`pytorch_model.bin`, or the folder holding either) or weights already in this
project's layout (`.pdparams`, `.safetensors`) into NumPy arrays, without
running code: safetensors hold none, a `.pdparams` goes through fileio's
restricted unpickler, and torch's zip files are read by torch_file.py without
PyTorch (only a file in torch's legacy pre-1.6 format needs PyTorch, and is
read with ``weights_only=True``).

`convert_state_dict` maps the names onto PaddleViT's layout, drops the
BatchNorm step counters, transposes Linear weights to Paddle's [in, out] and
checks the result against a `TargetLayout` (`layout_of(model)`): a source
tensor with no place in it, a model weight left unfilled or a shape that
disagrees is a `ConversionError` naming the keys. tools/convert_weights.py
(the command line) and hub.py (weights by name) use these.
"""

import os
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle.nn as nn

import fileio
import torch_file
from cvt import HEAD_KEYS

HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.tar')
WRAPPER_KEYS = ('state_dict', 'model')


class ConversionError(Exception):
    """The source cannot be converted; the message (one line) says which file or keys."""


def _listing(keys: Sequence[str], limit: int = 5) -> str:
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


# ---------------------------------------------------------------- reading

def _torch_to_numpy(tensor) -> np.ndarray:
    import torch  # only reached once torch has been imported by the caller
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _unwrap(checkpoint, path: str, is_tensor) -> Mapping:
    """The state dict inside a training checkpoint ({'state_dict': ...} or {'model': ...})."""
    while isinstance(checkpoint, Mapping) and not all(is_tensor(v) for v in checkpoint.values()):
        inner = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            others = [k for k, v in checkpoint.items() if not is_tensor(v)]
            raise ConversionError(f'{path}: not a state dict (entries that are no tensors: '
                                  f'{_listing([str(k) for k in others])}; looked for '
                                  f'{" / ".join(WRAPPER_KEYS)})')
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f'{path}: holds a {type(checkpoint).__name__}, not a state dict')
    return checkpoint


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    if torch_file.is_torch_zip(path):  # every torch.save since PyTorch 1.6: no torch needed
        try:
            checkpoint = torch_file.load(path)
        except fileio.FileFormatError as err:  # the unsafe ones included
            raise ConversionError(str(err)) from None
        state = _unwrap(checkpoint, path, lambda v: isinstance(v, np.ndarray))
        return {str(k): v for k, v in state.items()}
    try:
        import torch
    except ImportError:
        raise ConversionError(f'reading {path} needs PyTorch, which is not installed (it is not in '
                              f'torch.save\'s zip format, which is read without PyTorch): '
                              f'pip install torch (CPU build is enough), or convert a '
                              f'.safetensors file, which needs none') from None
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise ConversionError(f'{path}: not a readable PyTorch checkpoint ({type(err).__name__}: '
                              f'{str(err).splitlines()[0] if str(err) else ""})') from None
    state = _unwrap(checkpoint, path, lambda v: isinstance(v, torch.Tensor))
    return {str(k): _torch_to_numpy(v) for k, v in state.items()}


def _read_with_fileio(path: str) -> Dict[str, np.ndarray]:
    """A .safetensors file, or a Paddle .pdparams read without running code."""
    try:
        state = fileio.load(path, return_numpy=True)
    except fileio.FileFormatError as err:
        raise ConversionError(str(err)) from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ConversionError(f'{path}: not a state dict of weights')
    return state


def read_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """Name -> array of the checkpoint at `path` (file or Hugging Face folder),
    with any DataParallel 'module.' prefix removed."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in HF_WEIGHT_FILES
                 if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise ConversionError(f'{path}: folder holds neither {" nor ".join(HF_WEIGHT_FILES)}')
        path = found[0]  # safetensors first: it needs no torch
    if not os.path.isfile(path):
        raise ConversionError(f'{path}: no such file or folder')
    if path.endswith(('.safetensors', '.pdparams')):
        state = _read_with_fileio(path)
    elif path.endswith(TORCH_SUFFIXES):
        state = _read_torch(path)
    else:
        raise ConversionError(f'{path}: unknown checkpoint type (expected .safetensors, .pdparams, '
                              f'{", ".join(TORCH_SUFFIXES)} or a Hugging Face folder)')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------- names

_HF_STAGE = re.compile(r'(?:cvt\.)?encoder\.stages\.(\d+)\.(.+)')
_HF_BLOCK = re.compile(r'layers\.(\d+)\.(.+)')
_HF_STAGE_PARTS = {
    'embedding.convolution_embeddings.projection.': 'patch_embed.proj.',
    'embedding.convolution_embeddings.normalization.': 'patch_embed.norm.',
}
_HF_BLOCK_PARTS = {
    'layernorm_before.': 'norm1.',
    'layernorm_after.': 'norm2.',
    'attention.attention.projection_query.': 'attn.proj_q.',
    'attention.attention.projection_key.': 'attn.proj_k.',
    'attention.attention.projection_value.': 'attn.proj_v.',
    'attention.output.dense.': 'attn.proj.',
    'intermediate.dense.': 'mlp.fc1.',
    'output.dense.': 'mlp.fc2.',
}
for _hf, _official in (('query', 'q'), ('key', 'k'), ('value', 'v')):
    _prefix = f'attention.attention.convolution_projection_{_hf}.convolution_projection.'
    _HF_BLOCK_PARTS[_prefix + 'convolution.'] = f'attn.conv_proj_{_official}.conv.'
    _HF_BLOCK_PARTS[_prefix + 'normalization.'] = f'attn.conv_proj_{_official}.bn.'
_HF_TOP_PARTS = {'layernorm.': 'norm.', 'classifier.': 'head.'}


def _replace_prefix(name: str, table: Mapping[str, str]) -> Optional[str]:
    for old, new in table.items():
        if name.startswith(old) and '.' not in name[len(old):]:
            return new + name[len(old):]
    return None


def is_paddle_layout(names: Iterable[str]) -> bool:
    """True when the names are already this project's (PaddleViT's): `stages.<i>.`, not `stage<i>.`."""
    return any(name.startswith('stages.') for name in names)


def is_hf_layout(names: Iterable[str]) -> bool:
    """True when the names are Hugging Face transformers' CvT names."""
    return any(_HF_STAGE.fullmatch(name) for name in names)


def hf_to_official(name: str) -> Optional[str]:
    """The official microsoft/CvT name of a Hugging Face CvT tensor, or None if unknown."""
    stage = _HF_STAGE.fullmatch(name)
    if stage is None:
        return _replace_prefix(name, _HF_TOP_PARTS)
    index, rest = stage.groups()
    if rest == 'cls_token':
        return f'stage{index}.cls_token'
    block = _HF_BLOCK.fullmatch(rest)
    if block is None:
        mapped = _replace_prefix(rest, _HF_STAGE_PARTS)
        return None if mapped is None else f'stage{index}.{mapped}'
    mapped = _replace_prefix(block.group(2), _HF_BLOCK_PARTS)
    return None if mapped is None else f'stage{index}.blocks.{block.group(1)}.{mapped}'


_OFFICIAL_RULES = (
    (re.compile(r'^stage(\d+)\.'), r'stages.\1.'),
    (re.compile(r'\.(conv_proj_[qkv])\.conv\.'), r'.\1.0.'),
    (re.compile(r'\.(conv_proj_[qkv])\.bn\.running_mean$'), r'.\1.1._mean'),
    (re.compile(r'\.(conv_proj_[qkv])\.bn\.running_var$'), r'.\1.1._variance'),
    (re.compile(r'\.(conv_proj_[qkv])\.bn\.'), r'.\1.1.'),
)


def official_to_paddle(name: str) -> Optional[str]:
    """This project's (PaddleViT's) name of an official CvT tensor; None for the
    BatchNorm step counters, which Paddle does not keep."""
    if name.endswith('.num_batches_tracked'):
        return None
    for pattern, replacement in _OFFICIAL_RULES:
        name = pattern.sub(replacement, name)
    return name


# ---------------------------------------------------------------- conversion

@dataclass(frozen=True)
class TargetLayout:
    """What the converted state dict must hold: the model's keys, shapes and dtypes,
    and which weights belong to Linear layers (stored [in, out])."""
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, np.dtype]
    linear_weights: FrozenSet[str]


def layout_of(model: nn.Layer) -> TargetLayout:
    """The TargetLayout of `model` (which may be built under paddle.LazyGuard)."""
    state = model.state_dict()
    linear_weights = frozenset(f'{name}.weight' for name, layer in model.named_sublayers()
                               if isinstance(layer, nn.Linear))
    return TargetLayout(
        shapes={k: tuple(int(s) for s in t.shape) for k, t in state.items()},
        dtypes={k: np.dtype(str(t.dtype).replace('paddle.', '')) for k, t in state.items()},
        linear_weights=linear_weights)


def convert_state_dict(source: Mapping[str, np.ndarray], layout: TargetLayout) -> Dict[str, np.ndarray]:
    """Official, Hugging Face or this project's CvT tensors -> this project's state dict,
    checked against `layout`; raises ConversionError naming unmapped, unfilled or mis-shaped keys."""
    hf, ours = is_hf_layout(source), is_paddle_layout(source)
    converted: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    unmapped: List[str] = []
    for src_name, array in source.items():
        official = hf_to_official(src_name) if hf else src_name
        if official is None:
            if not src_name.endswith('.num_batches_tracked'):
                unmapped.append(src_name)
            continue
        name = official if ours else official_to_paddle(official)
        if name is None:
            continue
        if name not in layout.shapes or name in converted:
            unmapped.append(src_name)
            continue
        transposed = not ours and name in layout.linear_weights and array.ndim == 2
        converted[name] = array.T if transposed else array
        origin[name] = src_name
    kind = 'Hugging Face' if hf else 'this project\'s' if ours else 'official'
    if unmapped:
        raise ConversionError(f'{len(unmapped)} {kind} tensors have no place in the model: '
                              f'{_listing(unmapped)}')
    unfilled = [k for k in layout.shapes if k not in converted]
    if unfilled:
        raise ConversionError(f'{len(unfilled)} model weights not in the checkpoint: {_listing(unfilled)}')
    mismatched = [f'{origin[k]} {tuple(converted[k].shape)} -> {k} expects {layout.shapes[k]}'
                  for k in layout.shapes if tuple(converted[k].shape) != layout.shapes[k]]
    if mismatched:
        raise ConversionError(f'{len(mismatched)} shapes disagree with the model: {_listing(mismatched, 3)}')
    return {k: np.ascontiguousarray(converted[k], dtype=layout.dtypes[k]) for k in layout.shapes}


def with_head_of(layout: TargetLayout, source: Mapping[str, np.ndarray]) -> TargetLayout:
    """`layout` with the classifier head that the checkpoint `source` holds, of any class
    count or none, in place of the model's own: the whole checkpoint converts for a model
    of the same architecture fine-tuned to other classes (or without a classifier)."""
    hf, ours = is_hf_layout(source), is_paddle_layout(source)
    shapes = {k: v for k, v in layout.shapes.items() if k not in HEAD_KEYS}
    dtypes = {k: v for k, v in layout.dtypes.items() if k not in HEAD_KEYS}
    for src_name, array in source.items():
        name = hf_to_official(src_name) if hf else src_name
        if name in HEAD_KEYS:
            # PyTorch stores a Linear weight [out, in]; this project's are [in, out]
            transposed = name == 'head.weight' and not ours
            shapes[name] = tuple(reversed(array.shape)) if transposed else tuple(array.shape)
            dtypes[name] = layout.dtypes.get(name, np.dtype(np.float32))
    return TargetLayout(shapes=shapes, dtypes=dtypes, linear_weights=layout.linear_weights | {'head.weight'})
