"""refimpl.model on its own: cache decoding equals the full forward, sampling is seeded, bad calls raise."""

import pytest
import torch

from refimpl.config import ModelConfig
from refimpl.model import DeepSeekForCausalLM
from refimpl.moe import DeepSeekMoE

TINY = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                   n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                   first_k_dense_replace=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekForCausalLM(TINY).double().eval()


def test_layer_kinds_follow_first_k_dense_replace(model):
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MLP", "DeepSeekMoE", "DeepSeekMoE"]
    assert all(isinstance(m, DeepSeekMoE) for m in model.moe_layers()) and len(model.moe_layers()) == 2


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_decoding_with_the_cache_equals_the_full_forward(model, mode):
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(batch_size=2, max_len=10)
        steps = [model(ids[:, :4], 0, caches, mode)]  # prefill 4 tokens, then one at a time
        steps += [model(ids[:, t:t + 1], t, caches, mode) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=1e-10)


def test_generate_greedy_equals_argmax_of_full_forward(model):
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (1, 9) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        for t in range(3, 9):  # each new token is the argmax of the full forward over what came before
            assert out[0, t] == model(out[:, :t])[0, -1].argmax()


def test_sampling_is_seeded(model):
    prompt = torch.tensor([[5, 6]])
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, seed=3)
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, seed=3)
    c = [model.generate(prompt, 8, temperature=1.0, seed=s) for s in range(4)]
    assert torch.equal(a, b)
    assert len({tuple(x[0].tolist()) for x in c}) > 1


def test_top_k_one_is_greedy(model):
    prompt = torch.tensor([[7, 8, 9]])
    assert torch.equal(model.generate(prompt, 5, temperature=0.7, top_k=1, seed=0), model.generate(prompt, 5))


def test_eos_stops_generation(model):
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, 6)
    eos = int(greedy[0, 4])  # the second generated token
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert out[0, -1] == eos and out.shape[1] <= 5


def test_bad_generate_arguments_raise(model):
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(prompt, 63)
    with pytest.raises(ValueError, match="caches: expected one per layer"):
        model(prompt, 0, model.new_caches(1, 4)[:2])


def test_non_mla_config_raises():
    dense = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        DeepSeekForCausalLM(dense)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_empty_input_gives_empty_logits(model, mode):
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert model(empty, mode=mode).shape == (2, 0, 50)
    assert model(empty, 0, model.new_caches(2, 4), mode).shape == (2, 0, 50)
    with pytest.raises(ValueError, match=r"input_ids: expected a prompt of at least one token per row, got shape \(2, 0\)"):
        model.generate(empty, 3)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_padded_batch_generates_each_prompt_as_alone(model, mode):
    long, short = torch.tensor([[3, 14, 15, 9, 26, 5]]), torch.tensor([[35, 8, 9]])
    ids = torch.cat((long, torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1)))
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        logits = model(ids, mode=mode, attention_mask=mask)
        torch.testing.assert_close(logits[1, 3:], model(short, mode=mode)[0], atol=1e-10, rtol=1e-10)
    out = model.generate(ids, 7, attention_mask=mask, mode=mode)
    assert torch.equal(out[0], model.generate(long, 7, mode=mode)[0])
    assert torch.equal(out[1, 3:], model.generate(short, 7, mode=mode)[0])
    assert not torch.equal(model.generate(ids, 7, mode=mode)[1], out[1])  # without the mask: another continuation


@pytest.mark.parametrize("make", ["DeepSeekForCausalLM", "DenseForCausalLM"])
def test_a_config_that_is_not_a_model_config_is_refused(make):
    from refimpl.dense import DenseForCausalLM
    from refimpl.model import DeepSeekForCausalLM

    cls = {"DeepSeekForCausalLM": DeepSeekForCausalLM, "DenseForCausalLM": DenseForCausalLM}[make]
    with pytest.raises(TypeError, match="config: expected a refimpl.config.ModelConfig, got dict"):
        cls({"hidden_size": 8})
