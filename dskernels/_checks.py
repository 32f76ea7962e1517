"""Input checks every kernel's `forward` runs before launching: a kernel reads raw pointers, so a wrong shape,
dtype, stride or device gives garbage or a crash instead of an error. Each failure names the argument."""

import os

import torch

from refimpl.checks import check_shape, check_tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1, set on CPU machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_input(name: str, x, shape: tuple | None, dtypes: tuple = FLOAT_DTYPES) -> None:
    """x: a tensor of `shape` (None in it = any size; shape None: any shape with at least one dimension), one
    of `dtypes`, contiguous, on a device Triton can run on: a CUDA GPU, or the CPU under the interpreter.
    bfloat16 is refused under the interpreter, which computes garbage in it (values kept as raw 16-bit
    integers; see the shared notes on Triton on CPU)."""
    if shape is None:
        check_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name}: expected at least one dimension, got a 0-d tensor")
    else:
        check_shape(name, x, shape)
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")
    if x.dtype == torch.bfloat16 and interpreting():
        raise TypeError(f"{name}: bfloat16 needs a GPU: Triton's interpreter (TRITON_INTERPRET=1) computes "
                        f"garbage in bfloat16; use float16 or float32 on the CPU")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {x.stride()}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                         f"got device {x.device}")


def check_like(name: str, x, like: torch.Tensor, like_name: str, shape: tuple) -> None:
    """x: of `shape`, with the dtype and device of `like`, contiguous."""
    check_kernel_input(name, x, shape, dtypes=(like.dtype,))
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of {like_name}), got {x.device}")


def tolerance(dtype: torch.dtype, n: int = 1, scale: float = 1.0) -> float:
    """Absolute and relative tolerance for comparing a kernel with its reference: 4 * eps(dtype) * sqrt(n) * scale.

    eps is the dtype's machine epsilon (2^-23 float32, 2^-10 float16, 2^-7 bfloat16); n is the length of the
    longest sum behind an output (rounding errors of n terms add up like a random walk: sqrt(n) ulps); the 4
    covers the two sides each rounding (kernel and reference round at different places, e.g. the reference
    casts probabilities to float16 before multiplying by V, the kernel keeps them in float32) and two rounding
    steps each. `scale` is the size of the values summed, when not about 1.
    """
    return 4 * torch.finfo(dtype).eps * max(n, 1) ** 0.5 * scale
