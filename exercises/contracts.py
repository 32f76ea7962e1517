"""The kernel exercises' fixed contracts: kernel name, parameters, constexprs, grid, and how the grader launches it.

A kernel exercise is graded on the learner's `@triton.jit` function alone: the grader reads its source from the
notebook (`exercises.static_check.kernel_source`), compiles it for a GPU target in a process of its own
(`exercises.kernel_compile`), then launches it from `launch` below, in a fresh sandbox (`exercises._child`,
kernel mode), on the test inputs. The learner's Python wrapper (`softmax_rows(x)`) is never called when graded.

This module is copied into the sandbox: it imports torch and triton only, never refimpl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelContract:
    kernel: str  # the @triton.jit function's name in the notebook
    params: tuple[str, ...]  # its parameters, in order
    constexprs: dict[str, int]  # the `tl.constexpr` parameters, with the values the GPU compile uses
    signature: dict[str, str]  # Triton types of the other parameters, for the GPU compile
    launch: Callable[..., torch.Tensor]  # (kernel, *question args) -> result; the grid and constexprs are here
    # where not empty: the only tile sizes the kernel may build (tl.arange(0, one of these), shapes made of
    # them), so that it must loop over what is longer than a tile (exercises.static_check.kernel_source)
    tiles: tuple[str, ...] = ()


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _launch_softmax(kernel, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, cols = x.shape
    kernel[(rows,)](x, out, cols, BLOCK=_next_power_of_2(cols))  # grid: one program per row
    return out


DECODE_BLOCK_T = 8  # positions per step of the decode kernel's loop over the cache


def _launch_decode(kernel, q_latent, q_pe, c_kv, k_pe, scale: float) -> torch.Tensor:
    q_latent, q_pe, c_kv, k_pe = (t.contiguous() for t in (q_latent, q_pe, c_kv, k_pe))
    batch, heads, rank = q_latent.shape
    out = torch.empty_like(q_latent)
    kernel[(batch * heads,)](q_latent, q_pe, c_kv, k_pe, out, c_kv.shape[1], heads, scale, R=rank,
                             DR=q_pe.shape[-1], BLOCK_T=DECODE_BLOCK_T)  # grid: one program per (batch, head)
    return out


FLASH_BLOCK_M = FLASH_BLOCK_N = 16  # the flash kernel's tiles under the interpreter (tl.dot needs 16 or more)


def _launch_flash(kernel, q, k, v, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [batch, heads, seq_q, d], k and v [batch, heads, seq_k, d] -> (o like q, lse [batch, heads, seq_q] float32),
    through [batch * heads, seq, d] contiguous tensors; grid (query blocks, batch * heads)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    q, k, v = (t.reshape(batch * heads, -1, head_dim).contiguous() for t in (q, k, v))
    o = torch.empty_like(q)
    lse = torch.empty(batch * heads, seq_q, dtype=torch.float32, device=q.device)
    grid = ((seq_q + FLASH_BLOCK_M - 1) // FLASH_BLOCK_M, batch * heads)
    kernel[grid](q, k, v, o, lse, seq_q, seq_k, head_dim ** -0.5, BLOCK_M=FLASH_BLOCK_M, BLOCK_N=FLASH_BLOCK_N,
                 HEAD_DIM=head_dim, IS_CAUSAL=bool(is_causal))
    return o.view(batch, heads, seq_q, head_dim), lse.view(batch, heads, seq_q)


CONTRACTS = {
    "softmax_rows": KernelContract(
        "softmax_kernel", ("x_ptr", "out_ptr", "n_cols", "BLOCK"), {"BLOCK": 128},
        {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32"}, _launch_softmax),
    "mla_decode_block": KernelContract(
        "mla_decode_kernel", ("q_latent_ptr", "q_pe_ptr", "c_kv_ptr", "k_pe_ptr", "out_ptr", "kv_len", "heads",
                              "scale", "R", "DR", "BLOCK_T"), {"R": 16, "DR": 8, "BLOCK_T": DECODE_BLOCK_T},
        {"q_latent_ptr": "*fp32", "q_pe_ptr": "*fp32", "c_kv_ptr": "*fp32", "k_pe_ptr": "*fp32",
         "out_ptr": "*fp32", "kv_len": "i32", "heads": "i32", "scale": "fp32"}, _launch_decode),
    "flash_attention_fwd": KernelContract(  # compiled as an H100 would run it: float16, 64 x 64 tiles, causal
        "flash_fwd_kernel", ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "lse_ptr", "seq_q", "seq_k", "scale", "BLOCK_M",
                             "BLOCK_N", "HEAD_DIM", "IS_CAUSAL"),
        {"BLOCK_M": 64, "BLOCK_N": 64, "HEAD_DIM": 64, "IS_CAUSAL": True},
        {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "o_ptr": "*fp16", "lse_ptr": "*fp32",
         "seq_q": "i32", "seq_k": "i32", "scale": "fp32"}, _launch_flash, tiles=("BLOCK_M", "BLOCK_N", "HEAD_DIM")),
}


def define_kernel(source: str, name: str, filename: str):
    """The plain function `name` defined by `source` (one `def`, no decorator, no defaults: see
    static_check.kernel_source), with `tl` as its only global; Triton reads its source back through linecache."""
    import linecache

    import triton.language as tl

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"tl": tl}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]
