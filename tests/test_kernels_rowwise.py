"""Row-wise kernels (softmax ladder, RMSNorm) against float64 references, on the GPU (compiled) when there is
one, else under TRITON_INTERPRET=1 on the CPU; every output through `dskernels._checks.assert_close`."""

import pytest
import torch

from dskernels import rowwise
from dskernels._checks import assert_close, runnable_dtypes
from refimpl.norm import rms_norm

# odd widths, a width below one block, one past a power of two, a single row
SHAPES = [(3, 5), (1, 1), (4, 129), (2, 3, 1000)]
DTYPES = runnable_dtypes()


@pytest.mark.parametrize("step", rowwise.SOFTMAX_STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_torch(step, shape, dtype, device):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    # v2 with a 64-wide block: 1000 columns take 16 blocks, the last one partly masked
    got = rowwise.softmax(x, step=step, block=64 if step == "v2" else None)
    assert_close(got, rowwise.softmax_reference(x.double()), dtype=dtype)


@pytest.mark.parametrize("step", rowwise.SOFTMAX_STEPS)
@pytest.mark.parametrize("leading, width, block", [(67, 70, 64), (1027, 1030, None), (64, 65, 64)])
def test_softmax_rows_that_start_with_minus_infinity(step, leading, width, block, device):
    # the first tile all -inf: v2's running max is -inf there, and -inf - -inf was NaN for the whole row
    x = torch.randn(3, width, device=device)
    x[0, :leading] = float("-inf")
    x[1, :leading] = float("-inf")  # row 1: also -inf past the first tile
    x[2, leading:] = float("-inf")  # row 2: -inf at the end only
    got = rowwise.softmax(x, step=step, block=block if step == "v2" else None)
    assert_close(got, torch.softmax(x.double(), dim=-1), dtype=torch.float32)
    assert not bool(got.isnan().any())


def test_softmax_of_a_row_of_minus_infinity_is_nan_as_in_pytorch(device):
    x = torch.full((1, 70), float("-inf"), device=device)
    for step in rowwise.SOFTMAX_STEPS:
        assert bool(rowwise.softmax(x, step=step).isnan().all()) and bool(torch.softmax(x, -1).isnan().all())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_refimpl(shape, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    got = rowwise.rmsnorm(x, weight, 1e-6)
    assert_close(got, rms_norm(x.double(), weight.double(), 1e-6), dtype=dtype)


def test_bfloat16_needs_a_gpu(device):
    if device.type == "cuda":
        pytest.skip("on a GPU bfloat16 runs (test_softmax_matches_torch covers it)")
    # bfloat16 is garbage under the interpreter (values kept as raw 16-bit integers): refused, with the reason
    with pytest.raises(TypeError, match="bfloat16 needs a GPU"):
        rowwise.softmax(torch.randn(2, 8, dtype=torch.bfloat16, device=device))


def test_bad_input_is_named(device):
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        rowwise.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="x: expected dtype"):
        rowwise.softmax(torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        rowwise.softmax(torch.randn(4, 6, device=device).t())
    with pytest.raises(ValueError, match="step: expected one of"):
        rowwise.softmax(torch.randn(2, 3, device=device), step="v9")
    for block in (48, 0, 2**17, 64.0):
        with pytest.raises(ValueError, match="block: expected a power of two"):
            rowwise.softmax(torch.randn(2, 100, device=device), block=block)
    with pytest.raises(ValueError, match="x: step v1 holds a row in one block of at most 65536"):
        rowwise.softmax(torch.empty(0, 70000, device=device), step="v1")
    with pytest.raises(ValueError, match=r"weight: expected shape \(5,\)"):
        rowwise.rmsnorm(torch.randn(2, 5, device=device), torch.ones(4, device=device), 1e-6)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        rowwise.rmsnorm(torch.randn(2, 5, device=device), torch.ones(5, dtype=torch.float16, device=device), 1e-6)
    with pytest.raises(ValueError, match="eps: expected a non-negative number"):
        rowwise.rmsnorm(torch.randn(2, 5, device=device), torch.ones(5, device=device), -1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CPU tensor refused: only a GPU run refuses it")
def test_cpu_tensor_refused_on_a_gpu_machine():
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        rowwise.softmax(torch.randn(2, 3))
