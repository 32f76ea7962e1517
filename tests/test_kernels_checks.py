"""The output checker `dskernels._checks.compare`: it passes the reference rounded to the output dtype (the
best a kernel can do) and refuses the wrong outputs a kernel bug gives. No kernel runs here."""
# cpu-only file: the checker alone, on CPU tensors; no kernel runs on a device here


import pytest
import torch

from dskernels._checks import assert_close, bounds, compare
from refimpl.attention import scaled_dot_product_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _softmax_case():
    x = 3 * torch.randn(37, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, x.softmax(dim=-1)  # logits of size ~3, as the kernel tests use


def _attention_case(causal=True, scale=None):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g, dtype=torch.float64) for _ in range(3))
    return (q, k, v), scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_rounded_to_the_dtype_passes(dtype):
    for ref in (_softmax_case()[1], _attention_case()[1]):
        result = assert_close(ref.to(dtype), ref)
        assert result.rel_err <= result.rel_bound and result.max_row_err <= result.row_bound


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_outputs_are_refused(dtype):
    _, ref = _softmax_case()
    good = ref.to(dtype)
    wrong = {"all zeros": torch.zeros_like(good)}
    one_row = good.clone()
    one_row[5] = good[6]  # a wrong row offset for one row
    wrong["one row wrong"] = one_row
    last_block = good.clone()
    last_block[:, 64:] = 0  # the partial last 64-block of every row never written
    wrong["last partial block of columns"] = last_block
    last_rows = good.clone()
    last_rows[32:] = good[:5].repeat(7, 1)[:5]  # the partial last 32-block of rows holds another block's rows
    wrong["last partial block of rows"] = last_rows
    nan = good.clone()
    nan[3, 7] = float("nan")
    wrong["one NaN"] = nan
    x, _ = _softmax_case()
    wrong["softmax scale off by 1%"] = (1.01 * x).softmax(dim=-1).to(dtype)
    (q, k, v), attention = _attention_case()
    wrong["causal mask dropped"] = scaled_dot_product_attention(q, k, v, is_causal=False).to(dtype)
    wrong["attention scale off by 1%"] = scaled_dot_product_attention(
        q, k, v, scale=1.01 * 32 ** -0.5, is_causal=True).to(dtype)
    for what, out in wrong.items():
        want = attention if what.startswith(("causal", "attention")) else ref
        result = compare(out, want)
        assert not result.ok, (what, result.message)
        with pytest.raises(AssertionError, match=f"{what}: WRONG"):
            assert_close(out, want, what=what)


def test_a_zero_reference_row_must_be_matched_exactly():
    ref = torch.randn(3, 8, dtype=torch.float64)
    ref[1] = 0  # e.g. an empty slot of MLA decode
    out = ref.float()
    assert compare(out, ref).ok
    out[1, 2] = 1e-3
    assert not compare(out, ref).ok and compare(out, ref).worst_row == 1


def test_shapes_and_dtypes():
    assert not compare(torch.zeros(2, 3), torch.zeros(3, 2)).ok
    assert compare(torch.zeros(0, 3), torch.zeros(0, 3)).ok
    assert compare(torch.ones(5), torch.ones(5, dtype=torch.float64)).ok  # a 1-d tensor is one row
    with pytest.raises(TypeError, match="dtype: expected torch.float16, torch.bfloat16 or torch.float32"):
        compare(torch.zeros(2, dtype=torch.int64), torch.zeros(2))
    with pytest.raises(TypeError, match="out: expected a torch.Tensor"):
        compare([0.0], torch.zeros(1))
    assert bounds(torch.bfloat16) == (2 * 2**-8, 4 * 2**-8)
