"""The `kernels` fixture of the kernel tests (see _interpreter.py for how they run)."""

import pytest
from _interpreter import load_kernels


@pytest.fixture
def kernels():
    return load_kernels()
