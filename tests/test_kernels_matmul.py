"""Tiled matmul ladder against PyTorch, under TRITON_INTERPRET=1 on a CPU (big tiles: the interpreter's cost
grows with the number of programs and loop steps)."""

import pytest
import torch

from dskernels import matmul
from dskernels._checks import tolerance

# (M, K, N): odd sizes not multiples of the tiles, a single row, K shorter than a tile, several groups of tiles
SHAPES = [(1, 17, 33), (100, 70, 90), (67, 130, 33), (300, 16, 40)]


@pytest.mark.parametrize("step", matmul.STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_matches_torch(step, shape, dtype):
    torch.manual_seed(0)
    M, K, N = shape
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    # 300 rows in tiles of 32 with GROUP_M=2: 10 rows of tiles in 5 groups; v3 picks its own tiles
    got = matmul.matmul(a, b, step=step, block_m=32, block_n=32, block_k=64, group_m=2)
    # entries are sums of K products of N(0, 1) numbers: size ~sqrt(K), rounding to dtype on both sides
    tol = tolerance(dtype, K, scale=K ** 0.5)
    torch.testing.assert_close(got, matmul.reference(a, b), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 is garbage under Triton's interpreter (CPU)")
@pytest.mark.parametrize("step", matmul.STEPS)
def test_matmul_bfloat16_on_gpu(step):
    a = torch.randn(300, 200, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(200, 100, device="cuda", dtype=torch.bfloat16)
    tol = tolerance(torch.bfloat16, 200, scale=200 ** 0.5)
    torch.testing.assert_close(matmul.matmul(a, b, step=step), matmul.reference(a, b), atol=tol, rtol=tol)


def test_empty_sizes():
    assert matmul.matmul(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    assert torch.equal(matmul.matmul(torch.randn(4, 0), torch.randn(0, 3)), torch.zeros(4, 3))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"b: expected shape \(5, .\*.\), got \(6, 3\)"):
        matmul.matmul(torch.randn(4, 5), torch.randn(6, 3))
    with pytest.raises(TypeError, match="b: expected dtype torch.float32"):
        matmul.matmul(torch.randn(4, 5), torch.randn(5, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="a: expected a 2-d tensor"):
        matmul.matmul(torch.randn(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="a: expected a contiguous tensor"):
        matmul.matmul(torch.randn(5, 4).t(), torch.randn(5, 3))
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16"):
        matmul.matmul(torch.randn(4, 5), torch.randn(5, 3), step="v1", block_k=8)
    with pytest.raises(ValueError, match="step: expected one of"):
        matmul.matmul(torch.randn(4, 5), torch.randn(5, 3), step="v0")
