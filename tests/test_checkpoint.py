"""refimpl.checkpoint: what a checkpoint folder holds is loaded, every stored tensor kept or refused by name.

Checkpoints here are written by the tests from refimpl's own random models (config.json + safetensors); the
comparisons with transformers' DeepSeek models are in test_model_hf.py.
"""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from refimpl.checkpoint import dequantize_fp8, load_pretrained
from refimpl.config import ModelConfig
from refimpl.model import DeepSeekForCausalLM

VOCAB = 61
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            first_k_dense_replace=1, max_position_embeddings=64, model_type="deepseek_v3",
            scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, tie_word_embeddings=False)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _random_model(config: dict, seed: int = 0) -> DeepSeekForCausalLM:
    """refimpl's model with weights large enough that logits are far from zero and from ties."""
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(ModelConfig.from_hf(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model.eval()


def _save(folder, state: dict, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _load(folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a load that should be silent is
        return DeepSeekForCausalLM.from_pretrained(folder, **kwargs)


# ---------------------------------------------------------------------------- tied embeddings
def test_tied_config_with_a_different_head_keeps_both_untied(tmp_path):
    state = _random_model(TINY).state_dict()
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    folder = _save(tmp_path, state, {**TINY, "tie_word_embeddings": True})
    with pytest.warns(UserWarning, match=r"ties lm_head\.weight to model\.embed_tokens\.weight .* both are kept, "
                                         r"untied"):
        model = DeepSeekForCausalLM.from_pretrained(folder)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert model.config.tie_word_embeddings is False
    untied = _load(_save(tmp_path / "untied", state, TINY))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), untied(_ids()), atol=0, rtol=0)


def test_tied_config_with_only_the_embedding_ties(tmp_path):
    state = _random_model(TINY).state_dict()
    state.pop("lm_head.weight")
    model = _load(_save(tmp_path, state, {**TINY, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_tied_config_with_an_equal_head_stays_tied(tmp_path):
    state = _random_model(TINY).state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    model = _load(_save(tmp_path, state, {**TINY, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------- multi-token prediction
def _with_mtp_layers(state: dict, layers) -> dict:
    extra = {}
    for i in layers:
        extra[f"model.layers.{i}.eh_proj.weight"] = torch.zeros(32, 64)
        extra[f"model.layers.{i}.enorm.weight"] = torch.ones(32)
        extra[f"model.layers.{i}.mlp.experts.0.up_proj.weight"] = torch.zeros(16, 32)
    return {**state, **extra}


def test_every_declared_mtp_layer_is_skipped_with_one_warning(tmp_path):
    state = _random_model(TINY).state_dict()
    folder = _save(tmp_path, _with_mtp_layers(state, [2, 3]), {**TINY, "num_nextn_predict_layers": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = DeepSeekForCausalLM.from_pretrained(folder)
    notes = [str(w.message) for w in caught if "multi-token-prediction" in str(w.message)]
    assert len(notes) == 1
    assert "skipping 6 tensors of the multi-token-prediction layers (model.layers.2.*, model.layers.3.*)" in notes[0]
    plain = _load(_save(tmp_path / "plain", state, TINY))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), plain(_ids()), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:skipping .* multi-token-prediction")
def test_a_layer_beyond_the_declared_mtp_layers_is_refused(tmp_path):
    state = _with_mtp_layers(_random_model(TINY).state_dict(), [2, 3, 4])
    folder = _save(tmp_path, state, {**TINY, "num_nextn_predict_layers": 2})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.4\.eh_proj\.weight', "
                                         r"'model\.layers\.4\.enorm\.weight', 'model\.layers\.4\.mlp\.experts"
                                         r"\.0\.up_proj\.weight'\]$"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_mtp_layers_are_not_skipped_when_the_config_declares_none(tmp_path):
    folder = _save(tmp_path, _with_mtp_layers(_random_model(TINY).state_dict(), [2]), TINY)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.2\.eh_proj\.weight'"):
        DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.filterwarnings("ignore:skipping .* multi-token-prediction")
def test_a_misspelled_name_is_refused_next_to_the_missing_one(tmp_path):
    state = _random_model(TINY).state_dict()
    state["model.layers.1.mlp.gate.wieght"] = state.pop("model.layers.1.mlp.gate.weight")
    folder = _save(tmp_path, _with_mtp_layers(state, [2]), {**TINY, "num_nextn_predict_layers": 1})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.gate\.weight'\]; "
                                         r"unexpected tensors \['model\.layers\.1\.mlp\.gate\.wieght'\]"):
        DeepSeekForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------------- paths
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _random_model(TINY)
    return model, _save(tmp_path_factory.mktemp("tiny"), model.state_dict(), TINY)


@pytest.mark.parametrize("inside", ["config.json", "model.safetensors"])
def test_a_file_inside_the_folder_loads_the_folder(saved, inside):
    model, folder = saved
    loaded = _load(folder / inside)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), model(_ids()), atol=0, rtol=0)


def test_a_file_that_is_not_part_of_a_checkpoint_is_refused(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"expected a folder \(or its config.json, model.safetensors.index.json "
                                         r"or a \.safetensors file\), got the file"):
        DeepSeekForCausalLM.from_pretrained(tmp_path / "notes.txt")


def test_a_missing_folder_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist; expected a folder holding config.json"):
        DeepSeekForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_missing_shards_are_named(saved, tmp_path):
    _, folder = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"missing: \['model-00001-of-00002.safetensors'\]"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- dtype and device
def test_default_dtype_is_the_checkpoints_and_routers_stay_float32(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in _random_model(TINY).state_dict().items()}
    model = _load(_save(tmp_path, state, {**TINY, "torch_dtype": "bfloat16"}))
    router_names = {n for n in model.state_dict() if ".mlp.gate." in n}
    assert router_names == {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == (torch.float32 if name in router_names else torch.bfloat16), name
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name


def test_router_bias_keeps_float32_values_under_a_bfloat16_load(tmp_path):
    config = {**TINY, "num_hidden_layers": 1, "first_k_dense_replace": 0, "n_routed_experts": 2,
              "num_experts_per_tok": 1, "n_shared_experts": 0}
    state = _random_model(config).state_dict()
    state["model.layers.0.mlp.gate.weight"] = torch.zeros(2, 32)  # equal scores for both experts
    state["model.layers.0.mlp.gate.e_score_correction_bias"] = torch.tensor([5.0, 5.01])
    model = _load(_save(tmp_path, state, config), dtype=torch.bfloat16)
    gate = model.moe_layers()[0].gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.dtype == torch.float32
    assert gate.e_score_correction_bias[1].item() == torch.tensor(5.01).item()  # bf16 would make it 5.0
    routing = gate(torch.randn(3, 32, dtype=torch.bfloat16))
    assert routing.topk_idx.flatten().tolist() == [1, 1, 1]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, "bfloat16"])
def test_a_dtype_that_is_not_a_float_of_16_bits_or_more_is_refused(saved, dtype):
    with pytest.raises(ValueError, match="dtype: expected a floating dtype of 16 bits or more"):
        DeepSeekForCausalLM.from_pretrained(saved[1], dtype=dtype)


def test_an_unavailable_device_is_refused(saved):
    with pytest.raises(ValueError, match=r"device: .*cuda.*7.* is not available here"):
        DeepSeekForCausalLM.from_pretrained(saved[1], device="cuda:7")
    with pytest.raises(ValueError, match="device: 'moon' is not available here"):
        DeepSeekForCausalLM.from_pretrained(saved[1], device="moon")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_puts_the_model_on_the_gpu(saved):
    model, folder = saved
    loaded = _load(folder, device="cuda")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids().cuda()).cpu(), model(_ids()), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- FP8 (DeepSeek-V3's release)
FP8_CONFIG = {**TINY, "hidden_size": 200, "intermediate_size": 300, "moe_intermediate_size": 136,
              "q_lora_rank": 150, "kv_lora_rank": 130, "num_attention_heads": 3, "qk_nope_head_dim": 40,
              "v_head_dim": 56, "torch_dtype": "bfloat16",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}


def _quantize_fp8(weight: torch.Tensor, block: int = 128):
    """[rows, cols] float32 -> float8_e4m3fn weight and scale_inv [ceil(rows/128), ceil(cols/128)] float32,
    one scale per block: the block's largest |w| maps to 448, the largest float8_e4m3fn."""
    rows, cols = weight.shape
    scale_inv = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale_inv[i, j] = tile.abs().max() / FP8_MAX
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale_inv[i, j]).to(
                torch.float8_e4m3fn)
    return quantized, scale_inv


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    """(original model, FP8 folder, folder with the dequantized weights stored in float32)."""
    model = _random_model(FP8_CONFIG)
    fp8, exact = {}, {}
    for name, tensor in model.state_dict().items():
        if name.endswith("proj.weight"):  # V3 stores its linear layers in FP8, but not the router or lm_head
            quantized, scale_inv = _quantize_fp8(tensor)
            fp8[name], fp8[name + "_scale_inv"] = quantized, scale_inv
            exact[name] = dequantize_fp8(quantized, scale_inv, (128, 128))
        else:
            fp8[name] = exact[name] = tensor
    root = tmp_path_factory.mktemp("fp8")
    plain_config = {k: v for k, v in FP8_CONFIG.items() if k != "quantization_config"}
    return model, _save(root / "fp8", fp8, FP8_CONFIG), _save(root / "exact", exact, plain_config)


def test_dequantize_fp8_scales_each_block_including_partial_ones():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])  # blocks of 2 x 2: the last row and column partial
    expected = torch.tensor([[1.0, 2.0, 30.0], [4.0, 5.0, 60.0], [700.0, 800.0, 9000.0]])
    assert torch.equal(dequantize_fp8(weight, scale_inv, (2, 2)), expected)


def test_fp8_checkpoint_loads_dequantized(fp8_folders):
    model, fp8_folder, exact_folder = fp8_folders
    assert 200 % 128 and 130 % 128 and 136 % 128  # partial blocks in both directions
    fp8 = _load(fp8_folder, dtype=torch.float32)
    exact = _load(exact_folder, dtype=torch.float32)
    for name, tensor in exact.state_dict().items():
        assert torch.equal(fp8.state_dict()[name], tensor), name
    ids = _ids()
    with torch.no_grad():
        got, original = fp8(ids), model(ids)
        torch.testing.assert_close(got, exact(ids), atol=0, rtol=0)
    for name, weight in model.state_dict().items():  # float8_e4m3fn keeps 3 mantissa bits: 2^-4 relative
        if name.endswith("proj.weight"):  # ... and steps of 2^-9 scales below 2^-6 scales (subnormals)
            bound = 2 ** -4 * weight.abs() + 2 ** -10 * weight.abs().max() / FP8_MAX + 1e-7
            assert ((fp8.state_dict()[name] - weight).abs() <= bound).all(), name
    assert original.abs().max() > 1.0
    assert 0 < (got - original).norm() < 0.25 * original.norm()  # measured: 0.15 (two layers, one MoE)


def test_fp8_checkpoint_loads_into_bfloat16_by_default(fp8_folders):
    _, fp8_folder, exact_folder = fp8_folders
    fp8 = _load(fp8_folder)  # torch_dtype bfloat16
    exact = _load(exact_folder, dtype=torch.float32)
    weight = "model.layers.1.self_attn.kv_b_proj.weight"
    assert fp8.state_dict()[weight].dtype == torch.bfloat16
    assert torch.equal(fp8.state_dict()[weight], exact.state_dict()[weight].to(torch.bfloat16))


def _edit(folder, tmp_path, edit, config_edit=None):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    edit(state)
    if config_edit:
        config_edit(config)
    return _save(tmp_path, state, config)


def test_fp8_weight_without_its_scale_is_refused(fp8_folders, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    folder = _edit(fp8_folders[1], tmp_path, lambda s: s.pop(name + "_scale_inv"))
    with pytest.raises(ValueError, match=r"float8 tensors without a _scale_inv scale .*\['model\.layers\.0\.mlp"
                                         r"\.up_proj\.weight'\]"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_fp8_scales_of_the_wrong_shape_are_refused(fp8_folders, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"  # weight [300, 200]: 3 x 2 blocks
    folder = _edit(fp8_folders[1], tmp_path, lambda s: s.update({name: torch.ones(2, 2)}))
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale_inv: expected \(3, 2\) for a weight of shape "
                                         r"\(300, 200\), got \(2, 2\)"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_fp8_weights_need_the_block_size(fp8_folders, tmp_path):
    folder = _edit(fp8_folders[1], tmp_path, lambda s: None, lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"float8 weights need quantization_config\.weight_block_size"):
        DeepSeekForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------------- any model class
class _Head(nn.Module):
    """The smallest model `load_pretrained` accepts: built from a ModelConfig, named like a checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def test_load_pretrained_takes_any_model_class(tmp_path):
    weight = torch.randn(VOCAB, 32)
    model = load_pretrained(_Head, _save(tmp_path, {"lm_head.weight": weight}, TINY))
    assert torch.equal(model.lm_head.weight, weight) and not model.training


def test_tensors_nobody_fills_are_refused(tmp_path):
    class WithTable(_Head):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    with pytest.raises(NotImplementedError, match=r"neither stored in checkpoints nor recomputed.*\['table'\]"):
        load_pretrained(WithTable, _save(tmp_path, {"lm_head.weight": torch.randn(VOCAB, 32)}, TINY))
