"""A stopped run leaves nothing running: after SIGTERM, SIGINT, a second signal or an
error, at different points of an epoch, on a loaded machine, with loader workers, in one
process and several, no process of the run is left."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tiny_training import ROOT, make_tiny_data, write_tiny_yaml

TIMEOUT = 120  # only stops a hung run

# main_single_gpu.py with an error raised after a given optimizer step
FAILING = '''
import runpy, sys
sys.path.insert(0, {root!r})
import runtime
runtime.configure()
import checkpoint
after_optimizer_step = checkpoint.after_optimizer_step

def failing_step(trainer, epoch, step, meters, stop_code):
    after_optimizer_step(trainer, epoch, step, meters, stop_code)
    if step == {step}:
        raise RuntimeError('a bug in the middle of an epoch')

checkpoint.after_optimizer_step = failing_step
sys.argv = ['main_single_gpu.py', *{args!r}]
runpy.run_path('main_single_gpu.py', run_name='__main__')
'''


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


@pytest.fixture(scope='module')
def busy_machine():
    """A process that keeps one core busy while the runs stop."""
    hog = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    yield
    hog.kill()
    hog.wait()


def session_members(session: int):
    """(pid, command) of the live processes in `session` (zombies excluded)."""
    members = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as stat:
                fields = stat.read().rsplit(')', 1)[1].split()
            with open(f'/proc/{pid}/cmdline') as cmdline:
                command = cmdline.read().replace('\0', ' ')[:120]
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != 'Z':
            members.append((int(pid), command))
    return members


def stop_run(args, stop_after_line: str, signals, log_path: str, code_args=None):
    """Start a run in a session of its own, send `signals` (spaced by 0.05 s) once a line
    of its output contains `stop_after_line`, and return its exit code, the processes of
    its session still alive 3 s after it ended, and its last lines of output. (The output
    goes to a file: a survivor would hold a pipe open.)"""
    command = [sys.executable, *(code_args or ['main_single_gpu.py']), *args]
    with open(log_path, 'w') as log:
        run = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while run.poll() is None and time.monotonic() < deadline:
            with open(log_path) as log:
                if stop_after_line in log.read():
                    for i, signum in enumerate(signals):
                        if i:
                            time.sleep(0.05)  # the first one's handler has run; the step goes on
                        run.send_signal(signum)
                    break
            time.sleep(0.05)
        run.wait(timeout=TIMEOUT)
        deadline = time.monotonic() + 3
        while session_members(run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with open(log_path) as log:
            return run.returncode, session_members(run.pid), ''.join(log.readlines()[-5:])
    finally:
        for pid, _ in session_members(run.pid):
            os.kill(pid, signal.SIGKILL)
        run.kill()


# a second signal may land after the run has put the default handlers back, on its way
# out: the process then ends by the signal itself, which a shell reports as 143 / 130 too
CASES = {
    # (where in the run, the signals, the exit codes allowed)
    'first step, SIGTERM': ('Step[0001/', [signal.SIGTERM], {143}),
    'mid-epoch, SIGINT': ('Step[0007/', [signal.SIGINT], {130}),
    'validation starting, SIGTERM': ('Step[0020/', [signal.SIGTERM], {143}),
    'a second SIGTERM': ('Step[0004/', [signal.SIGTERM, signal.SIGTERM], {143, -signal.SIGTERM}),
    'a second SIGINT': ('Step[0011/', [signal.SIGINT, signal.SIGINT], {130, -signal.SIGINT}),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_stopped_run_leaves_no_process_behind(data_path, tmp_path, busy_machine, case):
    line, signals, codes = CASES[case]
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'out'), {
        'DATA.NUM_WORKERS': 2, 'DATA.BATCH_SIZE': 2, 'REPORT_FREQ': 1, 'TRAIN.NUM_EPOCHS': 3})
    code, left, output = stop_run(['-cfg', cfg], line, signals, str(tmp_path / 'output.txt'))
    assert code in codes, output
    assert left == [], (left, output)


def test_a_run_that_fails_leaves_no_process_behind(data_path, tmp_path, busy_machine):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'out'), {
        'DATA.NUM_WORKERS': 2, 'DATA.BATCH_SIZE': 2, 'REPORT_FREQ': 1})
    script = FAILING.format(root=ROOT, step=5, args=['-cfg', cfg])
    code, left, output = stop_run([], 'no line stops it', [], str(tmp_path / 'output.txt'),
                                  code_args=['-c', script])
    assert code == 1 and 'a bug in the middle of an epoch' in output
    assert left == [], (left, output)


@pytest.mark.parametrize('signals, codes', [([signal.SIGTERM], {143}),
                                            ([signal.SIGINT, signal.SIGINT], {130, -signal.SIGINT})])
def test_a_stopped_multi_process_run_leaves_no_process_behind(data_path, tmp_path, busy_machine, signals, codes):
    cfg = write_tiny_yaml(str(tmp_path / 'tiny.yaml'), data_path, str(tmp_path / 'out'), {
        'DATA.NUM_WORKERS': 2, 'DATA.BATCH_SIZE': 2, 'REPORT_FREQ': 1, 'TRAIN.NUM_EPOCHS': 3})
    exit_code, left, output = stop_run(['-cfg', cfg, '-ngpus', '2'], 'Step[0003/', signals,
                                       str(tmp_path / 'output.txt'), code_args=['main_multi_gpu.py'])
    assert exit_code in codes, output
    assert left == [], (left, output)
