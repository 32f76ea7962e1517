"""Row-wise kernels, the warm-up: softmax and RMSNorm over the last dimension, one program per row.

A Triton program works on a *block*: a power-of-two-sized vector of offsets (`tl.arange`). A row of any width
is covered by masking the offsets past its end (`mask=cols < n_cols`), loading a neutral value there
(-inf for a max, 0 for a sum).

Ladder (each step a separate kernel, so that `diff` shows one idea at a time):
  softmax_v1: the whole row in one block (BLOCK >= n_cols): load once, max, exp, sum, divide, store;
  softmax_v2: rows wider than a block: loop over blocks of the row with an *online* max and sum (the running
              sum is rescaled by exp(m_old - m_new) when the max grows), then a second loop writes the result.
              The same trick is the heart of flash attention (`dskernels.flash_attention`).
  rmsnorm:    one block per row, y = x / sqrt(mean(x^2) + eps) * weight, statistics in float32 (`refimpl.norm`).
"""

import torch
import triton
import triton.language as tl

from dskernels._checks import check_kernel_input, check_like
from refimpl.checks import check_number
from refimpl.norm import rms_norm


# ---------------------------------------------------------------------------------------------------- softmax
@triton.jit
def softmax_v1_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    """Program r: row r of x [rows, n_cols] (contiguous), all in one block of BLOCK >= n_cols."""
    row = tl.program_id(0).to(tl.int64)  # row * n_cols passes 2^31 (65,536 tokens x a 129,280 vocabulary)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)  # subtract the max: exp never overflows, the result is unchanged
    numerator = tl.exp(x)  # exp(-inf) = 0 past the row's end
    y = numerator / tl.sum(numerator, axis=0)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_v2_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    """Program r: row r, read in blocks of BLOCK: pass 1 keeps a running max m and sum s, pass 2 writes."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * n_cols may pass 2^31
    m = float("-inf")  # the max so far
    s = 0.0  # sum of exp(x - m) so far
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every value so far is -inf, m_new is -inf and x - m_new would be -inf - -inf = NaN: shift by 0
        # instead (exp(-inf - 0) = 0, the sum stays 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)  # rescale the old sum to the new max
        m = m_new
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.exp(x - m) / s
        tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


SOFTMAX_STEPS = ("v1", "v2")
MAX_BLOCK = 65536  # the widest block a program holds (256 KiB of float32 values spread over its registers)


def num_warps(block: int) -> int:
    """Warps per program for a block of `block` columns: 4, 8 from 2048, 16 from 8192 (the rule of Triton's
    earlier fused-softmax tutorial, which went to 16 from 4096), so that a wide row is spread over more
    threads instead of spilling registers."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def softmax(x: torch.Tensor, step: str = "v2", block: int | None = None) -> torch.Tensor:
    """softmax over the last dimension: x [..., n] float16/float32 (bfloat16 on a GPU) -> same shape and dtype.

    Computed in float32; a row of -inf only gives NaN, as PyTorch. step: "v1" (one block per row, BLOCK = next
    power of two >= n, n <= 65536) or "v2" (blocks of `block` columns, a power of two <= 65536, default
    min(that, 1024), online max and sum; any n). Raises TypeError/ValueError naming the bad argument.
    """
    check_kernel_input("x", x, None)
    if step not in SOFTMAX_STEPS:
        raise ValueError(f"step: expected one of {SOFTMAX_STEPS}, got {step!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1
                              or block & (block - 1) or block > MAX_BLOCK):
        raise ValueError(f"block: expected a power of two from 1 to {MAX_BLOCK} (tl.arange's length), got {block!r}")
    n_cols = x.shape[-1]
    whole_row = triton.next_power_of_2(n_cols)
    if step == "v1" and whole_row > MAX_BLOCK:
        raise ValueError(f"x: step v1 holds a row in one block of at most {MAX_BLOCK} columns, got {n_cols}; "
                         f"use step v2")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    rows = x.numel() // n_cols
    if step == "v1":
        softmax_v1_kernel[(rows,)](x, y, n_cols, BLOCK=whole_row, num_warps=num_warps(whole_row))
    else:
        block = block or min(whole_row, 1024)
        softmax_v2_kernel[(rows,)](x, y, n_cols, BLOCK=block, num_warps=num_warps(block))
    return y


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's softmax in float32, cast back to x's dtype (what the kernels compute)."""
    return x.float().softmax(dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """Program r: row r of x [rows, n_cols]; y = x * rsqrt(mean(x^2) + eps), cast to x's dtype, times weight."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * n_cols may pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)  # zeros add nothing to x^2
    mean_square = tl.sum(x * x, axis=0) / n_cols
    x_normed = (x * tl.math.rsqrt(mean_square + eps)).to(y_ptr.dtype.element_ty)  # cast as refimpl does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * n_cols + cols, (w * x_normed).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (`refimpl.norm.rms_norm`): x [..., dim], weight [dim] of x's dtype -> [..., dim].

    One program per row, the row in one block (dim up to 65536). Raises TypeError/ValueError for bad input.
    """
    check_kernel_input("x", x, None)
    check_like("weight", weight, x, "x", (x.shape[-1],))
    check_number("eps", eps)
    n_cols = x.shape[-1]
    if n_cols > MAX_BLOCK:
        raise ValueError(f"x: expected a last dimension of at most {MAX_BLOCK} (one block per row), got {n_cols}")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block = triton.next_power_of_2(n_cols)
    rmsnorm_kernel[(x.numel() // n_cols,)](x, weight, y, n_cols, eps, BLOCK=block, num_warps=num_warps(block))
    return y


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`refimpl.norm.rms_norm`."""
    return rms_norm(x, weight, eps)
