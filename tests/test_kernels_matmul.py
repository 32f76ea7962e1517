"""Tiled matmul ladder against a float64 product, on the GPU (compiled) when there is one, else under
TRITON_INTERPRET=1 on the CPU (big tiles: the interpreter's cost grows with programs and loop steps)."""

import pytest
import torch

from dskernels import matmul
from dskernels._checks import assert_close, runnable_dtypes

# (M, K, N): odd sizes not multiples of the tiles, a single row, K shorter than a tile, several groups of tiles
SHAPES = [(1, 17, 33), (100, 70, 90), (67, 130, 33), (300, 16, 40)]


@pytest.mark.parametrize("step", matmul.STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_matmul_matches_torch(step, shape, dtype, device):
    M, K, N = shape
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, generator=g, device=device).to(dtype)
    b = torch.randn(K, N, generator=g, device=device).to(dtype)
    # 300 rows in tiles of 32 with GROUP_M=2: 10 rows of tiles in 5 groups; v3 picks its own tiles
    got = matmul.matmul(a, b, step=step, block_m=32, block_n=32, block_k=64, group_m=2)
    assert_close(got, a.double() @ b.double(), dtype=dtype)


@pytest.mark.parametrize("step", ["v1", "v2"])
def test_transposed_operands_are_read_in_place(step, device):
    # an nn.Linear weight [N, K] used as B = W^T: a column-major view, no copy
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(37, 50, generator=g, device=device)
    w = torch.randn(45, 50, generator=g, device=device)
    assert_close(matmul.matmul(a, w.t(), step=step, block_m=32, block_n=32, block_k=32), a.double() @ w.double().t())
    assert_close(matmul.matmul(a.t().contiguous().t(), w.t(), step=step), a.double() @ w.double().t())


def test_empty_sizes(device):
    assert matmul.matmul(torch.randn(0, 5, device=device), torch.randn(5, 3, device=device)).shape == (0, 3)
    got = matmul.matmul(torch.randn(4, 0, device=device), torch.randn(0, 3, device=device))
    assert torch.equal(got, torch.zeros(4, 3, device=device))


def test_bad_input_is_named(device):
    with pytest.raises(ValueError, match=r"b: expected shape \(5, .\*.\), got \(6, 3\)"):
        matmul.matmul(torch.randn(4, 5, device=device), torch.randn(6, 3, device=device))
    with pytest.raises(TypeError, match="b: expected dtype torch.float32"):
        matmul.matmul(torch.randn(4, 5, device=device), torch.randn(5, 3, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="a: expected a 2-d tensor"):
        matmul.matmul(torch.randn(4, device=device), torch.randn(4, 3, device=device))
    with pytest.raises(ValueError, match="a: expected a row-major or column-major matrix"):
        matmul.matmul(torch.randn(8, 5, device=device)[::2], torch.randn(5, 3, device=device))
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16"):
        matmul.matmul(torch.randn(4, 5, device=device), torch.randn(5, 3, device=device), step="v1", block_k=8)
    with pytest.raises(ValueError, match="step: expected one of"):
        matmul.matmul(torch.randn(4, 5, device=device), torch.randn(5, 3, device=device), step="v0")
    with pytest.raises(ValueError, match="block_m=512, block_n=512, block_k=512: .* B of shared memory"):
        matmul.matmul(torch.randn(4, 5, device=device), torch.randn(5, 3, device=device), step="v1",
                      block_m=512, block_n=512, block_k=512)
