"""Flash attention v4: the forward tuned for Hopper, and the backward pass (FlashAttention-2), with autograd.

The step after `dskernels.flash_attention`'s v3 (whose online softmax, causal block skipping and unmasked /
masked split of the key loop it keeps), with what a fast kernel and training need:

* 128-row query blocks, and the key block, warps and pipeline stages chosen by `@triton.autotune` from
  `FORWARD_CONFIGS`, pruned to those whose shared memory estimate fits the GPU (227 KB per block on an H100 /
  H200, 163 KB on an A100); under the interpreter autotuning cannot time anything, so it keeps the first
  fitting one.
* exp2 instead of exp: exp(x) = 2^(x * log2 e), and log2(e) is folded into the softmax scale once
  (qk_scale = scale * log2 e), so the loop never multiplies by it (the GPU's ex2 instruction is what exp
  calls anyway, after that multiply).
* GQA: `heads` query heads share `kv_heads` key/value heads, query head h reading key/value head
  h // (heads // kv_heads), as `refimpl.attention.repeat_kv` (no copy of K and V per query head).
* Different head sizes for q/k and v: MLA's prefill, qk 192 (128 nope + 64 rope) and v 128 (DeepSeek-V2/V3).
* The forward also writes each query's log-sum-exp, lse_i = log sum_j exp(s_ij) (natural log, float32), the
  one number per query the backward needs to recompute the probabilities.

Backward (Dao 2023, "FlashAttention-2", algorithm 2), for O = P V, P = softmax(S), S = scale * Q K^T:

    dV = P^T dO                       dP = dO V^T
    dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dQ = scale * dS K                 dK = scale * dS^T Q

P is never stored: each backward kernel recomputes a block of it from Q, K and the saved lse as
P_ij = exp(s_ij - lse_i). Three launches: the preprocess (delta = rowsum(dO * O)), one program per key block
that accumulates its dK and dV over all query blocks (and, with GQA, over the query heads that share it: no
atomics), and one program per query block that accumulates its dQ over the key blocks. So the memory of
training is O(seq) per head, the forward saves q, k, v, O and lse only.
"""

import math

import torch
import triton
import triton.language as tl

from dskernels._checks import (check_kernel_input, check_like, device_arch, interpreting, pipeline_buffers,
                               shared_memory_budget)
from refimpl.attention import repeat_kv, scaled_dot_product_attention

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0

# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128-row query blocks first (Hopper's wgmma works on 64-row
# warpgroup tiles: 8 warps = 2 warpgroups = 128 rows); 64-row blocks last, for float32 with head 192 (a
# 128 x 256 float32 query block alone is 128 KiB), which no 128-row config fits.
FORWARD_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2),
                   (64, 32, 4, 1))
# The backward kernels' blocks (query rows x key rows), fixed: their shared memory grows with both head sizes
BWD_BLOCK_M, BWD_BLOCK_N = 64, 64
BWD_WARPS = 4
BWD_NUM_STAGES = (2, 1)  # tried in order: the first whose estimate fits


def _pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def forward_shared_memory(block_m: int, block_n: int, block_d: int, block_dv: int, itemsize: int,
                          num_stages: int, arch: int = 90) -> int:
    """Upper estimate (bytes) of the forward's shared memory on compute capability `arch` (90: H100, H200;
    80: A100): `pipeline_buffers(num_stages, arch)` buffers (num_stages on sm_90, max(num_stages - 1, 1) on
    sm_80) of a key block [block_n, block_d] and a value block [block_n, block_dv], the queries
    [block_m, block_d], the probabilities [block_m, block_n] in the input dtype (cast and converted before
    the second dot) and 1 KiB. Triton 3.9, aligned launches, bfloat16, heads 128/128: 128 x 64 blocks at 3
    stages compile to 131,072 B on sm_90 (3 x 32 KiB of K and V + 32 KiB of queries; estimate 148,480 B)
    and 98,304 B on sm_80; 128 x 128 at 2 stages to 163,840 B on sm_90 (estimate 197,632 B); heads 192/128
    at 128 x 128, 2 stages, to 262,144 B, above an H100's 232,448 (estimate 295,936 B: pruned). Checked
    against the compiler for every config on sm_80 / sm_90 by tests/test_kernels_compile.py."""
    kv = block_n * (block_d + block_dv) * itemsize
    queries = block_m * block_d * itemsize
    probabilities = block_m * block_n * itemsize
    return pipeline_buffers(num_stages, arch) * kv + queries + probabilities + 1024


def backward_shared_memory(block_m: int, block_n: int, block_d: int, block_dv: int, itemsize: int,
                           num_stages: int, arch: int = 90) -> int:
    """Upper estimate (bytes) of either backward kernel's shared memory on compute capability `arch`:
    `pipeline_buffers(num_stages, arch)` buffers (num_stages on sm_90, max(num_stages - 1, 1) on sm_80) of
    the streamed tiles (q [block_m, block_d] and dO [block_m, block_dv] for dK/dV; k and v for dQ: the
    larger block of the two), the resident tiles (k, v or q, dO), two float32 [block_m, block_n] matrices
    (P and dS in layout conversion) and 1 KiB. Checked against the compiler (Triton 3.9, aligned launches)
    for sm_80 / sm_90 by tests/test_kernels_compile.py."""
    rows = max(block_m, block_n)
    streamed = rows * (block_d + block_dv) * itemsize
    return (pipeline_buffers(num_stages, arch) + 1) * streamed + 2 * block_m * block_n * 4 + 1024


def fitting_forward_configs(block_d: int, block_dv: int, itemsize: int, budget: int,
                            arch: int = 90) -> list[tuple]:
    """The FORWARD_CONFIGS whose `forward_shared_memory` on `arch` fits `budget` bytes."""
    return [c for c in FORWARD_CONFIGS
            if forward_shared_memory(c[0], c[1], block_d, block_dv, itemsize, c[3], arch) <= budget]


def pick_backward_stages(block_d: int, block_dv: int, dtype: torch.dtype, budget: int,
                         arch: int = 90) -> int:
    """The most pipeline stages (of BWD_NUM_STAGES) whose `backward_shared_memory` on `arch` fits `budget`;
    ValueError naming the head sizes when none does."""
    for stages in BWD_NUM_STAGES:
        if backward_shared_memory(BWD_BLOCK_M, BWD_BLOCK_N, block_d, block_dv, dtype.itemsize,
                                  stages, arch) <= budget:
            return stages
    raise ValueError(f"q/v: head sizes padded to {block_d}/{block_dv} in {dtype} need more than this GPU's "
                     f"{budget} B of shared memory per block in the backward kernels")


@triton.jit
def _attend_block(acc, m, l, q, k_ptrs, v_ptrs, start_n, cols, rows, kv_len, position, qk_scale,
                  k_mask_d, v_mask_d, MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """One key block of the online softmax in base 2: scores s2 = q k^T * scale * log2 e, so that
    2^(s2 - m) = e^(s - m'). Returns the updated (acc, m, l)."""
    n = start_n + cols  # key indices [BLOCK_N]
    if MASKED:
        k = tl.load(k_ptrs, mask=k_mask_d & (n[None, :] < kv_len), other=0.0)  # k^T [BLOCK_D, BLOCK_N]
    else:
        k = tl.load(k_ptrs, mask=k_mask_d, other=0.0)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    else:
        s = tl.dot(q, k) * qk_scale
    if MASKED:
        visible = n[None, :] < kv_len
        if CAUSAL:
            visible = visible & (n[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=v_mask_d & (n[:, None] < kv_len), other=0.0)  # [BLOCK_N, BLOCK_DV]
    else:
        v = tl.load(v_ptrs, mask=v_mask_d, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l


@triton.jit
def flash_attention_v4_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_len, kv_len, heads, group, qk_scale,
                                  D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """Program (b * heads + h) * q_blocks + i: queries i*BLOCK_M ... of batch b, query head h, against key /
    value head h // group. q [B, heads, q_len, D], k [B, heads // group, kv_len, D], v [.., kv_len, DV],
    o [B, heads, q_len, DV], lse [B, heads, q_len] float32; all contiguous. qk_scale = scale * log2(e)."""
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    start_m = (tl.program_id(0) % q_blocks) * BLOCK_M
    bh = (tl.program_id(0) // q_blocks).to(tl.int64)  # b * heads + h, 64-bit offsets
    bkv = (bh // heads) * (heads // group) + (bh % heads) // group  # b * kv_heads + h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                mask=(rows[:, None] < q_len) & (d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    position = kv_len - q_len + rows  # bottom-right causal alignment
    k_ptrs = k_ptr + bkv * kv_len * D + cols[None, :] * D + d[:, None]  # k^T block at key 0
    v_ptrs = v_ptr + bkv * kv_len * DV + cols[:, None] * DV + dv[None, :]
    k_mask_d = d[:, None] < D
    v_mask_d = dv[None, :] < DV

    end_n = kv_len  # causal block skipping: no key past the block's last query position
    unmasked_end = (kv_len // BLOCK_N) * BLOCK_N  # full blocks every query of the block sees
    if CAUSAL:
        end_n = tl.minimum(kv_len, kv_len - q_len + start_m + BLOCK_M)
        unmasked_end = tl.minimum(unmasked_end, (kv_len - q_len + start_m + 1) // BLOCK_N * BLOCK_N)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, m, l = _attend_block(acc, m, l, q, k_ptrs + start_n * D, v_ptrs + start_n * DV, start_n, cols,
                                  rows, kv_len, position, qk_scale, k_mask_d, v_mask_d,
                                  False, CAUSAL, IEEE)
    for start_n in range(unmasked_end, end_n, BLOCK_N):  # the diagonal and a partial last block
        acc, m, l = _attend_block(acc, m, l, q, k_ptrs + start_n * D, v_ptrs + start_n * DV, start_n, cols,
                                  rows, kv_len, position, qk_scale, k_mask_d, v_mask_d,
                                  True, CAUSAL, IEEE)
    out = acc / l[:, None]
    tl.store(o_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < q_len) & (dv[None, :] < DV))
    lse = (m + tl.log2(l)) * 0.6931471805599453  # log-sum-exp in natural log: (m2 + log2 l) * ln 2
    tl.store(lse_ptr + bh * q_len + rows, lse, mask=rows < q_len)


def _prune_forward(configs, named_args, **kwargs):
    """Keep the configs whose shared memory fits this GPU (the first one only under the interpreter)."""
    q = named_args["q_ptr"]
    budget, arch = shared_memory_budget(q.device), device_arch(q.device)
    fitting = [c for c in configs
               if forward_shared_memory(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], kwargs["BLOCK_D"],
                                        kwargs["BLOCK_DV"], q.element_size(), c.num_stages, arch) <= budget]
    if not fitting:
        raise ValueError(f"flash attention v4: no config fits this GPU's {budget} B of shared memory per "
                         f"block for heads {kwargs['D']}/{kwargs['DV']} in {q.dtype}")
    return fitting[:1] if interpreting() else fitting


# the forward kernel, autotuned per (q_len, kv_len, head sizes, causal, dtype); a separate jit object so
# that the plain kernel stays launchable with explicit blocks (the compile check compiles each config)
flash_attention_v4_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in FORWARD_CONFIGS],
    key=["q_len", "kv_len", "D", "DV", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune_forward})(triton.jit(flash_attention_v4_fwd_kernel.fn))


@triton.jit
def flash_attention_v4_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, rows_total,
                                             DV: tl.constexpr, BLOCK_M: tl.constexpr,
                                             BLOCK_DV: tl.constexpr):
    """delta[r] = sum_j o[r, j] * do[r, j] for BLOCK_M rows of o, do [rows_total, DV] -> delta float32."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < rows_total) & (dv[None, :] < DV)
    o = tl.load(o_ptr + rows[:, None] * DV + dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * DV + dv[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < rows_total)


@triton.jit
def flash_attention_v4_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                       q_len, kv_len, heads, group, scale,
                                       D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                       BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """Program (b * kv_heads + g) * kv_blocks + j: dK, dV of keys j*BLOCK_N ... of batch b, key/value head g,
    summed over its `group` query heads and every query block that sees them. Shapes as the forward's;
    lse, delta [B, heads, q_len] float32; dk, dv like k, v. P^T is recomputed block by block from the lse."""
    kv_blocks = tl.cdiv(kv_len, BLOCK_N)
    start_n = (tl.program_id(0) % kv_blocks) * BLOCK_N
    bkv = (tl.program_id(0) // kv_blocks).to(tl.int64)  # b * kv_heads + g
    kv_heads = heads // group
    cols = start_n + tl.arange(0, BLOCK_N)  # key indices
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + bkv * kv_len * D + cols[:, None] * D + d[None, :],
                mask=(cols[:, None] < kv_len) & (d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + bkv * kv_len * DV + cols[:, None] * DV + dv[None, :],
                mask=(cols[:, None] < kv_len) & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
    log2e = 1.4426950408889634
    qk_scale = scale * log2e
    # the first query that sees key start_n sits at position start_n: query index start_n - (kv_len - q_len)
    start_m = 0
    if CAUSAL:
        start_m = tl.maximum(start_n - (kv_len - q_len), 0) // BLOCK_M * BLOCK_M
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for h_in_group in range(0, group):
        bh = (bkv // kv_heads) * heads + (bkv % kv_heads) * group + h_in_group  # b * heads + h
        for m0 in range(start_m, q_len, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(do_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :],
                         mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_M, BLOCK_DV]
            lse = tl.load(lse_ptr + bh * q_len + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + bh * q_len + rows, mask=row_ok, other=0.0)
            if IEEE:
                s_t = tl.dot(k, tl.trans(q), input_precision="ieee")  # S^T [BLOCK_N, BLOCK_M]
            else:
                s_t = tl.dot(k, tl.trans(q))
            visible = row_ok[None, :] & (cols[:, None] < kv_len)
            if CAUSAL:
                visible = visible & (cols[:, None] <= (kv_len - q_len + rows)[None, :])
            p_t = tl.where(visible, tl.exp2(s_t * qk_scale - lse[None, :] * log2e), 0.0)  # P^T
            if IEEE:
                dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")  # dV += P^T dO
                dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # dP^T = V dO^T
            else:
                dv_acc += tl.dot(p_t.to(do.dtype), do)
                dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])  # dS^T [BLOCK_N, BLOCK_M]
            if IEEE:
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")  # dK += dS^T Q
            else:
                dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * scale
    tl.store(dk_ptr + bkv * kv_len * D + cols[:, None] * D + d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=(cols[:, None] < kv_len) & (d[None, :] < D))
    tl.store(dv_ptr + bkv * kv_len * DV + cols[:, None] * DV + dv[None, :], dv_acc.to(dv_ptr.dtype.element_ty),
             mask=(cols[:, None] < kv_len) & (dv[None, :] < DV))


@triton.jit
def flash_attention_v4_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                     q_len, kv_len, heads, group, scale,
                                     D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """Program (b * heads + h) * q_blocks + i: dQ of queries i*BLOCK_M ... of batch b, head h, over the key
    blocks they see (causal block skipping as the forward). dq like q."""
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    start_m = (tl.program_id(0) % q_blocks) * BLOCK_M
    bh = (tl.program_id(0) // q_blocks).to(tl.int64)
    bkv = (bh // heads) * (heads // group) + (bh % heads) // group
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :],
                 mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    lse = tl.load(lse_ptr + bh * q_len + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * q_len + rows, mask=row_ok, other=0.0)
    log2e = 1.4426950408889634
    qk_scale = scale * log2e
    position = kv_len - q_len + rows
    end_n = kv_len
    if CAUSAL:
        end_n = tl.minimum(kv_len, kv_len - q_len + start_m + BLOCK_M)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bkv * kv_len * D + cols[:, None] * D + d[None, :],
                    mask=(cols[:, None] < kv_len) & (d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + bkv * kv_len * DV + cols[:, None] * DV + dv[None, :],
                    mask=(cols[:, None] < kv_len) & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dP = dO V^T
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        visible = row_ok[:, None] & (cols[None, :] < kv_len)
        if CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        p = tl.where(visible, tl.exp2(s * qk_scale - lse[:, None] * log2e), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")  # dQ += dS K
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(dq_ptr + bh * q_len * D + rows[:, None] * D + d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


def _check_inputs(q, k, v, causal: bool, scale):
    """Checks of `flash_attention`'s arguments -> (batch, heads, kv_heads, q_len, kv_len, d, d_v, scale)."""
    check_kernel_input("q", q, (None, None, None, None))
    batch, heads, q_len, d = q.shape
    check_like("k", k, q, "q", (batch, None, None, d))
    kv_heads, kv_len = k.shape[1], k.shape[2]
    check_like("v", v, q, "q", (batch, kv_heads, kv_len, None))
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected a number of key/value heads that divides the {heads} query heads "
                         f"(GQA), got {kv_heads}")
    if kv_len == 0:
        raise ValueError("k: expected at least one key (kv_len >= 1), got kv_len=0")
    if causal and q_len > kv_len:
        raise ValueError(f"causal: expected q_len <= kv_len (queries are the last q_len positions), "
                         f"got q_len={q_len}, kv_len={kv_len}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    if triton.cdiv(q_len, 64) * batch * heads > MAX_GRID_X:
        raise ValueError(f"q: more programs than CUDA's grid limit {MAX_GRID_X}; use fewer batch x heads")
    return batch, heads, kv_heads, q_len, kv_len, d, v.shape[3], float(scale)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel alone (no autograd): (o [batch, heads, q_len, d_v], lse [batch, heads, q_len]
    float32, lse_i = log sum_j exp(scale * q_i . k_j) over the keys query i sees). Arguments as
    `flash_attention`."""
    batch, heads, kv_heads, q_len, kv_len, d, d_v, scale = _check_inputs(q, k, v, causal, scale)
    out = torch.empty(batch, heads, q_len, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    flash_attention_v4_fwd_tuned[grid](q, k, v, out, lse, q_len, kv_len, heads, heads // kv_heads,
                                       scale * LOG2E, D=d, DV=d_v, CAUSAL=causal, BLOCK_D=_pow2(d),
                                       BLOCK_DV=_pow2(d_v), IEEE=q.dtype == torch.float32)
    return out, lse


def flash_attention_backward(q, k, v, out, lse, grad_out, causal: bool, scale: float):
    """dq, dk, dv from the saved (q, k, v, out, lse) and grad_out [batch, heads, q_len, d_v]: the three
    launches of FlashAttention-2's backward (preprocess, dK/dV, dQ)."""
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len, d_v = k.shape[1], k.shape[2], v.shape[3]
    grad_out = grad_out.contiguous()
    check_like("grad_out", grad_out, q, "q", tuple(out.shape))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or out.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d, block_dv = _pow2(d), _pow2(d_v)
    delta = torch.empty_like(lse)  # [batch, heads, q_len] float32
    rows_total = batch * heads * q_len
    flash_attention_v4_bwd_preprocess_kernel[(triton.cdiv(rows_total, 64),)](
        out, grad_out, delta, rows_total, DV=d_v, BLOCK_M=64, BLOCK_DV=block_dv)
    stages = pick_backward_stages(block_d, block_dv, q.dtype, shared_memory_budget(q.device),
                                  device_arch(q.device))
    meta = dict(D=d, DV=d_v, CAUSAL=causal, BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N, BLOCK_D=block_d,
                BLOCK_DV=block_dv, IEEE=q.dtype == torch.float32, num_warps=BWD_WARPS, num_stages=stages)
    group = heads // kv_heads
    flash_attention_v4_bwd_dkdv_kernel[(triton.cdiv(kv_len, BWD_BLOCK_N) * batch * kv_heads,)](
        q, k, v, grad_out, lse, delta, dk, dv, q_len, kv_len, heads, group, scale, **meta)
    flash_attention_v4_bwd_dq_kernel[(triton.cdiv(q_len, BWD_BLOCK_M) * batch * heads,)](
        q, k, v, grad_out, lse, delta, dq, q_len, kv_len, heads, group, scale, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Autograd for flash attention v4: the forward saves q, k, v, the output and the log-sum-exp
    ([batch, heads, q_len] float32), nothing of size q_len x kv_len; the backward runs the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale):
        out, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, grad_out, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with autograd: q [batch, heads, q_len, d], k [batch, kv_heads, kv_len, d],
    v [batch, kv_heads, kv_len, d_v] (kv_heads divides heads: GQA, query head h uses key/value head
    h // (heads // kv_heads); d != d_v allowed: MLA prefill, d 192, d_v 128), float16/float32 (bfloat16 on a
    GPU), contiguous -> [batch, heads, q_len, d_v]. causal: bottom-right aligned as
    `refimpl.attention.scaled_dot_product_attention(is_causal=True)` (needs q_len <= kv_len). scale: default
    d ** -0.5. Raises TypeError/ValueError naming the bad argument."""
    return FlashAttention.apply(q, k, v, causal, scale)


def reference(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """`refimpl.attention.scaled_dot_product_attention` with k and v repeated to the query heads (GQA)."""
    n_rep = q.shape[1] // k.shape[1]
    return scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale=scale,
                                        is_causal=causal)


def bench_cases(tiny: bool, device: str, dtype: torch.dtype) -> list:
    """`dskernels.bench` rows for v4 (to be appended to `bench._cases`): the causal forward at B4 H32 S4096
    D128 next to PyTorch's SDPA, and the backward alone (dq, dk, dv from a forward run outside the timing)
    next to SDPA's backward; timed by `bench._time_ms` like every row. --tiny: B1 H2 S64 D32."""
    import torch.nn.functional as F

    from dskernels.bench import Case, _randn

    B, H, S, D = (1, 2, 64, 32) if tiny else (4, 32, 4096, 128)
    size = dtype.itemsize
    flops = 4 * B * H * S * S * D / 2  # causal: half of QK^T and PV
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    forward = Case("flash attention (causal)", f"B{B} H{H} S{S} D{D}", flops, 4 * B * H * S * D * size,
                   lambda g: tuple(_randn(g, B, H, S, D, dtype=dtype, device=device) for _ in range(3)),
                   {"v4": lambda q, k, v: flash_attention(q, k, v, causal=True), "SDPA": sdpa},
                   lambda q, k, v: reference(q, k, v, causal=True), 2e-2 if dtype != torch.float32 else 1e-4)

    def make_backward(g):
        q, k, v, do = (_randn(g, B, H, S, D, dtype=dtype, device=device) for _ in range(4))
        return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do

    def timed_backward(attention):
        graphs = {}  # one forward per input set, outside the timed call: only the backward is timed

        def run(q, k, v, do):
            key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            if key not in graphs:
                graphs[key] = attention(q, k, v)
            grads = torch.autograd.grad(graphs[key], (q, k, v), do, retain_graph=True)
            return torch.cat([x.flatten() for x in grads])
        return run

    # FLOPs: 2.5x the forward's, FlashAttention-2's count (5 products; v4 does 7, recomputing S and dP for dQ)
    backward = Case("flash attention backward (causal)", f"B{B} H{H} S{S} D{D}", 2.5 * flops,
                    (7 * B * H * S * D + 2 * B * H * S) * size, make_backward,  # read q k v o dO lse, write dq dk dv
                    {"v4": timed_backward(lambda q, k, v: flash_attention(q, k, v, causal=True)),
                     "SDPA": timed_backward(sdpa)},
                    timed_backward(lambda q, k, v: reference(q, k, v, causal=True)),
                    2e-2 if dtype != torch.float32 else 1e-4)
    return [forward, backward]
