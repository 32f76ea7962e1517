"""MLA decode ladder (absorbed path, latent cache) against refimpl, under TRITON_INTERPRET=1 on a CPU."""

import pytest
import torch

from dskernels import mla_decode as md
from dskernels._checks import tolerance


def _inputs(batch, heads, kv_lora_rank, rope, max_len, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return (make(batch, heads, kv_lora_rank), make(batch, heads, rope), make(batch, max_len, kv_lora_rank),
            make(batch, max_len, rope))


def _run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale, num_splits=3):
    if step == "v3":
        pages = md.paginate(c_kv, k_pe, seq_lens, page_size=64, generator=torch.Generator().manual_seed(1))
        return md.mla_decode_paged(q_latent, q_pe, *pages, seq_lens, scale, num_splits=num_splits)
    return md.mla_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, scale, step=step, num_splits=num_splits)


@pytest.mark.parametrize("step", md.STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mla_decode_matches_refimpl(step, dtype):
    # 20 heads (a second, partly masked head block of 16); very unequal lengths: a single token, one past a
    # 64-block, and 200 (more splits than blocks for the short ones: empty splits must weigh nothing)
    q_latent, q_pe, c_kv, k_pe = _inputs(3, 20, 64, 16, 200, dtype)
    seq_lens = torch.tensor([1, 65, 200], dtype=torch.int32)
    scale = (64 + 16) ** -0.5
    got = _run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale)
    # outputs are convex combinations of cache rows (size ~1), sums over up to 200 tokens; scores are sums of
    # 80 products of size ~1, scaled by 80^-0.5: their rounding is inside the same budget
    tol = tolerance(dtype, 200, scale=2)
    torch.testing.assert_close(got, md.reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("step", ["v1", "v3"])
def test_deepseek_v3_latent_sizes(step):
    # kv_lora_rank 512 + qk_rope_head_dim 64 (DeepSeek-V3's config.json), 16 heads, float32
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 512, 64, 130, torch.float32)
    seq_lens = torch.tensor([130, 7])
    scale = 192 ** -0.5  # (qk_nope_head_dim 128 + qk_rope_head_dim 64) ** -0.5
    tol = tolerance(torch.float32, 576, scale=2)
    torch.testing.assert_close(_run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, scale, num_splits=2),
                               md.reference(q_latent, q_pe, c_kv, k_pe, seq_lens, scale), atol=tol, rtol=tol)


def test_paged_cache_reads_pages_through_the_block_table():
    # attention over a set of tokens does not depend on their order, so a permuted table proves nothing:
    # point both logical blocks at the same page and compare with the cache that table describes
    q_latent, q_pe, c_kv, k_pe = _inputs(1, 16, 32, 16, 128, torch.float32)
    seq_lens = torch.tensor([128])
    c_pages, k_pages, _ = md.paginate(c_kv, k_pe, seq_lens, generator=torch.Generator().manual_seed(0))
    table = torch.tensor([[1, 1]], dtype=torch.int32)
    got = md.mla_decode_paged(q_latent, q_pe, c_pages, k_pages, table, seq_lens, 0.2)
    described = c_pages[[1, 1]].reshape(1, 128, 32), k_pages[[1, 1]].reshape(1, 128, 16)
    want = md.reference(q_latent, q_pe, *described, seq_lens, 0.2)
    tol = tolerance(torch.float32, 128, scale=2)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert not torch.allclose(got, md.reference(q_latent, q_pe, c_kv, k_pe, seq_lens, 0.2), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 is garbage under Triton's interpreter (CPU)")
@pytest.mark.parametrize("step", md.STEPS)
def test_mla_decode_bfloat16_on_gpu(step):
    q_latent, q_pe, c_kv, k_pe = (t.cuda() for t in _inputs(4, 128, 512, 64, 1000, torch.bfloat16))
    seq_lens = torch.tensor([1, 64, 999, 1000], device="cuda")
    tol = tolerance(torch.bfloat16, 1000, scale=2)
    torch.testing.assert_close(_run(step, q_latent, q_pe, c_kv, k_pe, seq_lens, 0.07),
                               md.reference(q_latent, q_pe, c_kv, k_pe, seq_lens, 0.07), atol=tol, rtol=tol)


def test_bad_input_is_named():
    q_latent, q_pe, c_kv, k_pe = _inputs(2, 16, 32, 16, 10, torch.float32)
    lens = torch.tensor([3, 10])
    with pytest.raises(ValueError, match="seq_lens: expected lengths >= 1"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match=r"seq_lens: expected lengths <= 10"):
        md.mla_decode(q_latent, q_pe, c_kv, k_pe, torch.tensor([11, 3]), 0.1)
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
    pages = md.paginate(c_kv, k_pe, lens, page_size=16)
    with pytest.raises(ValueError, match="block_table: expected page numbers in"):
        md.mla_decode_paged(q_latent, q_pe, pages[0], pages[1], pages[2] + 5, lens, 0.1)
