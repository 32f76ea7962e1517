"""Flash attention forward (Dao et al. 2022, "FlashAttention", algorithm 1): softmax(q k^T * scale) v
without ever holding the q_len x kv_len score matrix in memory.

Each program owns BLOCK_M queries of one (batch, head) and streams the keys and values past them in blocks of
BLOCK_N, keeping per query a running max m, a running sum l of exp(score - m) and a running output acc:

    m_new = max(m, rowmax(S_block))
    acc   = acc * exp(m - m_new) + exp(S_block - m_new) @ V_block
    l     = l   * exp(m - m_new) + rowsum(exp(S_block - m_new))
    out   = acc / l                                   (after the last block)

the online softmax of `dskernels.rowwise.softmax_v2`, with a matrix product folded in. Causal masking is the
bottom-right alignment of `refimpl.attention.causal_mask`: query i sits at position kv_len - q_len + i.

Ladder:
  v1: one program per (q block, batch x head); every key block is visited, the causal mask applied to each;
  v2: causal block skipping: the loop stops after the last key block any query of this block can see, so a
      causal attention does about half of v1's work (for q_len = kv_len).
  v3: masks only where needed: the key blocks every query of the block sees in full (before the diagonal,
      inside kv_len) run in a first loop with no mask at all; only the last few blocks (the diagonal and a
      partial last block) pay for masked loads and the tl.where.
  v4: dskernels.flash_attention_v4: autotuned 128-row blocks, exp2, GQA, MLA head sizes, and the backward.
"""

import torch
import triton
import triton.language as tl

from dskernels._checks import (check_kernel_input, check_like, device_arch, most_stages_that_fit,
                               pipeline_buffers, shared_memory_budget)
from refimpl.attention import scaled_dot_product_attention

STEPS = ("v1", "v2", "v3", "v4")
MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2: 65,535)


@triton.jit
def flash_attention_v1_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_len, kv_len, scale,
                              D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """Program bh * q_blocks + i: queries i*BLOCK_M ... of batch x head bh; q [bh, q_len, D], k [bh, kv_len, D],
    v [bh, kv_len, DV], o [bh, q_len, DV], all contiguous."""
    # one grid axis (q blocks of one batch x head in a row): axis 0 allows 2^31 - 1 programs, axis 1 only 65,535
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    start_m = (tl.program_id(0) % q_blocks) * BLOCK_M
    bh = (tl.program_id(0) // q_blocks).to(tl.int64)  # 64-bit: bh * q_len * D passes 2^31 (B17 H32 S32K D128)
    rows = start_m + tl.arange(0, BLOCK_M)  # query indices [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                mask=(rows[:, None] < q_len) & (d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    position = kv_len - q_len + rows  # each query's position among the keys (bottom-right causal alignment)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)  # running sum of exp(score - m) * v
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # key indices [BLOCK_N]
        k = tl.load(k_ptr + bh * kv_len * D + cols[None, :] * D + d[:, None],
                    mask=(cols[None, :] < kv_len) & (d[:, None] < D), other=0.0)  # k^T: [BLOCK_D, BLOCK_N]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
        else:
            s = tl.dot(q, k) * scale
        visible = cols[None, :] < kv_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        # every query sees key 0, so m is finite after the first block and exp(m - m_new) is never NaN
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + bh * kv_len * DV + cols[:, None] * DV + dv[None, :],
                    mask=(cols[:, None] < kv_len) & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < q_len) & (dv[None, :] < DV))


@triton.jit
def flash_attention_v2_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_len, kv_len, scale,
                              D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """As v1, but with CAUSAL the loop ends at the last key the last query of this block can see."""
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    start_m = (tl.program_id(0) % q_blocks) * BLOCK_M
    bh = (tl.program_id(0) // q_blocks).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                mask=(rows[:, None] < q_len) & (d[None, :] < D), other=0.0)
    position = kv_len - q_len + rows

    # the only change from v1: keys past the block's last query position are never loaded
    end_n = kv_len
    if CAUSAL:
        end_n = tl.minimum(kv_len, kv_len - q_len + start_m + BLOCK_M)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bh * kv_len * D + cols[None, :] * D + d[:, None],
                    mask=(cols[None, :] < kv_len) & (d[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        visible = cols[None, :] < kv_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + bh * kv_len * DV + cols[:, None] * DV + dv[None, :],
                    mask=(cols[:, None] < kv_len) & (dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < q_len) & (dv[None, :] < DV))


@triton.jit
def flash_attention_v3_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_len, kv_len, scale,
                              D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """As v2, with the key loop split in two: unmasked full blocks, then the masked rest."""
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    start_m = (tl.program_id(0) % q_blocks) * BLOCK_M
    bh = (tl.program_id(0) // q_blocks).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * q_len * D + rows[:, None] * D + d[None, :],
                mask=(rows[:, None] < q_len) & (d[None, :] < D), other=0.0)
    position = kv_len - q_len + rows
    end_n = kv_len
    if CAUSAL:
        end_n = tl.minimum(kv_len, kv_len - q_len + start_m + BLOCK_M)
    # new in v3: keys before unmasked_end are inside kv_len and visible to every query of the block
    unmasked_end = (kv_len // BLOCK_N) * BLOCK_N  # whole blocks inside kv_len
    if CAUSAL:
        first_position = kv_len - q_len + start_m  # the block's first query sees keys 0 ... first_position
        unmasked_end = tl.minimum(unmasked_end, (first_position + 1) // BLOCK_N * BLOCK_N)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, unmasked_end, BLOCK_N):  # no mask on the keys (d < D still masks a padded head)
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bh * kv_len * D + cols[None, :] * D + d[:, None], mask=d[:, None] < D, other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + bh * kv_len * DV + cols[:, None] * DV + dv[None, :], mask=dv[None, :] < DV,
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    for start_n in range(unmasked_end, end_n, BLOCK_N):  # the diagonal and a partial last block: as v2
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bh * kv_len * D + cols[None, :] * D + d[:, None],
                    mask=(cols[None, :] < kv_len) & (d[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        visible = cols[None, :] < kv_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + bh * kv_len * DV + cols[:, None] * DV + dv[None, :],
                    mask=(cols[:, None] < kv_len) & (dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + bh * q_len * DV + rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < q_len) & (dv[None, :] < DV))


KERNELS = {"v1": flash_attention_v1_kernel, "v2": flash_attention_v2_kernel, "v3": flash_attention_v3_kernel}
NUM_STAGES = (3, 2, 1)  # tried in this order: the first whose estimate fits the shared memory budget


def shared_memory_estimate(block_m: int, block_n: int, block_d: int, block_dv: int, itemsize: int,
                           num_stages: int, arch: int = 90) -> int:
    """An upper estimate of a program's shared memory (bytes) on compute capability `arch` (90: H100, H200;
    80: A100): `pipeline_buffers(num_stages, arch)` buffers (num_stages on sm_90, max(num_stages - 1, 1) on
    sm_80) of a key block [block_n, block_d] and a value block [block_n, block_dv], the queries
    [block_m, block_d], the probabilities [block_m, block_n] in the input dtype (cast before the product
    with V; layout conversion) and 1 KiB of scratch. Measured with Triton 3.9, aligned launches, 64 x 64
    blocks, bfloat16: sm_90 uses exactly the buffers and the queries (d=128 at 3 stages:
    3 x 32 KiB + 16 KiB = 114,688 B; estimate 123,904 B), sm_80 the buffers, the queries and the
    probabilities (d=128, 3 stages: 90,112 B; estimate 91,136 B); tests/test_kernels_compile.py checks every
    config on both."""
    kv = block_n * (block_d + block_dv) * itemsize
    queries = block_m * block_d * itemsize
    probabilities = block_m * block_n * itemsize
    return pipeline_buffers(num_stages, arch) * kv + queries + probabilities + 1024


def pick_num_stages(block_m: int, block_n: int, block_d: int, block_dv: int, dtype: torch.dtype,
                    budget: int, arch: int = 90) -> int:
    """The most pipeline stages whose `shared_memory_estimate` on `arch` fits `budget`; ValueError naming
    the blocks when even one stage does not fit."""
    def estimate(stages: int) -> int:
        return shared_memory_estimate(block_m, block_n, block_d, block_dv, dtype.itemsize, stages, arch)
    return most_stages_that_fit(estimate, budget, NUM_STAGES, f"block_m={block_m}, block_n={block_n}: a program "
                                f"with head sizes up to {block_d}/{block_dv} in {dtype}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, step: str = "v3", block_m: int = 64,
                    block_n: int = 64) -> torch.Tensor:
    """softmax(q k^T * scale) v: q [batch, heads, q_len, d], k [batch, heads, kv_len, d],
    v [batch, heads, kv_len, d_v], float16/float32 (bfloat16 on a GPU), contiguous -> [batch, heads, q_len, d_v].

    causal: query i sits at position kv_len - q_len + i and sees keys up to it (needs q_len <= kv_len), as
    `refimpl.attention.scaled_dot_product_attention(is_causal=True)`. scale: default d ** -0.5.
    Blocks: powers of two >= 16. Raises TypeError/ValueError naming the bad argument.
    """
    check_kernel_input("q", q, (None, None, None, None))
    batch, heads, q_len, d = q.shape
    check_like("k", k, q, "q", (batch, heads, None, d))
    kv_len = k.shape[2]
    check_like("v", v, q, "q", (batch, heads, kv_len, None))
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    if kv_len == 0:
        raise ValueError("k: expected at least one key (kv_len >= 1), got kv_len=0")
    if causal and q_len > kv_len:
        raise ValueError(f"causal: expected q_len <= kv_len (queries are the last q_len positions), "
                         f"got q_len={q_len}, kv_len={kv_len}")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {size}")
    if step == "v4":  # a module of its own: autotuned blocks (block_m/block_n unused), autograd
        from dskernels.flash_attention_v4 import flash_attention as flash_attention_v4
        return flash_attention_v4(q, k, v, causal=causal, scale=scale)
    scale = d ** -0.5 if scale is None else scale
    d_v = v.shape[3]
    out = torch.empty(batch, heads, q_len, d_v, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(q_len, block_m) * batch * heads,)
    if grid[0] > MAX_GRID_X:
        raise ValueError(f"q: {grid[0]} programs (q blocks x batch x heads) exceed CUDA's grid limit of "
                         f"{MAX_GRID_X}; use a larger block_m")
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(d_v))
    stages = pick_num_stages(block_m, block_n, block_d, block_dv, q.dtype, shared_memory_budget(q.device),
                             device_arch(q.device))
    KERNELS[step][grid](q, k, v, out, q_len, kv_len, scale, D=d, DV=d_v, CAUSAL=causal,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                        IEEE=q.dtype == torch.float32, num_stages=stages)
    return out


def reference(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """`refimpl.attention.scaled_dot_product_attention`."""
    return scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
