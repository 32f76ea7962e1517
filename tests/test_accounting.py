"""refimpl.accounting against published figures (papers, model cards) and against transformers' own models.

Expected numbers are written out here, with their source, never computed by the code under test. Where the
published figure is rounded, the tolerance says how close our count comes (see `param_counts`' docstring).
"""

import warnings
from collections import Counter

import pytest

from refimpl import accounting as acc
from refimpl.config import ModelConfig, load_known

B = 1e9


def cfg(name):
    return load_known(name)


def close(got, want, rel):
    return abs(got / want - 1) <= rel


# ---------------------------------------------------------------------------------------------------- totals
@pytest.mark.parametrize("name, published, rel", [
    ("DeepSeek-V3", 671 * B, 0.01),  # V3 report (arXiv 2412.19437), abstract: "671B total parameters"
    ("DeepSeek-V2", 236 * B, 0.01),  # V2 report (arXiv 2405.04434), abstract: "236B total parameters"
    ("DeepSeek-V2-Lite", 15.7 * B, 0.01),  # V2 report, Appendix B: "15.7B parameters in total"
    ("Llama-3-8B", 8.03 * B, 0.005),  # Hugging Face model page (safetensors count): 8.03B
    ("Llama-3-70B", 70.6 * B, 0.005),  # Hugging Face model page: 70.6B
    ("Mistral-7B", 7.24 * B, 0.005),  # Hugging Face model page: 7.24B
    ("Llama-2-7B", 6.74 * B, 0.005),  # Hugging Face model page: 6.74B
    ("DeepSeek-LLM-67B", 67 * B, 0.01),  # DeepSeek LLM (arXiv 2401.02954): "67B"
    ("Llama-3.1-405B", 405 * B, 0.005),  # Llama 3.1 model card (meta-llama/llama-models): 405B
])
def test_total_matches_published(name, published, rel):
    assert close(acc.param_counts(cfg(name)).total, published, rel)


@pytest.mark.parametrize("name, exact", [
    # model.num_parameters() of the released transformers checkpoints, as widely quoted
    ("Llama-2-7B", 6_738_415_616),
    ("Llama-3-8B", 8_030_261_248),
    ("Llama-3-70B", 70_553_706_496),
    ("Mistral-7B", 7_241_732_096),
])
def test_dense_totals_are_exact(name, exact):
    assert acc.param_counts(cfg(name)).total == exact


# ---------------------------------------------------------------------------------------------------- activated
def test_v3_activated():
    p = acc.param_counts(cfg("DeepSeek-V3"))
    # README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: "Activation parameters: 36.7B"
    assert close(p.activated_non_embedding, 36.7 * B, 0.005)
    # report, abstract: "37B activated for each token"; everything a token touches is 37.55B (+1.5%)
    assert close(p.activated, 37 * B, 0.015)
    assert round(p.activated_non_embedding / B) == 37
    # by hand: 58 MoE layers (61 - first_k_dense_replace 3), each skipping 256 - 8 experts of 3 * 7168 * 2048
    assert p.total - p.activated == 58 * (256 - 8) * 3 * 7168 * 2048


def test_v2_activated():
    p = acc.param_counts(cfg("DeepSeek-V2"))
    # V2 report, abstract: "21B are activated for each token"
    assert close(p.activated_non_embedding, 21 * B, 0.01)
    assert close(p.activated, 21 * B, 0.02)
    assert p.total - p.activated == 59 * (160 - 6) * 3 * 5120 * 1536


def test_v2_lite_activated():
    p = acc.param_counts(cfg("DeepSeek-V2-Lite"))
    # V2 report, Appendix B: "2.4B are activated for each token"; nobody's counting reaches it (issue #73):
    # without the embedding 2.45B (+2.1%), with everything 2.66B
    assert close(p.activated_non_embedding, 2.4 * B, 0.025)
    assert p.total - p.activated == 26 * (64 - 6) * 3 * 2048 * 1408


def test_dense_models_activate_everything():
    for name in ("Llama-2-7B", "Llama-3-8B", "Llama-3-70B", "Llama-3.1-405B", "Mistral-7B",
                 "DeepSeek-LLM-67B"):
        p = acc.param_counts(cfg(name))
        assert p.activated == p.total
        assert p.routed_experts == p.router == p.shared_experts == p.mtp == 0


def test_v3_parts_by_hand():
    # V3 report sec. 4.2: 61 layers, hidden 7168, 128 heads of d_h 128, d_c 512, d'_c 1536, d_h^R 64;
    # first 3 layers dense (intermediate 18432), then 1 shared + 256 routed experts of width 2048
    p = acc.param_counts(cfg("DeepSeek-V3"))
    attn = acc.attention_params(cfg("DeepSeek-V3"))
    assert attn == {"q_a_proj": 7168 * 1536, "q_a_layernorm": 1536, "q_b_proj": 1536 * 128 * (128 + 64),
                    "kv_a_proj_with_mqa": 7168 * (512 + 64), "kv_a_layernorm": 512,
                    "kv_b_proj": 512 * 128 * (128 + 128), "o_proj": 128 * 128 * 7168}
    assert p.embedding == p.lm_head == 129280 * 7168
    assert p.dense_ffn == 3 * 3 * 7168 * 18432
    assert p.router == 58 * (256 * 7168 + 256)  # gate.weight + e_score_correction_bias
    assert p.shared_experts == 58 * 1 * 3 * 7168 * 2048
    assert p.norms == 61 * 2 * 7168 + 7168


def test_v2_lite_has_uncompressed_queries():
    attn = acc.attention_params(cfg("DeepSeek-V2-Lite"))
    assert "q_a_proj" not in attn
    assert attn["q_proj"] == 2048 * 16 * (128 + 64)
    assert acc.param_counts(cfg("DeepSeek-V2")).router == 59 * 160 * 5120  # V2 has no correction bias


def test_v3_mtp_module():
    c = cfg("DeepSeek-V3")
    p = acc.param_counts(c)
    # README_WEIGHTS.md: "11.5B unique parameters, excluding the shared 0.9B Embedding and 0.9B output Head"
    assert close(p.mtp, 11.5 * B, 0.01)
    # one MoE layer, from the main model's own totals: everything but embedding, head, final norm, 3 dense layers
    dense_layer = sum(acc.attention_params(c).values()) + 3 * 7168 * 18432 + 2 * 7168
    moe_layer = (p.total - 2 * 129280 * 7168 - 7168 - 3 * dense_layer) // 58
    assert p.mtp == moe_layer + 2 * 7168 * 7168 + 3 * 7168  # + eh_proj, enorm, hnorm, shared_head.norm
    # Hugging Face model card: 685B in the checkpoint, which stores the MTP module with copies of the
    # embedding and the head (model.layers.61.embed_tokens, model.layers.61.shared_head.head)
    assert close(p.total + p.mtp + 2 * 129280 * 7168, 685 * B, 0.001)
    assert acc.param_counts(cfg("DeepSeek-V2")).mtp == 0


# ---------------------------------------------------------------------------------------------------- vs transformers
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4)
TINY_MLA = dict(TINY, num_key_value_heads=4, moe_intermediate_size=24, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3)
HF_CASES = {
    "v2-q_proj": ("DeepseekV2", dict(TINY_MLA, q_lora_rank=None, first_k_dense_replace=1)),
    "v2-q_lora-bias-all-moe": ("DeepseekV2", dict(TINY_MLA, q_lora_rank=24, attention_bias=True,
                                                  first_k_dense_replace=0)),
    "v3-bias-tied": ("DeepseekV3", dict(TINY_MLA, q_lora_rank=24, attention_bias=True, n_group=2, topk_group=1,
                                        first_k_dense_replace=2, tie_word_embeddings=True)),
    "llama-gqa-bias-tied": ("Llama", dict(TINY, num_key_value_heads=2, attention_bias=True,
                                          tie_word_embeddings=True)),
    "mistral-mqa": ("Mistral", dict(TINY, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)),
}


def _part(name):
    """Our ParamCounts field for a transformers state_dict key."""
    for key, part in (("embed_tokens", "embedding"), ("lm_head", "lm_head"), (".self_attn.", "attention"),
                      (".mlp.experts.", "routed_experts"), (".mlp.shared_experts.", "shared_experts"),
                      (".mlp.gate.", "router"), (".mlp.", "dense_ffn"), ("norm", "norms")):
        if key in name:
            return part
    raise AssertionError(f"unexpected tensor {name}")


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_counts_match_transformers_models(case):
    transformers = pytest.importorskip("transformers")
    arch, kwargs = HF_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = getattr(transformers, f"{arch}Config")(**kwargs)
        model = getattr(transformers, f"{arch}ForCausalLM")(hf_config)
    expected, seen = Counter(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # buffers too: e_score_correction_bias
        if id(tensor) not in seen:  # a tied head is the embedding's tensor again
            seen.add(id(tensor))
            expected[_part(name)] += tensor.numel()
    p = acc.param_counts(ModelConfig.from_hf(hf_config.to_dict()))
    parts = ("embedding", "lm_head", "attention", "norms", "dense_ffn", "router", "shared_experts",
             "routed_experts")
    assert {k: getattr(p, k) for k in parts} == {k: expected[k] for k in parts}
    assert p.total == sum(expected.values())


# ---------------------------------------------------------------------------------------------------- FLOPs
def _causal_attention_flops(layers, heads, qk_dim, v_dim, seq_len):
    """Brute force: the token at position t scores t + 1 keys (2 qk_dim FLOPs each) and sums t + 1 values."""
    total = sum(layers * heads * 2 * (qk_dim + v_dim) * (t + 1) for t in range(seq_len))
    return total / seq_len


# Llama-2-7B by hand: 32 layers of 4 * 4096^2 attention + 3 * 4096 * 11008 FFN + 2 norms, final norm, head
LLAMA2_7B_NON_EMBEDDING = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096


@pytest.mark.parametrize("seq_len", [1, 2048, 4095])
def test_flops_per_token_llama2(seq_len):
    got = acc.flops_per_token(cfg("Llama-2-7B"), seq_len)
    assert got == 2 * LLAMA2_7B_NON_EMBEDDING + _causal_attention_flops(32, 32, 128, 128, seq_len)


def test_flops_per_token_v3_attention_uses_mla_head_dims():
    # V3: queries/keys 128 + 64 wide per head, values 128 (report sec. 4.2)
    assert acc.attention_flops_per_token(cfg("DeepSeek-V3"), 4096) == _causal_attention_flops(61, 128, 192, 128, 4096)
    n = acc.param_counts(cfg("DeepSeek-V3")).activated_non_embedding  # checked against published figures above
    assert acc.flops_per_token(cfg("DeepSeek-V3"), 4096) == 2 * n + _causal_attention_flops(61, 128, 192, 128, 4096)


def test_training_flops_is_6n():
    assert acc.training_flops(cfg("Llama-2-7B"), 2e12) == 6 * LLAMA2_7B_NON_EMBEDDING * 2e12
    # V3 on its 14.8T pre-training tokens (report sec. 4.2): 6 * 36.6B * 14.8T = 3.25e24 FLOPs
    assert close(acc.training_flops(cfg("DeepSeek-V3"), 14.8e12), 3.25e24, 0.002)
    assert acc.training_flops(cfg("Llama-2-7B"), 0) == 0


# ---------------------------------------------------------------------------------------------------- KV cache
def test_v2_kv_cache_matches_table_1():
    v2 = cfg("DeepSeek-V2")
    # V2 report, Table 1 with n_h = 128, d_h = 128, d_c = 512, d_h^R = 64, l = 60 (sec. 3.1.2)
    assert acc.kv_cache_elements_per_token(v2) == (512 + 64) * 60 == 34560
    assert acc.kv_cache_elements_per_token(v2, kind="mha") == 2 * 128 * 128 * 60
    assert acc.kv_cache_elements_per_token(v2, kind="mqa") == 2 * 128 * 60
    # Table 1: MLA's cache is "equal to GQA with only 2.25 groups": d_c = 4 d_h, d_h^R = d_h / 2
    assert 512 + 64 == 4.5 * 128
    assert acc.kv_cache_elements_per_token(v2) == 2 * 2.25 * 128 * 60
    assert acc.kv_cache_bytes_per_token(v2) == 69120


@pytest.mark.parametrize("name, kind, elements", [
    ("DeepSeek-V3", "mla", (512 + 64) * 61),
    ("DeepSeek-V2-Lite", "mla", (512 + 64) * 27),
    ("Llama-2-7B", "mha", 2 * 32 * 128 * 32),
    ("Llama-3-8B", "gqa", 2 * 8 * 128 * 32),
    ("Llama-3-70B", "gqa", 2 * 8 * 128 * 80),
    ("Llama-3.1-405B", "gqa", 2 * 8 * 128 * 126),
    ("Mistral-7B", "gqa", 2 * 8 * 128 * 32),
    ("DeepSeek-LLM-67B", "gqa", 2 * 8 * 128 * 95),  # the model DeepSeek-V2's "93.3%" compares against
])
def test_kv_cache_kind_and_size(name, kind, elements):
    c = cfg(name)
    assert acc.kv_cache_kind(c) == kind
    assert acc.kv_cache_elements_per_token(c) == elements
    assert acc.kv_cache_bytes_per_token(c, bytes_per_element=1) == elements


def test_other_kinds_for_a_dense_model():
    c = cfg("Llama-3-8B")
    assert acc.kv_cache_elements_per_token(c, kind="mha") == 2 * 32 * 128 * 32
    assert acc.kv_cache_elements_per_token(c, kind="mqa") == 2 * 128 * 32
    assert acc.kv_cache_kind(c.replace(num_key_value_heads=1)) == "mqa"


def test_kv_cache_grows_linearly_with_context():
    v3 = cfg("DeepSeek-V3")
    assert acc.kv_cache_bytes(v3, 0) == 0
    sizes = [acc.kv_cache_bytes(v3, n) for n in (1024, 2048, 3072, 4096)]
    assert {b - a for a, b in zip(sizes, sizes[1:])} == {35136 * 2 * 1024}  # equal steps: a straight line
    # 128K context, batch 4, BF16: 35,136 numbers * 2 bytes * 131,072 tokens * 4 = 18.4 GB
    assert acc.kv_cache_bytes(v3, 131072, batch_size=4) == 35136 * 2 * 131072 * 4
    # Llama-2-7B: 0.5 MiB per token, 2 GiB at its 4K context
    assert acc.kv_cache_bytes(cfg("Llama-2-7B"), 4096) == 2 * 1024 ** 3


def test_sliding_window_cache_stops_growing_at_the_window():
    """Mistral-7B-v0.1 attends to the last 4096 tokens (config.json sliding_window): its rolling cache holds
    at most 4096 tokens per sequence, 131,072 bytes each in BF16 (2 * 8 KV heads * 128 * 32 layers * 2)."""
    mistral = cfg("Mistral-7B")
    assert mistral.sliding_window == 4096
    per_token = 2 * 8 * 128 * 32 * 2
    assert acc.kv_cache_bytes(mistral, 1000) == 1000 * per_token  # inside the window: linear
    assert acc.kv_cache_bytes(mistral, 4096) == acc.kv_cache_bytes(mistral, 32768) == 4096 * per_token
    assert acc.kv_cache_bytes(mistral, 32768, batch_size=3) == 3 * 4096 * per_token
    assert acc.cached_tokens(mistral, 10_000) == 4096 and acc.cached_tokens(cfg("Llama-2-7B"), 10_000) == 10_000
    assert acc.kv_cache_bytes(mistral.replace(sliding_window=None), 32768) == 32768 * per_token


# ---------------------------------------------------------------------------------------------------- money
def test_v3_training_cost_table_1():
    # V3 report, Table 1: 2664K + 119K + 5K = 2788K H800 GPU-hours; $5.328M + $0.238M + $0.01M = $5.576M
    assert acc.DEEPSEEK_V3_GPU_HOURS == {"pre_training": 2_664_000, "context_extension": 119_000,
                                         "post_training": 5_000}
    assert sum(acc.DEEPSEEK_V3_GPU_HOURS.values()) == 2_788_000
    assert acc.training_cost(2_788_000) == 5_576_000
    assert [acc.training_cost(h) for h in acc.DEEPSEEK_V3_GPU_HOURS.values()] == [5_328_000, 238_000, 10_000]
    assert acc.training_cost(1000, price_per_gpu_hour=3.5) == 3500


# ---------------------------------------------------------------------------------------------------- summary
def test_summary():
    assert acc.summary(cfg("DeepSeek-V3")) == (
        "DeepSeek-V3: 671B parameters, 37.55B activated per token (36.63B without the embedding), +11.61B in "
        "1 MTP module; KV cache (MLA): 35,136 elements = 70.3 KB per token in BF16")
    assert acc.summary(cfg("Llama-3-8B")) == (
        "Llama-3-8B: 8.03B parameters (7.505B without the embedding); KV cache (GQA): 65,536 elements = "
        "131.1 KB per token in BF16")


# ---------------------------------------------------------------------------------------------------- bad input
def test_unknown_kind():
    with pytest.raises(ValueError, match=r"kind: expected one of \('mha', 'gqa', 'mqa', 'mla'\).*'MLA'"):
        acc.kv_cache_elements_per_token(cfg("DeepSeek-V2"), kind="MLA")
    with pytest.raises(ValueError, match="kind: expected one of"):
        acc.kv_cache_bytes(cfg("DeepSeek-V2"), 10, kind="paged")


def test_mla_for_a_dense_config():
    with pytest.raises(ValueError, match="kind: 'mla' needs an MLA config.*Llama-3-8B"):
        acc.kv_cache_bytes_per_token(cfg("Llama-3-8B"), kind="mla")


@pytest.mark.parametrize("call, match", [
    (lambda: acc.kv_cache_bytes(cfg("DeepSeek-V3"), -1), r"context_len: expected an int >= 0, got -1"),
    (lambda: acc.kv_cache_bytes(cfg("DeepSeek-V3"), 8, batch_size=0), r"batch_size: expected an int >= 1, got 0"),
    (lambda: acc.kv_cache_bytes_per_token(cfg("DeepSeek-V3"), bytes_per_element=0),
     r"bytes_per_element: expected a positive number, got 0"),
    (lambda: acc.training_flops(cfg("DeepSeek-V3"), -5), r"tokens: expected a non-negative number, got -5"),
    (lambda: acc.training_flops(cfg("DeepSeek-V3"), float("nan")), r"tokens: expected a non-negative number"),
    (lambda: acc.training_cost(-1.0), r"gpu_hours: expected a non-negative number, got -1.0"),
    (lambda: acc.training_cost(10, price_per_gpu_hour=-2), r"price_per_gpu_hour: expected a non-negative"),
    (lambda: acc.flops_per_token(cfg("DeepSeek-V3"), 0), r"seq_len: expected an int >= 1, got 0"),
])
def test_bad_numbers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: acc.kv_cache_bytes(cfg("DeepSeek-V3"), 4096.0), r"context_len: expected an int >= 0, got 4096.0 \(float\)"),
    (lambda: acc.flops_per_token(cfg("DeepSeek-V3"), True), r"seq_len: expected an int >= 1, got True \(bool\)"),
    (lambda: acc.training_cost("2788000"), r"gpu_hours: expected a number, got '2788000' \(str\)"),
])
def test_wrong_types(call, match):
    with pytest.raises(TypeError, match=match):
        call()
