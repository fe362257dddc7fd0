"""A run's -output folder is its own: no other run clobbers it, -resume auto continues only
the same run, a finished run re-run writes nothing, the best weights only improve."""

import glob
import json
import os
import subprocess
import sys

import pytest

import checkpoint
import engine
from tiny_training import ROOT, make_tiny_data, tiny_config, write_tiny_yaml
from utils import UsageError

TIMEOUT = 300  # only stops a hung run


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


@pytest.fixture(scope='module')
def finished_run(data_path, tmp_path_factory):
    """A 2-epoch run, done: its folder."""
    folder = str(tmp_path_factory.mktemp('finished'))
    engine.run(tiny_config(data_path, folder, {'SAVE_STEP_FREQ': 2}))
    return folder


def snapshot(folder: str):
    """Every file's name, size and modification time."""
    return {name: (os.path.getsize(os.path.join(folder, name)), os.path.getmtime(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))}


def run_cli(args):
    return subprocess.run([sys.executable, 'main_single_gpu.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_a_new_run_stops_in_a_folder_that_holds_another_before_touching_it(data_path, finished_run, tmp_path):
    before = snapshot(finished_run)
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, finished_run, {'SEED': 1})
    result = run_cli(['-cfg', cfg])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: -output {finished_run} already holds the files of')
    assert '-resume auto' in lines[0] and '-overwrite' in lines[0]
    assert snapshot(finished_run) == before


def test_resume_auto_refuses_another_runs_checkpoint_naming_the_settings(data_path, finished_run):
    before = snapshot(finished_run)
    config = tiny_config(data_path, finished_run, {'SEED': 1, 'TRAIN.NUM_EPOCHS': 3, 'MODEL.RESUME': 'auto'})
    with pytest.raises(UsageError, match=r"another run's \(settings differ: SEED 0 there, 1 now; "
                                         r"TRAIN.NUM_EPOCHS 2 there, 3 now\)"):
        engine.run(config)
    assert snapshot(finished_run) == before


def test_a_finished_run_run_again_says_so_and_writes_nothing(data_path, finished_run, tmp_path):
    before = snapshot(finished_run)
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, finished_run)
    result = run_cli(['-cfg', cfg, '-resume', 'auto'])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('this run is finished: ') and 'after epoch 2 of 2' in result.stdout
    assert snapshot(finished_run) == before
    # fewer epochs than it ran: another run's settings, refused in one line
    result = run_cli(['-cfg', cfg, '-resume', 'auto', '-opts', 'TRAIN.NUM_EPOCHS', '1'])
    assert result.returncode == 2 and 'TRAIN.NUM_EPOCHS 2 there, 1 now' in result.stderr
    assert 'Traceback' not in result.stderr
    assert snapshot(finished_run) == before


def test_overwrite_replaces_the_earlier_run(data_path, tmp_path):
    folder = str(tmp_path / 'run')
    engine.run(tiny_config(data_path, folder, {'TRAIN.NUM_EPOCHS': 1, 'SAVE_STEP_FREQ': 2}))
    first = set(glob.glob(os.path.join(folder, 'CvT-Epoch-*')))
    with pytest.raises(UsageError, match='-overwrite starts a new run and -resume continues one'):
        engine.run(tiny_config(data_path, folder, {'OVERWRITE': True, 'MODEL.RESUME': 'auto'}))
    result = engine.run(tiny_config(data_path, folder, {'OVERWRITE': True, 'SEED': 3}))
    assert not first & set(glob.glob(os.path.join(folder, 'CvT-Epoch-*')))  # the earlier files are gone
    assert "-overwrite: removed the earlier run's files" in open(os.path.join(folder, 'log.txt')).read()
    assert json.load(open(os.path.join(folder, 'CvT-best.json')))['run']['SEED'] == 3
    assert result['checkpoint'].endswith('.pdparams')


def test_the_best_weights_are_replaced_only_by_a_better_epoch_of_the_same_run(data_path, tmp_path):
    config = tiny_config(data_path, str(tmp_path), {'TRAIN.NUM_EPOCHS': 1})
    engine.run(config)
    record_path, best = checkpoint.best_record_path(config), checkpoint.best_path(config)
    record = json.load(open(record_path))

    class Trainer:  # what save_best reads
        def __init__(self, best_acc1):
            self.config, self.rank, self.best_acc1 = config, 0, best_acc1
            self.model = None
            self.logger = None

    def stamp():
        return os.path.getmtime(best), open(record_path).read()

    before = stamp()
    # resumed from an earlier checkpoint of the run: its best so far is below the file's
    checkpoint.save_best(Trainer(best_acc1=record['acc1'] - 0.5), epoch=5, acc1=record['acc1'] - 0.1)
    assert stamp() == before
    # the file is another run's
    other = dict(record, run=dict(record['run'], SEED=7), acc1=-1.0)
    with open(record_path, 'w') as out:
        json.dump(other, out)
    before = stamp()
    checkpoint.save_best(Trainer(best_acc1=None), epoch=5, acc1=0.99)
    assert stamp() == before
