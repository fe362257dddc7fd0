"""What a run shows: the terminal (a progress bar on a terminal, periodic lines
elsewhere), the log file, curves.png and history.json, VisualDL scalars."""

import glob
import io
import json
import os
import struct
import sys

import pytest

import engine
import reporting
from tiny_training import make_tiny_data, tiny_config
from utils import UsageError


class FakeTerminal(io.StringIO):
    """Captured stdout that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


def png_size(path):
    with open(path, 'rb') as png:
        header = png.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return struct.unpack('>II', header[16:24])


def run_captured(monkeypatch, stream, config):
    monkeypatch.setattr(sys, 'stdout', stream)
    result = engine.run(config)
    return result, stream.getvalue()


def test_terminal_shows_a_bar_and_one_line_per_epoch_the_log_file_everything(data_path, tmp_path, monkeypatch):
    config = tiny_config(data_path, str(tmp_path), {'VALIDATE_FREQ': 2, 'REPORT_FREQ': 1})
    _, shown = run_captured(monkeypatch, FakeTerminal(), config)
    log = (tmp_path / 'log.txt').read_text()
    # the log file: the full config and PaddleViT's lines, for people and scripts that parse them
    assert 'config:\n' in log and 'Step[0005/0005]' in log and 'Validation Acc@1' in log
    assert 'epoch 1/2 |' not in log and '\r' not in log
    # the terminal: where the log is, the settings, a bar, one line per epoch
    assert 'config:\n' not in shown and 'Step[' not in shown and 'Validation Acc@1' not in shown
    assert f'log and full config: {tmp_path}/log.txt' in shown
    assert 'model CvT-demo-48x48' in shown and '42 train / 30 val images' in shown and 'device cpu' in shown
    assert '| layers fast, CPU kernels ' in shown  # the layers that run, and the kernels' build
    assert '\repoch 1/2 [' in shown and '5/5' in shown
    lines = [line.rsplit('\r', 1)[-1] for line in shown.splitlines()]
    epoch_lines = [line for line in lines if ' | train loss ' in line]
    assert len(epoch_lines) == 2
    assert 'val top-1' not in epoch_lines[0] and 'val top-1' in epoch_lines[1]
    assert 'saved CvT-Epoch-2-' in epoch_lines[1]


def test_without_a_terminal_the_periodic_lines_replace_the_bar(data_path, tmp_path, monkeypatch):
    config = tiny_config(data_path, str(tmp_path), {'TRAIN.NUM_EPOCHS': 1, 'REPORT_FREQ': 2})
    _, shown = run_captured(monkeypatch, io.StringIO(), config)
    assert '\r' not in shown and 'config:\n' not in shown
    assert shown.count('Step[') == 3  # steps 2, 4 and the last, 5
    assert sum(' | train loss ' in line for line in shown.splitlines()) == 1


def test_evaluation_shows_a_bar_and_one_result_line(data_path, tmp_path, monkeypatch):
    checkpoint = engine.run(tiny_config(data_path, str(tmp_path / 'train'), {'TRAIN.NUM_EPOCHS': 1}))['checkpoint']
    config = tiny_config(data_path, str(tmp_path / 'eval'), {'EVAL': True, 'MODEL.PRETRAINED': checkpoint,
                                                             'MODEL.LAYERS': 'plain'})
    result, shown = run_captured(monkeypatch, FakeTerminal(), config)
    assert '\rvalidating [' in shown and 'config:\n' not in shown
    assert shown.splitlines()[1].endswith('| layers plain')  # the settings line
    assert f'val top-1 {result["val"]["acc1"]:.4f} | top-5' in shown and '30 images' in shown
    assert 'Validation Acc@1' in (tmp_path / 'eval' / 'log.txt').read_text()


def test_curves_png_and_history_at_each_validation_and_the_end(data_path, tmp_path, monkeypatch):
    written = []
    plot = reporting.plot_curves
    monkeypatch.setattr(reporting, 'plot_curves', lambda history, *a: (written.append(len(history)),
                                                                          plot(history, *a)))
    engine.run(tiny_config(data_path, str(tmp_path), {'TRAIN.NUM_EPOCHS': 3, 'VALIDATE_FREQ': 2}))
    assert written == [2, 3]  # after the epoch-2 validation and at the end
    width, height = png_size(tmp_path / 'curves.png')
    assert width >= 800 and height >= 300
    history = json.loads((tmp_path / 'history.json').read_text())
    assert [row['epoch'] for row in history] == [1, 2, 3]
    assert 'val_acc1' not in history[0] and 0 <= history[1]['val_acc1'] <= history[1]['val_acc5'] <= 1
    assert all(row['lr'] > 0 and row['train_loss'] > 0 for row in history)


def test_a_resumed_run_continues_the_history(data_path, tmp_path):
    first = engine.run(tiny_config(data_path, str(tmp_path), {'TRAIN.NUM_EPOCHS': 2, 'SAVE_FREQ': 1}))
    epoch_1 = glob.glob(str(tmp_path / 'CvT-Epoch-1-*[0-9].pdparams'))[0]
    history = json.loads((tmp_path / 'history.json').read_text())
    engine.run(tiny_config(data_path, str(tmp_path), {'TRAIN.NUM_EPOCHS': 2, 'MODEL.RESUME': epoch_1}))
    resumed = json.loads((tmp_path / 'history.json').read_text())
    assert [row['epoch'] for row in resumed] == [1, 2]
    assert resumed[0] == history[0] and resumed[1]['val_acc1'] == pytest.approx(first['val']['acc1'])


def test_progress_bar_redraws_in_place_and_erases_itself():
    stream = FakeTerminal()
    bar = reporting.ProgressBar(4, 'epoch 1/1', stream, width=4, interval=0)
    for done in range(1, 5):
        bar.update(done, 'loss 1.0')
    bar.close()
    text = stream.getvalue()
    assert '\repoch 1/1 [#...] 1/4 loss 1.0' in text and '[####] 4/4' in text
    assert '\n' not in text and text.endswith('\r\033[K')


def test_visualdl_scalars_read_back(data_path, tmp_path):
    pytest.importorskip('visualdl', reason='VisualDL is optional: pip install visualdl==2.5.3')
    from visualdl import LogReader
    engine.run(tiny_config(data_path, str(tmp_path), {'VISUALDL': True, 'TRAIN.NUM_EPOCHS': 2, 'REPORT_FREQ': 2}))
    files = glob.glob(str(tmp_path / 'vdl' / '*'))
    assert len(files) == 1
    reader = LogReader(file_path=files[0])
    steps = {tag: [(r.id, r.value) for r in reader.get_data('scalar', tag)]
             for tag in ('train/loss', 'train/acc1', 'train/lr', 'train/images_per_s', 'val/acc1', 'val/acc5')}
    assert [step for step, _ in steps['train/loss']] == [2, 4, 5, 7, 9, 10]  # every 2 steps and each epoch's last
    assert all(value > 0 for _, value in steps['train/lr'] + steps['train/images_per_s'])
    assert [step for step, _ in steps['val/acc1']] == [1, 2]
    history = json.loads((tmp_path / 'history.json').read_text())
    assert [value for _, value in steps['val/acc1']] == pytest.approx([row['val_acc1'] for row in history])


def test_visualdl_missing_stops_before_training_with_the_install_command(data_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'visualdl', None)  # import visualdl raises ImportError
    with pytest.raises(UsageError, match=r'needs VisualDL.*pip install visualdl==2\.5\.3'):
        engine.run(tiny_config(data_path, str(tmp_path), {'VISUALDL': True}))
    assert not os.path.exists(tmp_path / 'log.txt') or 'Step[' not in (tmp_path / 'log.txt').read_text()
