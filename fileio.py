"""Files from elsewhere, read without running their code; our own files, written whole.

Weights (``.pdparams``), training states (``.pdopt``) and the CIFAR archives are
pickles, and a plain unpickler runs whatever callable a file names. `load` and
`unpickle` build only what these files legitimately hold: NumPy arrays and
scalars, Paddle's saved tensors (a name and an array), numbers, strings, bytes
and plain containers, like ``torch.load(weights_only=True)``. A file that asks
for anything else stops with an `UnsafeFileError` naming the file and what it
asked for, before anything it names has run. ``.safetensors`` files hold no
code at all and load through the safetensors library.

`write_atomically` gives every file this project writes (checkpoints,
converted weights) a temporary name in the target folder, flushes it and
renames it: a reader, or a process killed meanwhile, never sees half a file,
and a failed write leaves nothing behind.
"""

import _compat_pickle
import codecs
import collections
import os
import pickle
import stat
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

SAFETENSORS_SUFFIX = '.safetensors'
# paddle.save's bookkeeping entries in a state dict (paddle/framework/io.py, io_utils.py)
_NAME_TABLE = 'StructuredToParameterName@@'
_SPLIT_ARRAYS = 'UnpackBigParamInfor@@'


class FileFormatError(ValueError):
    """A file is empty, truncated or not of the kind expected; the message names it."""


class UnsafeFileError(FileFormatError):
    """A pickle asks for code beyond tensors, arrays, numbers, strings and containers."""


def _rebuild_dense_tensor(expression: str, namespace: Dict[str, Any]) -> np.ndarray:
    """paddle.save writes a DenseTensor as ``eval('data', {'data': array})``; only that
    exact form is accepted, and no expression is evaluated."""
    if expression != 'data' or not isinstance(namespace, dict) or set(namespace) != {'data'} \
            or not isinstance(namespace['data'], np.ndarray):
        raise UnsafeFileError(f'asks to evaluate {str(expression)[:60]!r}')
    return namespace['data']


def _latin1_bytes(text: str, encoding: str = 'latin1') -> bytes:
    """Protocol-2 pickles written by Python 3 carry bytes as ``_codecs.encode(text, 'latin1')``."""
    if codecs.lookup(encoding).name != 'iso8859-1' or not isinstance(text, str):
        raise UnsafeFileError(f'asks to encode with {encoding!r}')
    return text.encode('latin1')


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder, wherever it lives
_SCALAR = np.float64(0).__reduce__()[0]

# (module, name) -> what it stands for; numpy 1 and 2 name their rebuilders differently
SAFE_GLOBALS: Dict[tuple, Any] = {
    ('builtins', 'tuple'): tuple,
    ('builtins', 'list'): list,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytearray'): bytearray,
    ('builtins', 'complex'): complex,
    ('builtins', 'eval'): _rebuild_dense_tensor,
    ('_codecs', 'encode'): _latin1_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}
for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    SAFE_GLOBALS[(_module, '_reconstruct')] = _RECONSTRUCT
    SAFE_GLOBALS[(_module, 'scalar')] = _SCALAR


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`."""

    def __init__(self, file, source: str, allowed: Mapping[tuple, Any],
                 persistent: Optional[Callable[[Any], Any]], **kwargs):
        super().__init__(file, **kwargs)
        self.source = source
        self.allowed = allowed
        self.persistent = persistent

    def find_class(self, module: str, name: str):
        # Python 2 pickles (the CIFAR archives) name builtins as Python 2 did
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeFileError(
                f'{self.source}: refused to load: it asks for {module}.{name}, which is not a tensor, '
                f'array, number, string or container; nothing in the file was run')
        return found

    def persistent_load(self, pid):
        if self.persistent is None:
            raise UnsafeFileError(f'{self.source}: refused to load: it refers to outside objects '
                                  f'({str(pid)[:40]})')
        return self.persistent(pid)


def unpickle(file, source: str, encoding: str = 'ASCII',
             extra_globals: Optional[Mapping[tuple, Any]] = None,
             persistent_load: Optional[Callable[[Any], Any]] = None) -> Any:
    """Unpickle the open binary `file` (named `source` in errors), allowing only
    `SAFE_GLOBALS` (and `extra_globals`, whose callables must be as harmless);
    `persistent_load` resolves persistent ids (none are allowed without it)."""
    allowed = {**SAFE_GLOBALS, **(extra_globals or {})}
    try:
        return _RestrictedUnpickler(file, source, allowed, persistent_load, encoding=encoding).load()
    except UnsafeFileError as err:
        message = str(err)
        raise UnsafeFileError(message if message.startswith(source) else
                              f'{source}: refused to load: it {message}; nothing in the file was run') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError, OverflowError) as err:
        kind = 'empty' if isinstance(err, EOFError) and file.tell() == 0 else 'not a whole pickle'
        raise FileFormatError(f'{source}: cannot be read, {kind} ({type(err).__name__}: '
                              f'{str(err)[:120]})') from None


def _is_saved_tensor(value: Any) -> bool:
    """paddle.save writes a Tensor as (name, array)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
        and isinstance(value[1], np.ndarray)


def _map(value: Any, is_leaf: Callable[[Any], bool], convert: Callable[[Any], Any]) -> Any:
    if is_leaf(value):
        return convert(value)
    if isinstance(value, dict):
        return type(value)((key, _map(item, is_leaf, convert)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_map(item, is_leaf, convert) for item in value)
    return value


def _contains(value: Any, is_leaf: Callable[[Any], bool]) -> bool:
    if is_leaf(value):
        return True
    if isinstance(value, dict):
        return any(_contains(item, is_leaf) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains(item, is_leaf) for item in value)
    return False


def _join_split_arrays(state: dict) -> dict:
    """paddle.save splits arrays above 1 GiB into slices for pickle protocols 2 and 3."""
    info = state.pop(_SPLIT_ARRAYS, None)
    if isinstance(info, dict):
        for key, entry in info.items():
            parts = [state.pop(part) for part in entry['slices']]
            state[key] = np.concatenate(parts).reshape(entry['OriginShape'])
    return state


def _as_paddle_objects(loaded: Any, return_numpy: bool) -> Any:
    """What paddle.load returns for the unpickled `loaded`: saved tensors as Tensors
    (or arrays with `return_numpy`), bookkeeping entries removed."""
    import paddle

    def tensor(array: np.ndarray, name: Optional[str] = None):
        if return_numpy:
            return array
        value = paddle.to_tensor(array)
        if name:
            value.name = name
        return value

    if isinstance(loaded, dict):
        loaded = _join_split_arrays(loaded)
        if _NAME_TABLE in loaded:  # a state dict: every array is a tensor
            names = loaded.pop(_NAME_TABLE)
            names = names if isinstance(names, dict) else {}
            return type(loaded)((key, tensor(value, names.get(key)) if isinstance(value, np.ndarray) else value)
                                for key, value in loaded.items())
    if _contains(loaded, _is_saved_tensor):  # paddle.save of any object: (name, array) are tensors
        return _map(loaded, _is_saved_tensor, lambda saved: tensor(saved[1], saved[0]))
    return _map(loaded, lambda v: isinstance(v, np.ndarray), tensor)


def load(path: str, return_numpy: bool = False) -> Any:
    """What `paddle.load(path)` returns, read without running code: a ``.safetensors``
    file as a dict of tensors, any other file as a pickle of paddle.save's kinds.

    Raises FileNotFoundError, `UnsafeFileError`, or `FileFormatError` (an empty,
    truncated or foreign file); each message names `path`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    check_header(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors(path, return_numpy)
    with open(path, 'rb') as file:
        loaded = unpickle(file, path, encoding='latin1')
    return _as_paddle_objects(loaded, return_numpy)


def check_header(path: str) -> str:
    """`path` if it starts as a Paddle pickle or a safetensors file does (a cheap check before
    long work); FileFormatError naming it otherwise (an empty file, text, an archive)."""
    with open(path, 'rb') as file:
        head = file.read(16)
    if not head:
        raise FileFormatError(f'{path}: the file is empty')
    if path.endswith(SAFETENSORS_SUFFIX):
        ok = len(head) > 8 and head[8:9] == b'{'  # an 8-byte header length, then JSON
    else:
        ok = head[:1] == b'\x80'  # pickle protocol 2 and up
    if not ok:
        kind = 'safetensors' if path.endswith(SAFETENSORS_SUFFIX) else 'Paddle weights or checkpoint'
        raise FileFormatError(f'{path}: not a {kind} file (it starts with {head[:8]!r})')
    return path


def _load_safetensors(path: str, return_numpy: bool) -> Dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        arrays = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f'{path}: not a readable safetensors file ({err})') from None
    if return_numpy:
        return arrays
    import paddle
    return {key: paddle.to_tensor(value) for key, value in arrays.items()}


def load_state_dict(path: str) -> Dict[str, Any]:
    """A dict of weights (name -> Tensor) from `path`, read as `load` reads; a
    FileFormatError names the file when it holds anything else."""
    state = load(path)
    import paddle
    if not isinstance(state, dict) or not state:
        raise FileFormatError(f'{path}: not a state dict of weights (holds {type(state).__name__})')
    others = [str(key) for key, value in state.items() if not isinstance(value, paddle.Tensor)]
    if others:
        raise FileFormatError(f'{path}: not a state dict of weights (entries that are no tensors: '
                              f'{", ".join(others[:5])})')
    return state


# ---------------------------------------------------------------- the cache

def cache_root() -> str:
    """CVT_CACHE_DIR, else ~/.cache/cvt-paddle: the compiled kernels, the released weights."""
    return os.environ.get('CVT_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'cvt-paddle')


def untrusted_reason(path: str, is_folder: bool = True) -> Optional[str]:
    """Why code or weights at `path` (a file, or a folder of them) must not be loaded, or
    None: it must be this user's, a plain file or folder (not a link), writable by
    nobody else, and every folder above it must be this user's or root's and not
    writable by others (one that others may write, such as /tmp, is fine only with
    the sticky bit, which keeps them from renaming what is in it)."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return f'{path} cannot be used ({err.strerror})'
    kind = stat.S_ISDIR if is_folder else stat.S_ISREG
    if not kind(info.st_mode):
        return f'{path} is not a {"folder" if is_folder else "plain file"}'
    if info.st_uid != os.getuid():
        return f'{path} belongs to another user (uid {info.st_uid})'
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})'
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        above = os.stat(parent)
        shared = above.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not above.st_mode & stat.S_ISVTX
        if above.st_uid not in (0, os.getuid()) or shared:
            return f'{parent}, above {path}, can be changed by other users'
        if parent == os.path.dirname(parent):
            return None
        parent = os.path.dirname(parent)



# ---------------------------------------------------------------- writing

class OutputError(OSError):
    """A file cannot be written; the message names it and the reason (one line)."""


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temporary)` to make the file, flush it to disk, then rename it to
    `path` (and flush the rename): `path` never holds part of a file. On any
    failure the temporary file is removed; an OSError becomes an OutputError
    naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = f'{path}.tmp{os.getpid()}'
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(f'{path} is a folder')
        write(temporary)
        with open(temporary, 'rb') as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException as err:
        if os.path.lexists(temporary):
            os.remove(temporary)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            reason = err.strerror or str(err)
            raise OutputError(f'{path}: cannot be written ({reason})') from None
        raise


def save(obj: Any, path: str) -> None:
    """paddle.save `obj` to `path`, atomically."""
    import paddle
    write_atomically(path, lambda temporary: paddle.save(obj, temporary))


def save_safetensors(state: Mapping[str, Any], path: str) -> None:
    """A state dict (tensors or arrays) as a safetensors file, atomically."""
    from safetensors.numpy import save_file
    arrays = {key: np.ascontiguousarray(value.numpy() if hasattr(value, 'numpy') else value)
              for key, value in state.items()}
    write_atomically(path, lambda temporary: save_file(arrays, temporary, metadata={'format': 'np'}))
