"""MLA decode, step v4: FlashMLA's design (DeepSeek, github.com/deepseek-ai/FlashMLA, 2025) in Triton.

The next rung after `dskernels.mla_decode` v3 (split-KV over a paged cache). Three changes:

* Many heads in one program: a program holds BLOCK_H = 64 query heads of one sequence (all of them when a
  model has fewer; FlashMLA: 64-row tiles over the 128 heads of DeepSeek-V3's decode), so each `tl.dot` is
  [64, C] x [C, BLOCK_N]: an M of 64 feeds the tensor cores, and a cache row is read by heads/64 programs,
  not heads/16 as in v1-v3 (two programs, not eight, for 128 heads).
* A split plan computed once per batch from the lengths (FlashMLA's `get_mla_metadata`): the batch's pages
  (plus a fixed cost per piece, for its setup and its partial write) are cut into `num_parts` runs of equal
  cost in sequence order. A part may hold the end of one sequence, several short ones and the start of a
  long one; a long sequence is split over several parts and a short one is not split at all, so a batch of
  very unequal lengths gives every program the same work, where v2/v3's fixed NUM_SPLITS per sequence give
  the programs of a long sequence far more pages than those of a short one.
* The programs that read one sequence's cache run together: the head blocks are grid axis 0 (the fastest-
  varying), so the 2 programs reading the same pages for 128 heads are launched side by side; the grid order
  is designed so that the second finds the pages in L2 (whether it does depends on the GPU's scheduling:
  measured only on a GPU, by its bytes read from memory).

A piece that is a whole sequence writes its output directly; the pieces of a split sequence write a partial
output and its log-sum-exp, merged by a second kernel (as v2's merge, over a variable number of pieces). The
paged cache is v3's (64-token pages, `mla_decode.paginate`); a length-0 sequence has no piece and gets an
exact zero row from the merge kernel.

`plan_flash_decode` (validation, the split plan: host syncs, once per batch) + `launch_flash_decode` (two
launches, no sync); `mla_decode_flash` does both.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dskernels import mla_decode as md
from dskernels._checks import device_arch, shared_memory_budget
from refimpl.checks import check_int

MAX_BLOCK_H = 64  # FlashMLA's tile of query heads (BLOCK_SIZE_M = 64)
PIECE_COST = 1  # the fixed cost of one piece, in pages (its query load, its partial write and merge)
INTERPRETER_PARTS = 8  # parts when there is no GPU to count SMs on


@triton.jit
def mla_decode_v4_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, seq_lens_ptr, block_table_ptr,
                         part_start_ptr, piece_seq_ptr, piece_begin_ptr, piece_end_ptr,
                         out_ptr, part_out_ptr, part_lse_ptr, heads, max_pages, scale,
                         C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         PAGE_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                         IEEE: tl.constexpr):
    """Program (hb, part): heads hb*BLOCK_H ... for the pieces part_start[part] ... part_start[part+1] - 1.
    Piece i: pages piece_begin[i] ... piece_end[i] - 1 of sequence piece_seq[i]. q_latent, out [B, heads, C];
    q_pe [B, heads, R]; c_kv [num_pages, PAGE_SIZE, C], k_pe [num_pages, PAGE_SIZE, R]; block_table
    [B, max_pages]; part_out [pieces, heads, C] and part_lse [pieces, heads] float32 (split sequences)."""
    h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    part = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    head_c = (h[:, None] < heads) & (c[None, :] < C)  # [BLOCK_H, BLOCK_C]
    for piece in range(tl.load(part_start_ptr + part), tl.load(part_start_ptr + part + 1)):
        b = tl.load(piece_seq_ptr + piece).to(tl.int64)  # 64-bit: b * heads * C, page * PAGE_SIZE * C
        page_begin = tl.load(piece_begin_ptr + piece)
        page_end = tl.load(piece_end_ptr + piece)
        seq_len = tl.load(seq_lens_ptr + b)
        q_latent = tl.load(q_latent_ptr + (b * heads + h[:, None]) * C + c[None, :], mask=head_c,
                           other=0.0)  # [BLOCK_H, BLOCK_C]
        q_pe = tl.load(q_pe_ptr + (b * heads + h[:, None]) * R + r[None, :],
                       mask=(h[:, None] < heads) & (r[None, :] < R), other=0.0)  # [BLOCK_H, BLOCK_R]
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        for i in range(page_begin, page_end):
            page = tl.load(block_table_ptr + b * max_pages + i).to(tl.int64)
            for sub in range(0, PAGE_SIZE, BLOCK_N):  # a page in blocks of BLOCK_N rows
                tokens = i * PAGE_SIZE + sub + n  # [BLOCK_N] positions in the sequence
                slots = page * PAGE_SIZE + sub + n  # [BLOCK_N] rows of the page pool
                valid = tokens < seq_len
                c_kv = tl.load(c_kv_ptr + slots[:, None] * C + c[None, :],
                               mask=valid[:, None] & (c[None, :] < C), other=0.0)  # [BLOCK_N, BLOCK_C]
                k_pe = tl.load(k_pe_ptr + slots[:, None] * R + r[None, :],
                               mask=valid[:, None] & (r[None, :] < R), other=0.0)  # [BLOCK_N, BLOCK_R]
                if IEEE:
                    s = (tl.dot(q_latent, tl.trans(c_kv), input_precision="ieee")
                         + tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee"))  # [BLOCK_H, BLOCK_N]
                else:
                    s = tl.dot(q_latent, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))
                s = tl.where(valid[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the end: no NaN
                alpha = tl.exp(m - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
                m = m_new
        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]  # [BLOCK_H, BLOCK_C]
        if (page_begin == 0) & (page_end * PAGE_SIZE >= seq_len):  # the whole sequence: the final output
            tl.store(out_ptr + (b * heads + h[:, None]) * C + c[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=head_c)
        else:  # one piece of a split sequence: a partial output and its log-sum-exp, for the merge
            row = piece * heads + h.to(tl.int64)  # [BLOCK_H]; 64-bit: row * C may pass 2^31
            tl.store(part_out_ptr + row[:, None] * C + c[None, :], out, mask=head_c)
            tl.store(part_lse_ptr + row, tl.where(l > 0, m + tl.log(l_safe), float("-inf")), mask=h < heads)


@triton.jit
def merge_pieces_kernel(part_out_ptr, part_lse_ptr, seq_piece_start_ptr, out_ptr, heads,
                        C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (hb, b): out[b, heads of hb] from sequence b's pieces seq_piece_start[b] ... [b+1] - 1: none
    (length 0): exact zeros; one: written by the decode kernel, nothing to do; several: the lse-weighted sum
    out = sum_i exp(lse_i - lse) out_i, lse = log sum_i exp(lse_i) (online, over the pieces)."""
    h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    first = tl.load(seq_piece_start_ptr + b)
    last = tl.load(seq_piece_start_ptr + b + 1)
    mask = (h[:, None] < heads) & (c[None, :] < C)
    if last - first != 1:
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        for piece in range(first, last):
            row = piece * heads + h.to(tl.int64)  # 64-bit: row * C may pass 2^31
            lse = tl.load(part_lse_ptr + row, mask=h < heads, other=float("-inf"))  # [BLOCK_H]
            part = tl.load(part_out_ptr + row[:, None] * C + c[None, :], mask=mask, other=0.0)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            weight = tl.exp(lse - m_safe)
            total = total * alpha + weight
            acc = acc * alpha[:, None] + weight[:, None] * part
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no piece: exact zeros
        tl.store(out_ptr + (b * heads + h[:, None]) * C + c[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)


def split_plan(seq_lens: list[int], page_size: int, num_parts: int) -> tuple[list, list, list]:
    """FlashMLA's get_mla_metadata idea on the host: cut the batch's work into at most about `num_parts`
    runs of equal cost, in sequence order.

    Cost of a sequence of n tokens: ceil(n / page_size) pages, plus PIECE_COST for each piece it is cut
    into. Each part gets quota = ceil(total / num_parts) (total: pages + PIECE_COST per non-empty sequence);
    a part takes whole sequences while they fit and cuts the sequence that does not at the page where its
    quota ends. -> (pieces [(b, page_begin, page_end)], part_start [parts + 1]: the first piece of each
    part, seq_piece_start [B + 1]: the first piece of each sequence). A length-0 sequence has no piece.
    The cut pieces' own costs can need a few parts past num_parts (at most one per cut)."""
    check_int("num_parts", num_parts, 1)
    pages = [-(-n // page_size) for n in seq_lens]
    total = sum(pages) + PIECE_COST * sum(1 for p in pages if p)
    quota = max(-(-total // num_parts), PIECE_COST + 1)
    pieces, part_start, seq_piece_start, room = [], [0], [], quota
    for b, n in enumerate(pages):
        seq_piece_start.append(len(pieces))
        begin = 0
        while begin < n:
            if room <= PIECE_COST:  # this part is full: start the next
                part_start.append(len(pieces))
                room = quota
            take = min(n - begin, room - PIECE_COST)
            pieces.append((b, begin, begin + take))
            begin += take
            room -= take + PIECE_COST
    seq_piece_start.append(len(pieces))
    if pieces:
        part_start.append(len(pieces))
    return pieces, part_start, seq_piece_start


@dataclass(frozen=True)
class FlashDecodePlan:
    """What `plan_flash_decode` checked and chose; `launch_flash_decode` runs it (no host sync)."""
    checked: md.DecodePlan  # step v3's plan of the same inputs: their shapes, dtype and validation
    block_h: int
    block_n: int  # cache rows per tl.dot: divides the page size
    num_stages: int
    num_parts: int  # programs per head block (the grid's axis 1)
    num_pieces: int
    part_start: torch.Tensor  # int32 [num_parts + 1]
    piece_seq: torch.Tensor  # int32 [num_pieces]
    piece_begin: torch.Tensor  # int32 [num_pieces], in pages
    piece_end: torch.Tensor
    seq_piece_start: torch.Tensor  # int32 [batch + 1]


def pick_blocks(C: int, R: int, heads: int, page_size: int, dtype: torch.dtype, budget: int,
                block_h: int | None = None, arch: int = 90) -> tuple[int, int, int]:
    """(block_h, block_n, num_stages) for `budget` bytes of shared memory: block_h as given, else the
    largest of min(64, heads rounded up to a power of two >= 16), then halves down to 16, whose program
    fits (64 on an H100 or H200; float32 over a 512 + 64 latent on an A100: 32); block_n the largest of
    64, 32, 16 that fits and divides the page size (`mla_decode.pick_block_n`); ValueError naming the sizes
    when nothing fits."""
    widest = md.next_pow2_16(min(heads, MAX_BLOCK_H))
    candidates = [block_h] if block_h else [b for b in (MAX_BLOCK_H, 32, 16) if b <= widest]
    for i, size in enumerate(candidates):
        try:
            block_n = min(md.pick_block_n(C, R, size, dtype, budget, arch), page_size)
            return size, block_n, md.pick_num_stages(C, R, size, block_n, dtype, budget, arch)
        except ValueError:
            if i == len(candidates) - 1:
                raise


def default_num_parts(device: torch.device, head_blocks: int) -> int:
    """FlashMLA's num_sm_parts: the GPU's SM count / head blocks (one wave of programs); 8 without a GPU."""
    if device.type != "cuda":
        return INTERPRETER_PARTS
    return max(1, torch.cuda.get_device_properties(device).multi_processor_count // head_blocks)


def plan_flash_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv_pages: torch.Tensor,
                      k_pe_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      num_parts: int | None = None, block_h: int | None = None) -> FlashDecodePlan:
    """Validate a decode batch (as `mla_decode.plan_decode` step "v3": host syncs) and make its split plan
    (`split_plan`, once per batch). Arguments as `mla_decode_flash`. Raises TypeError/ValueError naming the
    bad argument, and ValueError when the blocks cannot fit the GPU's shared memory."""
    checked = md.plan_decode(q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, "v3", 1, 16,
                             block_table=block_table)
    batch, heads, C = q_latent.shape
    R = q_pe.shape[2]
    page_size = c_kv_pages.shape[1]
    if block_h is not None:
        md._check_sizes(1, block_h, 16)
    budget = shared_memory_budget(q_latent.device)
    block_h, block_n, stages = pick_blocks(C, R, heads, page_size, q_latent.dtype, budget, block_h,
                                           device_arch(q_latent.device))
    head_blocks = triton.cdiv(heads, block_h)
    if num_parts is None:
        num_parts = default_num_parts(q_latent.device, head_blocks)
    pieces, part_start, seq_piece_start = split_plan(seq_lens.tolist(), page_size, num_parts)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=q_latent.device)  # noqa: E731
    seqs, begins, ends = zip(*pieces) if pieces else ((), (), ())
    return FlashDecodePlan(checked, block_h, block_n, stages, len(part_start) - 1, len(pieces),
                           as_int32(part_start), as_int32(seqs), as_int32(begins), as_int32(ends),
                           as_int32(seq_piece_start))


def launch_flash_decode(plan: FlashDecodePlan, q_latent: torch.Tensor, q_pe: torch.Tensor,
                        c_kv_pages: torch.Tensor, k_pe_pages: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Run a plan on tensors of the planned shapes (compared, no host sync): -> [batch, heads, C]."""
    md._check_against_plan(plan.checked, q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, block_table)
    batch, heads, C = q_latent.shape
    R = q_pe.shape[2]
    out = torch.empty_like(q_latent)
    if out.numel() == 0:
        return out
    head_blocks = triton.cdiv(heads, plan.block_h)
    part_out = torch.empty(plan.num_pieces, heads, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(plan.num_pieces, heads, dtype=torch.float32, device=q_latent.device)
    if plan.num_parts:
        mla_decode_v4_kernel[(head_blocks, plan.num_parts)](
            q_latent, q_pe, c_kv_pages, k_pe_pages, seq_lens, block_table, plan.part_start, plan.piece_seq,
            plan.piece_begin, plan.piece_end, out, part_out, part_lse, heads, block_table.shape[1], scale,
            C=C, R=R, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, PAGE_SIZE=c_kv_pages.shape[1],
            BLOCK_C=md.next_pow2_16(C), BLOCK_R=md.next_pow2_16(R), IEEE=q_latent.dtype == torch.float32,
            num_stages=plan.num_stages)
    merge_pieces_kernel[(head_blocks, batch)](part_out, part_lse, plan.seq_piece_start, out, heads, C=C,
                                             BLOCK_H=plan.block_h, BLOCK_C=md.next_pow2_16(C))
    return out


def mla_decode_flash(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv_pages: torch.Tensor,
                     k_pe_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_parts: int | None = None, block_h: int | None = None) -> torch.Tensor:
    """Step "v4": one decode step of absorbed MLA over a paged latent cache, FlashMLA's design.

    Arguments as `mla_decode.mla_decode_paged`: q_latent [batch, heads, kv_lora_rank], q_pe [batch, heads,
    qk_rope_head_dim], c_kv_pages [num_pages, page_size, kv_lora_rank], k_pe_pages [num_pages, page_size,
    qk_rope_head_dim] (page_size a power of two >= 16; 64 as FlashMLA), block_table int32 [batch, max_pages],
    seq_lens int32/int64 [batch] (0 allowed: a zero row), scale the softmax scale. num_parts: programs per head
    block (default: SM count / head blocks, FlashMLA's num_sm_parts); block_h: heads per program (default
    min(64, heads rounded up to a power of two >= 16)). -> [batch, heads, kv_lora_rank], q's dtype.
    `plan_flash_decode` then `launch_flash_decode`. Raises TypeError/ValueError naming the bad argument.
    """
    plan = plan_flash_decode(q_latent, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, num_parts, block_h)
    return launch_flash_decode(plan, q_latent, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, scale)
