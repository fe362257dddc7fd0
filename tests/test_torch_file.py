"""torch_file.py: torch.save's zip files read as NumPy without PyTorch, refusing what is not a tensor."""

import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest

import fileio
import torch_file


def text(value: str) -> bytes:
    """A pickle BINUNICODE string."""
    data = value.encode()
    return b'X' + struct.pack('<I', len(data)) + data


def small_int(value: int) -> bytes:
    return b'K' + bytes([value])


def tensor_pickle(size, stride, offset=0, key='0', storage=b'FloatStorage') -> bytes:
    """The pickle torch.save writes for {'w': tensor}, written out opcode by opcode (protocol 2)."""
    def int_tuple(values):
        return b'(' + b''.join(small_int(v) for v in values) + b't'
    persistent_id = (b'(' + text('storage') + b'ctorch\n' + storage + b'\n' + text(key) + text('cpu')
                     + small_int(4) + b'tQ')
    rebuild = (b'ctorch._utils\n_rebuild_tensor_v2\n(' + persistent_id + small_int(offset) + int_tuple(size)
               + int_tuple(stride) + b'\x89' + b'ccollections\nOrderedDict\n)R' + b'tR')
    return b'\x80\x02}' + text('w') + rebuild + b's.'


def write_zip(path, pickle_bytes: bytes, storages) -> str:
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', pickle_bytes)
        archive.writestr('archive/byteorder', 'little')
        for key, data in storages.items():
            archive.writestr(f'archive/data/{key}', data)
    return str(path)


FOUR_FLOATS = {'0': np.arange(4, dtype='<f4').tobytes()}


def test_a_hand_written_state_dict_reads_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)
    path = write_zip(tmp_path / 'w.bin', tensor_pickle((2, 2), (1, 2), offset=0), FOUR_FLOATS)
    state = torch_file.load(path)
    np.testing.assert_array_equal(state['w'], np.arange(4, dtype='float32').reshape(2, 2).T)


@pytest.mark.parametrize('size, stride, offset', [((5,), (1,), 0), ((2, 2), (2, 1), 1), ((3,), (2,), 0)])
def test_a_view_past_its_storage_is_refused(tmp_path, size, stride, offset):
    path = write_zip(tmp_path / 'w.bin', tensor_pickle(size, stride, offset), FOUR_FLOATS)
    with pytest.raises(fileio.UnsafeFileError, match=r'w\.bin: refused to load: a tensor view .* reaches past '
                                                     r'its storage of 4 elements'):
        torch_file.load(path)


def test_a_missing_storage_is_refused(tmp_path):
    path = write_zip(tmp_path / 'w.bin', tensor_pickle((4,), (1,), key='7'), FOUR_FLOATS)
    with pytest.raises(fileio.UnsafeFileError, match=r'its storage archive/data/7 is missing'):
        torch_file.load(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_pickle_asking_for_other_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / 'ran'
    path = write_zip(tmp_path / 'evil.bin', pickle.dumps({'w': RunsCode(marker)}, protocol=2), {})
    with pytest.raises(fileio.UnsafeFileError, match=r'evil\.bin: refused to load: it asks for (posix|os)\.system'):
        torch_file.load(path)
    assert not marker.exists()


def test_a_file_that_is_no_zip_is_a_format_error(tmp_path):
    (tmp_path / 'w.bin').write_bytes(b'\x80\x02}.')
    assert not torch_file.is_torch_zip(str(tmp_path / 'w.bin'))
    with pytest.raises(fileio.FileFormatError, match=r'w\.bin: not a PyTorch zip archive'):
        torch_file.load(str(tmp_path / 'w.bin'))


def test_what_torch_saves_reads_as_torch_loads_it(tmp_path):
    torch = pytest.importorskip('torch', reason='torch is a test-only dependency (requirements-test.txt)')
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        'float': base, 'transposed': base.t(), 'row of a shared storage': base[1], 'strided': base[:, ::2],
        'bfloat16': torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
        'float16': torch.tensor([0.5, 2.0], dtype=torch.float16), 'int64 scalar': torch.tensor(1234),
        'bool': torch.tensor([True, False]), 'empty': torch.zeros(0, 3), 'parameter': torch.nn.Parameter(base[0]),
    }
    torch.save(state, str(tmp_path / 'state.bin'))
    torch.save({'epoch': 3, 'state_dict': state}, str(tmp_path / 'wrapped.pth'))
    loaded = torch_file.load(str(tmp_path / 'state.bin'))
    assert torch_file.load(str(tmp_path / 'wrapped.pth'))['epoch'] == 3
    for key, tensor in state.items():
        want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape, key
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)
