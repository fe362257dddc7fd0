"""Weights by name (hub.py) against a stand-in Hub on 127.0.0.1 (tests/fake_hub.py), which
serves the checkpoints of a small transformers CvtForImageClassification in the real Hugging
Face layout: fetch, verification, conversion, the cache, offline use, failures, two processes
at once, and a whole run of tools/predict.py. Nothing here reaches the internet."""

import hashlib
import importlib
import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

torch = pytest.importorskip('torch', reason='torch is a test-only dependency (requirements-test.txt): '
                                            'it writes the pytorch_model.bin served here')
transformers = pytest.importorskip('transformers', reason='transformers is a test-only dependency '
                                                          '(requirements-test.txt)')
huggingface_hub = pytest.importorskip('huggingface_hub', reason='huggingface_hub fetches the weights '
                                                                '(requirements.txt)')
from huggingface_hub import constants as hub_constants  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import load_file, save as safetensors_bytes  # noqa: E402

import cvt  # noqa: E402
import engine  # noqa: E402
import hub  # noqa: E402
from backbone import CvTBackbone  # noqa: E402
from config import get_config  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from weight_conversion import convert_state_dict, layout_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = 'test/cvt-tiny'
NAME = f'hf-hub:{REPO}'
SMALL = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], cls_token=[False, False, True],
             num_labels=10)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A small Hugging Face CvT: its pytorch_model.bin and model.safetensors bytes, a config
    file of ours for it, and the state dict our layout should end with."""
    folder = tmp_path_factory.mktemp('checkpoint')
    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(transformers.CvtConfig(**SMALL))
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    with torch.no_grad():  # BatchNorm statistics away from their initial values
        for key, value in state.items():
            if key.endswith('running_var'):
                value.uniform_(0.5, 1.5)
    data = io.BytesIO()
    torch.save(state, data)
    arrays = {key: value.numpy() for key, value in state.items()}
    cfg = str(folder / 'cvt-tiny.yaml')
    with open(cfg, 'w') as out:
        yaml.safe_dump({'DATA': {'IMAGE_SIZE': 32, 'CROP_PCT': 1.0},
                        'MODEL': {'NAME': 'CvT-tiny', 'NUM_CLASSES': 10, 'DIM_EMBED': SMALL['embed_dim'],
                                  'NUM_HEADS': SMALL['num_heads'], 'DEPTH': SMALL['depth']}}, out)
    config = get_config(cfg)
    return {'bin': data.getvalue(), 'safetensors': safetensors_bytes(arrays), 'cfg': cfg,
            'expected': convert_state_dict(arrays, layout_of(cvt.build_cvt(config)))}


@pytest.fixture
def env(tmp_path):
    """A stand-in Hub, and HF_ENDPOINT, HF_HOME and CVT_CACHE_DIR pointing to it and into tmp_path,
    read by huggingface_hub afresh (it reads them when imported)."""
    server = FakeHub()
    with pytest.MonkeyPatch.context() as patch:
        for name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_HUB_CACHE', 'HF_TOKEN'):
            patch.delenv(name, raising=False)
        variables = {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf'),
                     'CVT_CACHE_DIR': str(tmp_path / 'cvt'), 'HF_HUB_DISABLE_IMPLICIT_TOKEN': '1'}
        for name, value in variables.items():
            patch.setenv(name, value)

        def offline(on: bool = True) -> None:
            patch.setenv('HF_HUB_OFFLINE', '1' if on else '0')
            importlib.reload(hub_constants)

        importlib.reload(hub_constants)
        server.offline = offline
        server.variables = variables
        server.cache = tmp_path / 'cvt' / 'weights'
        server.hf_cache = tmp_path / 'hf' / 'hub'
        try:
            yield server
        finally:
            server.stop()
    importlib.reload(hub_constants)


def hub_requests(server):
    """The requests for repository files (huggingface_hub also asks once for a registry of its own)."""
    return [request for request in server.requests if '/resolve/' in request[1]]


def assert_converted(path, checkpoint):
    state = load_file(path)
    assert sorted(state) == sorted(checkpoint['expected'])
    for key, value in checkpoint['expected'].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_a_bin_only_repo_is_fetched_without_torch_then_used_from_the_cache_without_the_network(
        env, checkpoint, monkeypatch, capsys):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    with monkeypatch.context() as no_torch:
        no_torch.setitem(sys.modules, 'torch', None)  # `import torch` fails, as without PyTorch
        path = cvt.resolve_weights_path(NAME, get_config(checkpoint['cfg']))
    assert path == str(env.cache / 'test--cvt-tiny.safetensors')
    assert_converted(path, checkpoint)
    assert hub_requests(env) == [('HEAD', f'/{REPO}/resolve/main/model.safetensors'),
                                 ('HEAD', f'/{REPO}/resolve/main/pytorch_model.bin'),
                                 ('GET', f'/{REPO}/resolve/main/pytorch_model.bin')]
    err = capsys.readouterr().err
    assert f'{NAME}: getting the weights of {REPO} from {env.url}' in err
    assert f'pytorch_model.bin of {REPO} has the digest the Hub advertises' in err
    assert oct(os.stat(env.cache).st_mode & 0o777) == '0o700'

    env.stop()  # the next uses must not need it
    model = cvt.build_cvt(get_config(checkpoint['cfg']))
    assert cvt.load_pretrained(model, NAME) == []
    env.offline()
    assert cvt.resolve_weights_path(NAME, get_config(checkpoint['cfg'])) == path
    assert capsys.readouterr().err == ''


def test_safetensors_is_taken_where_the_repo_has_it(env, checkpoint):
    env.add(REPO, 'model.safetensors', checkpoint['safetensors'])
    env.add(REPO, 'pytorch_model.bin', b'never read')
    assert_converted(hub.weights_path(NAME, get_config(checkpoint['cfg'])), checkpoint)
    assert env.downloads('pytorch_model.bin') == 0


def test_a_zoo_name_converts_for_its_own_config_and_serves_models_with_other_heads(env, checkpoint, monkeypatch):
    monkeypatch.setitem(hub.MODEL_ZOO, 'cvt-tiny', hub.ZooModel('cvt-tiny', REPO, checkpoint['cfg']))
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    assert_converted(hub.weights_path('cvt-tiny'), checkpoint)
    # a model fine-tuned to 3 classes starts from it with a new head; a backbone has none
    config = get_config(checkpoint['cfg'], ['MODEL.NUM_CLASSES', '3'])
    assert cvt.load_pretrained(cvt.build_cvt(config), 'cvt-tiny', log=lambda _: None) == list(cvt.HEAD_KEYS)
    backbone = CvTBackbone(checkpoint['cfg'], pretrained='cvt-tiny')
    np.testing.assert_array_equal(backbone.cvt.stages[0].patch_embed.proj.weight.numpy(),
                                  checkpoint['expected']['stages.0.patch_embed.proj.weight'])
    assert env.downloads('pytorch_model.bin') == 1


def test_an_hf_hub_name_of_another_class_count_keeps_its_head_for_load_pretrained_to_leave_out(env, checkpoint):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    config = get_config(checkpoint['cfg'], ['MODEL.NUM_CLASSES', '3'])
    path = hub.weights_path(NAME, config)
    assert load_file(path)['head.weight'].shape == (48, 10)
    assert cvt.load_pretrained(cvt.build_cvt(config), path, log=lambda _: None) == list(cvt.HEAD_KEYS)


def test_engine_fetches_in_check_paths_before_any_process_starts(env, checkpoint, tmp_path):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    (tmp_path / 'data').mkdir()
    config = get_config(checkpoint['cfg'], ['DATA.DATA_PATH', str(tmp_path / 'data'), 'MODEL.PRETRAINED', NAME,
                                            'EVAL', 'True'])
    engine.check_paths(config)
    assert (env.cache / 'test--cvt-tiny.safetensors').is_file()


def test_a_zoo_name_for_another_model_says_which_config_and_names_fit(env):
    with pytest.raises(hub.WeightsUnavailable) as error:
        cvt.resolve_weights_path('cvt-21-384', get_config(os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')))
    assert str(error.value) == (
        'cvt-21-384 holds a CvT-21-384x384 (configs/cvt-21-384x384.yaml), which the config\'s model '
        '(MODEL.NAME CvT-13-224x224) is not: use -cfg configs/cvt-21-384x384.yaml, or a name that fits it: '
        'cvt-13-224, cvt-13-384, cvt-13-384-22k')
    assert env.requests == []  # decided before any download


def test_an_unknown_name_lists_the_known_ones(env):
    with pytest.raises(FileNotFoundError, match=r'weights file not found: cvt-13 \(nor cvt-13\.pdparams, '
                                                r'cvt-13\.safetensors\); released weights are named cvt-13-224, '
                                                r'cvt-13-384, .*cvt-w24-384-22k, or hf-hub:ORG/REPO$'):
        cvt.resolve_weights_path('cvt-13')
    with pytest.raises(FileNotFoundError, match=r'\.safetensors\)$'):
        cvt.resolve_weights_path('weights/cvt-13.pdparams')  # a path, not a name: no list
    with pytest.raises(hub.WeightsUnavailable, match=r'hf-hub:microsoft: not a name of released weights; they '
                                                     r'are cvt-13-224, .* or hf-hub:ORG/REPO'):
        cvt.resolve_weights_path('hf-hub:microsoft')


@pytest.mark.parametrize('name, message', [
    ('hf-hub:test/absent', r'no model repository test/absent at http://127\.0\.0\.1:\d+ \(or it is private or '
                           r'gated: log in with `hf auth login`\); check the name$'),
    (f'{NAME}@v2', r'test/cvt-tiny at http://127\.0\.0\.1:\d+ has no revision v2$'),
    ('hf-hub:test/config-only', r'test/config-only at http://127\.0\.0\.1:\d+ holds neither model\.safetensors '
                                r'nor pytorch_model\.bin at revision main; convert the weights you have with '
                                r'tools/convert_weights\.py and give that file instead$'),
])
def test_a_missing_repo_revision_or_file_is_one_line(env, checkpoint, name, message):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    env.add('test/config-only', 'config.json', b'{}')
    with pytest.raises(hub.WeightsUnavailable, match=f'^{name}: {message}'):
        hub.weights_path(name, get_config(checkpoint['cfg']))


def test_offline_without_the_file_in_a_cache_says_what_to_do_without_a_request(env, checkpoint):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    env.offline()
    cache_file = env.cache / 'test--cvt-tiny.safetensors'
    with pytest.raises(hub.WeightsUnavailable) as error:
        hub.weights_path(NAME, get_config(checkpoint['cfg']))
    assert str(error.value) == (
        f'{NAME}: not in the cache, and HF_HUB_OFFLINE=1 allows no download: run once without it, or place '
        f'the weights by hand: download {env.url}/{REPO}/resolve/main/pytorch_model.bin (or model.safetensors) '
        f'and run python tools/convert_weights.py pytorch_model.bin {cache_file} -cfg YOUR_CONFIG.yaml')
    assert hub_requests(env) == []


def test_a_file_placed_by_hand_as_the_error_says_is_used_offline(env, checkpoint, tmp_path):
    env.offline()
    (tmp_path / 'pytorch_model.bin').write_bytes(checkpoint['bin'])
    cache_file = hub.cache_folder() + '/test--cvt-tiny.safetensors'
    run = subprocess.run([sys.executable, 'tools/convert_weights.py', str(tmp_path / 'pytorch_model.bin'),
                          cache_file, '-cfg', checkpoint['cfg']], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert hub.weights_path(NAME, get_config(checkpoint['cfg'])) == cache_file
    assert_converted(cache_file, checkpoint)


def test_offline_the_download_in_huggingface_hubs_cache_is_verified_and_converted(env, checkpoint):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    path = hub.weights_path(NAME, get_config(checkpoint['cfg']))
    os.remove(path)
    env.stop()
    env.offline()
    assert hub.weights_path(NAME, get_config(checkpoint['cfg'])) == path
    assert_converted(path, checkpoint)


def test_tampered_bytes_stop_with_both_digests_and_leave_no_file_in_either_cache(env, checkpoint):
    good = checkpoint['bin']
    middle = len(good) // 2
    env.add(REPO, 'pytorch_model.bin', good, served=good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1:])
    with pytest.raises(hub.WeightsUnavailable) as error:
        hub.weights_path(NAME, get_config(checkpoint['cfg']))
    advertised = hashlib.sha256(good).hexdigest()
    assert f'{NAME}: pytorch_model.bin of {REPO} has sha256 ' in str(error.value)
    assert f'but the Hub advertises {advertised}; removed from the cache, nothing converted' in str(error.value)
    assert str(error.value).count('\n') == 0
    assert list((env.hf_cache / 'models--test--cvt-tiny' / 'blobs').iterdir()) == []
    assert list((env.hf_cache / 'models--test--cvt-tiny' / 'snapshots').rglob('pytorch_model.bin')) == []
    assert [p.name for p in env.cache.iterdir() if p.name != '.lock'] == []
    env.add(REPO, 'pytorch_model.bin', good)  # the next try gets the right bytes
    assert_converted(hub.weights_path(NAME, get_config(checkpoint['cfg'])), checkpoint)


def test_an_interrupted_download_starts_again_and_a_lost_one_leaves_nothing_behind(env, checkpoint, monkeypatch, capfd):
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)  # huggingface_hub's pause before it resumes
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    env.cut_downloads = 1
    assert_converted(hub.weights_path(NAME, get_config(checkpoint['cfg'])), checkpoint)
    assert env.downloads('pytorch_model.bin') == 2  # huggingface_hub tried again (resuming past 10 MB chunks)
    os.remove(env.cache / 'test--cvt-tiny.safetensors')
    env.add('test/cut', 'pytorch_model.bin', checkpoint['bin'])
    env.cut_downloads = 100  # the connection never holds
    with pytest.raises(hub.WeightsUnavailable, match=r'^hf-hub:test/cut: fetching pytorch_model\.bin of test/cut at '
                                                     r'http://127\.0\.0\.1:\d+ failed \(RemoteProtocolError: .*\); '
                                                     r'or place the weights by hand'):
        hub.weights_path('hf-hub:test/cut', get_config(checkpoint['cfg']))
    assert list(env.hf_cache.rglob('*.incomplete')) == [] and \
        list((env.hf_cache / 'models--test--cut' / 'blobs').iterdir()) == []
    assert [p.name for p in env.cache.iterdir() if p.name != '.lock'] == []
    err = capfd.readouterr().err  # huggingface_hub's notes on each try stay off the terminal
    assert 'Trying to resume' not in err and 'Max retries' not in err


def test_a_file_the_hub_keeps_in_git_is_checked_against_its_git_digest(env, checkpoint):
    env.add(REPO, 'model.safetensors', checkpoint['safetensors'])
    data = checkpoint['safetensors']
    env.repos[REPO]['model.safetensors'].sha256 = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
    assert_converted(hub.weights_path(NAME, get_config(checkpoint['cfg'])), checkpoint)


def test_a_malicious_bin_is_refused_and_nothing_of_it_runs(env, checkpoint, tmp_path):
    class RunsCode:
        def __reduce__(self):
            return os.system, (f'touch {tmp_path / "ran"}',)

    data = io.BytesIO()
    torch.save({'classifier.weight': RunsCode()}, data)
    env.add(REPO, 'pytorch_model.bin', data.getvalue())
    with pytest.raises(hub.WeightsUnavailable, match=r'pytorch_model\.bin: refused to load: it asks for '
                                                     r'(posix|os)\.system'):
        hub.weights_path(NAME, get_config(checkpoint['cfg']))
    assert not (tmp_path / 'ran').exists()
    assert [p.name for p in env.cache.iterdir() if p.name != '.lock'] == []


def test_weights_of_another_architecture_name_the_keys(env, checkpoint, tmp_path):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    deeper = get_config(checkpoint['cfg'], ['MODEL.DEPTH', '[1, 2, 4]'])
    with pytest.raises(hub.WeightsUnavailable, match=rf'^{NAME}: pytorch_model\.bin of {REPO} does not fit the '
                                                     r'config\'s model \(MODEL\.NAME CvT-tiny\): .*stages\.2\.'
                                                     r'blocks\.3\.'):
        hub.weights_path(NAME, deeper)


def test_no_network_is_one_line(env, checkpoint, monkeypatch, capfd):
    env.stop()
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)  # huggingface_hub's retries, at once
    with pytest.raises(hub.WeightsUnavailable, match=rf'^{NAME}: cannot reach {env.url} \(ConnectError: .*\), '
                                                     r'and it is not in the cache: check the connection \(HF_ENDPOINT '
                                                     r'names a mirror\), or place the weights by hand: download '):
        hub.weights_path(NAME, get_config(checkpoint['cfg']))
    # huggingface_hub's notes on each retry and the HTTP client's request lines stay off the terminal
    assert capfd.readouterr().err == f'{NAME}: getting the weights of {REPO} from {env.url} ...\n'


def test_a_weights_cache_others_could_change_is_refused(env, monkeypatch):
    folder = hub.cache_folder()
    assert oct(os.stat(folder).st_mode & 0o777) == '0o700'
    os.chmod(folder, 0o777)
    with pytest.raises(hub.WeightsUnavailable, match=rf'^not using {folder} as the weights cache: {folder} is '
                                                     r'writable by other users \(mode 777\); make it yours alone '
                                                     r'\(chmod go-w\), or set CVT_CACHE_DIR to a folder'):
        hub.cache_folder()
    os.chmod(folder, 0o700)
    os.chmod(os.path.dirname(folder), 0o777)  # others could rename the weights folder away
    with pytest.raises(hub.WeightsUnavailable, match=r'cvt, above .*weights, can be changed by other users'):
        hub.cache_folder()
    os.chmod(os.path.dirname(folder), 0o700)
    uid = os.getuid()
    monkeypatch.setattr(os, 'getuid', lambda: uid + 1)
    with pytest.raises(hub.WeightsUnavailable, match=rf'weights belongs to another user \(uid {uid}\)'):
        hub.cache_folder()


FETCH = ('import sys, time; sys.path.insert(0, {root!r}); import runtime; runtime.configure(); '
         'from config import get_config; import hub; config = get_config({cfg!r}); '
         'open({started!r} + str(time.time()), "w").close(); path = hub.weights_path({name!r}, config); '
         'print(time.time(), path)')


def test_two_processes_fetching_at_once_download_once_and_both_get_the_whole_file(env, checkpoint, tmp_path):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    (tmp_path / 'started').mkdir()

    def when_both_asked():  # the download goes on while the other process waits for it
        deadline = time.time() + 120
        while len(os.listdir(tmp_path / 'started')) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1)

    env.before_download = when_both_asked
    script = FETCH.format(root=ROOT, name=NAME, cfg=checkpoint['cfg'], started=str(tmp_path / 'started') + '/')
    processes = [subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    results = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    ends, paths = zip(*(out.split() for out, _ in results))
    assert set(paths) == {str(env.cache / 'test--cvt-tiny.safetensors')}
    starts = [float(name) for name in os.listdir(tmp_path / 'started')]
    assert max(starts) < min(float(end) for end in ends)  # they overlapped
    assert env.downloads('pytorch_model.bin') == 1
    assert sum('getting the weights' in err for _, err in results) == 1
    assert sorted(p.name for p in env.cache.iterdir()) == ['.lock', 'test--cvt-tiny.safetensors']
    assert_converted(str(env.cache / 'test--cvt-tiny.safetensors'), checkpoint)


def test_predict_runs_from_nothing_with_an_hf_hub_name_and_a_failure_is_one_line(env, checkpoint, tmp_path):
    env.add(REPO, 'pytorch_model.bin', checkpoint['bin'])
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f'image{index}.png')
    run = subprocess.run([sys.executable, 'tools/predict.py', '-cfg', checkpoint['cfg'], '-pretrained', NAME,
                          str(tmp_path / 'image0.png'), str(tmp_path / 'image1.png'), '-topk', '3'],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count('  1. ') == 2 and run.stdout.count('  3. ') == 2
    cache_file = env.cache / 'test--cvt-tiny.safetensors'
    # two lines: no progress bar (stderr is no terminal here), no log lines of the HTTP client
    assert re.fullmatch(rf'{re.escape(NAME)}: getting the weights of {REPO} from {re.escape(env.url)} \.\.\.\n'
                        rf'{re.escape(NAME)}: pytorch_model\.bin of {REPO} has the digest the Hub advertises '
                        rf'\([0-9a-f]{{16}}\.\.\.\); converted to {re.escape(str(cache_file))}\n', run.stderr), \
        run.stderr
    assert_converted(str(cache_file), checkpoint)

    (tmp_path / 'data').mkdir()
    failed = subprocess.run([sys.executable, 'main_single_gpu.py', '-cfg', checkpoint['cfg'], '-eval',
                             '-data_path', str(tmp_path / 'data'), '-pretrained', 'hf-hub:test/elsewhere'],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f'error: -pretrained: hf-hub:test/elsewhere: not in the cache, and HF_HUB_OFFLINE=1 allows no download: '
        f'run once without it, or place the weights by hand: download {env.url}/test/elsewhere/resolve/main/'
        f'pytorch_model.bin (or model.safetensors) and run python tools/convert_weights.py pytorch_model.bin '
        f'{env.cache}/test--elsewhere.safetensors -cfg YOUR_CONFIG.yaml'], failed.stderr
