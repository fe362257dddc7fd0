"""Files from elsewhere never run code: a crafted weights file, checkpoint, optimizer state
or CIFAR archive, plain or stealthy (the real weights still inside), is refused at every
entry point that reads one, with one line naming the file and exit code 2, and nothing in
it runs. The project's own files, and PaddleViT's layout, still load exactly."""

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import pytest

import checkpoint
import cvt
import datasets
import fileio
from backbone import CvTBackbone
from tiny_training import ROOT, make_tiny_data, tiny_config, write_tiny_yaml

TIMEOUT = 300  # only stops a hung run
TINY = {'MODEL.NUM_CLASSES': 6}


class RunsCode:
    """Pickles as a call to os.system, the classic payload."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class StealthyTensor:
    """Pickles as eval(expression, {'data': array}) that runs a command and gives back the
    array: paddle.load would return the real weights, having run the command."""

    def __init__(self, array: np.ndarray, marker: str):
        self.array, self.marker = array, marker

    def __reduce__(self):
        return eval, (f"(__import__('os').system('touch {self.marker}'), data)[1]", {'data': self.array})


def plant(path: str, marker: str, stealthy: bool, state=None) -> str:
    """Write a crafted pickle at `path`: `state` (a dict of arrays) with one entry wrapped
    in a stealthy payload, or a bare payload."""
    if stealthy:
        state = dict(state)
        key = next(iter(state))
        state[key] = StealthyTensor(state[key], marker)
        obj = state
    else:
        obj = {'weights': RunsCode(marker)}
    with open(path, 'wb') as out:
        pickle.dump(obj, out, protocol=2)
    return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Tiny data, a config file, the tiny model's real weights and a whole checkpoint."""
    folder = tmp_path_factory.mktemp('untrusted')
    data = make_tiny_data(str(folder / 'data'))
    cfg = write_tiny_yaml(str(folder / 'tiny.yaml'), data, str(folder / 'unused'), TINY)
    real = {k: v.numpy() for k, v in cvt.build_cvt(tiny_config(data, '', TINY)).state_dict().items()}
    run = str(folder / 'run')
    import engine
    engine.run(tiny_config(data, run, {**TINY, 'TRAIN.NUM_EPOCHS': 1}))
    prefix = [p[:-len('.pdparams')] for p in os.listdir(run) if p.startswith('CvT-Epoch-1-Loss-')
              and p.endswith('.pdparams') and '-EMA' not in p][0]
    return {'folder': folder, 'data': data, 'cfg': cfg, 'real': real, 'checkpoint': os.path.join(run, prefix)}


def run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def cases(setup, where, marker, stealthy):
    """(name, command) of each entry point reading a planted file; the files are planted here."""
    cfg, data, real = setup['cfg'], setup['data'], setup['real']
    weights = plant(os.path.join(where, 'weights.pdparams'), marker, stealthy, real)
    image = os.path.join(data, 'val', 'n90000000', 'n90000000_val_00000.JPEG')
    # a checkpoint whose training state is the crafted file
    resume = os.path.join(where, 'CvT-Epoch-1-Loss-1.0000')
    shutil.copy(setup['checkpoint'] + '.pdparams', resume + '.pdparams')
    state = fileio.load(setup['checkpoint'] + '.pdopt', return_numpy=True)
    plant(resume + '.pdopt', marker, stealthy, state)
    # -resume auto: the crafted checkpoint merely lies in -output
    auto = os.path.join(where, 'auto')
    os.makedirs(auto)
    for suffix in ('.pdparams', '.pdopt'):
        shutil.copy(resume + suffix, os.path.join(auto, os.path.basename(resume) + suffix))
    teacher = ['-opts', 'TRAIN.DISTILLATION_TYPE', 'soft', 'TRAIN.TEACHER_CFG', cfg,
               'TRAIN.TEACHER_PRETRAINED', weights]
    cifar = os.path.join(where, 'cifar')
    write_cifar_archive(cifar, marker, stealthy)
    model = ['-cfg', cfg, '-pretrained', weights]
    return [
        ('predict', ['tools/predict.py', *model, image]),
        ('train -pretrained', ['main_single_gpu.py', '-cfg', cfg, '-output', os.path.join(where, 'o1'),
                               '-pretrained', weights]),
        ('-eval -pretrained', ['main_single_gpu.py', '-cfg', cfg, '-output', os.path.join(where, 'o2'),
                               '-eval', '-pretrained', weights]),
        ('-resume PATH', ['main_single_gpu.py', '-cfg', cfg, '-output', os.path.join(where, 'o3'),
                          '-resume', resume]),
        ('-resume auto', ['main_single_gpu.py', '-cfg', cfg, '-output', auto, '-resume', 'auto']),
        ('teacher', ['main_single_gpu.py', '-cfg', cfg, '-output', os.path.join(where, 'o4'), *teacher]),
        ('visualize_attention', ['tools/visualize_attention.py', *model, '-image', image,
                                 '-output', os.path.join(where, 'a.png')]),
        ('export_model', ['tools/export_model.py', *model, '-output', os.path.join(where, 'export')]),
        ('export_onnx', ['tools/export_onnx.py', *model, '-output', os.path.join(where, 'm.onnx')]),
        ('convert_weights', ['tools/convert_weights.py', weights, os.path.join(where, 'clean.safetensors'),
                             '-cfg', cfg]),
        ('CIFAR archive', ['main_single_gpu.py', '-cfg', cfg, '-output', os.path.join(where, 'o5'),
                           '-dataset', 'cifar10', '-data_path', cifar]),
    ]


def write_cifar_archive(folder: str, marker: str, stealthy: bool) -> None:
    """A cifar-10-python.tar.gz whose meta file is crafted."""
    os.makedirs(folder)
    meta = {b'label_names': [f'c{i}'.encode() for i in range(10)]}
    payload = {b'label_names': RunsCode(marker)} if not stealthy else {
        **meta, b'num_vis': StealthyTensor(np.arange(3), marker)}
    with tarfile.open(os.path.join(folder, 'cifar-10-python.tar.gz'), 'w:gz') as tar:
        for name, obj in [('batches.meta', payload)] + [
                (f'data_batch_{i}', {b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 1]}) for i in range(1, 6)
        ] + [('test_batch', {b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 1]})]:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize('stealthy', [False, True], ids=['plain', 'stealthy'])
def test_every_entry_point_refuses_a_crafted_file_and_runs_nothing(setup, tmp_path, stealthy):
    marker = str(tmp_path / 'code-ran')
    table = cases(setup, str(tmp_path), marker, stealthy)
    if paddle.__version__.startswith('2.'):  # paddle2onnx 2 refuses Paddle 2.6 before the weights are read
        table = [case for case in table if case[0] != 'export_onnx']
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(case[1]), table))
    problems = []
    for (name, _), result in zip(table, results):
        lines = result.stderr.strip().splitlines()
        if result.returncode != 2 or 'Traceback' in result.stderr or not lines \
                or not lines[-1].startswith('error: ') or 'refused to load' not in lines[-1]:
            problems.append(f'{name}: exit {result.returncode}: {result.stderr.strip()[-400:]}')
    assert not problems, '\n'.join(problems)
    assert not os.path.exists(marker)


def test_the_backbone_refuses_a_crafted_file(setup, tmp_path):
    marker = str(tmp_path / 'code-ran')
    weights = plant(str(tmp_path / 'w.pdparams'), marker, True, setup['real'])
    with pytest.raises(fileio.UnsafeFileError, match=r'w.pdparams: refused to load: it asks to evaluate'):
        CvTBackbone(tiny_config(setup['data'], '', TINY), pretrained=weights)
    assert not os.path.exists(marker)


def test_files_saved_by_paddle_load_exactly_as_paddle_load_reads_them(setup, tmp_path):
    """The project's checkpoint (weights, state, protocol 4) and PaddleViT's format
    (protocol 2, the name table), against paddle.load itself."""
    legacy = str(tmp_path / 'paddlevit.pdparams')
    paddle.save({k: paddle.to_tensor(v) for k, v in setup['real'].items()}, legacy, protocol=2)
    for path in (setup['checkpoint'] + '.pdparams', setup['checkpoint'] + '.pdopt', legacy):
        expected, loaded = paddle.load(path), fileio.load(path)
        assert_same(expected, loaded, path)


def assert_same(expected, loaded, where):
    assert type(expected) is type(loaded), where
    if isinstance(expected, dict):
        assert list(expected) == list(loaded), where
        for key in expected:
            assert_same(expected[key], loaded[key], f'{where}/{key}')
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(loaded), where
        for i, (a, b) in enumerate(zip(expected, loaded)):
            assert_same(a, b, f'{where}[{i}]')
    elif isinstance(expected, paddle.Tensor):
        assert expected.dtype == loaded.dtype and expected.name == loaded.name, where
        np.testing.assert_array_equal(expected.numpy(), loaded.numpy())
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(expected, loaded)
    else:
        assert expected == loaded, where


def test_a_checkpoint_of_paddle_2_6_loads_and_resumes(setup, tmp_path):
    """tests/data holds a tiny checkpoint written by Paddle 2.6.2 (weights, training state,
    EMA) after epoch 1 of tiny_training's run with EMA."""
    folder = os.path.join(ROOT, 'tests', 'data', 'paddle26-checkpoint')
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        assert_same(paddle.load(path), fileio.load(path), path)
    prefix = os.path.join(folder, 'CvT-Epoch-1-Loss-1.7911')
    state = fileio.load(prefix + '.pdopt')
    assert state['format'] == checkpoint.TRAIN_STATE_FORMAT and state['epoch'] == 1
    assert isinstance(next(iter(state['optimizer'].values())), paddle.Tensor)
    import engine
    result = engine.run(tiny_config(setup['data'], str(tmp_path), {
        'TRAIN.MODEL_EMA': True, 'TRAIN.NUM_EPOCHS': 2, 'MODEL.RESUME': prefix}))
    log = (tmp_path / 'log.txt').read_text()
    assert f'resumed from {prefix}.pdparams (after epoch 1)' in log
    assert 'CvT-Epoch-2-Loss-' in result['checkpoint']


def test_a_crafted_cifar_archive_is_refused(tmp_path):
    marker = str(tmp_path / 'code-ran')
    write_cifar_archive(str(tmp_path / 'cifar'), marker, stealthy=False)
    config = tiny_config(str(tmp_path / 'cifar'), '', {'DATA.DATASET': 'cifar10'})
    with pytest.raises(fileio.UnsafeFileError, match='batches.meta: refused to load: it asks for posix.system'):
        datasets.get_dataset(config, 'train')
    assert not os.path.exists(marker)


def test_safetensors_weights_load_wherever_weights_are_taken(setup, tmp_path):
    """convert_weights writes .safetensors; -pretrained takes it (suffix optional) in the tools,
    and SAVE_SAFETENSORS writes every checkpoint's weights as safetensors too."""
    clean = str(tmp_path / 'clean.safetensors')
    converted = run(['tools/convert_weights.py', setup['checkpoint'] + '.pdparams', clean, '-cfg', setup['cfg']])
    assert converted.returncode == 0, converted.stderr
    image = os.path.join(setup['data'], 'val', 'n90000000', 'n90000000_val_00000.JPEG')
    by_pdparams = run(['tools/predict.py', '-cfg', setup['cfg'], '-pretrained', setup['checkpoint'], image])
    by_safetensors = run(['tools/predict.py', '-cfg', setup['cfg'], '-pretrained', clean[:-len('.safetensors')],
                          image])
    assert by_safetensors.returncode == 0, by_safetensors.stderr
    assert by_safetensors.stdout.splitlines()[1:] == by_pdparams.stdout.splitlines()[1:]

    import engine
    result = engine.run(tiny_config(setup['data'], str(tmp_path / 'run'), {
        **TINY, 'TRAIN.NUM_EPOCHS': 1, 'TRAIN.MODEL_EMA': True, 'SAVE_SAFETENSORS': True}))
    prefix = result['checkpoint'][:-len('.pdparams')]
    for stem in (prefix, prefix + '-EMA', str(tmp_path / 'run' / 'CvT-best')):
        pickled, safe = fileio.load(stem + '.pdparams'), fileio.load(stem + '.safetensors')
        assert sorted(pickled) == sorted(safe)  # safetensors keeps its keys sorted
        for key in pickled:
            np.testing.assert_array_equal(pickled[key].numpy(), safe[key].numpy())
    model = cvt.build_cvt(tiny_config(setup['data'], '', TINY))
    cvt.load_pretrained(model, prefix + '.safetensors')
