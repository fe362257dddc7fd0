"""Each CPU kernel of each build against Paddle's own op, on CvT-13's shapes (batch 16, 224).

    python benchmarks/kernels.py                    # every build this CPU runs, all cores
    python benchmarks/kernels.py -builds avx2 -threads 1 -repeats 21
    python benchmarks/kernels.py -kernels transpose softmax

A development benchmark. For every kernel of fast/kernels.py it times the forward
alone (inference) and forward + backward (training) of the kernel and of the
Paddle op it replaces, alternately, and prints the medians and Paddle's time over
the kernel's (above 1: the kernel is faster). The fast layers use every kernel
wherever the library is built, so a kernel slower than Paddle's op on a new kind of
machine is for the kernel to fix (docs/speed-experiments.md has the figures).
"""

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402

runtime.configure()  # before paddle: threads, MKL's code path, allocator
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from fast import build, kernels  # noqa: E402
from utils import fail, int_at_least, thread_count  # noqa: E402

Op = Callable[..., paddle.Tensor]
KERNELS = ('depthwise_conv', 'patch_conv', 'softmax', 'layer_norm', 'batch_norm', 'silu', 'bias', 'residual',
           'transpose')


def leaf(shape: Sequence[int], grad: bool = True) -> paddle.Tensor:
    t = paddle.randn(list(shape))
    t.stop_gradient = not grad
    return t


def tokens_to_map_with_paddle(x: paddle.Tensor, height: int, width: int, lead: int) -> paddle.Tensor:
    """What kernels.tokens_to_maps does, in Paddle's ops: split off the lead tokens, transpose, copy."""
    tokens = paddle.split(x, [lead, height * width], axis=1)[1] if lead else x
    return tokens.transpose([0, 2, 1]).reshape([0, tokens.shape[2], height, width]).contiguous()


def depthwise_case(maps: paddle.Tensor, stride: int) -> Tuple[str, str, Op, Op, List[paddle.Tensor]]:
    """A 3x3 depthwise convolution of `maps` (B, C, H, W) with padding 1."""
    channels = int(maps.shape[1])
    return ('depthwise_conv', f'3x3 s{stride}, ' + 'x'.join(str(int(n)) for n in maps.shape),
            lambda x, w: F.conv2d(x, w, stride=stride, padding=1, groups=channels),
            lambda x, w: kernels.depthwise_conv2d(x, w, None, stride, 1), [maps, leaf([channels, 1, 3, 3])])


def cases() -> List[Tuple[str, str, Op, Op, List[paddle.Tensor]]]:
    """(kernel, what, Paddle's op, the kernel, inputs) on CvT-13's largest shapes."""
    stage1 = leaf([16, 64, 56, 56])
    drop_factors = paddle.floor(0.9 + paddle.rand([16, 1, 1])) / 0.9  # DropPath's, drop_prob 0.1
    return [depthwise_case(maps, stride) for maps in (stage1, leaf([16, 384, 14, 14])) for stride in (1, 2)] + [
        ('patch_conv', '7x7 s4, 16x3x224x224 -> 64',
         lambda x, w, b: F.conv2d(x, w, b, stride=4, padding=2).flatten(2).transpose([0, 2, 1]),
         lambda x, w, b: kernels.patch_conv(x, w, b, 4, 2)[0],
         [paddle.randn([16, 3, 224, 224]), leaf([64, 3, 7, 7]), leaf([64])]),
        ('patch_conv', '3x3 s2, 16x192x28x28 -> 384',
         lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1).flatten(2).transpose([0, 2, 1]),
         lambda x, w, b: kernels.patch_conv(x, w, b, 2, 1)[0],
         [leaf([16, 192, 28, 28]), leaf([384, 192, 3, 3]), leaf([384])]),
        ('softmax', '16x1x3136x784',
         lambda x: F.softmax(x, axis=-1), kernels.softmax, [leaf([16, 1, 3136, 784])]),
        ('layer_norm', '16x3136x64',
         lambda x, w, b: F.layer_norm(x, [64], w, b, 1e-5),
         lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), [leaf([16, 3136, 64]), leaf([64]), leaf([64])]),
        ('layer_norm', '16x197x384',
         lambda x, w, b: F.layer_norm(x, [384], w, b, 1e-5),
         lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), [leaf([16, 197, 384]), leaf([384]), leaf([384])]),
        ('batch_norm', 'training, 16x64x56x56',
         lambda x, w, b: F.batch_norm(x, paddle.zeros([64]), paddle.ones([64]), w, b, training=True).flatten(2),
         lambda x, w, b: kernels.batch_norm(x, w, b, paddle.zeros([64]), paddle.ones([64]), 0.9, 1e-5),
         [stage1, leaf([64]), leaf([64])]),
        ('batch_norm', 'training + cls column, 16x384x7x7',
         lambda x, w, b, cls: paddle.concat(
             [cls, F.batch_norm(x, paddle.zeros([384]), paddle.ones([384]), w, b, training=True).flatten(2)], axis=2),
         lambda x, w, b, cls: kernels.batch_norm(x, w, b, paddle.zeros([384]), paddle.ones([384]), 0.9, 1e-5, cls),
         [leaf([16, 384, 7, 7]), leaf([384]), leaf([384]), leaf([16, 384, 1])]),
        ('silu', 'bias + silu 16x3136x256',
         lambda x, b: F.silu(x + b), kernels.bias_silu, [leaf([16, 3136, 256]), leaf([256])]),
        ('silu', 'bias + silu 16x197x1536',
         lambda x, b: F.silu(x + b), kernels.bias_silu, [leaf([16, 197, 1536]), leaf([1536])]),
        ('bias', 'linear 50176x64 -> 256',
         F.linear, kernels.linear, [leaf([16, 3136, 64]), leaf([64, 256]), leaf([256])]),
        ('bias', 'bias on 16x192x784 maps',
         lambda x, b: x + b.reshape([-1, 1]),
         lambda x, b: kernels.add_bias(x, b, axis=1), [leaf([16, 192, 784]), leaf([192])]),
        ('bias', 'bias on 16x197x384 tokens',
         lambda x, b: x + b,
         lambda x, b: kernels.add_bias(x, b), [leaf([16, 197, 384]), leaf([384])]),
        ('residual', 'x + branch, 16x3136x64',
         lambda x, y: x + y, kernels.residual_add, [leaf([16, 3136, 64]), leaf([16, 3136, 64])]),
        ('residual', 'x + drop_path(branch), 16x197x384',
         lambda x, y: x + y * drop_factors, lambda x, y: kernels.residual_add(x, y, drop_factors),
         [leaf([16, 197, 384]), leaf([16, 197, 384])]),
        ('transpose', 'tokens -> maps, 16x3136x64',
         lambda x: tokens_to_map_with_paddle(x, 56, 56, 0),
         lambda x: kernels.tokens_to_maps(x, 56, 56, 0)[0], [leaf([16, 3136, 64])]),
        ('transpose', 'cls split + tokens -> maps, 16x197x384',
         lambda x: tokens_to_map_with_paddle(x, 14, 14, 1),
         lambda x: kernels.tokens_to_maps(x, 14, 14, 1)[0], [leaf([16, 197, 384])]),
    ]


def timed(op: Op, inputs: List[paddle.Tensor], backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        out = op(*inputs)
        grads = paddle.grad(out, [t for t in inputs if not t.stop_gradient], paddle.ones_like(out))
        # Paddle 3 may hand back a strided view (a transpose's gradient); the layer before
        # needs it in memory order, so its copy is part of the op's cost
        [kernels._contiguous(grad) for grad in grads]
    else:
        with paddle.no_grad():
            op(*inputs)
    return time.perf_counter() - start


def median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def load_build(isa: str) -> None:
    """Load the `isa` build of the kernels in place of the one loaded."""
    os.environ['CVT_CPU_ISA'] = isa
    build._load_attempted, build._library, build._isa = False, None, None
    if build.load() is None or build.isa() != isa:
        fail(f'the {isa} build of the CPU kernels could not be loaded (see the warning above)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    runnable = {'avx512': ['avx512', 'avx2'], 'avx2': ['avx2']}.get(build.native_isa(), [])
    parser.add_argument('-builds', nargs='+', choices=('avx512', 'avx2'), default=runnable)
    parser.add_argument('-threads', type=thread_count, default=None,
                        help='kernel threads (default: all usable cores)')
    parser.add_argument('-repeats', type=int_at_least(1), default=11, help='alternating timings per op (median)')
    parser.add_argument('-kernels', nargs='+', choices=KERNELS, default=KERNELS,
                        help='only these kernels (default: all)')
    args = parser.parse_args()
    if not args.builds:
        fail('this CPU runs no kernel build (neither AVX2 nor AVX-512)')
    for isa in args.builds:
        if isa not in runnable:
            fail(f'-builds {isa}: this CPU ({build.native_isa() or "no AVX2"}) cannot run it')
    threads = args.threads or runtime.usable_cores()
    vendor, model = runtime.cpu_model()
    print(f'{model} ({vendor}), kernel threads {threads}, paddle {paddle.__version__}; '
          f'median of {args.repeats} alternating timings, ms')
    print(f'{"build":<7} {"kernel":<15} {"shape":<26} {"paddle fwd":>10} {"ours fwd":>9} {"x":>5} '
          f'{"paddle f+b":>10} {"ours f+b":>9} {"x":>5}')
    paddle.seed(0)
    table = [case for case in cases() if case[0] in args.kernels]
    for isa in args.builds:
        load_build(isa)
        build.load().cvt_set_threads(threads)
        for kernel, shape, reference, ours, inputs in table:
            row: Dict[str, float] = {}
            for backward in (False, True):
                for op in (reference, ours, reference, ours):  # warm-up
                    timed(op, inputs, backward)
                times = {'paddle': [], 'ours': []}
                for _ in range(args.repeats):
                    times['paddle'].append(timed(reference, inputs, backward))
                    times['ours'].append(timed(ours, inputs, backward))
                for side in times:
                    row[f'{side} {"f+b" if backward else "fwd"}'] = median(times[side]) * 1e3
            fwd = row['paddle fwd'] / row['ours fwd']
            both = row['paddle f+b'] / row['ours f+b']
            print(f'{isa:<7} {kernel:<15} {shape:<26} {row["paddle fwd"]:>10.2f} {row["ours fwd"]:>9.2f} '
                  f'{fwd:>5.2f} {row["paddle f+b"]:>10.2f} {row["ours f+b"]:>9.2f} {both:>5.2f}', flush=True)


if __name__ == '__main__':
    main()
