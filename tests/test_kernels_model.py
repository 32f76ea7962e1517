"""The switch `dskernels.model.use_kernels`: a refimpl model generates the same tokens with the kernels inside,
on the GPU (compiled) when there is one, else under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from dskernels import mla_decode, moe, rowwise
from dskernels._checks import assert_close
from dskernels.model import use_kernels
from refimpl.config import ModelConfig
from refimpl.model import DeepSeekForCausalLM

# 3 layers (the first dense), MLA with q compression, 6 routed experts top-2 and a shared one
TINY = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
                   n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                   first_k_dense_replace=1, max_position_embeddings=64)


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(TINY).eval().to(device)


def test_generation_with_kernels_gives_the_same_tokens(model, monkeypatch, device):
    calls = {"rmsnorm": 0, "moe_experts": 0, "mla_decode": 0}
    for module, name in ((rowwise, "rmsnorm"), (moe, "moe_experts"), (mla_decode, "mla_decode")):
        def counted(*args, _f=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    prompt = torch.tensor([[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]], device=device)
    want = model.generate(prompt, 4)
    with use_kernels(model):
        got = model.generate(prompt, 4)
    assert torch.equal(got, want)
    # every kernel ran in each of the 4 model calls (prefill + 3 decode steps): 4 RMSNorms per layer + the
    # final one, 2 MoE layers; MLA decode in the 3 decode steps x 3 layers. The prefill's last layer runs its
    # last token only (refimpl.model.forward_last_positions): 2 more RMSNorms (the other tokens' cache
    # entries) and one more MLA decode (that token, after them)
    assert calls == {"rmsnorm": 4 * 13 + 2, "moe_experts": 4 * 2, "mla_decode": 3 * 3 + 1}
    # and the switch is off again: refimpl's own forward
    assert all("forward" not in vars(m) for m in model.modules())


def test_kernel_logits_match_refimpl(model, device):
    tokens = torch.tensor([[1, 2, 3, 4, 5]], device=device)
    caches = model.new_caches(1, 6)
    model(tokens, 0, caches, mode="absorbed")
    want = model(torch.tensor([[7]], device=device), 5, caches, mode="absorbed")
    caches = model.new_caches(1, 6)
    with torch.no_grad(), use_kernels(model, mla_step="v1"):
        model(tokens, 0, caches, mode="absorbed")
        got = model(torch.tensor([[7]], device=device), 5, caches, mode="absorbed")
    assert_close(got, want)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        with use_kernels("model"):
            pass
    with pytest.raises(ValueError, match="mla_step: expected 'v1' or 'v2'"):
        with use_kernels(torch.nn.Linear(2, 2), mla_step="v3"):  # cpu-only: refused before any kernel
            pass
