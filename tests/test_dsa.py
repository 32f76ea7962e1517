"""refimpl.dsa (DeepSeek Sparse Attention) against transformers' DeepseekV32ForCausalLM on a tiny random
checkpoint built here (no download): logits to 1e-5 in float32, the indexer's top-k equal, and a context longer
than top-k (top-k 4, 16 tokens), so that the selection matters."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV32ForCausalLM", allow_module_level=True)

from refimpl.config import ModelConfig  # noqa: E402
from refimpl.dsa import DeepSeekV32ForCausalLM, SparseMLA, select_topk, selection_mask  # noqa: E402

VOCAB, SEQ, TOPK = 97, 16, 4
CONFIG = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, q_lora_rank=24, n_routed_experts=8,
              n_shared_experts=2, num_experts_per_tok=3, max_position_embeddings=128,
              routed_scaling_factor=1.5, tie_word_embeddings=False, n_group=4, topk_group=2,
              norm_topk_prob=True, first_k_dense_replace=1, index_topk=TOPK, index_n_heads=16,
              index_head_dim=10)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.DeepseekV32Config(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(config)
    with torch.no_grad():  # weights larger than the default init: routing and top-k far from ties
        for name, p in hf.named_parameters():
            if "norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "norm.bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    folder = tmp_path_factory.mktemp("v32")
    hf.eval().save_pretrained(folder)
    return hf, DeepSeekV32ForCausalLM.from_pretrained(folder), folder


def _ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_config_reads_the_index_keys_and_v3_routing(pair):
    _, ours, folder = pair
    c = ours.config
    assert (c.index_topk, c.index_n_heads, c.index_head_dim) == (TOPK, 16, 10)
    assert "scoring_func" not in json.loads((folder / "config.json").read_text())
    assert (c.scoring_func, c.topk_method) == ("sigmoid", "noaux_tc")  # V3's, as transformers uses


def test_logits_equal_transformers(pair):
    hf, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_topk_indices_equal_transformers(pair):
    hf, ours, _ = pair
    got = []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, a, out: got.append(out))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(_ids())
        ours(_ids())
    for h in hooks:
        h.remove()
    for theirs, layer in zip(got, ours.model.layers):
        mine, scores = layer.self_attn.last_topk, layer.self_attn.last_index_scores
        for t in range(TOPK, SEQ):  # no tie at the top-k boundary, or either choice would be right
            kth, next_ = scores[0, t].sort(descending=True).values[TOPK - 1:TOPK + 1]
            assert kth > next_, (t, kth, next_)
        for t in range(SEQ):  # the visible keys among each query's selection (the rest are masked ties)
            a = {int(i) for i in theirs[0, t] if i <= t}
            b = {int(i) for i in mine[0, t] if i <= t}
            assert a == b and len(a) == min(TOPK, t + 1), (t, a, b)


def test_the_selection_changes_the_logits(pair):
    _, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        sparse = ours(ids)
        ours.set_sparse(False)
        dense = ours(ids)
        ours.set_sparse(True)
    assert torch.equal(sparse[:, :TOPK], sparse[:, :TOPK])
    torch.testing.assert_close(sparse[:, :TOPK], dense[:, :TOPK], rtol=0, atol=1e-5)  # <= top-k keys: all kept
    assert (sparse[:, TOPK:] - dense[:, TOPK:]).abs().max() > 1e-2


def test_cached_generation_equals_recomputing(pair):
    """Greedy decoding through the latent + indexer cache equals re-running the whole sequence each step
    (float64: no near-tie of the top-k or the logits can flip between the two orders of summation)."""
    _, _, folder = pair
    ours = DeepSeekV32ForCausalLM.from_pretrained(folder, dtype=torch.float64)
    ids = _ids(batch=2, seq=6)
    out = ours.generate(ids, max_new_tokens=12, mode="absorbed")
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_naive_and_absorbed_paths_agree(pair):
    _, ours, _ = pair
    layer = ours.model.layers[1].self_attn
    x = torch.randn(2, SEQ, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mode="naive"), layer(x, mode="absorbed"), rtol=0, atol=1e-5)


def test_topk_above_the_context_is_clamped():
    scores = torch.tensor([[[3.0, 1.0, float("-inf")]]])
    idx = select_topk(scores, 2048)
    assert idx.shape == (1, 1, 3) and idx[0, 0, :2].tolist() == [0, 1]
    assert selection_mask(idx[..., :1], 3).tolist() == [[[[True, False, False]]]]


def test_bad_dsa_configs_are_refused_by_name():
    base = {k: v for k, v in CONFIG.items() if k not in ("num_key_value_heads",)}
    with pytest.raises(ValueError, match="a DSA config sets all three"):
        ModelConfig(**{**base, "index_head_dim": None})
    with pytest.raises(ValueError, match="q_lora_rank: DSA's indexer reads the MLA query latent"):
        ModelConfig(**{**base, "q_lora_rank": None})
    with pytest.raises(ValueError, match=r"index_head_dim: expected at least qk_rope_head_dim \(6\), got 4"):
        ModelConfig(**{**base, "index_head_dim": 4})
    with pytest.raises(ValueError, match="expected a DSA config"):
        SparseMLA(ModelConfig(**{**base, "index_topk": None, "index_n_heads": None, "index_head_dim": None}))


def test_a_checkpoint_without_the_indexer_is_refused(pair, tmp_path):
    """An indexer config that does not match the checkpoint: loading lists the missing tensors."""
    _, _, folder = pair
    raw = json.loads((folder / "config.json").read_text())
    raw["index_n_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for f in folder.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="indexer"):
        DeepSeekV32ForCausalLM.from_pretrained(tmp_path)
