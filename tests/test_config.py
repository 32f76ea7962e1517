"""refimpl.config: the shipped configs hold their public numbers, config.json files are read (old and
transformers-5 layouts), to_dict round-trips, and every inconsistency fails with its field named."""

import json

import pytest

from refimpl.config import ModelConfig, RopeScaling, known_configs, load_known

# Numbers from each model's public config.json (huggingface.co/<org>/<model>/blob/main/config.json)
PUBLIC_NUMBERS = {
    "DeepSeek-V3": dict(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                        intermediate_size=18432, moe_intermediate_size=2048, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                        norm_topk_prob=True, first_k_dense_replace=3, num_nextn_predict_layers=1),
    "DeepSeek-V2": dict(vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
                        intermediate_size=12288, moe_intermediate_size=1536, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
                        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
                        routed_scaling_factor=16.0, scoring_func="softmax", topk_method="group_limited_greedy",
                        first_k_dense_replace=1),
    "DeepSeek-V2-Lite": dict(vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                             intermediate_size=10944, moe_intermediate_size=1408, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
                             topk_group=1, scoring_func="softmax", first_k_dense_replace=1),
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128, intermediate_size=11008, rope_theta=10000.0,
                       kv_lora_rank=None, n_routed_experts=None),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0),
    "Llama-3-70B": dict(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, intermediate_size=28672, rope_theta=500000.0),
    # Llama 3 paper (arXiv 2407.21783), Table 3: 126 layers, model dimension 16,384, FFN dimension 53,248,
    # 128 attention heads, 8 key/value heads; Llama 3.1 model card: 128k context
    "Llama-3.1-405B": dict(vocab_size=128256, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, head_dim=128, intermediate_size=53248, rope_theta=500000.0,
                           max_position_embeddings=131072),
    "Mistral-7B": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336, rope_theta=10000.0,
                       max_position_embeddings=32768),
    "DeepSeek-LLM-67B": dict(vocab_size=102400, hidden_size=8192, num_hidden_layers=95, num_attention_heads=64,
                             num_key_value_heads=8, head_dim=128, intermediate_size=22016, rope_theta=10000.0,
                             max_position_embeddings=4096, rms_norm_eps=1e-6),
}


def tiny_moe_dict(**changes) -> dict:
    d = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2)
    d.update(changes)
    return d


# ---------------------------------------------------------------------------- shipped configs
def test_known_configs_are_listed():
    assert set(PUBLIC_NUMBERS) <= set(known_configs())


@pytest.mark.parametrize("name", known_configs())
def test_every_known_config_loads_and_round_trips(name, tmp_path):
    config = load_known(name)
    assert config.name == name and config.source.startswith("https://huggingface.co/")
    assert ModelConfig.from_hf(config.to_dict()) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert ModelConfig.from_hf(tmp_path) == config


@pytest.mark.parametrize("name", sorted(PUBLIC_NUMBERS))
def test_known_config_has_public_numbers(name):
    config = load_known(name)
    for field_name, value in PUBLIC_NUMBERS[name].items():
        assert getattr(config, field_name) == value, field_name


def test_deepseek_v3_derived_quantities():
    config = load_known("DeepSeek-V3")
    assert config.is_mla and config.is_moe
    assert config.qk_head_dim == 128 + 64
    assert config.rope_scaling == RopeScaling(type="yarn", factor=40, original_max_position_embeddings=4096,
                                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    assert config.rope_scaling.factor * config.rope_scaling.original_max_position_embeddings == 163840
    assert config.max_position_embeddings == 163840
    assert [config.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]


def test_dense_configs_are_not_mla_or_moe():
    for name in ("Llama-2-7B", "Llama-3-8B", "Llama-3-70B", "Mistral-7B", "DeepSeek-LLM-67B"):
        config = load_known(name)
        assert not config.is_mla and not config.is_moe and config.rope_scaling is None
        assert config.qk_head_dim == config.head_dim == config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------- reading config.json
def test_from_hf_reads_dict_file_and_folder(tmp_path):
    d = dict(tiny_moe_dict(), architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16")  # extra keys ignored
    from_dict = ModelConfig.from_hf(d)
    assert from_dict.hidden_size == 32 and from_dict.n_group == 4
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_hf(folder / "config.json") == from_dict
    assert ModelConfig.from_hf(str(folder)) == from_dict
    assert ModelConfig.from_hf(folder).name == "my-model"


def test_from_hf_reads_transformers5_rope_parameters():
    d = tiny_moe_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 40.0,
                                       "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                       "mscale": 0.707, "mscale_all_dim": 0.707})
    config = ModelConfig.from_hf(d)
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                              mscale=0.707, mscale_all_dim=0.707)


def test_from_hf_default_rope_parameters_give_no_scaling():
    d = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config = ModelConfig.from_hf(d)
    assert config.rope_scaling is None and config.rope_theta == 500000.0
    old_style = dict(d, rope_scaling={"type": "default"}, rope_theta=500000.0)
    del old_style["rope_parameters"]
    assert ModelConfig.from_hf(old_style).rope_scaling is None


def test_from_hf_reads_files_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    rope_parameters = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 40.0,
                       "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}
    transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_parameters=rope_parameters).save_pretrained(tmp_path / "v3")
    v3 = ModelConfig.from_hf(tmp_path / "v3")
    assert (v3.rope_theta, v3.rope_scaling.factor, v3.kv_lora_rank, v3.scoring_func) == (50000.0, 40.0, 8, "sigmoid")
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             rope_theta=500000.0).save_pretrained(tmp_path / "llama")
    llama = ModelConfig.from_hf(tmp_path / "llama")
    assert (llama.rope_theta, llama.rope_scaling, llama.num_key_value_heads, llama.head_dim) == (500000.0, None, 2, 8)


# ---------------------------------------------------------------------------- inconsistencies
@pytest.mark.parametrize("name, changes, error, match", [
    ("Llama-3-8B", dict(num_key_value_heads=3), ValueError,
     r"num_attention_heads \(32\) must be divisible by num_key_value_heads \(3\)"),
    ("DeepSeek-V3", dict(q_lora_rank=8000), ValueError, r"q_lora_rank \(8000\) must not be larger than hidden_size"),
    ("DeepSeek-V3", dict(kv_lora_rank=7169), ValueError, r"kv_lora_rank \(7169\) must not be larger than hidden"),
    ("DeepSeek-V3", dict(hidden_size=0), ValueError, r"hidden_size: expected an int >= 1, got 0"),
    ("DeepSeek-V3", dict(num_hidden_layers=-1), ValueError, r"num_hidden_layers: expected an int >= 1, got -1"),
    ("DeepSeek-V3", dict(vocab_size=0), ValueError, r"vocab_size: expected an int >= 1"),
    ("DeepSeek-V3", dict(kv_lora_rank=0), ValueError, r"kv_lora_rank: expected an int >= 1, got 0"),
    ("DeepSeek-V3", dict(q_lora_rank=-5), ValueError, r"q_lora_rank: expected an int >= 1, got -5"),
    ("DeepSeek-V3", dict(n_routed_experts=0), ValueError, r"n_routed_experts: expected an int >= 1"),
    ("DeepSeek-V3", dict(moe_intermediate_size=-1), ValueError, r"moe_intermediate_size: expected an int >= 1"),
    ("DeepSeek-V3", dict(qk_rope_head_dim=None), ValueError,
     r"qk_rope_head_dim: expected a positive int when kv_lora_rank is set"),
    ("DeepSeek-V3", dict(qk_rope_head_dim=63), ValueError, r"qk_rope_head_dim must be even"),
    ("DeepSeek-V3", dict(hidden_size="7168"), TypeError, r"hidden_size: expected an int >= 1, got '7168' \(str\)"),
    ("Llama-3-8B", dict(head_dim=0), ValueError, r"head_dim: expected an int >= 1, got 0"),
    ("Llama-3-8B", dict(head_dim=127), ValueError, r"head_dim must be even"),
    ("Llama-3-8B", dict(rms_norm_eps=0.0), ValueError, r"rms_norm_eps: expected a positive number"),
    ("DeepSeek-V3", dict(num_experts_per_tok=257), ValueError,
     r"num_experts_per_tok \(257\) must not exceed n_routed_experts \(256\)"),
    ("DeepSeek-V3", dict(topk_group=9), ValueError, r"topk_group \(9\) must not exceed n_group \(8\)"),
    ("DeepSeek-V3", dict(n_group=7), ValueError, r"n_routed_experts \(256\) must be divisible into n_group \(7\)"),
    ("DeepSeek-V3", dict(topk_group=1, num_experts_per_tok=40), ValueError,
     r"num_experts_per_tok \(40\) exceeds the 32 experts in topk_group \(1\) groups of 32"),
    ("DeepSeek-V3", dict(scoring_func="relu"), ValueError, r"scoring_func: expected one of .*got 'relu'"),
    ("DeepSeek-V3", dict(topk_method="random"), ValueError, r"topk_method: expected one of .*got 'random'"),
    ("DeepSeek-V3", dict(n_shared_experts=-1), ValueError, r"n_shared_experts: expected an int >= 0, got -1"),
    ("DeepSeek-V3", dict(hidden_act="gelu"), ValueError, r"hidden_act: expected 'silu'"),
])
def test_inconsistent_config_raises(name, changes, error, match):
    with pytest.raises(error, match=match):
        load_known(name).replace(**changes)


def test_from_hf_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match=r"rope_scaling.type: expected one of \('yarn', 'llama3'\), got 'linear'"):
        ModelConfig.from_hf(tiny_moe_dict(rope_scaling={"type": "linear", "factor": 2.0,
                                                        "original_max_position_embeddings": 4096}))
    with pytest.raises(ValueError, match=r"rope_scaling.type: expected one of .*got 'dynamic'"):
        ModelConfig.from_hf(tiny_moe_dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0,
                                                           "original_max_position_embeddings": 4096}))
    d = tiny_moe_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match=r"config: missing required fields \['hidden_size'\]"):
        ModelConfig.from_hf(d)
    with pytest.raises(ValueError, match=r"config: expected a config.json file or a folder holding one"):
        ModelConfig.from_hf(tmp_path)  # a folder without config.json
    with pytest.raises(TypeError, match=r"config source: expected a path or a dict, got int"):
        ModelConfig.from_hf(3)
    with pytest.raises(ValueError, match=r"load_known: expected one of \[.*'DeepSeek-V3'.*\], got 'GPT-5'"):
        load_known("GPT-5")



# ---------------------------------------------------------------------------- integers, misspellings, llama3, window
@pytest.mark.parametrize("field_name, value", [("hidden_size", 7168.5), ("hidden_size", 7168.0),
                                               ("num_attention_heads", True), ("n_routed_experts", 256.0),
                                               ("kv_lora_rank", 512.5), ("first_k_dense_replace", 3.0),
                                               ("sliding_window", 4096.0)])
def test_integer_fields_must_be_ints(field_name, value):
    with pytest.raises(TypeError, match=rf"{field_name}: expected an int >= \d, got {value!r}"):
        load_known("DeepSeek-V3").replace(**{field_name: value})


def test_a_misspelled_key_raises_naming_the_field():
    """`n_routed_expert` ignored would make the model silently dense."""
    with pytest.raises(ValueError, match=r"unknown key 'n_routed_expert'; did you mean the field 'n_routed_experts'"):
        ModelConfig.from_hf({**tiny_moe_dict(), "n_routed_expert": 8})
    with pytest.raises(ValueError, match=r"unknown key 'num_expert_per_tok'.*'num_experts_per_tok'"):
        ModelConfig.from_hf({**tiny_moe_dict(), "num_expert_per_tok": 2})


HARMLESS_KEYS = dict(architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16",
                     transformers_version="4.46.3", bos_token_id=0, eos_token_id=1, pad_token_id=None,
                     use_cache=True, initializer_range=0.02, attention_dropout=0.0, ep_size=1,
                     auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, pretraining_tp=1,
                     quantization_config={"quant_method": "fp8"}, qk_head_dim=12, mlp_bias=False,
                     model_type="deepseek_v3")


def test_harmless_unknown_keys_are_accepted_silently(recwarn):
    config = ModelConfig.from_hf({**tiny_moe_dict(), **HARMLESS_KEYS})
    assert config == ModelConfig.from_hf(dict(tiny_moe_dict(), model_type="deepseek_v3"))
    assert not recwarn.list


@pytest.mark.parametrize("kind", ["DeepseekV3Config", "DeepseekV2Config", "LlamaConfig", "MistralConfig",
                                  "Qwen2Config"])
def test_every_key_transformers_writes_is_accepted(kind, recwarn):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, kind)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4)
    if kind.startswith("Deepseek"):
        hf = getattr(transformers, kind)(**{**hf.to_dict(), **tiny_moe_dict()})
    config = ModelConfig.from_hf(hf.to_dict())  # to_dict: every attribute, more than config.json holds
    assert config.hidden_size == 32 and not [w for w in recwarn.list if "refimpl" in str(w.filename)]


def test_from_hf_reads_llama_31_rope_scaling():
    d = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=131072, rope_theta=500000.0,
             rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"})  # Llama-3.1-8B
    config = ModelConfig.from_hf(d)
    assert config.rope_scaling == RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192,
                                              low_freq_factor=1.0, high_freq_factor=4.0)
    assert ModelConfig.from_hf(config.to_dict()) == config
    new_style = dict(d, rope_parameters={**d.pop("rope_scaling"), "rope_theta": 500000.0})
    assert ModelConfig.from_hf(new_style).rope_scaling == config.rope_scaling
    with pytest.raises(ValueError, match=r"rope_scaling.type: expected one of .*got 'longrope'"):
        ModelConfig.from_hf(dict(d, rope_scaling={"rope_type": "longrope", "factor": 8.0,
                                                  "original_max_position_embeddings": 8192}))


def test_sliding_window_is_read():
    assert load_known("Mistral-7B").sliding_window == 4096  # Mistral-7B-v0.1 config.json
    assert load_known("Llama-3-8B").sliding_window is None
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    assert ModelConfig.from_hf(dict(base, sliding_window=16)).sliding_window == 16
    # Qwen2 files carry a sliding_window that applies only when use_sliding_window is true
    assert ModelConfig.from_hf(dict(base, sliding_window=16, use_sliding_window=False)).sliding_window is None
    with pytest.raises(ValueError, match=r"sliding_window: expected an int >= 1, got 0"):
        ModelConfig(**base, sliding_window=0)
