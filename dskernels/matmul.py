"""Tiled matrix multiplication C = A @ B with `tl.dot`, A [M, K], B [K, N] -> C [M, N].

Each program computes one BLOCK_M x BLOCK_N tile of C: it walks along K in steps of BLOCK_K, loading a tile of
A and a tile of B and accumulating their product in float32 (`tl.dot`, on tensor cores on a GPU). Edges of any
size are masked. Pointers are plain arithmetic (base + row * stride + col), no block pointers (gone in
Triton 3.9).

Ladder:
  v1 naive tiles: program p computes tile (p // tiles_n, p % tiles_n): row by row of tiles. Consecutive
     programs share a row of A but each needs a different column of B, so B is re-read from DRAM for each
     row of tiles once it has fallen out of L2.
  v2 grouped ordering: programs are numbered down columns within groups of GROUP_M rows of tiles, so the
     programs running at the same time touch GROUP_M rows of A and a few columns of B, which stay in L2
     (the ordering of Triton's matmul tutorial).
  v3 autotuned: v2's kernel with `@triton.autotune` over block sizes, warps and pipeline stages, tried once
     per (M, N, K) on a GPU. Under the interpreter autotuning cannot time anything, so the configs are pruned
     to the first one.

float32 inputs use `input_precision="ieee"` (exact fp32 products; a GPU would otherwise use tf32, ~1e-3).
"""

import torch
import triton
import triton.language as tl

from dskernels._checks import (check_kernel_input, check_like, device_arch, interpreting, most_stages_that_fit,
                               pipeline_buffers, shared_memory_budget)

STEPS = ("v1", "v2", "v3")


@triton.jit
def matmul_v1_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     IEEE: tl.constexpr):
    """Program p: the tile of C at row of tiles p // tiles_n, column of tiles p % tiles_n."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], 64-bit: rows * stride > 2^31
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # [BLOCK_K]; 64-bit: k * stride_bk (K * N) may pass 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & ((k0 + ks)[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def matmul_v2_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, IEEE: tl.constexpr):
    """As v1, but program p is mapped to a tile in grouped order: down GROUP_M rows of tiles, then across."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # the only change from v1: which tile program p computes
    programs_per_group = GROUP_M * tiles_n
    group = pid // programs_per_group
    first_m = group * GROUP_M
    group_size_m = min(tiles_m - first_m, GROUP_M)  # the last group may have fewer rows of tiles
    pid_m = first_m + (pid % programs_per_group) % group_size_m
    pid_n = (pid % programs_per_group) // group_size_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & ((k0 + ks)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _autotune_configs():
    """Block sizes and schedules to try on a GPU (the first is also the one the interpreter keeps)."""
    configs = []
    for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                      (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                                      (128, 128, 32, 4, 4)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


def shared_memory_estimate(block_m: int, block_n: int, block_k: int, itemsize: int, num_stages: int,
                           arch: int = 90) -> int:
    """An upper estimate of a program's shared memory (bytes) on compute capability `arch` (90: H100, H200;
    80: A100): `pipeline_buffers(num_stages, arch)` buffers of an A tile [block_m, block_k] and a B tile
    [block_k, block_n], num_stages on sm_90, max(num_stages - 1, 1) on sm_80. This is exactly what Triton 3.9
    reports for aligned row-major launches (v2, 128x128x64 float16, 8 warps: 32/64/96/128 KiB at 1-4 stages
    on sm_90, 32/32/64/96 KiB on sm_80; tests/test_kernels_compile.py checks every config on both)."""
    return pipeline_buffers(num_stages, arch) * (block_m * block_k + block_k * block_n) * itemsize


NUM_STAGES = (4, 3, 2, 1)  # steps v1, v2: the first that fits the shared memory budget


def pick_num_stages(block_m: int, block_n: int, block_k: int, dtype: torch.dtype, budget: int,
                    arch: int = 90) -> int:
    """The most pipeline stages whose `shared_memory_estimate` on `arch` fits `budget`; ValueError naming the
    blocks when even one stage does not fit."""
    def estimate(stages: int) -> int:
        return shared_memory_estimate(block_m, block_n, block_k, dtype.itemsize, stages, arch)
    return most_stages_that_fit(estimate, budget, NUM_STAGES,
                                f"block_m={block_m}, block_n={block_n}, block_k={block_k}: a {dtype} tile")


def fitting_configs(configs, itemsize: int, budget: int, arch: int = 90) -> list:
    """The autotune configs whose `shared_memory_estimate` on `arch` fits `budget` bytes."""
    return [c for c in configs if shared_memory_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                         c.kwargs["BLOCK_K"], itemsize, c.num_stages,
                                                         arch) <= budget]


def _prune_configs(configs, named_args, **kwargs):
    """Autotune only the configs that fit this GPU's shared memory (all of them would be tried, and the
    ones over the limit fail); the interpreter cannot time kernels: keep the first fitting one there."""
    a = named_args["a_ptr"]
    fitting = fitting_configs(configs, a.element_size(), shared_memory_budget(a.device), device_arch(a.device))
    if not fitting:
        raise ValueError(f"matmul v3: no autotune config fits this GPU's {shared_memory_budget(a.device)} B of "
                         f"shared memory per block in {a.dtype}; use step v2 with smaller blocks")
    return fitting[:1] if interpreting() else fitting


# v3: the v2 kernel, autotuned (a new jit function object, so v2 itself stays untuned)
matmul_v3_kernel = triton.autotune(configs=_autotune_configs(), key=["M", "N", "K"],
                                   prune_configs_by={"early_config_prune": _prune_configs})(
    triton.jit(matmul_v2_kernel.fn))


def matmul(a: torch.Tensor, b: torch.Tensor, step: str = "v3", block_m: int = 64, block_n: int = 64,
           block_k: int = 64, group_m: int = 8) -> torch.Tensor:
    """C = A @ B: a [M, K], b [K, N] float16/float32 (bfloat16 on a GPU), same dtype and device, each row-major
    or column-major (a transposed view such as an nn.Linear weight's .t() is read in place) -> [M, N].

    Accumulates in float32, exact fp32 products for float32 input. step "v1", "v2" use the given block sizes
    (each >= 16: `tl.dot` needs it on a GPU); "v3" picks them by autotuning. Raises TypeError/ValueError.
    """
    check_kernel_input("a", a, (None, None), matrix_layout=True)
    check_like("b", b, a, "a", (a.shape[1], None), matrix_layout=True)
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {size}")
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    args = (a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride())
    ieee = a.dtype == torch.float32
    if step == "v3":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        matmul_v3_kernel[grid](*args, IEEE=ieee)
        return c
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    stages = pick_num_stages(block_m, block_n, block_k, a.dtype, shared_memory_budget(a.device),
                             device_arch(a.device))
    if step == "v1":
        matmul_v1_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee,
                               num_stages=stages)
    else:
        matmul_v2_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                               IEEE=ieee, num_stages=stages)
    return c


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch's matmul, in float32 and cast back (the same accumulation the kernels use)."""
    return (a.float() @ b.float()).to(a.dtype)
