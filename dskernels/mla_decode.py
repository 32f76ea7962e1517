"""MLA decode over the latent cache, absorbed path (DeepSeek-V2 section 2.1.2; `refimpl.mla._attend_absorbed`).

At decode time each sequence brings one new query token. On the absorbed path, head h's query has been mapped
into latent space, q_latent[h] = W^UK_h^T q^C_h (kv_lora_rank numbers), and every head attends to the same
cached rows [c_kv_j; k_pe_j] (kv_lora_rank + qk_rope_head_dim numbers per token):

    s[h, j]   = (q_latent[h] . c_kv[j] + q_pe[h] . k_pe[j]) * scale
    out[h]    = sum_j softmax_j(s[h, :]) c_kv[j]              [kv_lora_rank], before W^UV (outside the kernel)

The cache row c_kv[j] is both key and value, and all heads share it (like MQA): a program that handles a
block of BLOCK_H heads loads each cache block once for all of them, so the work is a pair of matrix products
[BLOCK_H, C] x [C, BLOCK_N] and [BLOCK_H, BLOCK_N] x [BLOCK_N, C] per cache block (tensor-core friendly
with 16+ heads, which is why MLA decode with 128 heads is compute-heavy rather than memory-bound).

Ladder:
  v1: one program per (sequence, block of heads), streaming the whole cache of its sequence (online softmax).
      With few sequences and heads there are few programs: most of a GPU's SMs idle on a long context.
  v2: split-KV ("flash-decoding", Dao et al. 2023): the cache of each sequence is cut into NUM_SPLITS chunks,
      one program each, which write a partial output normalized by its own softmax sum and its log-sum-exp
      lse = m + log(l); a second kernel merges the partials: out = sum_s exp(lse_s - lse) out_s with
      lse = log(sum_s exp(lse_s)).
  v3: v2 over a paged cache: the cache is a pool of pages of PAGE_SIZE tokens (64, as serving engines such
      as vLLM keep it), and block_table[b, i] names the page holding tokens i*PAGE_SIZE ... of sequence b,
      so sequences grow without reserving max_len rows each. Only the address computation changes.
Sequences in a batch may have any lengths (seq_lens), 0 included: a padded serving batch has empty slots,
whose output row is exactly zero in every step.

Each entry point is a plan and a launch, as FlashMLA's get_mla_metadata and flash_mla_with_kvcache: the plan
(`plan_decode`) validates the inputs, reading seq_lens and the block table on the host (device-to-host syncs),
and picks the configuration (pipeline stages from the GPU's shared memory); the launch (`launch_decode`) only
compares shapes and dtypes with the plan's (no sync) and launches, so a serving loop plans once per batch and
a benchmark times the launch alone.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dskernels._checks import (check_kernel_input, check_like, device_arch, most_stages_that_fit,
                               pipeline_buffers, shared_memory_budget)
from refimpl.attention import scaled_dot_product_attention
from refimpl.checks import check_int, check_shape

STEPS = ("v1", "v2", "v3")
MAX_SPLITS = 65535  # CUDA's limit on grid axis 2 (the splits)


@triton.jit
def mla_decode_v1_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, out_ptr,
                         heads, max_len, scale,
                         C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Program (b, hb): heads hb*BLOCK_H ... of sequence b. q_latent [B, heads, C], q_pe [B, heads, R],
    c_kv [B, max_len, C], k_pe [B, max_len, R], out [B, heads, C]; C = kv_lora_rank, R = qk_rope_head_dim."""
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * max_len * C passes 2^31 (B256 x 32K x 512)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    q_latent = tl.load(q_latent_ptr + (b * heads + h[:, None]) * C + c[None, :],
                       mask=(h[:, None] < heads) & (c[None, :] < C), other=0.0)  # [BLOCK_H, BLOCK_C]
    q_pe = tl.load(q_pe_ptr + (b * heads + h[:, None]) * R + r[None, :],
                   mask=(h[:, None] < heads) & (r[None, :] < R), other=0.0)  # [BLOCK_H, BLOCK_R]
    seq_len = tl.load(seq_lens_ptr + b)

    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        tokens = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        c_kv = tl.load(c_kv_ptr + (b * max_len + tokens[:, None]) * C + c[None, :],
                       mask=(tokens[:, None] < seq_len) & (c[None, :] < C), other=0.0)  # [BLOCK_N, BLOCK_C]
        k_pe = tl.load(k_pe_ptr + (b * max_len + tokens[:, None]) * R + r[None, :],
                       mask=(tokens[:, None] < seq_len) & (r[None, :] < R), other=0.0)  # [BLOCK_N, BLOCK_R]
        if IEEE:
            s = (tl.dot(q_latent, tl.trans(c_kv), input_precision="ieee")
                 + tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee"))  # [BLOCK_H, BLOCK_N]
        else:
            s = tl.dot(q_latent, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(tokens[None, :] < seq_len, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:  # the same c_kv block is the value: loaded once, used twice
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a length-0 sequence: an exact zero row, not 0/0
    tl.store(out_ptr + (b * heads + h[:, None]) * C + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(h[:, None] < heads) & (c[None, :] < C))


@triton.jit
def mla_decode_v2_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
                         heads, max_len, scale,
                         C: tl.constexpr, R: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Program (b, hb, split): as v1 over the split-th chunk of sequence b's cache; writes a partial output
    part_out [B, heads, NUM_SPLITS, C] (float32) and its log-sum-exp part_lse [B, heads, NUM_SPLITS]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    q_latent = tl.load(q_latent_ptr + (b * heads + h[:, None]) * C + c[None, :],
                       mask=(h[:, None] < heads) & (c[None, :] < C), other=0.0)
    q_pe = tl.load(q_pe_ptr + (b * heads + h[:, None]) * R + r[None, :],
                   mask=(h[:, None] < heads) & (r[None, :] < R), other=0.0)
    seq_len = tl.load(seq_lens_ptr + b)
    # new in v2: this program's chunk of the cache, a whole number of blocks (a short sequence leaves the
    # last splits empty: they write lse = -inf and weigh nothing in the merge)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        tokens = start_n + tl.arange(0, BLOCK_N)
        c_kv = tl.load(c_kv_ptr + (b * max_len + tokens[:, None]) * C + c[None, :],
                       mask=(tokens[:, None] < end) & (c[None, :] < C), other=0.0)
        k_pe = tl.load(k_pe_ptr + (b * max_len + tokens[:, None]) * R + r[None, :],
                       mask=(tokens[:, None] < end) & (r[None, :] < R), other=0.0)
        if IEEE:
            s = (tl.dot(q_latent, tl.trans(c_kv), input_precision="ieee")
                 + tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee"))
        else:
            s = tl.dot(q_latent, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(tokens[None, :] < end, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
        m = m_new
    # new in v2: a partial result and its log-sum-exp instead of the final output
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]  # an empty split: 0, not 0/0
    lse = tl.where(l > 0, m + tl.log(l_safe), float("-inf"))  # an empty split weighs nothing in the merge
    row = (b * heads + h) * NUM_SPLITS + split  # [BLOCK_H]
    tl.store(part_out_ptr + row[:, None] * C + c[None, :], out, mask=(h[:, None] < heads) & (c[None, :] < C))
    tl.store(part_lse_ptr + row, lse, mask=h < heads)


@triton.jit
def merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, C: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program i: (sequence, head) i; out = sum_s exp(lse_s - max lse) out_s / sum_s exp(lse_s - max lse)."""
    i = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(part_lse_ptr + i * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, axis=0)  # -inf only for a length-0 sequence (every split empty)
    weight = tl.exp(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # all 0 for a length-0 sequence
    part = tl.load(part_out_ptr + (i * NUM_SPLITS + s[:, None]) * C + c[None, :],
                   mask=(s[:, None] < NUM_SPLITS) & (c[None, :] < C), other=0.0)  # [BLOCK_S, BLOCK_C]
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)  # length 0: exact zeros
    tl.store(out_ptr + i * C + c, out.to(out_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def mla_decode_v3_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, block_table_ptr,
                         part_out_ptr, part_lse_ptr, heads, max_pages, scale,
                         C: tl.constexpr, R: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """As v2, with c_kv [num_pages, PAGE_SIZE, C], k_pe [num_pages, PAGE_SIZE, R] and block_table
    [B, max_pages] (int32): one cache block = one page, found through the block table."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    q_latent = tl.load(q_latent_ptr + (b * heads + h[:, None]) * C + c[None, :],
                       mask=(h[:, None] < heads) & (c[None, :] < C), other=0.0)
    q_pe = tl.load(q_pe_ptr + (b * heads + h[:, None]) * R + r[None, :],
                   mask=(h[:, None] < heads) & (r[None, :] < R), other=0.0)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), PAGE_SIZE) * PAGE_SIZE
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for start_n in range(start, end, PAGE_SIZE):
        tokens = start_n + tl.arange(0, PAGE_SIZE)  # logical positions in the sequence
        # new in v3: the page that holds these tokens, and the rows of that page
        page = tl.load(block_table_ptr + b * max_pages + start_n // PAGE_SIZE).to(tl.int64)
        slots = page * PAGE_SIZE + tl.arange(0, PAGE_SIZE)  # [PAGE_SIZE] rows in the page pool
        c_kv = tl.load(c_kv_ptr + slots[:, None] * C + c[None, :],
                       mask=(tokens[:, None] < end) & (c[None, :] < C), other=0.0)
        k_pe = tl.load(k_pe_ptr + slots[:, None] * R + r[None, :],
                       mask=(tokens[:, None] < end) & (r[None, :] < R), other=0.0)
        if IEEE:
            s = (tl.dot(q_latent, tl.trans(c_kv), input_precision="ieee")
                 + tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee"))
        else:
            s = tl.dot(q_latent, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(tokens[None, :] < end, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l > 0, m + tl.log(l_safe), float("-inf"))
    row = (b * heads + h) * NUM_SPLITS + split
    tl.store(part_out_ptr + row[:, None] * C + c[None, :], out, mask=(h[:, None] < heads) & (c[None, :] < C))
    tl.store(part_lse_ptr + row, lse, mask=h < heads)


def _check_queries_and_lengths(q_latent, q_pe, seq_lens, max_len: int) -> None:
    """Shapes, dtypes, devices of the queries and seq_lens, and 0 <= seq_lens <= max_len (host syncs)."""
    check_kernel_input("q_latent", q_latent, (None, None, None))
    batch, heads, _ = q_latent.shape
    check_like("q_pe", q_pe, q_latent, "q_latent", (batch, heads, None))
    check_kernel_input("seq_lens", seq_lens, (batch,), dtypes=(torch.int32, torch.int64))
    if seq_lens.device != q_latent.device:
        raise ValueError(f"seq_lens: expected device {q_latent.device} (that of q_latent), got {seq_lens.device}")
    if batch and (int(seq_lens.min()) < 0 or int(seq_lens.max()) > max_len):
        raise ValueError(f"seq_lens: expected lengths in [0, {max_len}] (the cache's length), got {seq_lens.tolist()}")


def _check_sizes(num_splits: int, block_h: int, block_n: int) -> None:
    check_int("num_splits", num_splits, 1)
    if num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits: expected at most {MAX_SPLITS} (CUDA's grid limit on axis 2), got {num_splits}")
    for name, size in (("block_h", block_h), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {size}")


def shared_memory_estimate(C: int, R: int, block_h: int, block_n: int, itemsize: int, num_stages: int,
                           arch: int = 90) -> int:
    """An upper estimate of the shared memory (bytes) a decode program needs on compute capability `arch`
    (90: H100, H200; 80: A100): `pipeline_buffers(num_stages, arch, block_h)` buffers (num_stages on sm_90
    with block_h >= 64, else max(num_stages - 1, 1)) of a cache block [block_n, C + R], the queries
    [block_h, C + R], the probabilities [block_h, block_n] in the input dtype (cast before the product with
    the values; their layout is converted) and 1 KiB of scratch. Triton 3.9, aligned launches, C=512, R=64,
    bfloat16: 16 x 64 blocks at 2 stages compile to 94,208 B on sm_90 and sm_80 (estimate 95,232 B); v4's
    64 x 64 blocks at 2 stages to 221,184 B on sm_90 (2 x 72 KiB of cache + 72 KiB of queries; estimate
    230,400 B) and 155,648 B on sm_80 (estimate 156,672 B). tests/test_kernels_compile.py checks, for every
    config on sm_80 and sm_90, that it is never below the compiled size."""
    width = next_pow2_16(C) + next_pow2_16(R)
    block = block_n * width * itemsize
    queries = block_h * width * itemsize
    probabilities = block_h * block_n * itemsize
    return pipeline_buffers(num_stages, arch, block_h) * block + queries + probabilities + 1024


def next_pow2_16(n: int) -> int:
    """The block that covers n: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


NUM_STAGES = (3, 2, 1)  # tried in this order: the first whose estimate fits the shared memory budget
BLOCK_N = (64, 32, 16)  # cache blocks tried when block_n is not given: the first that fits in one stage


def pick_block_n(C: int, R: int, block_h: int, dtype: torch.dtype, budget: int, arch: int = 90) -> int:
    """The largest cache block (64, 32, 16 tokens) whose one-stage estimate fits `budget` (64 on an H100 or
    H200 in every dtype; 32 for float32 with a 512 latent on an A100); ValueError when none does."""
    for block_n in BLOCK_N:
        if shared_memory_estimate(C, R, block_h, block_n, dtype.itemsize, 1, arch) <= budget:
            return block_n
    return pick_num_stages(C, R, block_h, BLOCK_N[-1], dtype, budget, arch)  # raises, naming the sizes


def pick_num_stages(C: int, R: int, block_h: int, block_n: int, dtype: torch.dtype, budget: int,
                    arch: int = 90) -> int:
    """The most pipeline stages (3, 2, 1) whose `shared_memory_estimate` on `arch` fits `budget` bytes;
    ValueError naming the sizes when even one stage does not fit (use a smaller block_n / block_h)."""
    def estimate(stages: int) -> int:
        return shared_memory_estimate(C, R, block_h, block_n, dtype.itemsize, stages, arch)
    return most_stages_that_fit(estimate, budget, NUM_STAGES, f"block_n={block_n}, block_h={block_h}: a decode "
                                f"program over a {C}+{R} latent cache in {dtype}")


@dataclass(frozen=True)
class DecodePlan:
    """What `plan_decode` checked and chose: launch with tensors of these shapes and dtype only."""
    step: str
    q_shape: tuple  # (batch, heads, kv_lora_rank)
    q_pe_shape: tuple
    cache_shape: tuple  # c_kv: (batch, max_len, C), or the pages (num_pages, page_size, C)
    k_pe_shape: tuple
    table_shape: tuple | None  # block_table (batch, max_pages), paged only
    dtype: torch.dtype
    num_splits: int
    block_h: int
    block_n: int  # the page size for "v3"
    num_stages: int


def plan_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                seq_lens: torch.Tensor, step: str = "v2", num_splits: int = 4, block_h: int = 16,
                block_n: int | None = None, block_table: torch.Tensor | None = None) -> DecodePlan:
    """Validate a decode batch and choose its configuration (once per batch; reads seq_lens and block_table
    on the host). Arguments as `mla_decode` (step "v1", "v2") or `mla_decode_paged` (step "v3", with
    block_table; c_kv, k_pe are then the page pools and block_n their page size). Raises TypeError/ValueError
    naming the bad argument, and ValueError when the blocks cannot fit the GPU's shared memory."""
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    check_kernel_input("q_latent", q_latent, (None, None, None))
    batch, heads, C = q_latent.shape
    check_like("q_pe", q_pe, q_latent, "q_latent", (batch, heads, None))
    R = q_pe.shape[2]
    table_shape = None
    if step == "v3":
        check_like("c_kv_pages", c_kv, q_latent, "q_latent", (None, None, C))
        num_pages, block_n, _ = c_kv.shape
        check_like("k_pe_pages", k_pe, q_latent, "q_latent", (num_pages, block_n, R))
        check_kernel_input("block_table", block_table, (batch, None), dtypes=(torch.int32,))
        _check_queries_and_lengths(q_latent, q_pe, seq_lens, block_table.shape[1] * block_n)
        if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_pages):
            raise ValueError(f"block_table: expected page numbers in [0, {num_pages}), got values from "
                             f"{int(block_table.min())} to {int(block_table.max())}")
        table_shape = tuple(block_table.shape)
    else:
        check_like("c_kv", c_kv, q_latent, "q_latent", (batch, None, C))
        check_like("k_pe", k_pe, q_latent, "q_latent", (batch, c_kv.shape[1], R))
        _check_queries_and_lengths(q_latent, q_pe, seq_lens, c_kv.shape[1])
    budget, arch = shared_memory_budget(q_latent.device), device_arch(q_latent.device)
    if block_n is None:
        _check_sizes(num_splits, block_h, 16)
        block_n = pick_block_n(C, R, block_h, q_latent.dtype, budget, arch)
    _check_sizes(num_splits, block_h, block_n)
    stages = pick_num_stages(C, R, block_h, block_n, q_latent.dtype, budget, arch)
    return DecodePlan(step, tuple(q_latent.shape), tuple(q_pe.shape), tuple(c_kv.shape), tuple(k_pe.shape),
                      table_shape, q_latent.dtype, num_splits if step != "v1" else 1, block_h, block_n, stages)


def _check_against_plan(plan: DecodePlan, q_latent, q_pe, c_kv, k_pe, seq_lens, block_table) -> None:
    """Shapes and dtype as planned (no host sync)."""
    got = (tuple(q_latent.shape), tuple(q_pe.shape), tuple(c_kv.shape), tuple(k_pe.shape),
           None if block_table is None else tuple(block_table.shape))
    want = (plan.q_shape, plan.q_pe_shape, plan.cache_shape, plan.k_pe_shape, plan.table_shape)
    if got != want or q_latent.dtype != plan.dtype or tuple(seq_lens.shape) != plan.q_shape[:1]:
        raise ValueError(f"launch_decode: expected the planned shapes {want} and dtype {plan.dtype}, got {got}, "
                         f"{q_latent.dtype}; plan again (plan_decode) for a new batch")


def launch_decode(plan: DecodePlan, q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                  k_pe: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the planned step on tensors of the planned shapes (no host sync): -> [batch, heads, C]."""
    _check_against_plan(plan, q_latent, q_pe, c_kv, k_pe, seq_lens, block_table)
    batch, heads, C = q_latent.shape
    out = torch.empty_like(q_latent)
    if out.numel() == 0:
        return out
    meta = dict(C=C, R=q_pe.shape[2], BLOCK_H=plan.block_h, BLOCK_C=next_pow2_16(C),
                BLOCK_R=next_pow2_16(q_pe.shape[2]), IEEE=q_latent.dtype == torch.float32,
                num_stages=plan.num_stages)
    head_blocks = triton.cdiv(heads, plan.block_h)
    if plan.step == "v1":
        mla_decode_v1_kernel[(batch, head_blocks)](q_latent, q_pe, c_kv, k_pe, seq_lens, out, heads,
                                                  c_kv.shape[1], scale, BLOCK_N=plan.block_n, **meta)
        return out
    num_splits = plan.num_splits
    part_out = torch.empty(batch, heads, num_splits, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q_latent.device)
    grid = (batch, head_blocks, num_splits)
    if plan.step == "v2":
        mla_decode_v2_kernel[grid](q_latent, q_pe, c_kv, k_pe, seq_lens, part_out, part_lse, heads,
                                   c_kv.shape[1], scale, NUM_SPLITS=num_splits, BLOCK_N=plan.block_n, **meta)
    else:
        mla_decode_v3_kernel[grid](q_latent, q_pe, c_kv, k_pe, seq_lens, block_table, part_out, part_lse,
                                   heads, block_table.shape[1], scale, NUM_SPLITS=num_splits,
                                   PAGE_SIZE=plan.block_n, **meta)
    merge_splits_kernel[(batch * heads,)](part_out, part_lse, out, C=C, NUM_SPLITS=num_splits,
                                          BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                                          BLOCK_C=next_pow2_16(C))
    return out


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, step: str = "v2", num_splits: int = 4,
               block_h: int = 16, block_n: int | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA over a contiguous latent cache (steps "v1", "v2").

    q_latent: [batch, heads, kv_lora_rank] (W^UK_h^T q^C_h), q_pe: [batch, heads, qk_rope_head_dim] (rotated),
    c_kv: [batch, max_len, kv_lora_rank], k_pe: [batch, max_len, qk_rope_head_dim] (an `refimpl.mla.MLACache`'s
    tensors), all one float dtype; seq_lens: int32/int64 [batch], 0 <= seq_lens[b] <= max_len, the tokens of
    sequence b in the cache (the new one included; 0 for an empty slot: a zero row); scale: the softmax scale
    (`MultiHeadLatentAttention.softmax_scale`). -> [batch, heads, kv_lora_rank], q's dtype: sum_j p_hj c_kv_j,
    to be mapped by W^UV. "v2" splits each cache into num_splits chunks. block_n: tokens per cache block
    (default: the largest of 64, 32, 16 that fits the GPU's shared memory, `pick_block_n`). `plan_decode`
    then `launch_decode`.
    Raises TypeError/ValueError naming the bad argument.
    """
    if step not in ("v1", "v2"):
        raise ValueError(f"step: expected 'v1' or 'v2' (for 'v3', the paged cache: mla_decode_paged), got {step!r}")
    plan = plan_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, step, num_splits, block_h, block_n)
    return launch_decode(plan, q_latent, q_pe, c_kv, k_pe, seq_lens, scale)


def mla_decode_paged(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv_pages: torch.Tensor,
                     k_pe_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int = 4, block_h: int = 16) -> torch.Tensor:
    """Step "v3": as `mla_decode` "v2" over a paged cache.

    c_kv_pages: [num_pages, page_size, kv_lora_rank], k_pe_pages: [num_pages, page_size, qk_rope_head_dim];
    block_table: int32 [batch, max_pages], block_table[b, i] = the page holding tokens i*page_size ...
    (i*page_size + page_size - 1) of sequence b; 0 <= seq_lens[b] <= max_pages * page_size. page_size: a power
    of two >= 16 (64 in `paginate`). -> [batch, heads, kv_lora_rank].
    """
    plan = plan_decode(q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, "v3", num_splits, block_h,
                       block_table=block_table)
    return launch_decode(plan, q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, scale, block_table)


def paginate(c_kv: torch.Tensor, k_pe: torch.Tensor, seq_lens: torch.Tensor, page_size: int = 64,
             generator: torch.Generator | None = None):
    """Copy a contiguous cache into a page pool, pages in a random order (as an engine hands them out):
    c_kv [batch, max_len, C], k_pe [batch, max_len, R] -> (c_kv_pages [num_pages, page_size, C],
    k_pe_pages [num_pages, page_size, R], block_table int32 [batch, max_pages]); sequence b gets
    ceil(seq_lens[b] / page_size) pages; unused block-table entries are 0."""
    check_shape("c_kv", c_kv, (None, None, None))
    batch, _, C = c_kv.shape
    check_shape("k_pe", k_pe, (batch, c_kv.shape[1], None))
    pages_per_seq = [-(-int(n) // page_size) for n in seq_lens.tolist()]
    num_pages, max_pages = sum(pages_per_seq), max(pages_per_seq, default=0)
    order = torch.randperm(num_pages, generator=generator)  # page i of the pool order goes to slot order[i]
    # at least one page: a batch of empty slots still has a pool the block table's zeros can name
    c_kv_pages = c_kv.new_zeros(max(num_pages, 1), page_size, C)
    k_pe_pages = k_pe.new_zeros(max(num_pages, 1), page_size, k_pe.shape[2])
    block_table = torch.zeros(batch, max(max_pages, 1), dtype=torch.int32)
    next_page = 0
    for b, n_pages in enumerate(pages_per_seq):
        for i in range(n_pages):
            page = int(order[next_page])
            next_page += 1
            rows = slice(i * page_size, min((i + 1) * page_size, int(seq_lens[b])))
            length = rows.stop - rows.start
            c_kv_pages[page, :length] = c_kv[b, rows]
            k_pe_pages[page, :length] = k_pe[b, rows]
            block_table[b, i] = page
    return c_kv_pages, k_pe_pages, block_table.to(c_kv.device)


def reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale: float) -> torch.Tensor:
    """The absorbed path's attention (`refimpl.mla.MultiHeadLatentAttention._attend_absorbed` before W^UV),
    written with `refimpl.attention.scaled_dot_product_attention`: query [q_latent; q_pe] and key
    [c_kv; k_pe] for every head, value c_kv, one sequence at a time over its seq_lens[b] tokens.
    Shapes as `mla_decode`."""
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        q = torch.cat((q_latent[b], q_pe[b]), dim=-1)[None, :, None]  # [1, heads, 1, C + R]
        k = torch.cat((c_kv[b, :n], k_pe[b, :n]), dim=-1)  # [n, C + R], shared by all heads
        heads = q.shape[1]
        out = scaled_dot_product_attention(q, k.expand(1, heads, n, -1), c_kv[b, :n].expand(1, heads, n, -1),
                                           scale=scale)  # [1, heads, 1, C]
        outs.append(out[0, :, 0])
    return torch.stack(outs)  # [batch, heads, C]
