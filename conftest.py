"""Repository-wide pytest setup.

Triton decides between compiled and interpreted kernels when a kernel is *defined*, so the interpreter switch
must be set before any kernel module is imported, and before nbval starts notebook kernels (they inherit it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
