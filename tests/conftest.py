"""Test set-up: flat imports from the repository root, seeded, quiet."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runtime  # noqa: E402
runtime.configure()  # before paddle, as the entry points do
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    paddle.seed(0)
    np.random.seed(0)
    yield


def runnable_kernel_builds():
    """The CPU kernel builds this machine runs (an AVX-512 CPU runs the AVX2 build too)."""
    from fast import build
    return {'avx512': ['avx512', 'avx2'], 'avx2': ['avx2']}.get(build.native_isa(), [])


def switch_kernel_build(monkeypatch, isa: str) -> None:
    """Load the CPU kernels' `isa` build for one test (monkeypatch restores the default)."""
    from fast import build
    monkeypatch.setenv('CVT_CPU_ISA', isa)
    for name, value in (('_load_attempted', False), ('_library', None), ('_isa', None)):
        monkeypatch.setattr(build, name, value)
    if build.load() is None:
        pytest.skip(f'the {isa} build of the CPU kernels cannot be built here (no C compiler?)')
    assert build.isa() == isa


@pytest.fixture(params=runnable_kernel_builds() or ['none'])
def kernel_build(request, monkeypatch):
    """Each CPU kernel build this machine runs, in turn."""
    if request.param == 'none':
        pytest.skip('no CPU kernel build for this CPU (neither AVX2 nor AVX-512)')
    switch_kernel_build(monkeypatch, request.param)
    return request.param
