"""Repository-wide pytest setup.

Triton decides between compiled and interpreted kernels when a kernel is *defined*, so the interpreter switch
must be set before any kernel module is imported, and before nbval starts notebook kernels (they inherit it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests make every tensor they pass to a kernel on: the GPU when there is one (kernels
    compiled), else the CPU (kernels under Triton's interpreter). Tests write `device=device` on each factory
    (or `.to(device)`), which `tests/test_device_lint.py` checks statically."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
