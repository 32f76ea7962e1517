"""refimpl.dense against transformers' Llama and Mistral: tiny random models built here (no download), their
weights copied in by name; logits within 1e-5 in float32, greedy generations equal token for token, for MHA,
GQA and MQA, llama3 RoPE scaling and Mistral's sliding window, padded batches included."""

import warnings

import pytest
import torch

from refimpl.config import ModelConfig
from refimpl.dense import DenseForCausalLM

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-gqa-llama3-rope": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "mistral-window-4": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
}


def build_hf(kind: str, overrides: dict, seed: int = 0):
    """A tiny random transformers Llama or Mistral, weights larger than the default init (logits far from ties)."""
    cfg_cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = cfg_cls(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (transformers.LlamaForCausalLM if kind == "llama" else transformers.MistralForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = build_hf(*CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, DenseForCausalLM.from_pretrained(folder)


def _ids(batch=2, seq=11, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_generate(hf, ids, mask, n):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None)  # tiny random models: don't stop on token 2


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = _ids()  # 11 tokens: longer than the sliding window of 4
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == (2, 11, VOCAB) and expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    ids = _ids(seq=5, seed=2)
    with torch.no_grad():
        expected = _hf_generate(hf, ids, torch.ones_like(ids), 12)
    got = ours.generate(ids, max_new_tokens=12)
    assert torch.equal(got, expected)
    assert len(set(got[0, 5:].tolist())) > 1  # not a degenerate repeat-one-token sequence


def test_padded_batch_matches_transformers_and_each_prompt_alone(pair):
    hf, ours = pair
    long, short = _ids(batch=1, seq=7, seed=3), _ids(batch=1, seq=3, seed=5)
    ids = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1)))  # left padding
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        torch.testing.assert_close(logits[1, 4:], ours(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1, 4:], hf(ids, attention_mask=mask).logits[1, 4:], atol=1e-5, rtol=1e-5)
        expected = _hf_generate(hf, ids, mask, 10)
    got = ours.generate(ids, 10, attention_mask=mask)
    assert torch.equal(got, expected)
    assert torch.equal(got[0], ours.generate(long, 10)[0])
    assert torch.equal(got[1, 4:], ours.generate(short, 10)[0])


def test_sliding_window_changes_what_a_token_sees(tmp_path):
    build_hf("mistral", CASES["mistral-window-4"][1]).save_pretrained(tmp_path)
    ours = DenseForCausalLM.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        logits = ours(ids)
        ours.model.layers[0].self_attn.sliding_window = None  # the window off in layer 0: later tokens change
        unwindowed = ours(ids)
    torch.testing.assert_close(logits[:, :4], unwindowed[:, :4], atol=1e-6, rtol=1e-6)  # within the window
    assert (logits[:, 4:] - unwindowed[:, 4:]).abs().max() > 1e-2


# ---------------------------------------------------------------------------- on its own
TINY = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DenseForCausalLM(TINY).double().eval()


def test_decoding_with_the_cache_equals_the_full_forward(tiny):
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(ids)
        caches = tiny.new_caches(batch_size=2, max_len=10)
        steps = [tiny(ids[:, :4], 0, caches)] + [tiny(ids[:, t:t + 1], t, caches) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=1e-10)


def test_empty_input_gives_empty_logits(tiny):
    assert tiny(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 50)
    with pytest.raises(ValueError, match="input_ids: expected a prompt of at least one token"):
        tiny.generate(torch.zeros(2, 0, dtype=torch.long), 3)


def test_parameter_names_are_those_of_llama_checkpoints(tiny):
    names = set(tiny.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert tiny.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)  # GQA: 2 key/value heads of 8


def test_non_dense_config_raises():
    mla = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    with pytest.raises(ValueError, match="DenseForCausalLM needs a dense config"):
        DenseForCausalLM(mla)
    with pytest.raises(TypeError, match="config: expected a refimpl.config.ModelConfig"):
        DenseForCausalLM({"vocab_size": 10})
