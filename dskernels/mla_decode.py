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
Sequences in a batch may have any lengths (seq_lens), >= 1.
"""

import torch
import triton
import triton.language as tl

from dskernels._checks import check_kernel_input, check_like
from refimpl.attention import scaled_dot_product_attention
from refimpl.checks import check_int, check_shape

STEPS = ("v1", "v2", "v3")


@triton.jit
def mla_decode_v1_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, out_ptr,
                         heads, max_len, scale,
                         C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Program (b, hb): heads hb*BLOCK_H ... of sequence b. q_latent [B, heads, C], q_pe [B, heads, R],
    c_kv [B, max_len, C], k_pe [B, max_len, R], out [B, heads, C]; C = kv_lora_rank, R = qk_rope_head_dim."""
    b = tl.program_id(0)
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
    out = acc / l[:, None]
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
    b = tl.program_id(0)
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
    i = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(part_lse_ptr + i * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))  # [BLOCK_S]
    weight = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    part = tl.load(part_out_ptr + (i * NUM_SPLITS + s[:, None]) * C + c[None, :],
                   mask=(s[:, None] < NUM_SPLITS) & (c[None, :] < C), other=0.0)  # [BLOCK_S, BLOCK_C]
    out = tl.sum(weight[:, None] * part, axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + i * C + c, out.to(out_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def mla_decode_v3_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, block_table_ptr,
                         part_out_ptr, part_lse_ptr, heads, max_pages, scale,
                         C: tl.constexpr, R: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """As v2, with c_kv [num_pages, PAGE_SIZE, C], k_pe [num_pages, PAGE_SIZE, R] and block_table
    [B, max_pages] (int32): one cache block = one page, found through the block table."""
    b = tl.program_id(0)
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


def _check_queries_and_lengths(q_latent, q_pe, seq_lens, max_len: int | None):
    check_kernel_input("q_latent", q_latent, (None, None, None))
    batch, heads, _ = q_latent.shape
    check_like("q_pe", q_pe, q_latent, "q_latent", (batch, heads, None))
    check_kernel_input("seq_lens", seq_lens, (batch,), dtypes=(torch.int32, torch.int64))
    if seq_lens.device != q_latent.device:
        raise ValueError(f"seq_lens: expected device {q_latent.device} (that of q_latent), got {seq_lens.device}")
    if batch and int(seq_lens.min()) < 1:
        raise ValueError(f"seq_lens: expected lengths >= 1 (the new token is in the cache), "
                         f"got {seq_lens.tolist()}")
    if max_len is not None and batch and int(seq_lens.max()) > max_len:
        raise ValueError(f"seq_lens: expected lengths <= {max_len} (the cache's length), got {seq_lens.tolist()}")


def _check_sizes(num_splits: int, block_h: int, block_n: int) -> None:
    check_int("num_splits", num_splits, 1)
    for name, size in (("block_h", block_h), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {size}")


def _common_meta(q_latent: torch.Tensor, q_pe: torch.Tensor, block_h: int) -> dict:
    C, R = q_latent.shape[2], q_pe.shape[2]
    # num_stages=2: a [64, 512] latent tile is 64 KiB in bfloat16, and each pipeline stage buffers one; three
    # stages (Triton's default) come close to an SM's 227 KiB of shared memory on Hopper (an estimate, not
    # yet measured on a GPU). The interpreter ignores it.
    return dict(C=C, R=R, BLOCK_H=block_h, BLOCK_C=max(16, triton.next_power_of_2(C)),
                BLOCK_R=max(16, triton.next_power_of_2(R)), IEEE=q_latent.dtype == torch.float32, num_stages=2)


def _merge(part_out, part_lse, out, num_splits: int) -> torch.Tensor:
    batch, heads, C = out.shape
    merge_splits_kernel[(batch * heads,)](part_out, part_lse, out, C=C, NUM_SPLITS=num_splits,
                                          BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                                          BLOCK_C=max(16, triton.next_power_of_2(C)))
    return out


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, step: str = "v2", num_splits: int = 4,
               block_h: int = 16, block_n: int = 64) -> torch.Tensor:
    """One decode step of absorbed MLA over a contiguous latent cache (steps "v1", "v2").

    q_latent: [batch, heads, kv_lora_rank] (W^UK_h^T q^C_h), q_pe: [batch, heads, qk_rope_head_dim] (rotated),
    c_kv: [batch, max_len, kv_lora_rank], k_pe: [batch, max_len, qk_rope_head_dim] (an `refimpl.mla.MLACache`'s
    tensors), all one float dtype; seq_lens: int32/int64 [batch], 1 <= seq_lens[b] <= max_len, the tokens of
    sequence b in the cache (the new one included); scale: the softmax scale (`MultiHeadLatentAttention
    .softmax_scale`). -> [batch, heads, kv_lora_rank], q's dtype: sum_j p_hj c_kv_j, to be mapped by W^UV.
    "v2" splits each cache into num_splits chunks. Raises TypeError/ValueError naming the bad argument.
    """
    _check_queries_and_lengths(q_latent, q_pe, seq_lens, None)
    batch, heads, C = q_latent.shape
    check_like("c_kv", c_kv, q_latent, "q_latent", (batch, None, C))
    check_like("k_pe", k_pe, q_latent, "q_latent", (batch, c_kv.shape[1], q_pe.shape[2]))
    _check_queries_and_lengths(q_latent, q_pe, seq_lens, c_kv.shape[1])
    if step not in ("v1", "v2"):
        raise ValueError(f"step: expected 'v1' or 'v2' (for 'v3', the paged cache: mla_decode_paged), got {step!r}")
    _check_sizes(num_splits, block_h, block_n)
    out = torch.empty_like(q_latent)
    if out.numel() == 0:
        return out
    meta = _common_meta(q_latent, q_pe, block_h)
    head_blocks = triton.cdiv(heads, block_h)
    if step == "v1":
        mla_decode_v1_kernel[(batch, head_blocks)](q_latent, q_pe, c_kv, k_pe, seq_lens, out, heads,
                                                  c_kv.shape[1], scale, BLOCK_N=block_n, **meta)
        return out
    part_out = torch.empty(batch, heads, num_splits, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q_latent.device)
    mla_decode_v2_kernel[(batch, head_blocks, num_splits)](q_latent, q_pe, c_kv, k_pe, seq_lens, part_out,
                                                           part_lse, heads, c_kv.shape[1], scale,
                                                           NUM_SPLITS=num_splits, BLOCK_N=block_n, **meta)
    return _merge(part_out, part_lse, out, num_splits)


def mla_decode_paged(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv_pages: torch.Tensor,
                     k_pe_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int = 4, block_h: int = 16) -> torch.Tensor:
    """Step "v3": as `mla_decode` "v2" over a paged cache.

    c_kv_pages: [num_pages, page_size, kv_lora_rank], k_pe_pages: [num_pages, page_size, qk_rope_head_dim];
    block_table: int32 [batch, max_pages], block_table[b, i] = the page holding tokens i*page_size ...
    (i*page_size + page_size - 1) of sequence b; seq_lens[b] <= max_pages * page_size. page_size: a power of
    two >= 16 (64 in `paginate`). -> [batch, heads, kv_lora_rank].
    """
    _check_queries_and_lengths(q_latent, q_pe, seq_lens, None)
    batch, heads, C = q_latent.shape
    check_like("c_kv_pages", c_kv_pages, q_latent, "q_latent", (None, None, C))
    num_pages, page_size, _ = c_kv_pages.shape
    check_like("k_pe_pages", k_pe_pages, q_latent, "q_latent", (num_pages, page_size, q_pe.shape[2]))
    check_kernel_input("block_table", block_table, (batch, None), dtypes=(torch.int32,))
    _check_queries_and_lengths(q_latent, q_pe, seq_lens, block_table.shape[1] * page_size)
    if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_pages):
        raise ValueError(f"block_table: expected page numbers in [0, {num_pages}), got values from "
                         f"{int(block_table.min())} to {int(block_table.max())}")
    _check_sizes(num_splits, block_h, page_size)
    out = torch.empty_like(q_latent)
    if out.numel() == 0:
        return out
    part_out = torch.empty(batch, heads, num_splits, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q_latent.device)
    grid = (batch, triton.cdiv(heads, block_h), num_splits)
    mla_decode_v3_kernel[grid](q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, block_table, part_out, part_lse,
                               heads, block_table.shape[1], scale, NUM_SPLITS=num_splits, PAGE_SIZE=page_size,
                               **_common_meta(q_latent, q_pe, block_h))
    return _merge(part_out, part_lse, out, num_splits)


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
    c_kv_pages = c_kv.new_zeros(num_pages, page_size, C)
    k_pe_pages = k_pe.new_zeros(num_pages, page_size, k_pe.shape[2])
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
