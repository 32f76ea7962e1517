"""Flash attention ladder against refimpl.attention.scaled_dot_product_attention, under TRITON_INTERPRET=1."""

import pytest
import torch

from dskernels import flash_attention as fa
from dskernels._checks import tolerance

# (batch, heads, q_len, kv_len, d, d_v): one token; lengths not multiples of the 32-blocks; fewer queries
# than keys (bottom-right causal alignment, as decoding with a cache); a head size that is not a power of two
SHAPES = [(1, 1, 1, 1, 16, 16), (2, 3, 37, 37, 32, 32), (1, 2, 5, 70, 64, 64), (1, 1, 40, 40, 24, 40)]


@pytest.mark.parametrize("step", fa.STEPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_matches_refimpl(step, causal, shape, dtype):
    torch.manual_seed(0)
    batch, heads, q_len, kv_len, d, d_v = shape
    q = torch.randn(batch, heads, q_len, d).to(dtype)
    k = torch.randn(batch, heads, kv_len, d).to(dtype)
    v = torch.randn(batch, heads, kv_len, d_v).to(dtype)
    got = fa.flash_attention(q, k, v, causal=causal, step=step, block_m=32, block_n=32)
    # outputs are convex combinations of v rows (size ~1); the longest sum is over kv_len keys; the reference
    # rounds the probabilities to dtype, the kernel keeps exp(s - m) in float32 until the product with v
    tol = tolerance(dtype, kv_len, scale=2)
    torch.testing.assert_close(got, fa.reference(q, k, v, causal=causal), atol=tol, rtol=tol)


def test_v2_and_v3_skip_the_blocks_no_query_sees():
    # NaN values past the first query block's positions: v1 loads them and multiplies them by probability 0
    # (0 * NaN = NaN), v2 never loads them for the first block, whose output stays finite and unchanged
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 32) for _ in range(3))
    poisoned = v.clone()
    poisoned[:, :, 32:] = float("nan")
    for step, first_block_finite in (("v1", False), ("v2", True), ("v3", True)):
        out = fa.flash_attention(q, k, poisoned, causal=True, step=step, block_m=32, block_n=32)
        assert bool(out[:, :, :32].isfinite().all()) == first_block_finite, step
    clean = fa.flash_attention(q, k, v, causal=True, step="v2", block_m=32, block_n=32)
    assert torch.equal(out[:, :, :32], clean[:, :, :32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 is garbage under Triton's interpreter (CPU)")
@pytest.mark.parametrize("step", fa.STEPS)
def test_flash_attention_bfloat16_on_gpu(step):
    q, k, v = (torch.randn(2, 4, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tol = tolerance(torch.bfloat16, 300, scale=2)
    torch.testing.assert_close(fa.flash_attention(q, k, v, causal=True, step=step),
                               fa.reference(q, k, v, causal=True), atol=tol, rtol=tol)


def test_bad_input_is_named():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="k: expected shape"):
        fa.flash_attention(q, torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(TypeError, match="v: expected dtype torch.float32"):
        fa.flash_attention(q, q, q.half())
    with pytest.raises(ValueError, match="causal: expected q_len <= kv_len"):
        fa.flash_attention(q, q[:, :, :2].contiguous(), q[:, :, :2].contiguous(), causal=True)
    with pytest.raises(ValueError, match="q: expected a contiguous tensor"):
        fa.flash_attention(q.transpose(2, 3), q, q)
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16"):
        fa.flash_attention(q, q, q, block_n=48)
