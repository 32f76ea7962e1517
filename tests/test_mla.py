"""refimpl.mla: the naive and absorbed paths agree, the latent cache decodes like the full forward, the cache holds
kv_lora_rank + qk_rope_head_dim numbers per token, the module matches the paper's equations written out by hand
and transformers' DeepseekV3Attention, gradients are right, and bad input raises."""

import itertools
import math
import warnings

import pytest
import torch

from refimpl.config import ModelConfig, load_known
from refimpl.mla import MLACache, MultiHeadLatentAttention

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}  # mscale != mscale_all_dim: both YaRN corrections are non-trivial


def _config(q_lora_rank=10, rope_scaling=None, rope_interleave=True, **changes) -> ModelConfig:
    base = dict(vocab_size=11, hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=16,
                kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, max_position_embeddings=64,
                rope_theta=100.0, q_lora_rank=q_lora_rank, rope_scaling=rope_scaling, rope_interleave=rope_interleave)
    return ModelConfig(**{**base, **changes})


def _module(config: ModelConfig, dtype=torch.float64, seed=0) -> MultiHeadLatentAttention:
    """Weights larger than nn.Linear's init, so that attention is far from uniform and every path matters."""
    torch.manual_seed(seed)
    attn = MultiHeadLatentAttention(config).to(dtype)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.4)
    return attn.eval()


def _x(config, batch=2, seq=7, dtype=torch.float64, seed=1):
    return torch.randn(batch, seq, config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _decode(attn, x, mode, prefill=0):
    """`prefill` tokens in one call, then one token per call, through a cache: [batch, seq, hidden]."""
    batch, seq, _ = x.shape
    cache = attn.new_cache(batch, seq)
    steps = [attn(x[:, :prefill], 0, cache, mode)] if prefill else []
    steps += [attn(x[:, t:t + 1], t, cache, mode) for t in range(prefill, seq)]
    return torch.cat(steps, dim=1)


VARIANTS = list(itertools.product([None, 10], [None, YARN], [True, False]))
VARIANT_IDS = [f"q_lora={q}-{'yarn' if y else 'rope'}-{'interleave' if i else 'half'}" for q, y, i in VARIANTS]


# ---------------------------------------------------------------------- naive == absorbed == cached decoding
@pytest.mark.parametrize("q_lora_rank, rope_scaling, rope_interleave", VARIANTS, ids=VARIANT_IDS)
def test_naive_equals_absorbed_prefill_and_decode(q_lora_rank, rope_scaling, rope_interleave):
    config = _config(q_lora_rank, rope_scaling, rope_interleave)
    attn = _module(config)
    x = _x(config, seq=12)  # positions past original_max_position_embeddings=8, where YaRN interpolates
    with torch.no_grad():
        naive, absorbed = attn(x, mode="naive"), attn(x, mode="absorbed")
        torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-10)
        torch.testing.assert_close(_decode(attn, x, "absorbed"), _decode(attn, x, "naive"), rtol=0, atol=1e-10)
        # not vacuous: later tokens attend to earlier ones, so dropping token 0 changes their outputs
        assert (naive[:, 1:] - attn(x[:, 1:], 1, mode="naive")).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@pytest.mark.parametrize("q_lora_rank, rope_scaling", [(None, None), (10, YARN)])
def test_cached_decoding_equals_full_causal_forward(mode, q_lora_rank, rope_scaling):
    config = _config(q_lora_rank, rope_scaling)
    attn = _module(config)
    x = _x(config, seq=10)
    with torch.no_grad():
        full = attn(x, mode=mode)
        torch.testing.assert_close(_decode(attn, x, mode), full, rtol=0, atol=1e-12)
        torch.testing.assert_close(_decode(attn, x, mode, prefill=4), full, rtol=0, atol=1e-12)
        # causal: the first 4 outputs depend on the first 4 tokens only
        torch.testing.assert_close(attn(x[:, :4], mode=mode), full[:, :4], rtol=0, atol=1e-12)


def test_chunked_prefill_into_the_cache_equals_full_forward():
    attn = _module(_config())
    x = _x(_config(), seq=9)
    with torch.no_grad():
        cache = attn.new_cache(2, 12)  # longer than needed: unused slots must not be attended to
        chunks = [attn(x[:, 0:3], 0, cache, "absorbed"), attn(x[:, 3:7], 3, cache, "naive"),
                  attn(x[:, 7:9], 7, cache, "absorbed")]
        torch.testing.assert_close(torch.cat(chunks, dim=1), attn(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- padding (attention_mask) and 0 tokens
LEFT_PAD_MASK = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])  # row 1: 4 pads, then 5 tokens


@pytest.mark.parametrize("q_lora_rank, rope_scaling, rope_interleave", VARIANTS, ids=VARIANT_IDS)
def test_masked_naive_equals_absorbed_and_a_padded_row_equals_its_tokens_alone(q_lora_rank, rope_scaling,
                                                                                rope_interleave):
    config = _config(q_lora_rank, rope_scaling, rope_interleave)
    attn = _module(config)
    x = _x(config, seq=9)
    with torch.no_grad():
        naive = attn(x, mode="naive", attention_mask=LEFT_PAD_MASK)
        absorbed = attn(x, mode="absorbed", attention_mask=LEFT_PAD_MASK)
        torch.testing.assert_close(absorbed[:, 4:], naive[:, 4:], rtol=0, atol=1e-10)
        alone = attn(x[1:, 4:], mode="naive")  # the 5 tokens without their pads, at positions 0..4
        torch.testing.assert_close(naive[1, 4:], alone[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(naive[0], attn(x[:1])[0], rtol=0, atol=1e-12)  # an all-ones row: no change
        assert naive.isfinite().all() and absorbed.isfinite().all()  # pad queries too: no NaN to spread
        # not vacuous: without the mask the padded row sees its pads and sits at other positions
        assert (attn(x)[1, 4:] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_masked_cached_decoding_equals_the_masked_full_forward(mode):
    config = _config(10, YARN)
    attn = _module(config)
    x = _x(config, seq=9)
    with torch.no_grad():
        full = attn(x, mode=mode, attention_mask=LEFT_PAD_MASK)
        cache = attn.new_cache(2, 9)
        steps = [attn(x[:, :6], 0, cache, mode, LEFT_PAD_MASK[:, :6])]  # the mask covers cached tokens too
        steps += [attn(x[:, t:t + 1], t, cache, mode, LEFT_PAD_MASK[:, :t + 1]) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 4:], full[:, 4:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_zero_tokens_give_zero_outputs(mode):
    config = _config()
    attn = _module(config)
    x = _x(config, seq=0)
    assert attn(x, mode=mode).shape == (2, 0, config.hidden_size)
    assert attn(x, 0, attn.new_cache(2, 4), mode).shape == (2, 0, config.hidden_size)


# ---------------------------------------------------------------------- what the cache holds
def test_cache_holds_the_normalized_latent_and_the_rotated_rope_key():
    config = _config()
    attn = _module(config)
    x = _x(config, seq=5)
    with torch.no_grad():
        cache = attn.new_cache(2, 5)
        attn(x, 0, cache)
        c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        torch.testing.assert_close(cache.c_kv, attn.kv_a_layernorm(c_kv), rtol=0, atol=1e-14)
        # rotation keeps the norm of each (x_2i, x_2i+1) pair and moves the pair unless at position 0
        pairs, cached = k_pe.unflatten(-1, (-1, 2)), cache.k_pe.unflatten(-1, (-1, 2))
        torch.testing.assert_close(cached.norm(dim=-1), pairs.norm(dim=-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(cached[:, 0], pairs[:, 0], rtol=0, atol=1e-14)
        assert (cached[:, 1:] - pairs[:, 1:]).abs().max() > 1e-3


def _numbers_per_token(cache: MLACache) -> float:
    """Every number the cache object holds, divided by its token slots."""
    tensors = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() for t in tensors) / (cache.batch_size * cache.max_len)


def test_cache_size_per_token_deepseek_v2():
    config = load_known("DeepSeek-V2")
    cache = MLACache(2, 3, config.kv_lora_rank, config.qk_rope_head_dim)
    assert cache.numbers_per_token == config.kv_lora_rank + config.qk_rope_head_dim == 576
    assert _numbers_per_token(cache) == 576
    mha = 2 * config.num_attention_heads * config.qk_nope_head_dim  # 2 n_h d_h, section 2.1.4 / Table 1
    assert mha == 32768
    assert cache.numbers_per_token == 4.5 * config.qk_nope_head_dim  # "GQA with 2.25 groups" in the paper


def test_module_cache_size_per_token():
    config = _config()
    cache = _module(config).new_cache(batch_size=3, max_len=5)
    assert cache.numbers_per_token == _numbers_per_token(cache) == 8 + 4
    assert (cache.c_kv.dtype, cache.k_pe.dtype) == (torch.float64, torch.float64)


# ---------------------------------------------------------------------- the paper's equations, by hand
def _rope_by_hand(x: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """Rotate pairs (x_2k, x_2k+1) by position * base^(-2k/d): RoPE (Su et al.) in DeepSeek's interleaved layout."""
    out = x.clone()
    d = x.shape[0]
    for k in range(d // 2):
        angle = position * base ** (-2 * k / d)
        c, s = math.cos(angle), math.sin(angle)
        out[2 * k] = x[2 * k] * c - x[2 * k + 1] * s
        out[2 * k + 1] = x[2 * k] * s + x[2 * k + 1] * c
    return out


def _rms_by_hand(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return g * x / torch.sqrt((x * x).mean() + eps)


def _mla_by_hand(attn: MultiHeadLatentAttention, config: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """u_t for one sequence h: [seq, hidden], token by token and head by head, from eqs 9-19 (DeepSeek-V2 section
    2.1, appendix C), with the RMSNorms after c^Q and c^KV that the released code adds."""
    n_h, d_h, d_r, d_v, d_c = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                               config.v_head_dim, config.kv_lora_rank)
    eps, base = config.rms_norm_eps, config.rope_theta
    W_DKV, W_KR = attn.kv_a_proj_with_mqa.weight[:d_c], attn.kv_a_proj_with_mqa.weight[d_c:]
    W_DQ = attn.q_a_proj.weight
    W_UQ = [attn.q_b_proj.weight[i * (d_h + d_r):i * (d_h + d_r) + d_h] for i in range(n_h)]
    W_QR = [attn.q_b_proj.weight[i * (d_h + d_r) + d_h:(i + 1) * (d_h + d_r)] for i in range(n_h)]
    W_UK = [attn.kv_b_proj.weight[i * (d_h + d_v):i * (d_h + d_v) + d_h] for i in range(n_h)]
    W_UV = [attn.kv_b_proj.weight[i * (d_h + d_v) + d_h:(i + 1) * (d_h + d_v)] for i in range(n_h)]
    W_O = attn.o_proj.weight
    g_q, g_kv = attn.q_a_layernorm.weight, attn.kv_a_layernorm.weight

    seq = h.shape[0]
    c_KV = [_rms_by_hand(W_DKV @ h[t], g_kv, eps) for t in range(seq)]  # (9)
    k_R = [_rope_by_hand(W_KR @ h[t], t, base) for t in range(seq)]  # (15)
    c_Q = [_rms_by_hand(W_DQ @ h[t], g_q, eps) for t in range(seq)]  # (12)
    u = []
    for t in range(seq):
        o = []
        for i in range(n_h):
            q = torch.cat([W_UQ[i] @ c_Q[t], _rope_by_hand(W_QR[i] @ c_Q[t], t, base)])  # (13), (14), (16)
            logits = []
            for j in range(t + 1):
                k = torch.cat([W_UK[i] @ c_KV[j], k_R[j]])  # (10), (17)
                logits.append(q @ k / math.sqrt(d_h + d_r))
            p = torch.softmax(torch.stack(logits), dim=0)
            o.append(sum(p[j] * (W_UV[i] @ c_KV[j]) for j in range(t + 1)))  # (11), (18)
        u.append(W_O @ torch.cat(o))  # (19)
    return torch.stack(u)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_matches_the_equations_written_out_by_hand(mode):
    config = _config(q_lora_rank=10, rope_interleave=True, num_attention_heads=2)
    attn = _module(config)
    x = _x(config, batch=2, seq=5)
    with torch.no_grad():
        out = attn(x, mode=mode)
        for b in range(2):
            torch.testing.assert_close(out[b], _mla_by_hand(attn, config, x[b]), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- transformers' DeepseekV3Attention
MLA_FIELDS = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "rope_theta", "rope_scaling", "rope_interleave", "attention_bias",
              "rms_norm_eps")
HF_CASES = {
    "q_lora-interleave": dict(q_lora_rank=10, rope_interleave=True),
    "q_proj-yarn-interleave": dict(q_lora_rank=None, rope_interleave=True, rope_scaling=YARN),
    "q_lora-yarn-half-bias": dict(q_lora_rank=10, rope_interleave=False, rope_scaling=YARN, attention_bias=True),
}


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_matches_transformers_deepseek_v3_attention(case, mode):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

    overrides = HF_CASES[case]
    config = _config(**overrides)
    hf_kwargs = dict(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.num_attention_heads, kv_lora_rank=config.kv_lora_rank,
                     qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                     v_head_dim=config.v_head_dim, max_position_embeddings=config.max_position_embeddings,
                     rope_theta=config.rope_theta, vocab_size=11, num_hidden_layers=1, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.DeepseekV3Config(**hf_kwargs)
    hf_config._attn_implementation = "eager"
    read_back = ModelConfig.from_hf(hf_config.to_dict())  # transformers' config says what ours says
    for name in MLA_FIELDS:
        assert getattr(read_back, name) == getattr(config, name), name

    ours = _module(config, dtype=torch.float32)
    hf = hf_v3.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict())  # strict: the same parameter names and shapes

    x = _x(config, batch=2, seq=12, dtype=torch.float32)
    position_ids = torch.arange(12).expand(2, -1)
    cos_sin = hf_v3.DeepseekV3RotaryEmbedding(hf_config)(x, position_ids)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]  # additive causal mask
    with torch.no_grad():
        want = hf(x, cos_sin, mask)[0]
        got = ours(x, mode=mode)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert want.abs().max() > 0.1  # not a vacuous comparison


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_gradcheck(mode):
    config = _config(hidden_size=6, num_attention_heads=2, q_lora_rank=4, kv_lora_rank=3, qk_nope_head_dim=2,
                     qk_rope_head_dim=2, v_head_dim=2, rope_scaling=YARN)
    attn = _module(config)
    x = _x(config, batch=1, seq=3).requires_grad_()
    w_kv_b = attn.kv_b_proj.weight.detach().clone().requires_grad_()  # used differently by the two paths

    def f(x, w_kv_b):
        return torch.func.functional_call(attn, {"kv_b_proj.weight": w_kv_b}, (x,), {"mode": mode})

    assert torch.autograd.gradcheck(f, (x, w_kv_b))


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    config = _config()
    return config, _module(config)


def test_non_mla_config_raises():
    dense = ModelConfig(vocab_size=11, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                        intermediate_size=16)
    with pytest.raises(ValueError, match="config: expected an MLA config.*kv_lora_rank=None"):
        MultiHeadLatentAttention(dense)
    with pytest.raises(TypeError, match="config: expected a refimpl.config.ModelConfig, got dict"):
        MultiHeadLatentAttention(dense.to_dict())


def test_bad_hidden_states_raise(small):
    config, attn = small
    with pytest.raises(ValueError, match=r"hidden_states: expected a 3-d tensor, got shape \(7, 24\)"):
        attn(torch.randn(7, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hidden_states: expected shape \('\*', '\*', 24\), got \(2, 7, 23\)"):
        attn(torch.randn(2, 7, 23, dtype=torch.float64))
    with pytest.raises(TypeError, match="hidden_states: expected dtype torch.float64.*got torch.float32"):
        attn(torch.randn(2, 7, 24))
    with pytest.raises(TypeError, match="hidden_states: expected a torch.Tensor, got list"):
        attn([[[0.0] * 24]])


def test_unknown_mode_raises(small):
    config, attn = small
    with pytest.raises(ValueError, match=r"mode: expected one of \('naive', 'absorbed', 'naive_sdpa'\), got 'latent'"):
        attn(_x(config), mode="latent")


def test_bad_start_pos_raises(small):
    config, attn = small
    x = _x(config, seq=3)
    with pytest.raises(ValueError, match="start_pos: expected an int >= 0, got -1"):
        attn(x, start_pos=-1)
    with pytest.raises(TypeError, match="start_pos: expected an int >= 0, got 1.0"):
        attn(x, start_pos=1.0)
    cache = attn.new_cache(2, 4)
    with pytest.raises(ValueError, match=r"start_pos: 3 tokens at start_pos 2 reach position 4, past the cache "
                                         r"length max_len=4"):
        attn(x, 2, cache)
    with pytest.raises(ValueError, match=r"start_pos: expected an int >= 0 \(cache length max_len=4\), got -1"):
        cache.update(cache.c_kv[:, :1], cache.k_pe[:, :1], -1)


def test_bad_cache_raises(small):
    config, attn = small
    x = _x(config, seq=3)
    with pytest.raises(ValueError, match=r"cache: expected \(batch_size, kv_lora_rank, qk_rope_head_dim\) = "
                                         r"\(2, 8, 4\), got \(2, 9, 4\)"):
        attn(x, 0, MLACache(2, 5, 9, 4, torch.float64))
    with pytest.raises(ValueError, match=r"cache: expected .* = \(2, 8, 4\), got \(1, 8, 4\)"):
        attn(x, 0, MLACache(1, 5, 8, 4, torch.float64))
    with pytest.raises(TypeError, match="cache: expected dtype torch.float64.*got torch.float32"):
        attn(x, 0, MLACache(2, 5, 8, 4))
    with pytest.raises(TypeError, match="cache: expected an MLACache or None, got dict"):
        attn(x, 0, {})


def test_bad_cache_arguments_raise():
    with pytest.raises(ValueError, match="max_len: expected an int >= 1, got 0"):
        MLACache(1, 0, 8, 4)
    with pytest.raises(TypeError, match="kv_lora_rank: expected an int >= 1, got 2.5"):
        MLACache(1, 4, 2.5, 4)
    cache = MLACache(2, 4, 8, 4)
    with pytest.raises(ValueError, match=r"c_kv: expected shape \(2, '\*', 8\), got \(2, 1, 7\)"):
        cache.update(torch.zeros(2, 1, 7), torch.zeros(2, 1, 4), 0)
    with pytest.raises(ValueError, match=r"k_pe: expected shape \(2, 1, 4\), got \(2, 2, 4\)"):
        cache.update(torch.zeros(2, 1, 8), torch.zeros(2, 2, 4), 0)
    with pytest.raises(TypeError, match=r"c_kv: expected dtype torch.float32 \(that of the cache\), got torch.float64"):
        cache.update(torch.zeros(2, 1, 8, dtype=torch.float64), torch.zeros(2, 1, 4), 0)
