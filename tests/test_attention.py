"""refimpl.attention: SDPA against torch's, GQA/MQA against MHA and a per-head loop, cache decoding against the
full forward, gradients, transformers' LlamaAttention, and every bad input."""

import pytest
import torch
import torch.nn.functional as F

from refimpl.attention import (Attention, KVCache, causal_mask, check_attention_mask, decoder_mask, position_ids,
                               repeat_kv, scaled_dot_product_attention)
from refimpl.config import ModelConfig, load_known
from refimpl.rope import apply_rope


def small_config(heads=4, kv_heads=2, head_dim=8, hidden=16, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=32, **kw)


def make_attention(config, dtype=torch.float64, seed=0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(config).to(dtype)
    with torch.no_grad():  # O(1) weights and biases, so that a wrong term shows in the output
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def qkv(batch=2, heads=3, q_len=5, kv_len=5, d=8, d_v=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, d, dtype=dtype, generator=g),
            torch.randn(batch, heads, kv_len, d, dtype=dtype, generator=g),
            torch.randn(batch, heads, kv_len, d_v, dtype=dtype, generator=g))


# ---------------------------------------------------------------------------- scaled_dot_product_attention
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(dtype, tol, is_causal):
    q, k, v = qkv(dtype=dtype)
    ours = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), atol=tol, rtol=tol)


def test_sdpa_custom_scale_matches_torch():
    q, k, v = qkv()
    ours = scaled_dot_product_attention(q, k, v, scale=0.37)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=0.37), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 7), (1, 3, 4, 7), (2, 1, 4, 7), (1, 1, 4, 7)])
def test_sdpa_bool_mask_matches_torch(mask_shape):
    q, k, v = qkv(q_len=4, kv_len=7)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[..., 0] = True  # every query sees at least one key (else softmax over nothing: NaN)
    ours = scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-12, rtol=1e-12)


def test_sdpa_causal_offset_when_fewer_queries_than_keys():
    # 3 new queries after 4 cached keys: query i sits at position 4 + i and sees keys 0 ... 4 + i
    q, k, v = qkv(q_len=3, kv_len=7)
    manual = torch.tensor([[j <= 4 + i for j in range(7)] for i in range(3)])
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=manual), atol=1e-12, rtol=1e-12)
    # and it is not torch's top-left alignment
    assert not torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sdpa_mask_and_causal_combine():
    q, k, v = qkv(q_len=5, kv_len=5)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 1] = False  # nobody may look at key 1
    both = torch.ones(5, 5, dtype=torch.bool).tril() & mask
    ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=both), atol=1e-12, rtol=1e-12)


def test_sdpa_float32_softmax_for_bfloat16():
    q, k, v = qkv(dtype=torch.bfloat16)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == torch.bfloat16
    reference = scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(ours.double(), reference, atol=3e-2, rtol=3e-2)


def test_sdpa_gradcheck():
    q, k, v = qkv(batch=1, heads=2, q_len=3, kv_len=4, d=4, d_v=3)
    mask = torch.tensor([[True, False, True, True]]).expand(3, 4)[None, None]
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask, is_causal=True),
                                    (q, k, v))


# ---------------------------------------------------------------------------- repeat_kv
def test_repeat_kv_consecutive_query_heads_share_a_kv_head():
    x = torch.randn(2, 3, 5, 4)
    out = repeat_kv(x, 4)
    assert out.shape == (2, 12, 5, 4)
    for h in range(12):
        assert torch.equal(out[:, h], x[:, h // 4])


# ---------------------------------------------------------------------------- Attention: MHA, GQA, MQA
def manual_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-head loop over query heads, from the module's weights; query head h uses KV head h // group."""
    batch, seq, _ = x.shape
    heads, kv_heads, d = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, seq, heads, d).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, seq, kv_heads, d).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, seq, kv_heads, d).transpose(1, 2)
    cos, sin = attn.rotary_emb(torch.arange(seq), dtype=x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    outs = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = (q[:, h] @ k[:, g].transpose(-1, -2)) * d ** -0.5  # [batch, seq, seq]
        outs.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, g])
    return F.linear(torch.cat(outs, dim=-1), attn.o_proj.weight, attn.o_proj.bias)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_matches_per_head_loop(kv_heads, bias):
    attn = make_attention(small_config(kv_heads=kv_heads, attention_bias=bias))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), manual_attention(attn, x), atol=1e-12, rtol=1e-12)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make_attention(small_config(heads=6, kv_heads=2))
    mha = make_attention(small_config(heads=6, kv_heads=6), seed=1)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # KV head g -> query heads 3g, 3g+1, 3g+2
            w = getattr(gqa, name).weight.view(2, 8, 16).repeat_interleave(3, dim=0).reshape(48, 16)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-12, rtol=1e-12)


def test_attention_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    hf_config = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         intermediate_size=32, vocab_size=32, rope_theta=500000.0,
                                         attn_implementation="eager")
    ours = make_attention(small_config(rope_theta=500000.0), dtype=torch.float32)
    hf = LlamaAttention(hf_config, layer_idx=0)
    hf.load_state_dict(ours.state_dict())  # same parameter names, same shapes
    x = torch.randn(2, 6, 16)
    position_ids = torch.arange(6)[None].expand(2, 6)
    cos_sin = LlamaRotaryEmbedding(hf_config)(x, position_ids)
    additive_mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=additive_mask)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_yarn_scaling_changes_the_softmax_scale():
    rope_scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "mscale": 1.0,
                    "mscale_all_dim": 1.0}
    attn = Attention(small_config(rope_scaling=rope_scaling))
    assert attn.softmax_scale == pytest.approx(8 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


# ---------------------------------------------------------------------------- masks: padding, sliding window
def test_causal_mask_with_a_sliding_window():
    # Mistral: a query sees the last `sliding_window` keys, itself included; queries are the last q_len keys
    expected = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 5, sliding_window=3), expected)
    assert torch.equal(causal_mask(3, 5, sliding_window=100), causal_mask(3, 5))
    with pytest.raises(ValueError, match="sliding_window: expected an int >= 1, got 0"):
        causal_mask(3, 5, sliding_window=0)


def test_position_ids_count_tokens_only():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(position_ids(mask, 0, 4), torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]]))
    assert torch.equal(position_ids(mask, 3, 1), torch.tensor([[3], [1]]))  # one new token after 3 cached
    assert torch.equal(position_ids(None, 3, 2), torch.tensor([3, 4]))
    assert torch.equal(position_ids(torch.ones(1, 2), 3, 2), torch.tensor([[3, 4]]))  # no cache: from start_pos


def test_decoder_mask_hides_padding_and_a_pad_sees_itself():
    mask = decoder_mask(torch.tensor([[0, 1, 1]]), 3, 3)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 3, 3) and torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_left_padded_row_equals_its_tokens_alone(kv_heads):
    attn = make_attention(small_config(kv_heads=kv_heads))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = attn(x, attention_mask=mask)
    torch.testing.assert_close(out[1, 3:], attn(x[1:, 3:])[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[0], attn(x[:1])[0], atol=1e-12, rtol=1e-12)
    assert out.isfinite().all()
    cache = attn.new_cache(2, 6)  # decoding: the mask covers the cached tokens too
    steps = [attn(x[:, :4], 0, cache, mask[:, :4])] + [attn(x[:, t:t + 1], t, cache, mask[:, :t + 1])
                                                       for t in (4, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 3:], out[:, 3:], atol=1e-12, rtol=1e-12)


def test_sliding_window_attention_equals_attention_over_the_window():
    attn = make_attention(small_config())
    windowed = make_attention(small_config(sliding_window=3))
    windowed.load_state_dict(attn.state_dict())
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    out = windowed(x)
    # the last query sees tokens 3, 4, 5 only: RoPE depends on relative positions, so those 3 alone give it
    torch.testing.assert_close(out[0, -1], attn(x[:, 3:], start_pos=3)[0, -1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[:, :3], attn(x[:, :3]), atol=1e-12, rtol=1e-12)
    assert (out[0, -1] - attn(x)[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(2, 5), TypeError, "attention_mask: expected a bool or integer tensor"),
    (torch.ones(2, 4, dtype=torch.long), ValueError, r"attention_mask: expected shape \(2, 5\)"),
    (torch.full((2, 5), 2), ValueError, r"attention_mask: expected values 0 \(padding\) and 1 \(token\), got \[2\]"),
    (torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), ValueError, r"expected left padding .* rows \[0\]"),
    (torch.tensor([[0] * 5, [1] * 5]), ValueError, r"at least one token .* rows \[0\] are all 0"),
    ([[1] * 5] * 2, TypeError, "attention_mask: expected a torch.Tensor, got list"),
])
def test_bad_attention_mask_raises(mask, error, match):
    with pytest.raises(error, match=match):
        check_attention_mask(mask, 2, 5)
    with pytest.raises(error, match=match):
        make_attention(small_config())(torch.zeros(2, 5, 16, dtype=torch.float64), attention_mask=mask)


def test_zero_tokens_give_zero_outputs():
    attn = make_attention(small_config())
    assert attn(torch.zeros(2, 0, 16, dtype=torch.float64)).shape == (2, 0, 16)


# ---------------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_decoding_token_by_token_equals_full_forward(kv_heads):
    attn = make_attention(small_config(kv_heads=kv_heads))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    full = attn(x)
    cache = attn.new_cache(batch_size=2, max_len=10)
    steps = [attn(x[:, t:t + 1], start_pos=t, cache=cache) for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)


def test_prefill_then_tokens_equals_full_forward():
    attn = make_attention(small_config())
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    full = attn(x)
    cache = attn.new_cache(batch_size=2, max_len=7)
    outs = [attn(x[:, :4], start_pos=0, cache=cache)]  # prefill a chunk of 4
    outs += [attn(x[:, t:t + 1], start_pos=t, cache=cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=1e-12)


def test_cache_update_writes_and_returns_the_prefix():
    cache = KVCache(batch_size=1, num_key_value_heads=2, max_len=5, head_dim=3, dtype=torch.float64)
    k, v = torch.randn(1, 2, 2, 3, dtype=torch.float64), torch.randn(1, 2, 2, 3, dtype=torch.float64)
    k_all, v_all = cache.update(k, v, start_pos=1)
    assert k_all.shape == v_all.shape == (1, 2, 3, 3)
    assert torch.equal(k_all[:, :, 1:], k) and torch.equal(v_all[:, :, 1:], v)
    assert torch.equal(cache.k[:, :, 3:], torch.zeros(1, 2, 2, 3, dtype=torch.float64))


def test_cache_numbers_per_token_and_new_cache():
    attn = Attention(small_config(kv_heads=2, head_dim=8)).to(torch.float64)
    cache = attn.new_cache(batch_size=3, max_len=11)
    assert cache.numbers_per_token == 2 * 2 * 8
    assert cache.k.shape == cache.v.shape == (3, 2, 11, 8)
    assert cache.k.dtype == torch.float64
    # a Llama-3-8B layer caches 2 * 8 KV heads * 128 = 2048 numbers per token; MHA would cache 32 heads: 8192
    assert KVCache(1, 8, 1, 128, device="meta").numbers_per_token == 2048


def test_attention_gradcheck():
    attn = make_attention(small_config(heads=2, kv_heads=1, head_dim=4, hidden=6, attention_bias=True))
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in attn.named_parameters()}
    names = list(params)

    def f(x, *weights):
        return torch.func.functional_call(attn, dict(zip(names, weights)), (x,), {"start_pos": 2})

    assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=True)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, error, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected a 4-d"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, r"k: expected shape \(2, 3, '?\*'?, 8\)"),
    (lambda q, k, v: (q, k[:1], v), ValueError, r"k: expected shape"),
    (lambda q, k, v: (q, k[:, :2], v), ValueError, r"k: expected shape"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, r"v: expected shape \(2, 3, 5, '?\*'?\)"),
    (lambda q, k, v: (q, k.float(), v), TypeError, r"k: expected dtype torch.float64 \(that of q\)"),
    (lambda q, k, v: (q, k, v.float()), TypeError, r"v: expected dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"k: expected device cpu"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, r"q: expected a floating-point"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, r"q: expected a torch.Tensor"),
])
def test_sdpa_bad_tensors_raise(make, error, match):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(*make(*qkv()))


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(1, 1, 5, 5), TypeError, r"mask: expected dtype torch.bool"),
    (torch.ones(5, 5, dtype=torch.bool), ValueError, r"mask: expected shape \(2 or 1, 3 or 1, 5, 5\)"),
    (torch.ones(3, 1, 5, 5, dtype=torch.bool), ValueError, r"mask: expected shape"),
    (torch.ones(1, 2, 5, 5, dtype=torch.bool), ValueError, r"mask: expected shape"),
    (torch.ones(1, 1, 5, 1, dtype=torch.bool), ValueError, r"mask: expected shape"),
    (torch.ones(1, 1, 5, 5, dtype=torch.bool, device="meta"), ValueError, r"mask: expected device cpu"),
])
def test_sdpa_bad_mask_raises(mask, error, match):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(*qkv(), mask=mask)


@pytest.mark.parametrize("scale", [0.0, -1.0, "0.5"])
def test_sdpa_bad_scale_raises(scale):
    with pytest.raises(ValueError, match=r"scale: expected a positive number"):
        scaled_dot_product_attention(*qkv(), scale=scale)


def test_sdpa_causal_with_more_queries_than_keys_raises():
    with pytest.raises(ValueError, match=r"is_causal: expected q_len <= kv_len.*q_len=5, kv_len=3"):
        scaled_dot_product_attention(*qkv(q_len=5, kv_len=3), is_causal=True)


@pytest.mark.parametrize("x, n_rep, error, match", [
    (torch.zeros(2, 3, 4), 2, ValueError, r"x: expected a 4-d"),
    (torch.zeros(1, 2, 3, 4), 0, ValueError, r"n_rep: expected an int >= 1, got 0"),
    (torch.zeros(1, 2, 3, 4), 1.5, TypeError, r"n_rep: expected an int >= 1, got 1.5 \(float\)"),
])
def test_repeat_kv_bad_input_raises(x, n_rep, error, match):
    with pytest.raises(error, match=match):
        repeat_kv(x, n_rep)


def test_cache_bad_input_raises():
    cache = KVCache(batch_size=2, num_key_value_heads=2, max_len=4, head_dim=3)
    k = torch.zeros(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"start_pos: .*past the cache length max_len=4"):
        cache.update(k, k, start_pos=2)
    with pytest.raises(ValueError, match=r"start_pos: expected an int >= 0, got -1"):
        cache.update(k, k, start_pos=-1)
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 2, '?\*'?, 3\)"):
        cache.update(torch.zeros(2, 1, 3, 3), k, start_pos=0)
    with pytest.raises(ValueError, match=r"v: expected shape \(2, 2, 3, 3\)"):
        cache.update(k, k[:, :, :2], start_pos=0)
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(that of the cache\)"):
        cache.update(k.double(), k.double(), start_pos=0)
    with pytest.raises(ValueError, match=r"k: expected device cpu"):
        cache.update(k.to("meta"), k.to("meta"), start_pos=0)
    with pytest.raises(ValueError, match=r"max_len: expected an int >= 1, got 0"):
        KVCache(batch_size=1, num_key_value_heads=1, max_len=0, head_dim=2)
    with pytest.raises(ValueError, match=r"head_dim: expected an int >= 1, got -2"):
        KVCache(batch_size=1, num_key_value_heads=1, max_len=3, head_dim=-2)


def test_attention_bad_input_raises():
    attn = Attention(small_config())
    with pytest.raises(ValueError, match=r"hidden_states: expected a 3-d tensor"):
        attn(torch.zeros(5, 16))
    with pytest.raises(ValueError, match=r"hidden_states: expected shape \('?\*'?, '?\*'?, 16\), got \(2, 5, 12\)"):
        attn(torch.zeros(2, 5, 12))
    with pytest.raises(TypeError, match=r"hidden_states: expected dtype torch.float32 \(that of the module's"):
        attn(torch.zeros(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hidden_states: expected device cpu"):
        attn(torch.zeros(2, 5, 16, device="meta"))
    with pytest.raises(ValueError, match=r"start_pos: expected an int >= 0, got -1"):
        attn(torch.zeros(2, 5, 16), start_pos=-1)
    cache = attn.new_cache(batch_size=2, max_len=6)
    with pytest.raises(ValueError, match=r"start_pos: .*past the cache length max_len=6"):
        attn(torch.zeros(2, 5, 16), start_pos=3, cache=cache)
    with pytest.raises(ValueError, match=r"cache: expected \(batch_size, num_key_value_heads, head_dim\)"):
        attn(torch.zeros(2, 5, 16), cache=KVCache(2, 4, 6, 8))
    with pytest.raises(ValueError, match=r"cache: expected"):
        attn(torch.zeros(3, 5, 16), cache=cache)
    with pytest.raises(TypeError, match=r"cache: expected a KVCache"):
        attn(torch.zeros(2, 5, 16), cache=(cache.k, cache.v))


def test_attention_rejects_non_dense_config():
    with pytest.raises(ValueError, match=r"config: expected a dense-attention config.*kv_lora_rank=512"):
        Attention(load_known("DeepSeek-V2-Lite"))
    with pytest.raises(TypeError, match=r"config: expected a refimpl.config.ModelConfig"):
        Attention({"hidden_size": 16})
