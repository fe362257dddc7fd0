"""The training engine, in process: schedule, optimizer groups, steps, resume, errors."""

import glob
import logging
import math
import os

import numpy as np
import paddle
import pytest

import cvt
import datasets
import engine
import losses
import mixup as mixup_lib
from tiny_training import make_tiny_data, tiny_config, write_tiny_yaml
from config import get_config
from transforms import DeviceFinish
from utils import NonFiniteLossError, UsageError, get_logger


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp('tiny_data')))


def weights(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def max_difference(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_lr_scales_with_global_batch_warms_up_per_step_and_ends_absolute(tmp_path):
    config = tiny_config(str(tmp_path), str(tmp_path), {
        'TRAIN.BASE_LR': 1e-3, 'TRAIN.LINEAR_SCALED_LR': 64, 'TRAIN.ACCUM_ITER': 2,
        'TRAIN.WARMUP_START_LR': 1e-6, 'TRAIN.END_LR': 1e-5,
        'TRAIN.WARMUP_EPOCHS': 1, 'TRAIN.NUM_EPOCHS': 3})
    schedule = engine.build_lr_schedule(config, steps_per_epoch=10, world_size=2)
    # batch 8 x 2 processes x 2 accumulated = 32 images: half of the 64 BASE_LR is for
    assert schedule.peak_lr == pytest.approx(5e-4)
    lrs = []
    for _ in range(30):
        lrs.append(schedule())
        schedule.step()
    assert lrs[0] == pytest.approx(1e-6)  # warm-up starts at WARMUP_START_LR, unscaled
    assert lrs[5] == pytest.approx(1e-6 + (5e-4 - 1e-6) / 2)  # mid-epoch: stepped per iteration
    assert lrs[10] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert schedule() == pytest.approx(1e-5)  # ends at END_LR, unscaled


def test_weight_decay_skips_biases_norms_and_cls_token(tmp_path):
    config = tiny_config(str(tmp_path), str(tmp_path))
    model = cvt.build_cvt(config)
    decayed = {name for name, p in model.named_parameters() if engine.decays_weight(name, p)}
    assert 'stages.0.patch_embed.proj.weight' in decayed
    assert 'stages.2.blocks.0.attn.proj_q.weight' in decayed
    assert 'head.weight' in decayed
    for name in ('stages.2.cls_token', 'head.bias', 'norm.weight', 'stages.0.blocks.0.norm1.weight',
                 'stages.0.blocks.0.attn.conv_proj_q.1.weight'):
        assert name not in decayed
    optimizer = engine.build_optimizer(config, model, 1e-3)
    by_name = dict(model.named_parameters())
    assert optimizer._apply_decay_param_fun(by_name['head.weight'].name)
    assert not optimizer._apply_decay_param_fun(by_name['stages.2.cls_token'].name)


def _first_batch(config, size):
    dataset = datasets.get_dataset(config, 'val')
    images, labels, _, boxes = zip(*(dataset[i] for i in range(0, len(dataset), len(dataset) // size)[:size]))
    finish = DeviceFinish(config, training=False)
    return finish(paddle.to_tensor(np.stack(images)), paddle.to_tensor(np.stack(boxes))), \
        paddle.to_tensor(np.array(labels, dtype='int64'))


def _tiny_training(data_path, tmp_path, batch):
    """A tiny CvT in training mode, its AdamW, loss and (disabled) scaler, and one batch."""
    config = tiny_config(data_path, str(tmp_path))
    model = cvt.build_cvt(config)
    model.train()
    optimizer = engine.build_optimizer(config, model, 1e-3)
    criterion = losses.build_criterion(config, mixup_active=False)
    return model, optimizer, criterion, paddle.amp.GradScaler(enable=False), _first_batch(config, batch)


def test_training_steps_reduce_the_loss(data_path, tmp_path):
    model, optimizer, criterion, scaler, (images, labels) = _tiny_training(data_path, tmp_path, 16)
    first = float(engine.train_step(model, images, labels, criterion, optimizer, scaler)[0])
    for _ in range(15):
        last = float(engine.train_step(model, images, labels, criterion, optimizer, scaler)[0])
    assert last < 0.7 * first


def test_an_update_releases_the_gradients_and_a_micro_step_keeps_them(data_path, tmp_path):
    model, optimizer, criterion, scaler, (images, labels) = _tiny_training(data_path, tmp_path, 4)
    trained = [p for p in model.parameters() if not p.stop_gradient]
    engine.train_step(model, images, labels, criterion, optimizer, scaler, accum_iter=2, update=False)
    assert all(p.grad is not None for p in trained)
    engine.train_step(model, images, labels, criterion, optimizer, scaler, accum_iter=2, update=True)
    # released, not zero-filled: the next backward writes fresh gradients
    assert all(p.grad is None for p in trained)


def test_gradient_accumulation_equals_a_larger_batch(data_path, tmp_path):
    # linear projections: no BatchNorm, whose batch statistics depend on the batch split
    config = tiny_config(data_path, str(tmp_path), {
        'MODEL.QKV_PROJ_METHOD': ['linear'] * 3, 'TRAIN.GRAD_CLIP': 1.0})
    images, labels = _first_batch(config, 8)
    criterion = losses.build_criterion(config, mixup_active=False)
    results = []
    for accum in (1, 2):
        paddle.seed(1)
        model = cvt.build_cvt(config)
        model.train()
        optimizer = engine.build_optimizer(config, model, 1e-3)
        scaler = paddle.amp.GradScaler(enable=False)
        size = 8 // accum
        for k in range(accum):
            engine.train_step(model, images[k * size:(k + 1) * size], labels[k * size:(k + 1) * size],
                              criterion, optimizer, scaler, accum_iter=accum, update=k == accum - 1)
        results.append(weights(model))
    paddle.seed(1)
    start = weights(cvt.build_cvt(config))
    assert max_difference(start, results[0]) > 1e-4  # the step changed the weights
    assert max_difference(results[0], results[1]) < 1e-5


def test_resume_after_a_stop_repeats_a_straight_run(data_path, tmp_path):
    changes = {'TRAIN.MODEL_EMA': True, 'TRAIN.MODEL_EMA_DECAY': 0.9,
               'MODEL.DROP_PATH_RATE': [0.0, 0.0, 0.2], 'TRAIN.MIXUP_PROB': 1.0}
    straight = engine.run(tiny_config(data_path, str(tmp_path / 'straight'), changes))
    first_epoch = glob.glob(str(tmp_path / 'straight' / 'CvT-Epoch-1-*[0-9].pdparams'))
    assert len(first_epoch) == 1
    resumed = engine.run(tiny_config(data_path, str(tmp_path / 'resumed'), {
        **changes, 'MODEL.RESUME': first_epoch[0][:-len('.pdparams')]}))
    assert os.path.basename(resumed['checkpoint']) == os.path.basename(straight['checkpoint'])
    for suffix in ('.pdparams', '-EMA.pdparams'):
        a = paddle.load(straight['checkpoint'].replace('.pdparams', suffix))
        b = paddle.load(resumed['checkpoint'].replace('.pdparams', suffix))
        assert max_difference({k: v.numpy() for k, v in a.items()}, {k: v.numpy() for k, v in b.items()}) < 1e-5
    assert resumed['val'].pop('unreadable') == straight['val'].pop('unreadable') == []
    assert resumed['val'] == pytest.approx(straight['val'])
    log = (tmp_path / 'resumed' / 'log.txt').read_text()
    assert 'resumed from' in log and 'Epoch[001/002], Step' not in log


def test_amp_flag_on_cpu_trains_in_float32_and_says_so_once(data_path, tmp_path):
    result = engine.run(tiny_config(data_path, str(tmp_path), {'AMP': True, 'TRAIN.NUM_EPOCHS': 1}))
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('trains in float32') == 1
    assert math.isfinite(result['train_loss'])
    state = paddle.load(result['checkpoint'].replace('.pdparams', '.pdopt'))
    assert {'optimizer', 'lr_schedule', 'scaler', 'epoch'} <= set(state) and state['epoch'] == 1


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_checkpoints(data_path, tmp_path, monkeypatch):
    calls = []
    build_criterion = losses.build_criterion

    def failing_criterion(config, mixup_active):
        real = build_criterion(config, mixup_active)

        def criterion(logits, targets):
            calls.append(1)
            loss = real(logits, targets)
            return loss * float('nan') if len(calls) == 5 + 3 else loss  # epoch 2, step 3
        return criterion

    monkeypatch.setattr(losses, 'build_criterion', failing_criterion)
    with pytest.raises(NonFiniteLossError, match=r'epoch 2, steps 3-4/5'):  # read back every 2 steps
        engine.run(tiny_config(data_path, str(tmp_path)))
    assert len(glob.glob(str(tmp_path / 'CvT-Epoch-1-*.pdparams'))) == 1
    assert not glob.glob(str(tmp_path / 'CvT-Epoch-2-*'))


@pytest.mark.parametrize('changes, message', [
    ({'DATA.DATA_PATH': '/no/such/folder'}, r'-data_path /no/such/folder: folder not found'),
    ({'MODEL.PRETRAINED': '/no/such/weights'}, r'-pretrained: weights file not found'),
    ({'MODEL.RESUME': '/no/such/checkpoint'}, r'-resume: weights file not found'),
    ({'EVAL': True}, r'-eval needs the weights to evaluate'),
    ({'TRAIN.ACCUM_ITER': 6}, r'smaller than one optimizer step'),
    ({'TRAIN.DISTILLATION_TYPE': 'soft'}, r'needs TRAIN.TEACHER_CFG and TRAIN.TEACHER_PRETRAINED'),
    ({'TRAIN.DISTILLATION_TYPE': 'hard', 'TRAIN.TEACHER_CFG': '/no/teacher.yaml',
      'TRAIN.TEACHER_PRETRAINED': '/no/teacher'}, r'TEACHER_CFG /no/teacher.yaml: config file not found'),
])
def test_bad_inputs_fail_before_training_with_a_clear_message(data_path, tmp_path, changes, message):
    with pytest.raises(UsageError, match=message):
        engine.run(tiny_config(data_path, str(tmp_path), changes))
    log = tmp_path / 'log.txt'
    assert not log.exists() or 'Step[' not in log.read_text()


def test_pretrained_weights_of_another_model_are_refused_listing_keys(data_path, tmp_path):
    other = tiny_config(data_path, str(tmp_path), {'MODEL.DEPTH': [1, 1, 2]})
    path = str(tmp_path / 'other.pdparams')
    paddle.save(cvt.build_cvt(other).state_dict(), path)
    with pytest.raises(UsageError, match=r'unexpected: stages\.2\.blocks\.1\.'):
        engine.run(tiny_config(data_path, str(tmp_path), {'EVAL': True, 'MODEL.PRETRAINED': path}))


def test_paddlevit_optimizer_file_resumes_with_last_epoch(data_path, tmp_path):
    config = tiny_config(data_path, str(tmp_path / 'first'), {'TRAIN.NUM_EPOCHS': 1})
    checkpoint = engine.run(config)['checkpoint']
    prefix = str(tmp_path / 'paddlevit')
    paddle.save(paddle.load(checkpoint), prefix + '.pdparams')
    model = cvt.build_cvt(config)
    optimizer = engine.build_optimizer(config, model, 1e-3)
    images, labels = _first_batch(config, 8)
    engine.train_step(model, images, labels, losses.build_criterion(config, False), optimizer,
                      paddle.amp.GradScaler(enable=False))
    paddle.save(optimizer.state_dict(), prefix + '.pdopt')  # PaddleViT's .pdopt: the optimizer alone
    with pytest.raises(UsageError, match='give the epoch it ended with -last_epoch'):
        engine.run(tiny_config(data_path, str(tmp_path / 'second'), {'MODEL.RESUME': prefix}))
    result = engine.run(tiny_config(data_path, str(tmp_path / 'third'),
                                    {'MODEL.RESUME': prefix, 'TRAIN.LAST_EPOCH': 1}))
    assert os.path.basename(result['checkpoint']).startswith('CvT-Epoch-2-')
    log = (tmp_path / 'third' / 'log.txt').read_text()
    assert 'Epoch[001/002], Step' not in log and "AdamW's moments restart" in log


def test_distillation_adds_the_frozen_teachers_soft_targets_to_the_loss(data_path, tmp_path):
    teacher_cfg = write_tiny_yaml(str(tmp_path / 'teacher.yaml'), data_path, str(tmp_path),
                                  {'MODEL.DEPTH': [1, 1, 2]})
    teacher_weights = str(tmp_path / 'teacher.pdparams')
    source = cvt.build_cvt(get_config(teacher_cfg))
    paddle.save(source.state_dict(), teacher_weights)
    alpha, tau = 0.3, 2.0
    config = tiny_config(data_path, str(tmp_path), {
        'TRAIN.DISTILLATION_TYPE': 'soft', 'TRAIN.DISTILLATION_ALPHA': alpha, 'TRAIN.DISTILLATION_TAU': tau,
        'TRAIN.TEACHER_CFG': teacher_cfg, 'TRAIN.TEACHER_PRETRAINED': teacher_weights[:-len('.pdparams')]})
    model = cvt.build_cvt(config)
    trainer = engine.build_trainer(config, model, None, 1, 1, get_logger(None))
    assert isinstance(trainer.criterion, losses.DistillationLoss)
    teacher = trainer.criterion.teacher_model
    assert all(p.stop_gradient for p in teacher.parameters())
    images, labels = _first_batch(config, 4)
    model.train()
    loss, logits = engine.train_step(model, images, labels, trainer.criterion, trainer.optimizer, trainer.scaler)

    source.eval()
    log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    teacher_log = log_softmax(source(images).numpy() / tau)
    student_log = log_softmax(logits.numpy() / tau)
    kl = (np.exp(teacher_log) * (teacher_log - student_log)).mean() * tau * tau
    base = float(losses.build_criterion(config, False)(logits, labels))
    assert float(loss) == pytest.approx((1 - alpha) * base + alpha * kl, rel=1e-4)
    # the teacher did not train
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(teacher.state_dict()[key].numpy(), value.numpy())


HOST_READS = ('numpy', 'item', 'tolist', '__float__', '__int__', '__bool__', '__index__', '__array__')


@pytest.mark.parametrize('changes', [{}, {'TRAIN.ACCUM_ITER': 2, 'TRAIN.MODEL_EMA': True,
                                          'TRAIN.MIXUP_PROB': 1.0, 'TRAIN.GRAD_CLIP': 1.0}])
def test_a_training_step_reads_nothing_back_between_read_backs(data_path, tmp_path, monkeypatch, changes):
    """Every read of a tensor's value on the host (a device-to-host copy and a wait on a GPU)
    during an epoch of 4 optimizer steps read back every 2: none inside the steps."""
    config = tiny_config(data_path, str(tmp_path), {'REPORT_FREQ': 2, **changes})
    train_set = datasets.get_dataset(config, 'train')
    loader = datasets.get_dataloader(config, train_set, 'train', multi_process=False)
    model = cvt.build_cvt(config)
    mixup = mixup_lib.build_mixup(config, train_set.num_classes)
    steps = len(loader) // config.TRAIN.ACCUM_ITER
    trainer = engine.build_trainer(config, model, mixup, steps, 1, logging.getLogger('quiet'))
    datasets.set_epoch(loader, 1)
    events = []
    for name in HOST_READS:
        original = getattr(paddle.Tensor, name, None)
        if original is not None:
            monkeypatch.setattr(paddle.Tensor, name, lambda self, *a, _original=original, _name=name, **k: (
                events.append(_name), _original(self, *a, **k))[1])
    read_back = engine.StepSums.read
    monkeypatch.setattr(engine.StepSums, 'read', lambda self, *a: (events.append('READ BACK'), read_back(self, *a))[1])
    progress = trainer.reporter.progress
    monkeypatch.setattr(trainer.reporter, 'progress', lambda *a: (events.append('step'), progress(*a))[1])
    engine.train_one_epoch(trainer, loader, 1)
    assert events.count('step') == steps * config.TRAIN.ACCUM_ITER
    # read back after optimizer steps 2, 4, ... and the last; each read back is one host read
    assert events.count('READ BACK') == steps // 2 + steps % 2
    stray = [i for i, event in enumerate(events) if event in HOST_READS and events[i - 1] != 'READ BACK']
    assert stray == [], events


@pytest.mark.parametrize('dtype, capability, expected', [
    ('auto', (7, 0), 'float16'),   # V100
    ('auto', (7, 5), 'float16'),   # T4
    ('auto', (8, 0), 'bfloat16'),  # A100
    ('auto', (9, 0), 'bfloat16'),  # H100
    ('float16', (9, 0), 'float16'),
    ('bfloat16', (8, 6), 'bfloat16'),
])
def test_amp_dtype_follows_the_gpu(dtype, capability, expected):
    config = get_config(opts=['AMP', 'True', 'AMP_DTYPE', dtype])
    assert engine.amp_dtype(config, capability=capability) == expected
    assert engine.amp_dtype(get_config(opts=['AMP_DTYPE', dtype]), capability=capability) is None


def test_a_collapsed_float16_loss_scale_stops_the_run(data_path, tmp_path):
    config = tiny_config(data_path, str(tmp_path))
    scaler = type('Float16Scaler', (), {'is_enable': lambda self: True})()  # Paddle enables none on a CPU
    trainer = type('Trainer', (), {'config': config, 'scaler': scaler})()
    healthy = {'loss_sum': 3.0, 'images': 2, 'scale': 1024.0, 'skipped': 3}
    engine._check_window(trainer, healthy, 1, 0, 2, 5)
    for window in ({**healthy, 'scale': 0.5}, {**healthy, 'skipped': engine.MAX_SKIPPED_STEPS}):
        with pytest.raises(NonFiniteLossError, match='float16 overflows every step: the loss scale is'):
            engine._check_window(trainer, window, 1, 0, 2, 5)


def test_step_sums_count_the_run_of_skipped_float16_updates_and_read_the_scale_on_the_device():
    """The float16 scaler's state as Paddle keeps it on the device (paddle_internals:
    `_found_inf`, `_scale`), stood in on the CPU, where Paddle enables no scaler."""
    scaler = type('Float16Scaler', (), {'is_enable': lambda self: True})()
    scaler._scale = paddle.to_tensor([2048.0])
    trainer = type('Trainer', (), {'scaler': scaler, 'world_size': 1})()
    sums = engine.StepSums()
    for overflowed in (True, True, False, True, True, True):
        scaler._found_inf = paddle.to_tensor(overflowed)
        sums.add(paddle.to_tensor(2.0), paddle.to_tensor([[0.1, 0.9]]), paddle.to_tensor([1]),
                 paddle.to_tensor([-1]))
        sums.after_update(scaler)
    read = sums.read(trainer, stop_code=0)
    assert read['skipped'] == 3 and read['scale'] == 2048.0  # the run since the last good update
    assert read['images'] == 6 and read['loss_sum'] == 12.0 and read['correct'] == 6
