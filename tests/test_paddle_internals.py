"""The private Paddle attributes the project reads (paddle_internals.py) mean, on this Paddle, what they say."""

import numpy as np
import paddle
import paddle.nn as nn

import paddle_internals as internals


def test_conv_geometry_reads_the_constructor_arguments():
    conv = nn.Conv2D(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    g = internals.conv_geometry(conv)
    assert g.stride == (2, 1) and g.padding == ((1, 1), (2, 2)) and g.dilation == (1, 2)
    assert g.explicit_padding and g.channels_first and g.zero_padding
    g = internals.conv_geometry(nn.Conv2D(3, 3, 3, padding=[0, 1, 2, 3], padding_mode='zeros'))
    assert g.padding == ((0, 1), (2, 3)) and g.stride == (1, 1)
    assert not internals.conv_geometry(nn.Conv2D(3, 3, 3, padding=1, padding_mode='reflect')).zero_padding
    assert not internals.conv_geometry(nn.Conv2D(3, 3, 3, data_format='NHWC')).channels_first
    assert not internals.conv_geometry(nn.Conv2D(3, 3, 3, padding='SAME')).explicit_padding


def test_batch_norm_settings_and_statistics():
    norm = nn.BatchNorm2D(3, momentum=0.8, epsilon=1e-3)
    assert internals.batch_norm_settings(norm) == (0.8, 1e-3, True, True)
    assert not internals.batch_norm_settings(nn.BatchNorm2D(3, use_global_stats=True)).batch_statistics_in_training
    assert not internals.batch_norm_settings(nn.BatchNorm2D(3, data_format='NHWC')).channels_first
    mean, variance = internals.batch_norm_statistics(norm)
    norm.train()
    x = paddle.randn([4, 3, 5, 5]) * 2 + 1
    norm(x)
    batch_mean = x.numpy().mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean.numpy(), 0.2 * batch_mean, rtol=1e-5)  # the running mean, updated
    assert variance.numpy().shape == (3,)
    np.testing.assert_array_equal(norm.state_dict()['_mean'].numpy(), mean.numpy())  # its state-dict key


def test_layer_norm_epsilon():
    assert internals.layer_norm_epsilon(nn.LayerNorm(8, epsilon=1e-6)) == 1e-6


def test_forward_hooks_are_seen_until_removed():
    layer = nn.Linear(2, 2)
    assert not internals.has_forward_hooks(layer)
    for register in (layer.register_forward_pre_hook, layer.register_forward_post_hook):
        handle = register(lambda *args: None)
        assert internals.has_forward_hooks(layer)
        handle.remove()
        assert not internals.has_forward_hooks(layer)


def test_set_num_threads_runs():
    internals.set_num_threads(1)
    import runtime
    internals.set_num_threads(runtime.threads())


def test_autocast_dtype_is_what_auto_cast_set_and_none_outside():
    assert internals.autocast_dtype() is None
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count():
        for dtype in ('float16', 'bfloat16'):
            with paddle.amp.auto_cast(True, level='O1', dtype=dtype):
                assert internals.autocast_dtype() == dtype
        return
    # a CPU build enables no autocast: the tracer's state stood in as auto_cast sets it
    tracer = paddle.base.framework._dygraph_tracer()
    saved = tracer._amp_level, tracer._amp_dtype
    try:
        tracer._amp_level, tracer._amp_dtype = paddle.base.core.AmpLevel.O1, 'bfloat16'
        assert internals.autocast_dtype() == 'bfloat16'
    finally:
        tracer._amp_level, tracer._amp_dtype = saved
    assert internals.autocast_dtype() is None
