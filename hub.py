"""Released CvT weights by name: fetched from the Hugging Face Hub, verified, converted, cached.

    -pretrained cvt-13-224                a name of the model zoo (`MODEL_ZOO`)
    -pretrained hf-hub:ORG/REPO[@REV]     any Hugging Face CvtForImageClassification repository

Every place that takes pretrained weights resolves them through
`cvt.resolve_weights_path`, which hands a name that is no file to
`weights_path`. On first use that downloads the repository's
``model.safetensors`` (or, where it has none, ``pytorch_model.bin``) with
huggingface_hub, which keeps it in its own cache (``HF_HOME``, ``HF_HUB_CACHE``)
and follows ``HF_ENDPOINT`` (a mirror) and ``HF_HUB_OFFLINE=1`` (the cache
only); checks the file's sha256 against the one the Hub advertised for it;
reads it without running code (a ``.bin`` through torch_file.py, without
PyTorch); converts it to this project's layout for the model it is meant for
(weight_conversion.py, which checks every key and shape); and writes the result
as ``<CVT_CACHE_DIR>/weights/<org>--<repo>.safetensors``. The next use of the
name returns that file at once, without the network.

The weights cache is a folder of this user's (created 0700; one owned by
another user, or writable by others, is refused), written atomically under a
file lock, so that processes that start together (several GPUs) fetch once and
never see half a file. Every failure is a `WeightsUnavailable` (a
FileNotFoundError, which the entry points report in one line, exit code 2)
that says what to do, including how to place a file by hand.
"""

import hashlib
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

import fileio

ROOT = os.path.dirname(os.path.abspath(__file__))
HF_PREFIX = 'hf-hub:'
DEFAULT_REVISION = 'main'
# what the repositories of transformers' CvtForImageClassification hold, in the order tried
HUB_FILES = ('model.safetensors', 'pytorch_model.bin')
DEFAULT_ENDPOINT = 'https://huggingface.co'
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')


@dataclass(frozen=True)
class ZooModel:
    """A released model: its short name, its Hugging Face repository and the config
    (relative to the repository root) of the model it holds."""
    name: str
    repo: str
    config: str


# the model zoo; the -22k models are pre-trained on ImageNet-22k and fine-tuned on ImageNet-1k
MODEL_ZOO: Dict[str, ZooModel] = {model.name: model for model in (
    ZooModel('cvt-13-224', 'microsoft/cvt-13', 'configs/cvt-13-224x224.yaml'),
    ZooModel('cvt-13-384', 'microsoft/cvt-13-384', 'configs/cvt-13-384x384.yaml'),
    ZooModel('cvt-13-384-22k', 'microsoft/cvt-13-384-22k', 'configs/cvt-13-384x384.yaml'),
    ZooModel('cvt-21-224', 'microsoft/cvt-21', 'configs/cvt-21-224x224.yaml'),
    ZooModel('cvt-21-384', 'microsoft/cvt-21-384', 'configs/cvt-21-384x384.yaml'),
    ZooModel('cvt-21-384-22k', 'microsoft/cvt-21-384-22k', 'configs/cvt-21-384x384.yaml'),
    ZooModel('cvt-w24-384-22k', 'microsoft/cvt-w24-384-22k', 'configs/cvt-w24-384x384.yaml'),
)}


class WeightsUnavailable(FileNotFoundError):
    """Named weights cannot be had as asked; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class Source:
    """Where a name's weights come from."""
    name: str  # as the user wrote it
    repo: str
    revision: str
    zoo: Optional[ZooModel]

    @property
    def file_name(self) -> str:
        """The converted weights' name in the cache folder."""
        stem = self.repo.replace('/', '--')
        if self.revision != DEFAULT_REVISION:
            stem += '@' + re.sub(r'[^\w.-]', '_', self.revision)
        return stem + fileio.SAFETENSORS_SUFFIX


def is_weights_name(text: str) -> bool:
    """True when `text` names released weights (a zoo name or hf-hub:...) rather than a file."""
    return text in MODEL_ZOO or text.startswith(HF_PREFIX)


def known_names() -> str:
    return f'{", ".join(MODEL_ZOO)}, or {HF_PREFIX}ORG/REPO'


def names_hint(path: str) -> str:
    """For a weights path that is no file: the names that are released weights, when
    `path` reads like a name (no folder, no suffix); else nothing."""
    if os.sep in path or os.path.splitext(path)[1] in ('.pdparams', fileio.SAFETENSORS_SUFFIX):
        return ''
    return f'; released weights are named {known_names()}'


def parse(name: str) -> Source:
    """The Source of a zoo name or of ``hf-hub:ORG/REPO[@REVISION]``."""
    if name in MODEL_ZOO:
        zoo = MODEL_ZOO[name]
        return Source(name, zoo.repo, DEFAULT_REVISION, zoo)
    repo, at, revision = name[len(HF_PREFIX):].partition('@')
    if not name.startswith(HF_PREFIX) or not _REPO_ID.fullmatch(repo) or '..' in repo or (at and not revision):
        raise WeightsUnavailable(f'{name}: not a name of released weights; they are {known_names()} '
                                 f'(with @REVISION for another branch, tag or commit)')
    zoo = next((model for model in MODEL_ZOO.values() if model.repo == repo), None)
    return Source(name, repo, revision or DEFAULT_REVISION, zoo)


# ---------------------------------------------------------------- the model a name is for

def _layout_of_config(config):
    import paddle
    from cvt import build_cvt
    from weight_conversion import layout_of
    with paddle.LazyGuard():  # shapes only: no memory or time spent on weights
        return layout_of(build_cvt(config))


@lru_cache(maxsize=None)
def _zoo_config(config_file: str):
    from config import get_config
    return get_config(os.path.join(ROOT, config_file))


@lru_cache(maxsize=None)
def _zoo_layout(config_file: str):
    return _layout_of_config(_zoo_config(config_file))


def _target_layout(target):
    """The TargetLayout of `target`: a model (nn.Layer) or the config that builds one."""
    import paddle
    from weight_conversion import layout_of
    return layout_of(target) if isinstance(target, paddle.nn.Layer) else _layout_of_config(target)


def _body(layout) -> Dict[str, Tuple[int, ...]]:
    """Shapes of every weight but the classifier head (any class count fits a name)."""
    from cvt import HEAD_KEYS
    return {key: shape for key, shape in layout.shapes.items() if key not in HEAD_KEYS}


def _describe(target) -> str:
    model = getattr(target, 'MODEL', None)
    return f'the config\'s model (MODEL.NAME {model.NAME})' if model is not None else 'the model'


def _check_fits(source: Source, target, layout) -> None:
    """One line naming the config that fits a zoo name, and the names that fit the model,
    when the model of `target` is of another architecture."""
    wanted = _body(layout)
    if _body(_zoo_layout(source.zoo.config)) == wanted:
        return
    fitting = [name for name, model in MODEL_ZOO.items() if _body(_zoo_layout(model.config)) == wanted]
    others = f'a name that fits it: {", ".join(fitting)}' if fitting else 'no released weights fit it'
    raise WeightsUnavailable(
        f'{source.name} holds a {_zoo_config(source.zoo.config).MODEL.NAME} ({source.zoo.config}), '
        f'which {_describe(target)} is not: use -cfg {source.zoo.config}, or {others}')


# ---------------------------------------------------------------- the cache

def cache_folder() -> str:
    """``<CVT_CACHE_DIR or ~/.cache/cvt-paddle>/weights``, created private (0700); refused
    when others could change what is in it (they would choose the weights loaded)."""
    root = fileio.cache_root()
    folder = os.path.join(root, 'weights')
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        reason = fileio.untrusted_reason(folder)
    except OSError as err:
        raise WeightsUnavailable(f'{folder}: the weights cache cannot be made ({err.strerror}); '
                                 f'set CVT_CACHE_DIR to a folder of yours') from None
    if reason is not None:
        raise WeightsUnavailable(f'not using {folder} as the weights cache: {reason}; make it yours alone '
                                 f'(chmod go-w), or set CVT_CACHE_DIR to a folder that only you can write')
    return folder


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if need be): one process at a time."""
    import fcntl  # POSIX; imported here so that resolving a plain file path needs none
    with open(path, 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def weights_path(name: str, target=None) -> str:
    """The converted weights of `name` in the cache, fetched, verified and converted
    on first use. `target` (the config of the model they are for, or the model)
    checks a zoo name against the model, and gives an ``hf-hub:`` name its layout;
    without one, a zoo name converts for its own config. Raises WeightsUnavailable."""
    source = parse(name)
    layout = None if target is None else _target_layout(target)
    if source.zoo is not None and layout is not None:
        _check_fits(source, target, layout)
    path = os.path.join(cache_folder(), source.file_name)
    if os.path.isfile(path):
        return path
    with _locked(os.path.join(os.path.dirname(path), '.lock')):
        if not os.path.isfile(path):  # else another process made it while this one waited
            if source.zoo is not None:
                layout, target = _zoo_layout(source.zoo.config), _zoo_config(source.zoo.config)
            elif layout is None:
                raise WeightsUnavailable(f'{name}: converting it needs the config of the model it is for '
                                         f'(cvt.resolve_weights_path(name, config))')
            try:
                _fetch_and_convert(source, layout, _describe(target), path)
            except fileio.OutputError as err:  # the disk is full, ...
                raise WeightsUnavailable(f'{name}: {err}') from None
    return path


# ---------------------------------------------------------------- fetching

def _endpoint() -> str:
    hub = sys.modules.get('huggingface_hub.constants')
    return hub.ENDPOINT if hub is not None else os.environ.get('HF_ENDPOINT', DEFAULT_ENDPOINT).rstrip('/')


def _by_hand(source: Source, path: str) -> str:
    config = source.zoo.config if source.zoo else 'YOUR_CONFIG.yaml'
    return (f'or place the weights by hand: download {_endpoint()}/{source.repo}/resolve/{source.revision}/'
            f'pytorch_model.bin (or model.safetensors) and run python tools/convert_weights.py '
            f'pytorch_model.bin {path} -cfg {config}')


@contextmanager
def _quiet_network_logs() -> Iterator[None]:
    """Keep the HTTP client's request lines and huggingface_hub's retry notes off the
    terminal while fetching (Paddle's root logger shows INFO); a failure ends in one line."""
    loggers = [logging.getLogger(name) for name in ('huggingface_hub', 'httpx2', 'httpx', 'httpcore')]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f'{type(err).__name__}: {text.splitlines()[0]}' if text else type(err).__name__


def _download(source: Source, path: str) -> Tuple[str, str]:
    """(local file, its name in the repository) of the first of HUB_FILES the repository
    has, from huggingface_hub's cache or downloaded into it."""
    # importing these sets huggingface_hub's log level: before _quiet_network_logs
    from huggingface_hub import constants, errors, hf_hub_download
    where = f'{source.repo} at {_endpoint()}'
    cache_only, unreachable = constants.is_offline_mode(), None
    for filename in HUB_FILES:
        try:
            with _quiet_network_logs():
                local = hf_hub_download(source.repo, filename, revision=source.revision, library_name='cvt-paddle',
                                        local_files_only=cache_only)
            return local, filename
        except errors.RemoteEntryNotFoundError:
            continue
        except errors.LocalEntryNotFoundError as err:
            # offline, or the Hub unreachable: the other file may still be in the cache
            cache_only, unreachable = True, unreachable or err
        except errors.RevisionNotFoundError:
            raise WeightsUnavailable(f'{source.name}: {where} has no revision {source.revision}') from None
        except errors.RepositoryNotFoundError:
            raise WeightsUnavailable(f'{source.name}: no model repository {where} (or it is private or '
                                     f'gated: log in with `hf auth login`); check the name') from None
        except errors.HfHubHTTPError as err:
            raise WeightsUnavailable(f'{source.name}: the Hub answered {_first_line(err)} for {filename} of '
                                     f'{where}; try again later, {_by_hand(source, path)}') from None
        except Exception as err:  # the network library's own errors (a proxy, TLS), disk full, ...
            raise WeightsUnavailable(f'{source.name}: fetching {filename} of {where} failed ({_first_line(err)}); '
                                     f'{_by_hand(source, path)}') from None
    if unreachable is None:
        raise WeightsUnavailable(f'{source.name}: {where} holds neither {" nor ".join(HUB_FILES)} at revision '
                                 f'{source.revision}; convert the weights you have with tools/convert_weights.py '
                                 f'and give that file instead')
    if constants.is_offline_mode():
        raise WeightsUnavailable(f'{source.name}: not in the cache, and HF_HUB_OFFLINE=1 allows no download: '
                                 f'run once without it, {_by_hand(source, path)}')
    reason = _first_line(unreachable.__cause__ or unreachable)
    raise WeightsUnavailable(f'{source.name}: cannot reach {_endpoint()} ({reason}), and it is not in the cache: '
                             f'check the connection (HF_ENDPOINT names a mirror), {_by_hand(source, path)}')


def _digest(path: str, algorithm: str) -> str:
    """sha256 of the file, or (for files the Hub keeps in git, not LFS) git's blob sha1."""
    digest = hashlib.new(algorithm)
    if algorithm == 'sha1':
        digest.update(f'blob {os.path.getsize(path)}\0'.encode())
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _verify(source: Source, local: str, filename: str) -> str:
    """Check `local` against the digest the Hub advertised for it (huggingface_hub
    names each blob of its cache by that ETag: the sha256 of an LFS file); returns it.
    A file that differs is removed from the cache (blob and snapshot link)."""
    blob = os.path.realpath(local)
    advertised = os.path.basename(blob)
    algorithm = {64: 'sha256', 40: 'sha1'}.get(len(advertised)) if re.fullmatch(r'[0-9a-f]+', advertised) else None
    if algorithm is None:
        raise WeightsUnavailable(f'{source.name}: cannot verify {local}: the Hugging Face cache does not name it '
                                 f'by its digest (symlinks off?); place the weights by hand')
    actual = _digest(blob, algorithm)
    if actual != advertised:
        for leftover in (local, blob):
            if os.path.lexists(leftover):
                os.remove(leftover)
        raise WeightsUnavailable(f'{source.name}: {filename} of {source.repo} has {algorithm} {actual}, but the Hub '
                                 f'advertises {advertised}; removed from the cache, nothing converted: try again '
                                 f'(a proxy or mirror may have altered it)')
    return advertised


def _fetch_and_convert(source: Source, layout, model: str, path: str) -> None:
    """Download, verify, read and convert the weights of `source` for `layout` into `path`."""
    from safetensors.numpy import save_file
    from weight_conversion import ConversionError, convert_state_dict, read_checkpoint, with_head_of
    try:
        from huggingface_hub import constants
    except ImportError:
        raise WeightsUnavailable(f'fetching {source.name} needs huggingface_hub, which is not installed: '
                                 f'pip install -r requirements.txt; {_by_hand(source, path)}') from None
    if not constants.is_offline_mode():  # a download takes a while, and its progress bar shows on a terminal only
        print(f'{source.name}: getting the weights of {source.repo} from {_endpoint()} ...',
              file=sys.stderr, flush=True)
    local, filename = _download(source, path)
    digest = _verify(source, local, filename)
    try:
        arrays = read_checkpoint(local)
        state = convert_state_dict(arrays, with_head_of(layout, arrays))
    except ConversionError as err:
        raise WeightsUnavailable(f'{source.name}: {filename} of {source.repo} does not fit {model}: {err}') from None
    commit = os.path.basename(os.path.dirname(local))  # huggingface_hub's snapshots/<commit>/<file>
    metadata = {'format': 'np', 'source': f'{source.repo}@{commit}/{filename}', 'digest': digest}
    arrays = {key: np.ascontiguousarray(value) for key, value in state.items()}
    fileio.write_atomically(path, lambda temporary: save_file(arrays, temporary, metadata=metadata))
    print(f'{source.name}: {filename} of {source.repo} has the digest the Hub advertises ({digest[:16]}...); '
          f'converted to {path}', file=sys.stderr, flush=True)
