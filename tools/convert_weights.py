"""Convert CvT weights to this project's layout, as `.pdparams` or `.safetensors`.

    python tools/convert_weights.py SRC DST.pdparams -cfg configs/cvt-13-224x224.yaml
    python tools/convert_weights.py SRC DST.safetensors -cfg configs/cvt-13-224x224.yaml

SRC is one of
  * an official PyTorch checkpoint (`.pth`): a state dict, bare or under
    'state_dict' / 'model', keys possibly prefixed 'module.';
  * a Hugging Face `CvtForImageClassification` checkpoint: `model.safetensors`,
    `pytorch_model.bin`, or the folder holding either;
  * weights in this project's (PaddleViT's) layout, `.pdparams` or `.safetensors`:
    a `.pdparams` from elsewhere is read without running code, so converting it
    to `.safetensors` once gives a file that any tool can load safely.
Every one is read without running code, and without PyTorch (weight_conversion.py;
only a `.pth` in PyTorch's legacy pre-1.6 format needs it).

Names are mapped onto PaddleViT's layout, BatchNorm step counters dropped and
Linear weights transposed to Paddle's [in, out]. The result is checked against
the model that -cfg builds: a source tensor with no place in it, a model
weight left unfilled or a shape that disagrees stops the conversion with one
line naming the keys (exit code 2), and nothing is written. The output is
written atomically; its suffix picks the format. The released weights need no
conversion by hand: `-pretrained cvt-13-224` fetches and converts them (hub.py,
docs/tools.md).
"""

import argparse
import os
import sys
from typing import Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runtime  # noqa: E402
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import fileio  # noqa: E402
from config import ConfigError, get_config  # noqa: E402
from cvt import build_cvt  # noqa: E402
from utils import add_opts_argument  # noqa: E402
from weight_conversion import (ConversionError, convert_state_dict, layout_of,  # noqa: E402,F401
                               read_checkpoint)


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
