"""Test set-up: flat imports from the repository root, seeded, quiet."""

import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runtime  # noqa: E402,F401  (before paddle)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402

warnings.filterwarnings('ignore', message='No ccache found')


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    paddle.seed(0)
    np.random.seed(0)
    yield
