"""refimpl.mtp: V3's multi-token-prediction modules, checked against transformers' MTP layers, and their loss."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from refimpl.mtp import DeepSeekMTPForCausalLM, lambda_schedule, mtp_loss
from refimpl.train import tiny_config

transformers = pytest.importorskip("transformers")
modeling_layers = pytest.importorskip("transformers.modeling_layers")

VOCAB = 97
LAYERS = 3
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, max_position_embeddings=128,
            n_group=4, topk_group=2, norm_topk_prob=True, first_k_dense_replace=1,
            routed_scaling_factor=1.5, tie_word_embeddings=False)


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # weights larger than the default init, so that routing is far from ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))


def _mtp_checkpoint(folder, n_mtp: int):
    """A tiny random DeepSeek-V3 checkpoint with `n_mtp` MTP layers stored as model.layers.3.*, ...

    transformers writes the blocks: a model with LAYERS + n_mtp decoder layers is saved, then config.json is
    edited down to LAYERS layers and the MTP-only tensors (enorm, hnorm, eh_proj, shared_head.*, the
    embedding copy) are added under the same prefixes, as in V3's release.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.DeepseekV3Config(**BASE, num_hidden_layers=LAYERS + n_mtp, num_mtp_layers=n_mtp)
        model = transformers.DeepseekV3ForCausalLM(config)
    _randomize(model, seed=0)
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    hidden = BASE["hidden_size"]
    for layer in range(LAYERS, LAYERS + n_mtp):
        prefix = f"model.layers.{layer}."
        for name in ("enorm", "hnorm", "shared_head.norm"):
            tensors[prefix + name + ".weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        tensors[prefix + "eh_proj.weight"] = 0.15 * torch.randn(hidden, 2 * hidden, generator=gen)
        tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    raw["num_hidden_layers"] = LAYERS
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def _transformers_mtp(folder, n_mtp: int):
    """transformers' main model and MtpModel loaded from the folder (their MTP loader only knows layer 61)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager")
        main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{LAYERS + k}\..*" for k in range(n_mtp)]
        mtp = modeling_layers.MtpModel.from_pretrained(main)
    return main.eval(), mtp.eval()


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_mtp_logits_match_transformers_at_every_position(tmp_path, n_mtp):
    folder = _mtp_checkpoint(tmp_path, n_mtp)
    main, mtp = _transformers_mtp(folder, n_mtp)
    ours = DeepSeekMTPForCausalLM.from_pretrained(folder)
    assert ours.config.num_nextn_predict_layers == n_mtp
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    seq = ids.shape[1]
    with torch.no_grad():
        hidden = main.model(ids).last_hidden_state  # [batch, seq, hidden], after the final norm
        logits, mtp_logits = ours.forward_mtp(ids)
        torch.testing.assert_close(logits, main(ids).logits, rtol=0, atol=1e-5)
        for depth in range(1, n_mtp + 1):
            # depth k: h^{k-1} at positions 0..T-k-1 with t_{i+k}; transformers numbers them by t_{i+k}
            positions = torch.arange(depth, seq).expand(ids.shape[0], -1)
            hidden = mtp.forward_layer(depth - 1, hidden[:, :-1], positions, None, input_ids=ids[:, depth:])
            theirs = mtp._project_to_logits(hidden)  # [batch, T - k, vocab]
            assert mtp_logits[depth - 1].shape == theirs.shape == (2, seq - depth, VOCAB)
            torch.testing.assert_close(mtp_logits[depth - 1], theirs, rtol=0, atol=1e-5)


def test_swapping_the_concatenation_order_breaks_the_match(tmp_path):
    """The check can fail: with [hidden; embedding] (the paper's notation) the logits differ."""
    folder = _mtp_checkpoint(tmp_path, 1)
    _, mtp = _transformers_mtp(folder, 1)
    ours = DeepSeekMTPForCausalLM.from_pretrained(folder)
    mtp.config.mtp_hidden_states_first = True  # transformers' switch for checkpoints in the other order
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = ours.hidden_and_logits(ids)[0]
        positions = torch.arange(1, 9)[None]
        theirs = mtp._project_to_logits(mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids[:, 1:]))
        assert (ours.forward_mtp(ids)[1][0] - theirs).abs().max() > 1e-2


def test_main_model_alone_skips_the_mtp_layers_with_a_warning(tmp_path):
    from refimpl.model import DeepSeekForCausalLM

    folder = _mtp_checkpoint(tmp_path, 1)
    with pytest.warns(UserWarning, match="multi-token-prediction.*DeepSeekMTPForCausalLM"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_mtp_model_refuses_a_checkpoint_without_mtp_tensors(tmp_path):
    torch.manual_seed(0)
    from refimpl.checkpoint import save_pretrained
    from refimpl.model import DeepSeekForCausalLM

    folder = save_pretrained(DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=1)), tmp_path / "m")
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers=1.*no tensor is stored under"
                                         r" \['model\.layers\.3\.\*'\]"):
        DeepSeekMTPForCausalLM.from_pretrained(folder)
    folder = save_pretrained(DeepSeekForCausalLM(tiny_config()), tmp_path / "n")
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0"):
        DeepSeekMTPForCausalLM.from_pretrained(folder)


def test_save_and_load_round_trip_keeps_every_tensor(tmp_path):
    from refimpl.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = DeepSeekMTPForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    loaded = DeepSeekMTPForCausalLM.from_pretrained(save_pretrained(model, tmp_path))
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_main_model_init_is_the_plain_models():
    from refimpl.model import DeepSeekForCausalLM

    torch.manual_seed(0)
    plain = DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=1))
    torch.manual_seed(0)
    with_mtp = DeepSeekMTPForCausalLM(tiny_config(num_nextn_predict_layers=1))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_mtp.state_dict()[name]), name


def test_mtp_loss_is_lambda_over_depths_times_the_summed_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(2, 7, 5), torch.randn(2, 6, 5)]
    targets = torch.randint(0, 5, (2, 8))
    ce = [torch.nn.functional.cross_entropy(logits[k].reshape(-1, 5), targets[:, k + 1:].reshape(-1))
          for k in range(2)]
    torch.testing.assert_close(mtp_loss(logits, targets, 0.3), 0.3 / 2 * (ce[0] + ce[1]))
    with pytest.raises(ValueError, match=r"mtp_logits\[1\]: expected \[batch, T - 2, vocab\]"):
        mtp_loss([logits[0], logits[0]], targets, 0.3)
    with pytest.raises(ValueError, match="mtp_lambda: expected >= 0"):
        mtp_loss(logits, targets, float("nan"))


def test_forward_mtp_targets_line_up_with_the_tokens_they_predict():
    """Depth 1 at position i reads t_{i+1} and predicts t_{i+2}: change t_j and only positions >= j - 1 move."""
    torch.manual_seed(0)
    model = DeepSeekMTPForCausalLM(tiny_config(num_nextn_predict_layers=1)).eval()
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 256
    with torch.no_grad():
        a, b = model.forward_mtp(ids)[1][0], model.forward_mtp(changed)[1][0]
    moved = (a - b).abs().amax(-1)[0] > 1e-4  # [T - 1]; below: float rounding of batched matmuls
    assert moved.tolist() == [False] * 5 + [True] * 6


def test_lambda_schedule_is_v3s_scaled_to_the_steps():
    schedule = lambda_schedule(100)
    assert [schedule(s) for s in (1, 67, 68, 100)] == [0.3, 0.3, 0.1, 0.1]


def test_bad_inputs_are_refused_by_name():
    torch.manual_seed(0)
    model = DeepSeekMTPForCausalLM(tiny_config(num_nextn_predict_layers=2))
    with pytest.raises(ValueError, match=r"input_ids: expected \[batch, seq\] with seq > num_nextn_predict_layers"):
        model.forward_mtp(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"depth: expected 1\.\.2"):
        model.mtp_step(3, torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long))
