"""Every bad input is one line and exit code 2, through the real command lines, before any
work starts: sizes the model cannot take, a class count the data contradicts, empty or
binary files, outputs that cannot be written, non-finite numbers, absurd sizes and thread
counts. (A full disk is checked in-process: it cannot be made here.)"""

import errno
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import paddle
import pytest

import cvt
import engine
import fileio
from tiny_training import ROOT, make_tiny_data, tiny_config, write_tiny_yaml
from utils import UsageError

TIMEOUT = 300  # only stops a hung run


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bad_input')
    data = make_tiny_data(str(folder / 'data'))
    cfg = write_tiny_yaml(str(folder / 'tiny.yaml'), data, str(folder / 'out'), {'MODEL.NUM_CLASSES': 6})
    weights = str(folder / 'tiny.pdparams')
    paddle.save(cvt.build_cvt(tiny_config(data, '', {'MODEL.NUM_CLASSES': 6})).state_dict(), weights)
    (folder / 'empty.pdparams').write_bytes(b'')
    (folder / 'binary.yaml').write_bytes(bytes(range(256)))
    (folder / 'a_file').write_text('not a folder')
    (folder / 'a_folder').mkdir()
    image = os.path.join(data, 'val', 'n90000000', 'n90000000_val_00000.JPEG')
    return {'folder': str(folder), 'data': data, 'cfg': cfg, 'weights': weights, 'image': image}


def table(s):
    """(command, the text the error line must hold)."""
    cfg, weights, image, folder = s['cfg'], s['weights'], s['image'], s['folder']
    train = ['main_single_gpu.py', '-cfg', cfg]
    model = ['-cfg', cfg, '-pretrained', weights]
    return [
        (train + ['-image_size', '2'], 'DATA.IMAGE_SIZE = 2 is too small for the model'),
        (train + ['-image_size', '100000'], 'DATA.IMAGE_SIZE = 100000 is beyond 4096'),
        (train + ['-eval', '-pretrained', weights, '-image_size', '1'], 'DATA.IMAGE_SIZE = 1 is too small'),
        (['main_multi_gpu.py', '-cfg', cfg, '-ngpus', '2', '-image_size', '2'], 'DATA.IMAGE_SIZE = 2 is too small'),
        (['tools/predict.py', *model, '-image_size', '2', image], 'DATA.IMAGE_SIZE = 2 is too small'),
        (['tools/visualize_attention.py', *model, '-image_size', '1', '-image', image, '-output',
          os.path.join(folder, 'a.png')], 'DATA.IMAGE_SIZE = 1 is too small'),
        (['tools/export_model.py', *model, '-image_size', '2', '-output', os.path.join(folder, 'e')],
         'DATA.IMAGE_SIZE = 2 is too small'),
        (['tools/model_info.py', '-cfg', cfg, '-image_size', '2'], 'DATA.IMAGE_SIZE = 2 is too small'),
        (['tools/predict.py', *model, '-image_size', '3000', image], 'the attention alone needs about'),
        (train + ['-num_classes', '3', '-output', os.path.join(folder, 'o1')],
         'MODEL.NUM_CLASSES = 3: the model has 3 classes, the data 6'),
        (train + ['-pretrained', os.path.join(folder, 'empty.pdparams')], 'empty.pdparams: the file is empty'),
        (['tools/predict.py', '-cfg', cfg, '-pretrained', os.path.join(folder, 'empty'), image],
         'empty.pdparams: the file is empty'),
        (['main_single_gpu.py', '-cfg', os.path.join(folder, 'binary.yaml')], 'binary.yaml: not a yaml text file'),
        (train + ['-output', os.path.join(folder, 'a_file')], 'a_file: is a file, not a folder'),
        (train + ['-output', os.path.join(folder, 'a_file', 'below')], 'cannot write into it'),
        (train + ['-opts', 'TRAIN.BASE_LR', 'nan'], 'TRAIN.BASE_LR must be a finite number, got nan'),
        (train + ['-opts', 'TRAIN.MODEL_EMA_DECAY', 'nan'], 'TRAIN.MODEL_EMA_DECAY must be a finite number'),
        (train + ['-opts', 'TRAIN.WARMUP_START_LR', 'inf'], 'TRAIN.WARMUP_START_LR must be a finite number'),
        (train + ['-opts', 'DATA.IMAGENET_STD', '[0.2, .nan, 0.2]'], 'DATA.IMAGENET_STD[1] must be a finite'),
        (['tools/visualize_attention.py', *model, '-image', image, '-output', os.path.join(folder, 'a_folder')],
         'a_folder: is a folder'),
        (['tools/convert_weights.py', weights, os.path.join(folder, 'a_folder'), '-cfg', cfg], 'a_folder: is a folder'),
        (['tools/infer.py', '-model', os.path.join(folder, 'm.onnx'), '-threads', '100000', image],
         'argument -threads: 100000: this process may use 1 to'),
        (['tools/benchmark.py', '-cfg', cfg, '-threads', '100000'], 'argument -threads: 100000: this process may use'),
    ]


def test_each_bad_input_is_one_line_and_exit_code_2(setup):
    cases = table(setup)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: subprocess.run(
            [sys.executable, *case[0]], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT), cases))
    problems = []
    for (command, expected), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        # our errors are one line; argparse's are its usage (wrapped), then the error
        one_line = len(lines) == 1 or (lines[0].startswith('usage:') and lines[-1].startswith(
            os.path.basename(command[0]) + ': error: '))
        if result.returncode != 2 or 'Traceback' in result.stderr or not one_line \
                or expected not in lines[-1] or 'Step[' in result.stdout:
            problems.append(f'{" ".join(command[:1] + command[-4:])}: exit {result.returncode}: '
                            f'{result.stderr.strip()[-300:]}')
    assert not problems, '\n'.join(problems)


def test_a_full_disk_stops_before_training_and_a_failed_save_leaves_no_temporary(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.shutil, 'disk_usage', lambda path: type('Usage', (), {'free': 1000})())
    config = tiny_config(setup['data'], str(tmp_path / 'out'), {'MODEL.NUM_CLASSES': 6})
    with pytest.raises(UsageError, match=r'a checkpoint needs about \d+ MB, 0 MB are free there'):
        engine.run(config)
    assert not [name for name in os.listdir(tmp_path / 'out') if 'Epoch' in name]

    def fill_disk(path):
        with open(path, 'wb') as out:
            out.write(b'half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = str(tmp_path / 'w.pdparams')
    with pytest.raises(fileio.OutputError, match='w.pdparams: cannot be written .No space left on device'):
        fileio.write_atomically(target, fill_disk)
    assert os.listdir(tmp_path) == ['out']
