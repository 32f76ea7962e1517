"""Row-wise kernels (softmax ladder, RMSNorm) against PyTorch / refimpl, under TRITON_INTERPRET=1 on a CPU."""

import pytest
import torch

from dskernels import rowwise
from dskernels._checks import tolerance
from refimpl.norm import rms_norm

# odd widths, a width below one block, one past a power of two, a single row
SHAPES = [(3, 5), (1, 1), (4, 129), (2, 3, 1000)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("step", rowwise.SOFTMAX_STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_torch(step, shape, dtype):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).to(dtype)
    # v2 with a 64-wide block: 1000 columns take 16 blocks, the last one partly masked
    got = rowwise.softmax(x, step=step, block=64 if step == "v2" else None)
    want = rowwise.softmax_reference(x)
    # outputs lie in [0, 1]; float32 math, one rounding to dtype on both sides: tolerance of a length-n sum
    tol = tolerance(dtype, shape[-1])
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got.float().sum(-1), torch.ones(shape[:-1]), atol=tol * 8, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_refimpl(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    got = rowwise.rmsnorm(x, weight, 1e-6)
    want = rms_norm(x, weight, 1e-6)
    # outputs of size ~1 (|x| / rms ~ a few): two roundings to dtype (the normalized x, then times weight)
    tol = tolerance(dtype, shape[-1], scale=4)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_bfloat16_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU bfloat16 runs")
    # bfloat16 is garbage under the interpreter (values kept as raw 16-bit integers): refused, with the reason
    with pytest.raises(TypeError, match="bfloat16 needs a GPU"):
        rowwise.softmax(torch.randn(2, 8, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 is garbage under Triton's interpreter (CPU)")
def test_bfloat16_on_gpu():
    x = torch.randn(4, 300, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(300, device="cuda", dtype=torch.bfloat16)
    tol = tolerance(torch.bfloat16, 300)
    torch.testing.assert_close(rowwise.softmax(x), rowwise.softmax_reference(x), atol=tol, rtol=tol)
    torch.testing.assert_close(rowwise.rmsnorm(x, w, 1e-6), rms_norm(x, w, 1e-6), atol=tol * 4, rtol=tol * 4)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        rowwise.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="x: expected dtype"):
        rowwise.softmax(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        rowwise.softmax(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="step: expected one of"):
        rowwise.softmax(torch.randn(2, 3), step="v9")
    with pytest.raises(ValueError, match=r"weight: expected shape \(5,\)"):
        rowwise.rmsnorm(torch.randn(2, 5), torch.ones(4), 1e-6)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        rowwise.rmsnorm(torch.randn(2, 5), torch.ones(5, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="eps: expected a non-negative number"):
        rowwise.rmsnorm(torch.randn(2, 5), torch.ones(5), -1.0)
