"""MoE experts ladder (loop over experts; aligned grouped GEMM with fused SwiGLU) against a float64
refimpl.moe reference, on the GPU (compiled) when there is one, else under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from dskernels import matmul, moe
from dskernels._checks import assert_close, runnable_dtypes


def _inputs(T, H, I, E, k, dtype, device, used_experts=None, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    used = used_experts or E
    topk_idx = torch.stack([torch.randperm(used, generator=g, device=device)[:k] for _ in range(T)]).reshape(T, k)
    topk_weight = torch.rand(T, k, generator=g, device=device)
    # weights ~ 1/sqrt(fan-in), as nn.Linear's init: activations stay of size ~1
    w_gate = (torch.randn(E, I, H, generator=g, device=device) * H ** -0.5).to(dtype)
    w_up = (torch.randn(E, I, H, generator=g, device=device) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g, device=device) * I ** -0.5).to(dtype)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    return x, topk_idx, topk_weight, w_gate, w_up, w_down


def _reference(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    return moe.reference(x.double(), topk_idx, topk_weight.double(), w_gate.double(), w_up.double(),
                         w_down.double())


@pytest.mark.parametrize("step", moe.STEPS)
@pytest.mark.parametrize("dtype", runnable_dtypes())
@pytest.mark.parametrize("T", [1, 37])
def test_moe_experts_match_refimpl(step, dtype, T, device):
    # 8 experts of which only the first 5 are ever chosen: 3 empty experts; odd sizes, 37 tokens x top-3 pairs
    # are not a multiple of the 16-row blocks
    args = _inputs(T, 48, 40, 8, 3, dtype, device, used_experts=5)
    got = moe.moe_experts(*args, step=step, block_m=16, block_n=32, block_k=32)
    assert_close(got, _reference(*args), dtype=dtype)


def test_v1_reads_the_weights_in_place(device, monkeypatch):
    # like the eager loop's F.linear: no transposed copy of an expert's weights on each call
    args = _inputs(5, 32, 16, 4, 2, torch.float32, device)
    seen = []

    def spy(a, b, **kwargs):
        seen.append(b.data_ptr())
        return real(a, b, **kwargs)
    real = matmul.matmul
    monkeypatch.setattr(moe.tiled_matmul, "matmul", spy)
    assert_close(moe.moe_experts(*args, step="v1"), _reference(*args))
    weights = [w[e].data_ptr() for w in args[3:] for e in range(4)]
    assert len(seen) == 3 * 4 and all(ptr in weights for ptr in seen)  # each matmul's B: a weight itself


def test_align_to_experts_pads_each_expert_to_whole_blocks(device):
    topk_idx = torch.tensor([[2, 0], [2, 1], [0, 2]], device=device)  # pairs 0..5: experts 2, 0, 2, 1, 0, 2
    sorted_pairs, block_expert = moe.align_to_experts(topk_idx, 4, block_m=4)
    # expert 0: pairs 1, 4; expert 1: pair 3; expert 2: pairs 0, 2, 5; expert 3: none (no block); sentinel 6
    assert sorted_pairs.tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]
    assert block_expert.tolist() == [0, 1, 2]


def test_no_tokens(device):
    x, topk_idx, topk_weight, *weights = _inputs(1, 16, 16, 4, 2, torch.float32, device)
    assert moe.moe_experts(x[:0], topk_idx[:0], topk_weight[:0], *weights).shape == (0, 16)


def test_plan_once_launch_many(device):
    args = _inputs(9, 32, 16, 4, 2, torch.float32, device)
    plan = moe.plan_experts(*args, block_m=16, block_n=16, block_k=16)
    for _ in range(2):
        assert_close(moe.launch_experts(plan, *args), _reference(*args))
    with pytest.raises(ValueError, match="launch_experts: expected the planned shapes"):
        moe.launch_experts(plan, *(t[:3].contiguous() for t in args[:3]), *args[3:])


def test_bad_input_is_named(device):
    x, topk_idx, topk_weight, w_gate, w_up, w_down = _inputs(4, 16, 32, 4, 2, torch.float32, device)
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
    with pytest.raises(ValueError, match="block_m=1024, block_n=1024, block_k=1024: .* B of shared memory"):
        moe.moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, block_m=1024, block_n=1024, block_k=1024)


@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_v3_decode_regime_a_few_tokens_per_expert(dtype, device):
    # 3 tokens x top-2 over 16 experts (DeepSeek-V2-Lite decode has 64 x 6 over 64: 6 rows per expert):
    # 16-row blocks, the combine summed in the down launch (each token's 2 rows in different programs)
    args = _inputs(3, 48, 40, 16, 2, dtype, device)
    plan = moe.plan_experts(*args, step="v3", block_n=32, block_k=32)
    assert plan.block_m == 16
    assert_close(moe.launch_experts(plan, *args), _reference(*args), dtype=dtype)


def test_v3_fuses_the_combine_into_the_down_launch(device, monkeypatch):
    args = _inputs(9, 32, 16, 4, 3, torch.float32, device)
    launched = []
    for name in ("gate_up_kernel", "down_kernel", "down_combine_kernel"):
        kernel = getattr(moe, name)
        monkeypatch.setattr(moe, name, _Recorder(kernel, name, launched))
    assert_close(moe.moe_experts(*args, step="v3", block_m=16, block_n=16, block_k=16), _reference(*args))
    assert launched == ["gate_up_kernel", "down_combine_kernel"]  # no per-pair buffer summed afterwards


class _Recorder:
    """kernel[grid](...) that records the kernel's name, then launches it."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_decode_block_m_and_bytes_floor():
    assert moe.decode_block_m(64 * 6, 64, 64) == 16  # V2-Lite decode: 6 rows per expert
    assert moe.decode_block_m(8192 * 6, 64, 64) == 64  # prefill: 768 rows per expert, capped at block_m
    assert moe.decode_block_m(40 * 6, 8, 64) == 32
    # V2-Lite experts (H 2048, I 1408), 64 used, bf16: 3 * 64 * 1408 * 2048 * 2 B = 1.107 GB of weights
    assert moe.decode_bytes(64, 2048, 1408, 64, 2) == 3 * 64 * 1408 * 2048 * 2 + 2 * 64 * 2048 * 2
