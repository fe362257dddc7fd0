"""The number formats a deployed CvT runs in (fp32, bf16, int8), which of them this CPU
computes natively, and the line that says what a run computes in.

A format is native where the CPU has dot-product instructions for it, which is
what makes it faster than float32:

    bf16   AVX512_BF16 or AMX-BF16 (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on)
    int8   AVX512_VNNI, AVX_VNNI or AMX-INT8 (Intel Cascade Lake and Alder Lake on, AMD Zen 4 on)

AVX2 alone multiplies int8 only through a three-instruction sequence that
saturates at 16 bits (vpmaddubsw, vpmaddwd, vpaddd); OpenVINO runs int8 there,
but CvT-13's int8 model ran slower than its fp32 one on such a CPU
(docs/deploy.md), so int8 without VNNI or AMX does not count as native. Where
the asked format is not native the run says so in one line and computes in
fp32; ``-force_precision`` runs the asked format anyway where the runtime can
(to measure the accuracy of a model meant for another CPU, not for speed).

Whether a runtime has a format at all is checked before any work: ONNX Runtime
has no bfloat16 kernels for x86 CPUs, and Paddle Inference has no int8 path
for the programs Paddle 3 exports (`UNSUPPORTED`).
"""

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import FrozenSet, Optional

import runtime

PRECISIONS = ('fp32', 'bf16', 'int8')
# the CPU flags (as /proc/cpuinfo names them) that make a format native
NATIVE_FLAGS = {'bf16': ('avx512_bf16', 'amx_bf16'), 'int8': ('avx512_vnni', 'avx_vnni', 'amx_int8')}
# the instruction sets the first line of a run names, present or absent
ISA_NAMES = (('avx2', 'AVX2'), ('fma', 'FMA'), ('avx512f', 'AVX-512'), ('avx512_vnni', 'AVX512_VNNI'),
             ('avx_vnni', 'AVX_VNNI'), ('avx512_bf16', 'AVX512_BF16'), ('amx_bf16', 'AMX-BF16'),
             ('amx_int8', 'AMX-INT8'))
RUNTIME_NAMES = {'openvino': 'OpenVINO', 'onnxruntime': 'ONNX Runtime', 'paddle': 'Paddle Inference'}
# a runtime without a format on any CPU, and why (an error before any work)
UNSUPPORTED = {
    ('onnxruntime', 'bf16'): 'ONNX Runtime has no bfloat16 kernels for x86 CPUs; '
                             'run the .onnx file in OpenVINO (-backend openvino)',
    ('paddle', 'int8'): 'Paddle Inference runs int8 only from a program quantised by PaddleSlim or '
                        'paddle.static.quantization, which read Paddle 2 programs, not the PIR programs Paddle 3 '
                        'exports (whose oneDNN passes have no int8 kernels either); quantise the .onnx export '
                        '(tools/quantize.py) and run it in OpenVINO',
}


def native_instructions(precision: str) -> str:
    """The instruction sets that make `precision` native, in words: 'AVX512_BF16 or AMX-BF16'."""
    names = [dict(ISA_NAMES)[flag] for flag in NATIVE_FLAGS[precision]]
    return f'{", ".join(names[:-1])} or {names[-1]}'


def native_formats(flags: FrozenSet[str]) -> FrozenSet[str]:
    """The formats a CPU with these /proc/cpuinfo flags computes natively (fp32 always)."""
    return frozenset({'fp32'} | {fmt for fmt, needed in NATIVE_FLAGS.items() if flags & set(needed)})


def isa_summary(flags: FrozenSet[str]) -> str:
    """The instruction sets that matter here, those present and those absent:
    'AVX2 FMA; no AVX-512, AVX512_VNNI, ...'."""
    present = [name for flag, name in ISA_NAMES if flag in flags]
    absent = [name for flag, name in ISA_NAMES if flag not in flags]
    return ' '.join(present or ['none of AVX2, AVX-512']) + (f'; no {", ".join(absent)}' if absent else '')


@functools.lru_cache(maxsize=None)
def openvino_core() -> 'openvino.Core':
    """The process's one OpenVINO Core, kept for its life. OpenVINO's CPU plugin gives
    the calling thread a signal stack while it lives and hands it back when it ends;
    with two Cores ending out of order the thread is left with a freed one, and the
    next Python signal handler (Ctrl-C, SIGCHLD) crashes the process."""
    import openvino
    return openvino.Core()


def runtime_formats(backend: str) -> FrozenSet[str]:
    """The formats `backend` computes at all on this CPU, native or not (OpenVINO says
    so in its CPU device's OPTIMIZATION_CAPABILITIES; Paddle's oneDNN bf16 needs
    AVX-512, which it emulates bf16 on)."""
    if backend == 'openvino':
        try:
            core = openvino_core()
        except ImportError:  # the runner stops with the install hint
            return frozenset({'fp32'})
        capabilities = core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
        return frozenset({'fp32'} | {fmt for fmt in ('bf16', 'int8') if fmt.upper() in capabilities})
    if backend == 'paddle':
        import paddle
        return frozenset({'fp32'} | ({'bf16'} if paddle.base.core.supports_bfloat16() else set()))
    return frozenset({'fp32', 'int8'})  # onnxruntime


def unsupported(precision: str, backend: str) -> Optional[str]:
    """Why `backend` cannot run `precision` on any CPU, or None."""
    return UNSUPPORTED.get((backend, precision))


@dataclass(frozen=True)
class Choice:
    """The precision asked for, the one run, and why they differ (None when they do not)."""
    asked: str
    run: str
    reason: Optional[str] = None


def choose(asked: str, backend: str, force: bool = False) -> Choice:
    """What a run asked for `asked` on `backend` computes in on this CPU: `asked` where the
    CPU has it natively (or `force`) and the runtime has it here, else fp32 with the reason."""
    if asked == 'fp32':
        return Choice(asked, asked)
    flags = runtime.cpu_info()[1]
    if asked not in native_formats(flags) and not force:
        return Choice(asked, 'fp32', f'this CPU has no native {asked}: no {native_instructions(asked)}')
    if asked not in runtime_formats(backend):
        return Choice(asked, 'fp32', f'{RUNTIME_NAMES[backend]} has no {asked} kernels for this CPU')
    return Choice(asked, asked)


def runtime_version(backend: str) -> str:
    if backend == 'paddle':
        import paddle
        return paddle.__version__
    return importlib.metadata.version(backend)


def first_line(choice: Choice, backend: str) -> str:
    """The line a run starts with: the precision it computes in (and why, where that is
    not the one asked), the runtime, the CPU and its instruction sets."""
    precision = choice.run if choice.reason is None else f'{choice.run} ({choice.asked} asked: {choice.reason})'
    model = runtime.cpu_model()[1]
    return (f'precision {precision} | {RUNTIME_NAMES[backend]} {runtime_version(backend)} | '
            f'CPU {model}: {isa_summary(runtime.cpu_info()[1])}')
