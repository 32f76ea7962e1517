"""MoE experts ladder (loop over experts; aligned grouped GEMM with fused SwiGLU) against refimpl.moe,
under TRITON_INTERPRET=1 on a CPU."""

import pytest
import torch

from dskernels import moe
from dskernels._checks import tolerance


def _inputs(T, H, I, E, k, dtype, used_experts=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    used = used_experts or E
    topk_idx = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(T)]).reshape(T, k)
    topk_weight = torch.rand(T, k, generator=g)
    # weights ~ 1/sqrt(fan-in), as nn.Linear's init: activations stay of size ~1
    w_gate = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(dtype)
    w_up = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return torch.randn(T, H, generator=g).to(dtype), topk_idx, topk_weight, w_gate, w_up, w_down


@pytest.mark.parametrize("step", moe.STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 37])
def test_moe_experts_match_refimpl(step, dtype, T):
    # 8 experts of which only the first 5 are ever chosen: 3 empty experts; odd sizes, 37 tokens x top-3 pairs
    # are not a multiple of the 16-row blocks
    args = _inputs(T, 48, 40, 8, 3, dtype, used_experts=5)
    got = moe.moe_experts(*args, step=step, block_m=16, block_n=32, block_k=32)
    # sums of k=3 weighted expert outputs (size ~1), each through sums of H=48 and I=40 products
    tol = tolerance(dtype, 48, scale=4)
    torch.testing.assert_close(got, moe.reference(*args), atol=tol, rtol=tol)


def test_align_to_experts_pads_each_expert_to_whole_blocks():
    topk_idx = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5: experts 2, 0, 2, 1, 0, 2
    sorted_pairs, block_expert = moe.align_to_experts(topk_idx, 4, block_m=4)
    # expert 0: pairs 1, 4; expert 1: pair 3; expert 2: pairs 0, 2, 5; expert 3: none (no block); sentinel 6
    assert sorted_pairs.tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]
    assert block_expert.tolist() == [0, 1, 2]


def test_no_tokens():
    x, topk_idx, topk_weight, *weights = _inputs(1, 16, 16, 4, 2, torch.float32)
    assert moe.moe_experts(x[:0], topk_idx[:0], topk_weight[:0], *weights).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 is garbage under Triton's interpreter (CPU)")
@pytest.mark.parametrize("step", moe.STEPS)
def test_moe_bfloat16_on_gpu(step):
    args = [t.cuda() for t in _inputs(300, 256, 128, 16, 4, torch.bfloat16, used_experts=12)]
    tol = tolerance(torch.bfloat16, 256, scale=4)
    torch.testing.assert_close(moe.moe_experts(*args, step=step), moe.reference(*args), atol=tol, rtol=tol)


def test_bad_input_is_named():
    x, topk_idx, topk_weight, w_gate, w_up, w_down = _inputs(4, 16, 32, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 4\)"):
        moe.moe_experts(x, topk_idx + 3, topk_weight, w_gate, w_up, w_down)
    with pytest.raises(TypeError, match="topk_idx: expected dtype torch.int64"):
        moe.moe_experts(x, topk_idx.int(), topk_weight, w_gate, w_up, w_down)
    with pytest.raises(ValueError, match="w_down: expected shape"):
        moe.moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_up)
    with pytest.raises(TypeError, match="w_up: expected dtype torch.float32"):
        moe.moe_experts(x, topk_idx, topk_weight, w_gate, w_up.half(), w_down)
    with pytest.raises(ValueError, match="topk_weight: expected shape"):
        moe.moe_experts(x, topk_idx, topk_weight[:, :1].contiguous(), w_gate, w_up, w_down)
    with pytest.raises(ValueError, match="block_m: expected a power of two"):
        moe.moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, block_m=48)
