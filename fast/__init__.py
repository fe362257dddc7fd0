"""The speed layers of CvT: the model of cvt.py, computed faster (docs/speed.md).

`cvt.build_cvt(config)` builds them where MODEL.LAYERS is `fast` (the default);
`convert` turns a built model's layers from one family into the other, in place,
keeping its weights, its mode and its hooks:

    import fast
    fast.convert(model, 'plain')    # every layer as cvt.py writes it
    fast.convert(model, 'fast')

    layers.py     the fast layer classes: subclasses of cvt.py's, overriding `forward`
    kernels.py    the threaded C kernels as differentiable Paddle ops
    build.py      compiling, caching and loading the kernels' library
    csrc/         the kernels' C source

Importing this package changes nothing process-wide and builds nothing: the kernels
are compiled (once per machine, cached) when a fast layer first runs on the CPU.
"""

import paddle.nn as nn

import cvt
from config import LAYERS
from fast.layers import (FastAttention, FastBlock, FastConvEmbed, FastConvolutionalVisionTransformer,
                         FastLayerNorm, FastMlp, FastVisionTransformer, kernel_isa)

# each plain layer of cvt.py and its fast subclass
FAST_CLASS = {
    cvt.ConvolutionalVisionTransformer: FastConvolutionalVisionTransformer,
    cvt.VisionTransformer: FastVisionTransformer,
    cvt.ConvEmbed: FastConvEmbed,
    cvt.Block: FastBlock,
    cvt.Attention: FastAttention,
    cvt.Mlp: FastMlp,
    nn.LayerNorm: FastLayerNorm,
}
PLAIN_CLASS = {fast: plain for plain, fast in FAST_CLASS.items()}


def convert(model: nn.Layer, layers: str) -> nn.Layer:
    """`model` with the CvT layers in it (the model itself, a backbone holding one, ...) of
    the family `layers` names: `fast` or `plain`. In place: the layers keep their
    parameters and buffers (so an optimizer built on them goes on), their mode and their
    hooks; the state dict is unchanged. Layers of other classes (a LoRA wrapper, a
    subclass of your own) are left as they are. Returns `model`."""
    if layers not in LAYERS:
        raise ValueError(f'layers {layers!r}: expected one of {", ".join(LAYERS)}')
    table = FAST_CLASS if layers == 'fast' else PLAIN_CLASS
    for layer in _cvt_layers(model):
        layer.__class__ = table.get(type(layer), type(layer))
        # the LayerNorms of CvT's layers: a block's two, the embedding's, the final one
        for norm in layer.children():
            if type(norm) in (nn.LayerNorm, FastLayerNorm):
                norm.__class__ = table.get(type(norm), type(norm))
    return model


def describe(model: nn.Layer) -> str:
    """The layers `model` runs, in words: 'plain', or 'fast' with the CPU kernels' build
    ('fast, CPU kernels avx2'; 'none' where they do not run)."""
    families = {'fast' if type(layer) in PLAIN_CLASS else 'plain' for layer in _cvt_layers(model)}
    if families == {'fast'}:
        return f'fast, CPU kernels {kernel_isa() or "none"}'
    return 'plain' if families == {'plain'} else 'fast and plain'


def _cvt_layers(model: nn.Layer):
    """The CvT layers in `model`, of either family (LayerNorms aside: they are nn.LayerNorm)."""
    return [layer for layer in model.sublayers(include_self=True)
            if type(layer) not in (nn.LayerNorm, FastLayerNorm) and (type(layer) in FAST_CLASS
                                                                    or type(layer) in PLAIN_CLASS)]
