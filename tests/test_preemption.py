"""Training that survives preemption: runs killed (SIGKILL, also inside a save) or
stopped (SIGTERM) at different steps and resumed with `-resume auto` through the
real command line end with the same weights as a run never interrupted."""

import glob
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest

import checkpoint
import datasets
import engine
import preemption
from config import ConfigError, get_config, validate_config
from tiny_training import ROOT, make_tiny_data, tiny_config, write_tiny_yaml

PYTHON = sys.executable
TIMEOUT = 300  # only stops a hung run; no test measures time
# everything random on: Mixup/CutMix, random erasing, drop path, EMA, 2 loader workers
RANDOM_RECIPE = {
    'TRAIN.MODEL_EMA': True, 'TRAIN.MODEL_EMA_DECAY': 0.9, 'MODEL.DROP_PATH_RATE': [0.0, 0.1, 0.2],
    'TRAIN.MIXUP_PROB': 1.0, 'TRAIN.RANDOM_ERASE_PROB': 0.5, 'DATA.NUM_WORKERS': 2,
    'DATA.BATCH_SIZE': 4, 'SAVE_STEP_FREQ': 2, 'REPORT_FREQ': 1,
}

# Runs the real main_single_gpu.py with a hook after every optimizer step (kill
# this process at a global step) or inside the checkpoint writer (kill it while
# a given file is half written).
DRIVER = '''
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import runtime
runtime.configure()  # before paddle, as the entry points do
import checkpoint
import fileio

kill_after_step, signal_name, kill_in_write = {kill_after_step!r}, {signal_name!r}, {kill_in_write!r}
after_optimizer_step, save = checkpoint.after_optimizer_step, fileio.save

def hooked_step(trainer, epoch, step, meters, stop_code):
    after_optimizer_step(trainer, epoch, step, meters, stop_code)
    if (epoch - 1) * trainer.steps_per_epoch + step == kill_after_step:
        os.kill(os.getpid(), getattr(signal, signal_name))

def hooked_write(obj, path):
    if kill_in_write and path.endswith(kill_in_write):
        import paddle
        paddle.save(obj, path + '.tmp' + str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path)

checkpoint.after_optimizer_step, fileio.save = hooked_step, hooked_write
sys.argv = ['main_single_gpu.py', *{args!r}]
runpy.run_path(os.path.join({root!r}, 'main_single_gpu.py'), run_name='__main__')
'''


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    # 40 training images: 10 steps of 4 per epoch in one process, 5 in each of two
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


def run_cli(args, kill_after_step=None, signal_name='SIGKILL', kill_in_write=None):
    script = DRIVER.format(root=ROOT, args=list(args), kill_after_step=kill_after_step,
                           signal_name=signal_name, kill_in_write=kill_in_write)
    return subprocess.run([PYTHON, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def final_weights(output, epoch=2):
    """The weights and EMA weights of the checkpoint after `epoch` in `output`."""
    params = sorted(glob.glob(os.path.join(output, f'CvT-Epoch-{epoch}-Loss-*[0-9].pdparams')))
    assert len(params) == 1, os.listdir(output)
    return {suffix: {k: v.numpy() for k, v in paddle.load(params[0].replace('.pdparams', suffix)).items()}
            for suffix in ('.pdparams', '-EMA.pdparams')}


def assert_same_weights(a, b):
    for suffix in a:
        assert a[suffix].keys() == b[suffix].keys()
        worst = max(float(np.abs(a[suffix][k] - b[suffix][k]).max()) for k in a[suffix])
        assert worst < 1e-5, (suffix, worst)


def test_killed_and_stopped_runs_resume_to_the_weights_of_a_straight_run(data_path, tmp_path):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'unused'), RANDOM_RECIPE)
    straight_dir, resumed_dir = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    straight = run_cli(['-cfg', cfg, '-output', straight_dir])
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = ['-cfg', cfg, '-output', resumed_dir, '-resume', 'auto']

    # SIGKILL after global step 5: the mid-epoch checkpoint of step 4 is the newest
    killed = run_cli(resumed, kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL
    assert 'no checkpoint in' in killed.stdout
    assert os.path.isfile(os.path.join(resumed_dir, 'CvT-Epoch-1-Step-4.pdparams'))

    # SIGKILL while the state file of the checkpoint at step 12 (epoch 2, step 2) is half written
    killed = run_cli(resumed, kill_in_write='Epoch-2-Step-2.pdopt')
    assert killed.returncode == -signal.SIGKILL
    assert 'resumed from ' in killed.stdout and 'CvT-Epoch-1-Step-4.pdparams (epoch 1, step 4)' in killed.stdout
    assert glob.glob(os.path.join(resumed_dir, 'CvT-Epoch-2-Step-2.pdopt.tmp*'))
    assert not os.path.exists(os.path.join(resumed_dir, 'CvT-Epoch-2-Step-2.pdparams'))
    assert not glob.glob(os.path.join(resumed_dir, 'CvT-Epoch-1-Step-*'))  # the epoch's end replaced them

    # SIGTERM after step 15: the run finishes step 16, saves it and exits with 143
    stopped = run_cli(resumed, kill_after_step=15, signal_name='SIGTERM')
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert 'after epoch 1)' in stopped.stdout
    assert stopped.stdout.count('stopped by SIGTERM at epoch 2, step 6/10') == 1
    assert os.listdir(resumed_dir).count('CvT-Epoch-2-Step-6.pdparams') == 1
    assert not glob.glob(os.path.join(resumed_dir, '*.tmp*'))  # the killed save's leftovers are gone

    finished = run_cli(resumed)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert '(epoch 2, step 6)' in finished.stdout and 'Step[0006/0010]' not in finished.stdout
    assert_same_weights(final_weights(straight_dir), final_weights(resumed_dir))
    # the epoch's logged mean loss continues over the interruption
    assert finished.stdout.split('Train Loss: ')[-1][:6] in straight.stdout


def test_two_processes_stop_together_on_sigterm_to_the_launcher_and_resume_exactly(data_path, tmp_path):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'unused'),
                          {**RANDOM_RECIPE, 'SAVE_STEP_FREQ': 0, 'TRAIN.NUM_EPOCHS': 1})
    straight_dir, resumed_dir = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    args = ['main_multi_gpu.py', '-cfg', cfg, '-ngpus', '2']
    straight = subprocess.run([PYTHON, *args, '-output', straight_dir], cwd=ROOT, capture_output=True,
                              text=True, timeout=TIMEOUT)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # SIGTERM to the launcher alone, as Kubernetes sends it: it passes the stop on
    process = subprocess.Popen([PYTHON, *args, '-output', resumed_dir], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if 'train 1 epochs | model' in line:  # the settings line, just before training starts
                process.send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    log = ''.join(lines)
    assert process.returncode == 143, log[-3000:]
    assert log.count('----- stopped by SIGTERM at ') == 1
    assert len(checkpoint.list_checkpoints(resumed_dir, 'CvT')) == 1

    resumed = subprocess.run([PYTHON, *args, '-output', resumed_dir, '-resume', 'auto'], cwd=ROOT,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from ' in resumed.stdout
    assert_same_weights(final_weights(straight_dir, epoch=1), final_weights(resumed_dir, epoch=1))


def test_resume_auto_without_a_checkpoint_starts_from_scratch_saying_so(data_path, tmp_path):
    result = engine.run(tiny_config(data_path, str(tmp_path), {'MODEL.RESUME': 'auto', 'TRAIN.NUM_EPOCHS': 1}))
    log = (tmp_path / 'log.txt').read_text()
    assert log.count(f'-resume auto: no checkpoint in {tmp_path}, training from scratch') == 1
    assert 'Epoch[001/001], Step[0002/0005]' in log and result['checkpoint']


def test_torn_checkpoints_are_never_resumed_from(data_path, tmp_path):
    changes = {'TRAIN.MODEL_EMA': True, 'TRAIN.NUM_EPOCHS': 2}
    engine.run(tiny_config(data_path, str(tmp_path), changes))
    for path in glob.glob(str(tmp_path / 'CvT-Epoch-2-*')):  # back to the end of epoch 1
        os.remove(path)
    whole = glob.glob(str(tmp_path / 'CvT-Epoch-1-Loss-*[0-9].pdparams'))[0][:-len('.pdparams')]

    def copy(step, suffixes, truncate=None):
        prefix = str(tmp_path / f'CvT-Epoch-2-Step-{step}')
        for suffix in suffixes:
            shutil.copy(whole + suffix, prefix + suffix)
        if truncate:
            with open(prefix + truncate, 'r+b') as half:
                half.truncate(os.path.getsize(prefix + truncate) // 2)

    copy(1, ['.pdparams'])  # no training state
    copy(2, ['.pdparams', '.pdopt', '-EMA.pdparams'], truncate='.pdparams')
    copy(3, ['.pdparams', '.pdopt'])  # no EMA, which the state says there is
    copy(4, ['.pdparams', '.pdopt', '-EMA.pdparams'], truncate='.pdopt')
    shutil.copy(whole + '.pdparams', str(tmp_path / 'CvT-Epoch-2-Step-5.pdparams.tmp999999999'))  # a save killed
    result = engine.run(tiny_config(data_path, str(tmp_path), {**changes, 'MODEL.RESUME': 'auto'}))
    log = (tmp_path / 'log.txt').read_text()
    assert f'resumed from {whole}.pdparams (after epoch 1)' in log
    for step in (1, 2, 3, 4):
        assert log.count(f'-resume auto: skipping CvT-Epoch-2-Step-{step}, it is not whole') == 1
    assert 'Step-5' not in log
    # the finished epoch 2 makes them all stale: gone
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in glob.glob(str(tmp_path / 'CvT-Epoch-[12]-Loss-*')) + [
            str(tmp_path / name) for name in ('CvT-best.pdparams', 'CvT-best.json', 'log.txt', 'curves.png',
                                              'history.json')])
    assert result['checkpoint'].endswith('.pdparams')


def test_keep_checkpoints_keeps_the_newest_epochs_and_the_best(data_path, tmp_path):
    result = engine.run(tiny_config(data_path, str(tmp_path), {
        'TRAIN.MODEL_EMA': True, 'TRAIN.NUM_EPOCHS': 4, 'KEEP_CHECKPOINTS': 2, 'SAVE_STEP_FREQ': 2,
        'TRAIN.BASE_LR': 5e-3, 'TRAIN.MIXUP_PROB': 0.0}))
    kept = sorted(os.listdir(tmp_path))
    assert [name for name in kept if 'Epoch' in name] == sorted(
        f'{os.path.basename(p)[:-len(".pdparams")]}{suffix}'
        for p in glob.glob(str(tmp_path / 'CvT-Epoch-[34]-Loss-*[0-9].pdparams'))
        for suffix in ('-EMA.pdparams', '.pdopt', '.pdparams'))
    assert len(kept) == 3 * 2 + 5  # + CvT-best.pdparams and .json, log.txt, curves.png and history.json
    best_lines = [line for line in (tmp_path / 'log.txt').read_text().splitlines() if 'best Acc@1 so far' in line]
    best_acc1 = float(best_lines[-1].split('best Acc@1 so far (')[1].split(',')[0])
    evaluated = engine.run(tiny_config(data_path, str(tmp_path / 'eval'), {
        'EVAL': True, 'MODEL.PRETRAINED': str(tmp_path / 'CvT-best.pdparams')}))['val']
    assert evaluated['acc1'] == pytest.approx(best_acc1, abs=1e-4)
    assert best_acc1 >= result['val']['acc1']


def test_sampler_continues_an_epoch_without_reading_the_batches_before(data_path, tmp_path):
    config = tiny_config(data_path, str(tmp_path))
    dataset = datasets.get_dataset(config, 'train')
    loader = datasets.get_dataloader(config, dataset, 'train', multi_process=False)
    datasets.set_epoch(loader, 3)
    whole_epoch = list(loader.batch_sampler)
    reads = []
    load = dataset.load
    dataset.load = lambda index: reads.append(index) or load(index)
    datasets.set_epoch(loader, 3, first_batch=2)
    assert list(loader.batch_sampler) == whole_epoch[2:]
    batches = list(loader)
    assert len(batches) == len(whole_epoch) - 2 == len(loader) - 2
    assert sorted(reads) == sorted(i for batch in whole_epoch[2:] for _, i in batch)


@pytest.mark.parametrize('key', ['SAVE_STEP_FREQ', 'KEEP_CHECKPOINTS'])
def test_checkpoint_settings_must_be_counts(key):
    config = get_config()
    config[key] = -1
    with pytest.raises(ConfigError, match=f'{key} must be >= 0, got -1'):
        validate_config(config)


SIGNALS_TO_ITSELF = """
import os, signal, sys
sys.path.insert(0, {root!r})
import preemption
previous = signal.getsignal(signal.SIGINT)
with preemption.StopSignals() as stop:
    assert stop.agreed_code(world_size=1) == 0
    os.kill(os.getpid(), signal.SIGINT)  # handled here, not a KeyboardInterrupt
    assert stop.agreed_code(world_size=1) == 130 and stop.name(130) == 'SIGINT'
assert signal.getsignal(signal.SIGINT) is previous
with preemption.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGUSR1)  # the launcher's request: like SIGTERM
    assert stop.code == 143
    os.kill(os.getpid(), signal.SIGTERM)  # the first real signal, not a second one
    assert stop.code == 143
print('ok')
"""


def test_stop_signals_ask_for_a_stop_with_the_signals_exit_code_and_restore_the_handlers():
    # in a process of its own: signals sent to the test process would also reach the threads
    # that other tests' runtimes (OpenVINO, NNCF) left behind
    result = subprocess.run([PYTHON, '-c', SIGNALS_TO_ITSELF.format(root=ROOT)], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr
