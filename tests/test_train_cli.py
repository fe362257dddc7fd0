"""The training entry points as users run them: errors, several processes, killed saves."""

import glob
import os
import re
import signal
import subprocess
import sys

import paddle
import pytest

import cvt
import engine
from tiny_training import ROOT, make_tiny_data, tiny_config, write_tiny_yaml

PYTHON = sys.executable
# generous bounds that only stop a hung run; no test measures time
TIMEOUT = 300
VALIDATION = re.compile(r'Validation Loss: ([\d.]+), Validation Acc@1: ([\d.]+), '
                        r'Validation Acc@5: ([\d.]+) \((\d+) images\)')


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


def run_script(args, cwd=ROOT):
    return subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def validation_numbers(log_text):
    """(loss, acc@1, acc@5, images) of the last validation line."""
    found = VALIDATION.findall(log_text)
    assert found, log_text[-2000:]
    return tuple(float(v) for v in found[-1])


@pytest.mark.parametrize('script, args, message', [
    ('main_single_gpu.py', ['-cfg', 'configs/no-such.yaml'], 'configs/no-such.yaml: config file not found'),
    ('main_multi_gpu.py', ['-ngpus', '2', '-data_path', '/no/such/folder'],
     '-data_path /no/such/folder: folder not found'),
    ('main_single_gpu.py', ['-batch_size', '0'], 'command line: DATA.BATCH_SIZE must be >= 1, got 0'),
    ('main_multi_gpu.py', ['-opts', 'TRAIN.BASE_LR', '5e-4', 'TRAIN.LR', '1'],
     '-opts: Non-existent config key: TRAIN.LR'),
])
def test_entry_points_report_usage_errors_in_one_line(data_path, tmp_path, script, args, message):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'out'))
    result = run_script([script, '-cfg', cfg, *args])
    assert result.returncode == 2
    assert f'error: {message}' in result.stderr
    assert 'Traceback' not in result.stderr and 'Step[' not in result.stdout


def test_two_processes_train_and_evaluate_every_image_once_like_one(data_path, tmp_path):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'train2'),
                          {'TRAIN.NUM_EPOCHS': 1})
    trained = run_script(['main_multi_gpu.py', '-cfg', cfg, '-ngpus', '2'])
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = (tmp_path / 'train2' / 'log.txt').read_text()
    assert '2 process(es) on cpu' in log
    # only rank 0 prints: one settings line, one epoch line
    assert trained.stdout.count('log and full config:') == 1 and trained.stdout.count(' | train loss ') == 1
    two_process = validation_numbers(log)
    assert two_process[3] == 30  # each val image once, though 30 / 2 processes / batch 8 is uneven
    checkpoint = glob.glob(str(tmp_path / 'train2' / 'CvT-Epoch-1-*.pdparams'))[0]

    one_process = engine.run(tiny_config(data_path, str(tmp_path / 'eval1'),
                                         {'EVAL': True, 'MODEL.PRETRAINED': checkpoint}))['val']
    assert (one_process['loss'], one_process['acc1'], one_process['acc5'], one_process['count']) == \
        pytest.approx(two_process, abs=1e-4)

    launched = run_script(['-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                           '--log_dir', str(tmp_path / 'launch_logs'), 'main_multi_gpu.py', '-cfg', cfg,
                           '-eval', '-pretrained', checkpoint[:-len('.pdparams')],
                           '-output', str(tmp_path / 'eval2')])
    assert launched.returncode == 0, launched.stdout[-3000:]
    assert validation_numbers((tmp_path / 'eval2' / 'log.txt').read_text()) == pytest.approx(two_process, abs=1e-4)


KILLED_SAVE = '''
import os, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import runtime
runtime.configure()  # before paddle: threads, MKL's code path, allocator
import paddle
import engine
from tiny_training import tiny_config

real_save = paddle.save

def save_then_hang(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if 'Epoch-2' in path:
        with open(path, 'r+b') as half_written:
            half_written.truncate(os.path.getsize(path) // 2)
        print('SAVING', path, flush=True)
        time.sleep(600)

paddle.save = save_then_hang
engine.run(tiny_config({data!r}, {output!r}))
'''


def test_sigkill_during_a_save_leaves_the_earlier_checkpoint_whole(data_path, tmp_path):
    output = str(tmp_path / 'out')
    script = KILLED_SAVE.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=data_path, output=output)
    process = subprocess.Popen([PYTHON, '-c', script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith('SAVING'):
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    assert glob.glob(os.path.join(output, 'CvT-Epoch-2-*.tmp*'))  # killed inside the epoch-2 save
    assert not glob.glob(os.path.join(output, 'CvT-Epoch-2-*.pdparams'))
    assert not glob.glob(os.path.join(output, 'CvT-Epoch-2-*.pdopt'))
    first = glob.glob(os.path.join(output, 'CvT-Epoch-1-*.pdparams'))
    assert len(first) == 1

    config = tiny_config(data_path, str(tmp_path / 'resumed'), {'MODEL.RESUME': first[0]})
    cvt.load_pretrained(cvt.build_cvt(config), first[0])
    assert paddle.load(first[0].replace('.pdparams', '.pdopt'))['epoch'] == 1
    assert engine.run(config)['checkpoint'].endswith('.pdparams')


def test_unreadable_val_images_are_left_out_counted_and_named_in_one_and_two_processes(tmp_path):
    data = make_tiny_data(str(tmp_path / 'data'))
    val = sorted(glob.glob(os.path.join(data, 'val', '*', '*.JPEG')))
    broken = [val[3], val[20]]
    for path in broken:
        with open(path, 'wb') as out:
            out.write(b'not an image')
    config = tiny_config(data, str(tmp_path / 'unused'))
    weights = str(tmp_path / 'weights.pdparams')
    paddle.save(cvt.build_cvt(config).state_dict(), weights)
    one = engine.run(tiny_config(data, str(tmp_path / 'eval1'), {'EVAL': True, 'MODEL.PRETRAINED': weights}))
    assert one['val']['count'] == 28 and one['val']['unreadable'] == broken
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data, str(tmp_path / 'eval2'))
    two = run_script(['main_multi_gpu.py', '-cfg', cfg, '-ngpus', '2', '-eval', '-pretrained', weights])
    assert two.returncode == 0, two.stderr[-3000:]
    line = [line for line in (tmp_path / 'eval2' / 'log.txt').read_text().splitlines() if 'Validation Acc@1' in line]
    assert f'(28 images; 2 unreadable left out: {broken[0]}, {broken[1]})' in line[-1]
    assert f'Validation Acc@1: {one["val"]["acc1"]:.4f}' in line[-1]
    assert '28 images (2 unreadable left out' in two.stdout
