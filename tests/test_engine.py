"""The engine's paths: PyTorch's fused attention against the written-out reference, the MLA path chosen per call
(`mode="auto"`), the last layer of a prefill run on the kept positions only, and peak memory linear in the
prompt. Speed is not tested here: `python -m refimpl.bench` measures it (its --quick run is the last test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refimpl import attention, mla
from refimpl.attention import decoder_mask, fused_attention, scaled_dot_product_attention
from refimpl.config import ModelConfig
from refimpl.dense import DenseForCausalLM
from refimpl.model import DeepSeekForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _reference(q, k, v, scale, attention_mask=None, sliding_window=None):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    mask = decoder_mask(attention_mask, q.shape[2], k.shape[2], sliding_window)
    return scaled_dot_product_attention(q, k, v, mask, scale=scale)


@pytest.mark.parametrize("heads, kv_heads, q_len, kv_len, d_v, padded, window", [
    (4, 4, 9, 9, 6, False, None),  # square, no mask: is_causal=True; unequal head dims (MLA's v is narrower)
    (4, 2, 3, 9, 8, True, None),  # a cached prefix, left padding, GQA
    (4, 1, 9, 9, 8, False, 3),  # a sliding window, MQA
    (4, 2, 1, 9, 5, True, 2),  # one decode step
    (6, 3, 23, 30, 5, True, None),  # several query chunks (QUERY_CHUNK set to 8 below)
])
def test_fused_attention_equals_the_written_out_reference(monkeypatch, heads, kv_heads, q_len, kv_len, d_v,
                                                          padded, window):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, q_len, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, kv_len, d_v, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.long)
        mask[1, :2] = 0
    got = fused_attention(q, k, v, 0.3, mask, window)
    assert got.shape == (2, heads, q_len, d_v)
    torch.testing.assert_close(got, _reference(q, k, v, 0.3, mask, window), rtol=1e-12, atol=1e-12)
    if window is not None or padded:  # the mask matters: without it the answer differs
        assert not torch.allclose(got, _reference(q, k, v, 0.3), rtol=1e-6, atol=1e-6)


def test_auto_mode_is_the_cheaper_path():
    config = ModelConfig.from_hf(ROOT / "refimpl" / "known_configs" / "DeepSeek-V2-Lite.json")
    # absorbed: seq * (2 * 512 + 64); naive: 512 * (128 + 128) + seq * (128 + 64 + 128): equal at seq = 170.67
    assert [mla.auto_mode(config, seq) for seq in (1, 170, 171, 4096)] == [
        "absorbed", "absorbed", "naive_sdpa", "naive_sdpa"]


# ------------------------------------------------------------------------------------------- tiny models
def deepseek_config(**overrides):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=1024)
    return ModelConfig(**{**base, **overrides})


def _randomized(model):
    """Weights larger than the default init: logits far from ties, so that paths that differ show it."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.double().eval()


@pytest.fixture(scope="module")
def deepseek():
    return _randomized(DeepSeekForCausalLM(deepseek_config()))


@pytest.fixture(scope="module")
def dense():
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         sliding_window=200)
    return _randomized(DenseForCausalLM(config))


PROMPTS = torch.randint(0, 300, (2, 250), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1] * 250, [0] * 9 + [1] * 241])  # the second prompt is left-padded


def _record_modes(monkeypatch):
    """Record (mode, seq, kv_len) of every MultiHeadLatentAttention call."""
    calls = []
    forward = mla.MultiHeadLatentAttention.forward

    def spy(self, hidden_states, start_pos=0, cache=None, mode="naive", attention_mask=None):
        calls.append((mode, hidden_states.shape[1], start_pos + hidden_states.shape[1]))
        return forward(self, hidden_states, start_pos, cache, mode, attention_mask)

    monkeypatch.setattr(mla.MultiHeadLatentAttention, "forward", spy)
    return calls


def test_generation_on_the_chosen_paths_equals_each_path_alone(deepseek, monkeypatch):
    tokens = {mode: deepseek.generate(PROMPTS, 12, attention_mask=MASK, mode=mode)
              for mode in ("naive", "absorbed", "naive_sdpa")}
    calls = _record_modes(monkeypatch)
    auto = deepseek.generate(PROMPTS, 12, attention_mask=MASK)  # mode="auto", the default
    for mode, expected in tokens.items():
        assert torch.equal(auto, expected), mode
    # the switch switches: the prompt on the fused naive path (the last layer: its last token only, absorbed),
    # every new token absorbed
    layers = deepseek.config.num_hidden_layers
    assert calls[:layers] == [("naive_sdpa", 250, 250)] * (layers - 1) + [("absorbed", 1, 250)]
    assert calls[layers:] == [("absorbed", 1, 250 + step) for step in range(1, 12) for _ in range(layers)]
    # and the paths are different computations: their logits are not bit for bit equal
    with torch.no_grad():
        naive, absorbed = (deepseek(PROMPTS, attention_mask=MASK, mode=m) for m in ("naive", "absorbed"))
    assert not torch.equal(naive, absorbed)
    torch.testing.assert_close(naive, absorbed, rtol=1e-9, atol=1e-9)


def test_the_last_layer_runs_the_kept_positions_only(deepseek, dense, monkeypatch):
    calls = _record_modes(monkeypatch)
    for model, kwargs in ((deepseek, dict(mode="auto")), (dense, dict(sdpa=True))):
        with torch.no_grad():
            full = model(PROMPTS, attention_mask=MASK, **kwargs)
            caches = model.new_caches(2, 260)
            kept = model(PROMPTS, caches=caches, attention_mask=MASK, logits_to_keep=3, **kwargs)
            assert kept.shape == (2, 3, 300)
            torch.testing.assert_close(kept, full[:, -3:], rtol=1e-10, atol=1e-10)
            # the caches hold every position: the next token sees the whole prompt
            nxt = torch.tensor([[5], [7]])
            mask = torch.cat((MASK, torch.ones(2, 1, dtype=MASK.dtype)), dim=1)
            step = model(nxt, start_pos=250, caches=caches, attention_mask=mask, **kwargs)
            torch.testing.assert_close(step[:, 0], model(torch.cat((PROMPTS, nxt), 1), attention_mask=mask,
                                                          **kwargs)[:, -1], rtol=1e-10, atol=1e-10)
    assert ("absorbed", 3, 250) in calls and ("naive_sdpa", 250, 250) in calls
    with pytest.raises(ValueError, match="logits_to_keep: expected an int >= 1 or None"):
        deepseek(PROMPTS, logits_to_keep=0)
    with pytest.raises(ValueError, match=r"mode: expected one of \('naive', 'absorbed', 'naive_sdpa', 'auto'\)"):
        deepseek(PROMPTS, mode="fast")


def test_dense_generation_fused_equals_the_reference(dense, monkeypatch):
    reference = dense.generate(PROMPTS, 12, attention_mask=MASK, sdpa=False)
    calls = []
    monkeypatch.setattr(attention, "fused_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[2]) or fused_attention(*args, **kwargs))
    fused = dense.generate(PROMPTS, 12, attention_mask=MASK)  # sdpa=True, the default
    assert torch.equal(fused, reference)
    assert calls[:2] == [250, 1] and len(calls) == 2 + 2 * 11  # prompt (last layer: 1 position), 11 steps
    with pytest.raises(TypeError, match="sdpa: expected True or False"):
        dense(PROMPTS, sdpa="yes")


# ------------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = """
import json, resource, sys, torch
from refimpl.config import ModelConfig
from refimpl.dense import DenseForCausalLM
from refimpl.model import DeepSeekForCausalLM
family, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
if family == "deepseek":
    model = DeepSeekForCausalLM(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=16, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, max_position_embeddings=8192))
    options = dict(mode=mode)
else:
    model = DenseForCausalLM(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192))
    options = dict(sdpa=mode == "sdpa")
peaks = {}
for length in (1024, 2048, 4096):  # increasing: ru_maxrss is the peak so far
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.generate(torch.randint(0, 512, (1, length)), 2, **options)
    peaks[length] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(peaks))
"""


def _peaks(family: str, mode: str) -> dict[int, int]:
    """Peak RSS (bytes) of a fresh process after generating from prompts of 1K, 2K, 4K tokens."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, family, mode], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert result.returncode == 0, result.stderr
    return {int(k): v for k, v in json.loads(result.stdout).items()}


def _grows_linearly(peaks: dict[int, int]) -> bool:
    """Doubling the prompt from 2K to 4K may add at most 2.5x what doubling it from 1K to 2K added, + 16 MB of
    slack (a linear cost adds 2x; a quadratic one, as a 16-head score matrix, 4x: 768 MB against 192 MB)."""
    return peaks[4096] - peaks[2048] <= 2.5 * (peaks[2048] - peaks[1024]) + 16e6


def test_peak_memory_grows_linearly_with_the_prompt():
    for family, engine in (("deepseek", "auto"), ("dense", "sdpa")):
        peaks = _peaks(family, engine)
        assert _grows_linearly(peaks), (family, peaks)
        assert peaks[4096] - peaks[1024] < 200e6, (family, peaks)
    # the check can fail: the written-out attention holds a 16 x 4096 x 4096 float32 score matrix (1 GB)
    quadratic = _peaks("deepseek", "naive")
    assert not _grows_linearly(quadratic), quadratic


def test_bench_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "refimpl.bench", "--quick", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                                           "PATH": "/usr/bin:/bin"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(r["family"], r["length"]) for r in report["rows"]} == {("deepseek", 128), ("dense", 128)}
    for row in report["rows"]:
        assert row["prefill_s"] > 0 and row["decode_ms"] > 0 and row["floor_ms"] > 0 and row["hf_prefill_s"] > 0
        assert row["same_tokens"]  # the same weights give the same greedy tokens in both engines
    assert report["table"] in result.stdout and report["machine"]["memory_bandwidth_gb_s"] > 0
