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
import runtime  # noqa: F401  (before paddle)
import checkpoint

kill_after_step, signal_name, kill_in_write = {kill_after_step!r}, {signal_name!r}, {kill_in_write!r}
after_optimizer_step, write_atomically = checkpoint.after_optimizer_step, checkpoint._write_atomically

def hooked_step(trainer, epoch, step, meters):
    after_optimizer_step(trainer, epoch, step, meters)
    if (epoch - 1) * trainer.steps_per_epoch + step == kill_after_step:
        os.kill(os.getpid(), getattr(signal, signal_name))

def hooked_write(obj, path):
    if kill_in_write and path.endswith(kill_in_write):
        import paddle
        paddle.save(obj, path + '.tmp' + str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    write_atomically(obj, path)

checkpoint.after_optimizer_step, checkpoint._write_atomically = hooked_step, hooked_write
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


def final_weights(output):
    """The weights and EMA weights of the last epoch checkpoint in `output`."""
    params = sorted(glob.glob(os.path.join(output, 'CvT-Epoch-2-Loss-*[0-9].pdparams')))
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
