"""MLA decode ladder (absorbed path, latent cache) against a float64 refimpl reference, on the GPU (compiled)
when there is one, else under TRITON_INTERPRET=1 on the CPU; every output through `assert_close`."""

import pytest
import torch

from dskernels import mla_decode as md
from dskernels._checks import assert_close, runnable_dtypes


def _inputs(batch, heads, kv_lora_rank, rope, max_len, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    return (make(batch, heads, kv_lora_rank), make(batch, heads, rope), make(batch, max_len, kv_lora_rank),
            make(batch, max_len, rope))


def _run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale, num_splits=3):
    if step == "v3":
        pages = md.paginate(c_kv, k_pe, seq_lens, page_size=64, generator=torch.Generator().manual_seed(1))
        return md.mla_decode_paged(q_latent, q_pe, *pages, seq_lens, scale, num_splits=num_splits)
    return md.mla_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, scale, step=step, num_splits=num_splits)


def _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale):
    return md.reference(q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(), seq_lens, scale)


@pytest.mark.parametrize("step", md.STEPS)
@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_mla_decode_matches_refimpl(step, dtype, device):
    # 20 heads (a second, partly masked head block of 16); very unequal lengths: an empty slot, a single
    # token, one past a 64-block, and 200 (more splits than blocks for the short ones: empty splits must
    # weigh nothing)
    q_latent, q_pe, c_kv, k_pe = _inputs(4, 20, 64, 16, 200, dtype, device)
    seq_lens = torch.tensor([1, 0, 65, 200], dtype=torch.int32, device=device)
    scale = (64 + 16) ** -0.5
    got = _run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # length 0: an exact zero row, no NaN
    assert_close(got, _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale), dtype=dtype)


@pytest.mark.parametrize("step", md.STEPS)
def test_a_batch_of_empty_slots_gives_zero_rows(step, device):
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 64, torch.float32, device)
    seq_lens = torch.zeros(2, dtype=torch.int64, device=device)
    got = _run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, 0.1, num_splits=2)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("step", ["v1", "v3"])
def test_deepseek_v3_latent_sizes(step, device):
    # kv_lora_rank 512 + qk_rope_head_dim 64 (DeepSeek-V3's config.json), 16 heads, float32
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 512, 64, 130, torch.float32, device)
    seq_lens = torch.tensor([130, 7], device=device)
    scale = 192 ** -0.5  # (qk_nope_head_dim 128 + qk_rope_head_dim 64) ** -0.5
    assert_close(_run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale, num_splits=2),
                 _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale))


def test_paged_cache_reads_pages_through_the_block_table(device):
    # attention over a set of tokens does not depend on their order, so a permuted table proves nothing:
    # point both logical blocks at the same page and compare with the cache that table describes
    q_latent, q_pe, c_kv, k_pe = _inputs(1, 16, 32, 16, 128, torch.float32, device)
    seq_lens = torch.tensor([128], device=device)
    c_pages, k_pages, _ = md.paginate(c_kv, k_pe, seq_lens, generator=torch.Generator().manual_seed(0))
    table = torch.tensor([[1, 1]], dtype=torch.int32, device=device)
    got = md.mla_decode_paged(q_latent, q_pe, c_pages, k_pages, table, seq_lens, 0.2)
    described = c_pages[[1, 1]].reshape(1, 128, 32), k_pages[[1, 1]].reshape(1, 128, 16)
    assert_close(got, _reference(q_latent, q_pe, *described, seq_lens, 0.2))
    assert not md.reference(q_latent, q_pe, c_kv, k_pe, seq_lens, 0.2).allclose(got, atol=1e-3)


def test_plan_once_launch_many(device):
    # the plan holds the validation (host syncs) and the choices; a launch on the planned shapes runs alone
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 70, torch.float32, device)
    seq_lens = torch.tensor([70, 3], device=device)
    plan = md.plan_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, step="v2", num_splits=2)
    assert plan.block_n == 64 and plan.num_stages in md.NUM_STAGES
    for scale in (0.1, 0.3):
        assert_close(md.launch_decode(plan, q_latent, q_pe, c_kv, k_pe, seq_lens, scale),
                     _reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale))
    with pytest.raises(ValueError, match="launch_decode: expected the planned shapes"):
        md.launch_decode(plan, q_latent[:1].contiguous(), q_pe[:1].contiguous(), c_kv[:1].contiguous(),
                         k_pe[:1].contiguous(), seq_lens[:1].contiguous(), 0.1)


def test_shared_memory_budget_picks_the_cache_block():
    # float32 over DeepSeek-V3's 512 + 64 latent: a 64-token block fits an H100's 232,448 B per block, not an
    # A100's 166,912 B (estimate 189,440 B), so there the wrapper takes 32; a 48 KiB budget refuses by name
    assert md.pick_block_n(512, 64, 16, torch.float32, 232448) == 64
    assert md.pick_block_n(512, 64, 16, torch.float32, 166912, arch=80) == 32
    assert md.pick_block_n(512, 64, 16, torch.bfloat16, 166912, arch=80) == 64
    with pytest.raises(ValueError, match="block_n=16, block_h=64: .* more than this GPU's 49152 B"):
        md.pick_block_n(512, 64, 64, torch.float32, 49152)


def test_bad_input_is_named(device):
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 10, torch.float32, device)
    lens = torch.tensor([3, 10], device=device)
    with pytest.raises(ValueError, match=r"seq_lens: expected lengths in \[0, 10\]"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, torch.tensor([-1, 3], device=device), 0.1)
    with pytest.raises(ValueError, match=r"seq_lens: expected lengths in \[0, 10\]"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, torch.tensor([11, 3], device=device), 0.1)
    with pytest.raises(TypeError, match="seq_lens: expected dtype"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, lens.float(), 0.1)
    with pytest.raises(ValueError, match="k_pe: expected shape"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe[:, :, :8].contiguous(), lens, 0.1)
    with pytest.raises(TypeError, match="c_kv: expected dtype torch.float32"):
        md.mla_decode(q_latent, q_pe, c_kv.half(), k_pe, lens, 0.1)
    with pytest.raises(ValueError, match="step: expected 'v1' or 'v2'"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.1, step="v3")
    with pytest.raises(ValueError, match="block_h: expected a power of two >= 16"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.1, block_h=8)
    with pytest.raises(ValueError, match="num_splits: expected at most 65535"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.1, num_splits=70000)
    pages = md.paginate(c_kv, k_pe, lens, page_size=16)
    with pytest.raises(ValueError, match="block_table: expected page numbers in"):
        md.mla_decode_paged(q_latent, q_pe, pages[0], pages[1], pages[2] + 5, lens, 0.1)
