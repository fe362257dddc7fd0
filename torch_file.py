"""PyTorch checkpoints (`torch.save`'s zip format) read as NumPy arrays, without PyTorch
and without running code.

Hugging Face's ``pytorch_model.bin`` and the official ``.pth`` files are zip
archives holding ``<name>/data.pkl``, a pickle of the state dict, and one
``<name>/data/<key>`` entry of raw bytes per tensor storage. The pickle is read
by `fileio.unpickle`, which resolves only the few names a state dict asks for
(``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` and the other
storage types, ``collections.OrderedDict``), each mapped to a harmless stand-in
here; a pickle naming anything else stops with `fileio.UnsafeFileError` before
anything it names has run. Each tensor becomes a NumPy copy of its view of the
storage, whose offset, shape and strides are checked to lie inside it.
"""

import collections
import zipfile
from typing import Any, Dict, Tuple

import numpy as np

import fileio

# torch.<Name>Storage -> the dtype of its elements; BFloat16 has no NumPy dtype
# and is read as its 16-bit patterns, widened to float32 below
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
    """Stands for a torch storage class (`torch.FloatStorage`, ...) in the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def is_torch_zip(path: str) -> bool:
    """True when `path` is a zip archive, as every `torch.save` file since PyTorch 1.6 is."""
    return zipfile.is_zipfile(path)


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Archive:
    """The storages of one torch zip archive, read on demand (a storage shared by
    several tensors is read once)."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        self.archive = archive
        self.prefix = prefix
        self.source = source
        self.byteorder = '<' if byteorder == 'little' else '>'
        self.storages: Dict[str, np.ndarray] = {}

    def _refuse(self, problem: str) -> fileio.UnsafeFileError:
        # raised inside the unpickler, which passes a message naming the file on as it is
        return fileio.UnsafeFileError(f'{self.source}: refused to load: {problem}; nothing in the file was run')

    def storage(self, pid: Any) -> np.ndarray:
        """The array of persistent id ('storage', type, key, location, numel)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise self._refuse(f'it refers to an outside object other than a tensor storage ({str(pid)[:60]})')
        storage_type, key = pid[1], pid[2]
        if key not in self.storages:
            entry = f'{self.prefix}data/{key}'
            try:
                raw = self.archive.read(entry)
            except KeyError:
                raise self._refuse(f'its storage {entry} is missing') from None
            if storage_type.dtype == 'bfloat16':
                dtype = np.dtype(f'{self.byteorder}u2')
            else:
                dtype = np.dtype(storage_type.dtype).newbyteorder(self.byteorder)
            if len(raw) % dtype.itemsize:
                raise self._refuse(f'its storage {entry} holds {len(raw)} bytes, not whole '
                                   f'{storage_type.name} elements')
            array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder('='))
            self.storages[key] = _bfloat16_to_float32(array) if storage_type.dtype == 'bfloat16' else array
        return self.storages[key]

    def tensor(self, storage: np.ndarray, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...],
               *_ignored) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of `storage`, copied;
        the view must lie inside the storage (as_strided would read any memory)."""
        view = f'(offset {offset}, size {size}, stride {stride})'
        if not (isinstance(storage, np.ndarray) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride)
                and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))):
            raise self._refuse(f'a tensor has an invalid view {view}')
        if not all(size):
            return np.zeros(size, dtype=storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise self._refuse(f'a tensor view {view} reaches past its storage of {storage.size} elements')
        strided = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, writeable=False,
                                                  strides=tuple(s * storage.itemsize for s in stride))
        return np.array(strided)


def _parameter(data: np.ndarray, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_parameter: a parameter is its data."""
    if not isinstance(data, np.ndarray):
        raise fileio.UnsafeFileError(f'asks to make a parameter of a {type(data).__name__}')
    return data


def load(path: str) -> Any:
    """What `torch.load(path)` returns, with NumPy arrays for tensors; raises
    `fileio.UnsafeFileError` for a pickle that asks for anything else and
    `fileio.FileFormatError` for a file that is not a readable torch zip archive
    (both name `path`)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise fileio.FileFormatError(f'{path}: not a PyTorch zip archive ({err})') from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1]
        if len(pickles) != 1:
            raise fileio.FileFormatError(f'{path}: not a PyTorch checkpoint (no single <name>/data.pkl in the zip)')
        prefix = pickles[0][:-len('data.pkl')]
        byteorder = 'little'
        if f'{prefix}byteorder' in archive.namelist():
            byteorder = archive.read(f'{prefix}byteorder').decode('ascii', 'replace').strip()
            if byteorder not in ('little', 'big'):
                raise fileio.FileFormatError(f'{path}: cannot be read, unknown byte order {byteorder[:20]!r}')
        storages = _Archive(archive, prefix, path, byteorder)
        allowed = {('torch._utils', '_rebuild_tensor_v2'): storages.tensor,
                   ('torch._utils', '_rebuild_parameter'): _parameter,
                   ('collections', 'OrderedDict'): collections.OrderedDict}
        allowed.update({('torch', name): _StorageType(name) for name in _STORAGE_DTYPES})
        with archive.open(pickles[0]) as data:
            return fileio.unpickle(data, path, encoding='utf-8', extra_globals=allowed,
                                   persistent_load=storages.storage)
