"""MLA decode step v4 (FlashMLA's design: 64 heads per program, a split plan from the lengths, 64-token pages)
against the float64 refimpl reference, on the GPU (compiled) when there is one, else under TRITON_INTERPRET=1
on the CPU; every output through `assert_close`."""

import pytest
import torch

from dskernels import mla_decode as md
from dskernels import mla_decode_flash as mf
from dskernels._checks import assert_close, runnable_dtypes


def _inputs(batch, heads, C, R, max_len, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    return make(batch, heads, C), make(batch, heads, R), make(batch, max_len, C), make(batch, max_len, R)


def _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale):
    return md.reference(q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(), seq_lens, scale)


def _pages(c_kv, k_pe, seq_lens):
    return md.paginate(c_kv, k_pe, seq_lens, page_size=64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", runnable_dtypes())
@pytest.mark.parametrize("num_parts, block_h", [(1, None), (3, None), (8, 16)])
def test_flash_decode_matches_refimpl(dtype, num_parts, block_h, device):
    # 20 heads: one block of 32 (default) or a full and a partly masked block of 16; lengths 0, 1, one past a
    # page, not a page multiple, 300: one part (no split), or parts that cut sequences (partial outputs merged)
    q_latent, q_pe, c_kv, k_pe = _inputs(6, 20, 64, 16, 300, dtype, device)
    seq_lens = torch.tensor([1, 0, 65, 300, 130, 64], dtype=torch.int32, device=device)
    scale = (64 + 16) ** -0.5
    got = mf.mla_decode_flash(q_latent, q_pe, *_pages(c_kv, k_pe, seq_lens), seq_lens, scale,
                              num_parts=num_parts, block_h=block_h)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # length 0: an exact zero row, no NaN
    assert_close(got, _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale), dtype=dtype)


def test_deepseek_v3_latent_sizes_with_64_heads(device):
    # kv_lora_rank 512 + qk_rope_head_dim 64 (DeepSeek-V3's config.json), 64 heads in one program, float32
    q_latent, q_pe, c_kv, k_pe = _inputs(3, 64, 512, 64, 200, torch.float32, device)
    seq_lens = torch.tensor([200, 7, 0], device=device)
    plan = mf.plan_flash_decode(q_latent, q_pe, *_pages(c_kv, k_pe, seq_lens), seq_lens, num_parts=3)
    assert plan.block_h == 64 and 64 % plan.block_n == 0
    got = mf.launch_flash_decode(plan, q_latent, q_pe, *_pages(c_kv, k_pe, seq_lens), seq_lens, 192 ** -0.5)
    assert_close(got, _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, 192 ** -0.5))


def test_split_plan_balances_very_unequal_lengths():
    # one 4096-token sequence among 15 one-token ones and an empty slot, 8 parts: v2/v3's fixed 4 splits per
    # sequence give one program 16 pages and most 1 or 0; the plan gives every part at most its quota
    lens = [4096] + [1] * 15 + [0]
    pieces, part_start, seq_piece_start = mf.split_plan(lens, 64, 8)
    pages = [-(-n // 64) for n in lens]
    quota = -(-(sum(pages) + mf.PIECE_COST * 16) // 8)  # 64 + 16 pages + 16 pieces' cost over 8 parts: 12
    costs = [sum(end - begin + mf.PIECE_COST for _, begin, end in pieces[a:z])
             for a, z in zip(part_start, part_start[1:])]
    assert max(costs) <= quota == 12 and len(costs) <= 8 + 1
    assert max(costs) <= 1.5 * sum(costs) / len(costs)  # balanced: no part far above the mean
    long = [(begin, end) for b, begin, end in pieces if b == 0]
    assert len(long) >= 5 and long[0][0] == 0 and long[-1][1] == 64  # the long sequence split over parts
    assert all(a[1] == b[0] for a, b in zip(long, long[1:]))  # its pages covered once, in order
    assert all(sum(1 for p in pieces if p[0] == b) == 1 for b in range(1, 16))  # the short ones whole
    assert seq_piece_start[16] == seq_piece_start[17] == len(pieces)  # the empty slot: no piece


def test_a_batch_of_empty_slots_gives_zero_rows(device):
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 64, torch.float32, device)
    seq_lens = torch.zeros(2, dtype=torch.int64, device=device)
    got = mf.mla_decode_flash(q_latent, q_pe, *_pages(c_kv, k_pe, seq_lens), seq_lens, 0.1)
    assert torch.equal(got, torch.zeros_like(got))


def test_plan_once_launch_many(device):
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 150, torch.float32, device)
    seq_lens = torch.tensor([150, 3], device=device)
    pages = _pages(c_kv, k_pe, seq_lens)
    plan = mf.plan_flash_decode(q_latent, q_pe, *pages, seq_lens, num_parts=2)
    for scale in (0.1, 0.3):
        assert_close(mf.launch_flash_decode(plan, q_latent, q_pe, *pages, seq_lens, scale),
                     _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale))
    with pytest.raises(ValueError, match="launch_decode: expected the planned shapes"):
        mf.launch_flash_decode(plan, q_latent[:1].contiguous(), q_pe[:1].contiguous(), *pages[:2],
                               pages[2][:1].contiguous(), seq_lens[:1].contiguous(), 0.1)


def test_bad_input_is_named(device):
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 70, torch.float32, device)
    lens = torch.tensor([3, 70], device=device)
    pages = _pages(c_kv, k_pe, lens)
    with pytest.raises(ValueError, match="block_h: expected a power of two >= 16"):
        mf.mla_decode_flash(q_latent, q_pe, *pages, lens, 0.1, block_h=48)
    with pytest.raises(ValueError, match="num_parts"):
        mf.mla_decode_flash(q_latent, q_pe, *pages, lens, 0.1, num_parts=0)
    with pytest.raises(ValueError, match=r"seq_lens: expected lengths in \[0, 128\]"):
        mf.mla_decode_flash(q_latent, q_pe, *pages, torch.tensor([3, 129], device=device), 0.1)
    with pytest.raises(ValueError, match="block_table: expected page numbers in"):
        mf.mla_decode_flash(q_latent, q_pe, pages[0], pages[1], pages[2] + 5, lens, 0.1)


def test_blocks_fit_the_shared_memory_budget():
    # 64 heads per program on an H100 (232,448 B per block); float32 over DeepSeek-V3's 512 + 64 latent does
    # not fit 64 heads on an A100 (166,912 B): 32; 5 heads: one block of 16; 48 KiB in float32: refused by name
    # bfloat16 on an H100: 64 x 64 blocks pipelined over 2 stages (221,184 B compiled for sm_90)
    assert mf.pick_blocks(512, 64, 128, 64, torch.bfloat16, 232448) == (64, 64, 2)
    assert mf.pick_blocks(512, 64, 128, 64, torch.float32, 232448)[0] == 64
    assert mf.pick_blocks(512, 64, 128, 64, torch.float32, 166912, arch=80)[0] == 32
    assert mf.pick_blocks(64, 16, 5, 64, torch.float16, 232448)[0] == 16
    with pytest.raises(ValueError, match="block_h=16: .* more than this GPU's 49152 B"):
        mf.pick_blocks(512, 64, 128, 64, torch.float32, 49152)
