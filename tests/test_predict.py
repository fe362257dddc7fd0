"""tools/predict.py: the printed top-k is softmax(logits)'s, batch by batch; bad input exits 2."""

import os

import numpy as np
import paddle
import pytest
from PIL import Image

from config import get_config
from cvt import build_cvt
from datasets import get_val_transforms
from tools import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = f"""BASE: ['{os.path.join(ROOT, 'configs', 'cvt-13-224x224.yaml')}']
DATA:
  IMAGE_SIZE: 64
  BATCH_SIZE_EVAL: 2
MODEL:
  NAME: tiny-cvt
  NUM_CLASSES: 10
  DIM_EMBED: [16, 32, 48]
  NUM_HEADS: [1, 2, 3]
  DEPTH: [1, 1, 1]
"""


def write_tiny_model(folder) -> tuple:
    """A tiny CvT config file and seeded random weights in `folder`: (cfg path, weights path, model).

    BatchNorm statistics are randomised too, so that a tool that forgot eval
    mode or dropped buffers would give other logits.
    """
    cfg = os.path.join(folder, 'tiny.yaml')
    with open(cfg, 'w') as out:
        out.write(TINY_YAML)
    paddle.seed(1)
    model = build_cvt(get_config(cfg))
    for name, tensor in model.state_dict().items():
        if name.endswith('_mean'):
            tensor.set_value(paddle.randn(tensor.shape) * 0.1)
        elif name.endswith('_variance'):
            tensor.set_value(paddle.rand(tensor.shape) + 0.5)
    weights = os.path.join(folder, 'tiny.pdparams')
    paddle.save(model.state_dict(), weights)
    model.eval()
    return cfg, weights, model


def write_images(folder, count: int) -> list:
    """`count` random-noise images of assorted sizes and modes, sorted by name."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        size = (int(rng.integers(50, 120)), int(rng.integers(50, 120)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        path = os.path.join(folder, f'img{i}.png' if i % 2 else f'img{i}.jpg')
        (image.convert('L') if i == 3 else image).save(path)
        paths.append(path)
    return paths


def parse_top_k(text: str) -> dict:
    """predict/infer output -> {path: [(index, probability, name), ...]}."""
    result, current = {}, None
    for line in text.splitlines():
        if not line.startswith('  '):
            current = result.setdefault(line, [])
        else:
            _, prob, index, *name = line.split(maxsplit=3)
            current.append((int(index), float(prob), name[0] if name else None))
    return result


def assert_same_top_k(got: dict, want: dict, paths: list, atol: float = 1.1e-4) -> None:
    """Two parse_top_k results list the same images in order, with the same classes
    and probabilities within `atol`."""
    assert list(got) == list(want) == paths
    for path in paths:
        assert [i for i, _, _ in got[path]] == [i for i, _, _ in want[path]]
        np.testing.assert_allclose([p for _, p, _ in got[path]], [p for _, p, _ in want[path]], atol=atol)


def expected_top_k(model, config, paths, k):
    """Each image's top k from softmax of the model's logits, one image at a time."""
    transform = get_val_transforms(config)
    expected = {}
    for path in paths:
        with paddle.no_grad():
            logits = model(paddle.to_tensor(transform(Image.open(path).convert('RGB'))[None])).numpy()[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:k]
        expected[path] = [(int(i), float(probs[i])) for i in order]
    return expected


def test_printed_top_k_is_softmax_of_logits_for_a_folder_in_batches(tmp_path, capsys):
    cfg, weights, model = write_tiny_model(str(tmp_path))
    paths = write_images(str(tmp_path / 'images'), 5)  # batches of 2, 2 and 1
    labels = tmp_path / 'labels.txt'
    labels.write_text(''.join(f'class number {i}\n' for i in range(10)))

    assert predict.main(['-cfg', cfg, '-pretrained', weights, str(tmp_path / 'images'),
                         '-labels', str(labels), '-topk', '3']) == 0
    printed = parse_top_k(capsys.readouterr().out)

    expected = expected_top_k(model, get_config(cfg), paths, 3)
    assert list(printed) == paths
    for path in paths:
        assert [i for i, _, _ in printed[path]] == [i for i, _ in expected[path]]
        np.testing.assert_allclose([p for _, p, _ in printed[path]], [p for _, p in expected[path]], atol=6e-5)
        assert [name for _, _, name in printed[path]] == [f'class number {i}' for i, _ in expected[path]]


def test_unreadable_file_is_reported_and_skipped(tmp_path, capsys):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    good = write_images(str(tmp_path), 1)[0]
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')

    assert predict.main(['-cfg', cfg, '-pretrained', weights, str(broken), good, '-topk', '2']) == 0
    out, err = capsys.readouterr()
    assert list(parse_top_k(out)) == [good]
    assert f'skipped {broken}' in err


@pytest.mark.parametrize('change, message', [
    ({'image': 'missing.jpg'}, 'missing.jpg: no such file or folder'),
    ({'-pretrained': 'missing'}, 'weights file not found: missing'),
    ({'-topk': '11'}, '-topk 11 must be between 1'),
    ({'-labels': 'labels.txt'}, 'labels.txt: 2 class names, but the model has 10 classes'),
])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys, monkeypatch, change, message):
    cfg, weights, _ = write_tiny_model(str(tmp_path))
    image = write_images(str(tmp_path), 1)[0]
    (tmp_path / 'labels.txt').write_text('cat\ndog\n')
    monkeypatch.chdir(tmp_path)
    args = {'-cfg': cfg, '-pretrained': weights, '-topk': '5', 'image': image}
    args.update(change)
    argv = [args.pop('image')] + [v for kv in args.items() for v in kv]

    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and message in err
