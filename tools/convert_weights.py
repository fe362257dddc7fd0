"""Convert CvT weights to this project's layout, as `.pdparams` or `.safetensors`.

    python tools/convert_weights.py SRC DST.pdparams -cfg configs/cvt-13-224x224.yaml
    python tools/convert_weights.py SRC DST.safetensors -cfg configs/cvt-13-224x224.yaml

SRC is one of
  * an official PyTorch checkpoint (`.pth`): a state dict, bare or under
    'state_dict' / 'model', keys possibly prefixed 'module.';
  * a Hugging Face `CvtForImageClassification` checkpoint: `model.safetensors`
    (read without PyTorch), `pytorch_model.bin`, or the folder holding either;
  * weights in this project's (PaddleViT's) layout, `.pdparams` or `.safetensors`:
    a `.pdparams` from elsewhere is read without running code, so converting it
    to `.safetensors` once gives a file that any tool can load safely.

Names are mapped onto PaddleViT's layout, BatchNorm step counters dropped and
Linear weights transposed to Paddle's [in, out]. The result is checked against
the model that -cfg builds: a source tensor with no place in it, a model
weight left unfilled or a shape that disagrees stops the conversion with one
line naming the keys (exit code 2), and nothing is written. The output is
written atomically; its suffix picks the format.
"""

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

import fileio  # noqa: E402
from config import ConfigError, get_config  # noqa: E402
from cvt import build_cvt  # noqa: E402
from utils import add_opts_argument  # noqa: E402

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


def _unwrap(checkpoint, path: str):
    """The state dict inside a training checkpoint ({'state_dict': ...} or {'model': ...})."""
    import torch
    while isinstance(checkpoint, Mapping) and not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        inner = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            others = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
            raise ConversionError(f'{path}: not a state dict (entries that are no tensors: '
                                  f'{_listing([str(k) for k in others])}; looked for '
                                  f'{" / ".join(WRAPPER_KEYS)})')
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f'{path}: holds a {type(checkpoint).__name__}, not a state dict')
    return checkpoint


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f'reading {path} needs PyTorch, which is not installed: '
                              f'pip install torch (CPU build is enough), or convert a '
                              f'.safetensors file, which needs none') from None
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise ConversionError(f'{path}: not a readable PyTorch checkpoint ({type(err).__name__}: '
                              f'{str(err).splitlines()[0] if str(err) else ""})') from None
    state = _unwrap(checkpoint, path)
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


def save(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write `state` to `path` atomically: safetensors for a `.safetensors` path, else paddle.save."""
    if path.endswith(fileio.SAFETENSORS_SUFFIX):
        fileio.save_safetensors(state, path)
    else:
        fileio.save({k: paddle.to_tensor(v) for k, v in state.items()}, path)


def convert(src: str, dst: str, cfg: str, opts: Sequence[str] = ()) -> int:
    """Convert checkpoint `src` for the model of config file `cfg` into `dst`;
    returns the number of tensors written."""
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConversionError(f'{dst}: folder {folder} does not exist')
    if os.path.isdir(dst):
        raise ConversionError(f'{dst}: is a folder; give the output file\'s name (.pdparams or .safetensors)')
    config = get_config(cfg, opts)
    with paddle.LazyGuard():  # shapes only: no memory or time spent on weights
        layout = layout_of(build_cvt(config))
    state = convert_state_dict(read_checkpoint(src), layout)
    save(state, dst)
    return len(state)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='official .pth, Hugging Face model.safetensors / '
                                    'pytorch_model.bin, or the folder holding one')
    parser.add_argument('dst', help='output .pdparams or .safetensors')
    parser.add_argument('-cfg', required=True, help='config yaml of the model the weights are for')
    add_opts_argument(parser)
    args = parser.parse_args(argv)
    try:
        count = convert(args.src, args.dst, args.cfg, args.opts or ())
    except (ConversionError, ConfigError, fileio.OutputError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {args.dst}: {count} tensors for {args.cfg}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
