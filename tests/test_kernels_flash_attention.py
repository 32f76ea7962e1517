"""Flash attention ladder against a float64 refimpl.attention reference, on the GPU (compiled) when there is
one, else under TRITON_INTERPRET=1 on the CPU; every output through `dskernels._checks.assert_close`."""

import pytest
import torch

from dskernels import flash_attention as fa
from dskernels._checks import assert_close, runnable_dtypes

# (batch, heads, q_len, kv_len, d, d_v): one token; lengths not multiples of the 32-blocks; fewer queries
# than keys (bottom-right causal alignment, as decoding with a cache); a head size that is not a power of two
SHAPES = [(1, 1, 1, 1, 16, 16), (2, 3, 37, 37, 32, 32), (1, 2, 5, 70, 64, 64), (1, 1, 40, 40, 24, 40)]


def _qkv(shape, dtype, device):
    batch, heads, q_len, kv_len, d, d_v = shape
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(batch, heads, q_len, d, generator=g, device=device).to(dtype),
            torch.randn(batch, heads, kv_len, d, generator=g, device=device).to(dtype),
            torch.randn(batch, heads, kv_len, d_v, generator=g, device=device).to(dtype))


@pytest.mark.parametrize("step", fa.STEPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_flash_attention_matches_refimpl(step, causal, shape, dtype, device):
    q, k, v = _qkv(shape, dtype, device)
    got = fa.flash_attention(q, k, v, causal=causal, step=step, block_m=32, block_n=32)
    assert_close(got, fa.reference(q.double(), k.double(), v.double(), causal=causal), dtype=dtype)


def test_v2_and_v3_skip_the_blocks_no_query_sees(device):
    # NaN values past the first query block's positions: v1 loads them and multiplies them by probability 0
    # (0 * NaN = NaN), v2 never loads them for the first block, whose output stays finite and unchanged
    q, k, v = _qkv((1, 1, 64, 64, 32, 32), torch.float32, device)
    poisoned = v.clone()
    poisoned[:, :, 32:] = float("nan")
    for step, first_block_finite in (("v1", False), ("v2", True), ("v3", True)):
        out = fa.flash_attention(q, k, poisoned, causal=True, step=step, block_m=32, block_n=32)
        assert bool(out[:, :, :32].isfinite().all()) == first_block_finite, step
    clean = fa.flash_attention(q, k, v, causal=True, step="v2", block_m=32, block_n=32)
    assert torch.equal(out[:, :, :32], clean[:, :, :32])


def test_bad_input_is_named(device):
    q = torch.randn(1, 2, 4, 16, device=device)
    with pytest.raises(ValueError, match="k: expected shape"):
        fa.flash_attention(q, torch.randn(1, 3, 4, 16, device=device), torch.randn(1, 2, 4, 16, device=device))
    with pytest.raises(TypeError, match="v: expected dtype torch.float32"):
        fa.flash_attention(q, q, q.half())
    with pytest.raises(ValueError, match="causal: expected q_len <= kv_len"):
        fa.flash_attention(q, q[:, :, :2].contiguous(), q[:, :, :2].contiguous(), causal=True)
    with pytest.raises(ValueError, match="q: expected a contiguous tensor"):
        fa.flash_attention(q.transpose(2, 3), q, q)
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16"):
        fa.flash_attention(q, q, q, block_n=48)
    with pytest.raises(ValueError, match="block_m=512, block_n=512: .* needs about .* B of shared memory"):
        big = torch.randn(1, 1, 4, 256, device=device)
        fa.flash_attention(big, big, big, block_m=512, block_n=512)
