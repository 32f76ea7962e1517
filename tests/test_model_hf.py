"""refimpl's DeepSeek model against an implementation nobody here wrote: transformers' DeepSeek-V2 and V3.

Each case builds a tiny random model with transformers (no download), saves it as a Hugging Face checkpoint,
loads it with `DeepSeekForCausalLM.from_pretrained`, and requires equal logits (float32, 1e-5) and equal
greedy generations, token for token.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from refimpl.model import DeepSeekForCausalLM  # noqa: E402

VOCAB = 97

BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, max_position_embeddings=128,
            routed_scaling_factor=1.5, tie_word_embeddings=False, attention_bias=False)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

CASES = {
    # V2: softmax scores, greedy top-k, uncompressed queries (like V2-Lite)
    "v2-greedy-q_proj": ("v2", dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1)),
    # V2: group-limited routing (groups ranked by their max), compressed queries, YaRN, all layers MoE
    "v2-group-limited-yarn": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                         topk_group=2, first_k_dense_replace=0, rope_scaling=YARN)),
    # V3: sigmoid scores + correction bias, groups ranked by top-2 sums, normalized weights, 2 dense layers
    "v3-groups-norm": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                  first_k_dense_replace=2, rope_scaling=YARN)),
    # V3: one group (no group limit), weights not normalized, uncompressed queries
    "v3-nogroup-nonorm": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                     first_k_dense_replace=1)),
}


def _build_hf(kind: str, overrides: dict, seed: int = 0):
    cfg_cls = transformers.DeepseekV2Config if kind == "v2" else transformers.DeepseekV3Config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = cfg_cls(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (transformers.DeepseekV2ForCausalLM if kind == "v2" else transformers.DeepseekV3ForCausalLM)(config)
    with torch.no_grad():  # weights larger than the default init, so that routing and logits are far from ties
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf = _build_hf(kind, overrides)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, DeepSeekForCausalLM.from_pretrained(folder), folder


def _ids(batch=2, seq=9, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_config_read_from_checkpoint(pair):
    hf, ours, _ = pair
    c = ours.config
    assert (c.q_lora_rank, c.kv_lora_rank, c.first_k_dense_replace) == (
        hf.config.q_lora_rank, hf.config.kv_lora_rank, hf.config.first_k_dense_replace)
    assert c.scoring_func == ("sigmoid" if hf.config.model_type == "deepseek_v3" else "softmax")
    assert len(ours.moe_layers()) == c.num_hidden_layers - c.first_k_dense_replace


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_logits_match_transformers(pair, mode):
    hf, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, mode=mode)
    assert got.shape == (2, 9, VOCAB)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    ids = _ids(batch=2, seq=5, seed=2)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, eos_token_id=None)  # tiny random models: don't stop on token 1
    got = ours.generate(ids, max_new_tokens=12)
    assert torch.equal(got, expected)
    assert len(set(got[0, 5:].tolist())) > 1  # not a degenerate repeat-one-token sequence


def test_sharded_checkpoint_loads_the_same(pair, tmp_path):
    hf, ours, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = DeepSeekForCausalLM.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids), ours(ids), atol=0, rtol=0)


def test_bfloat16_load_keeps_routers_float32(pair):
    _, ours, folder = pair
    low = DeepSeekForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    full = ours.state_dict()
    for name, tensor in low.state_dict().items():
        if ".mlp.gate." in name:  # router weight (and V3's e_score_correction_bias): the stored float32 values
            assert tensor.dtype == torch.float32 and torch.equal(tensor, full[name]), name
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[name].to(torch.bfloat16)), name
    with torch.no_grad():
        got = low(_ids())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()  # bf16 flips some routing: not compared


# ---------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def v3_folder(tmp_path):
    hf = _build_hf("v3", CASES["v3-groups-norm"][1])
    hf.save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_is_named(v3_folder):
    _edit_weights(v3_folder, lambda s: s.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'\]"):
        DeepSeekForCausalLM.from_pretrained(v3_folder)


def test_extra_tensor_is_named(v3_folder):
    _edit_weights(v3_folder, lambda s: s.update({"model.layers.0.mlp.bogus.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.0\.mlp\.bogus\.weight'\]"):
        DeepSeekForCausalLM.from_pretrained(v3_folder)


def test_wrong_shape_is_named(v3_folder):
    _edit_weights(v3_folder, lambda s: s.update({"model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(8, 16)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight: expected \(72, 16\), got \(8, 16\)"):
        DeepSeekForCausalLM.from_pretrained(v3_folder)


def test_fp8_scale_of_a_weight_that_is_not_fp8_is_refused(v3_folder):
    _edit_weights(v3_folder, lambda s: s.update({"model.layers.1.self_attn.o_proj.weight_scale_inv": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.1\.self_attn\.o_proj\."
                                         r"weight_scale_inv'\] \(a \*\.weight_scale_inv scales a float8"):
        DeepSeekForCausalLM.from_pretrained(v3_folder)


def test_mtp_layer_is_skipped_with_a_note(v3_folder):
    n = json.loads((v3_folder / "config.json").read_text())["num_hidden_layers"]
    _edit_weights(v3_folder, lambda s: s.update({f"model.layers.{n}.eh_proj.weight": torch.zeros(48, 96),
                                                 f"model.layers.{n}.enorm.weight": torch.ones(48)}))
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        model = DeepSeekForCausalLM.from_pretrained(v3_folder)
    assert model(_ids()).shape == (2, 9, VOCAB)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in the folder"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "q_lora_rank": None, "model_type": "deepseek_v2"}))
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or model.safetensors.index.json"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


def test_token_ids_out_of_vocabulary_raise(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 97\), got values from 0 to 97"):
        ours(torch.tensor([[0, 97]]))
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        ours(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="input_ids: expected a 2-d tensor"):
        ours(torch.tensor([1, 2, 3]))
