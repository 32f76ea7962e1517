"""Multi-head attention and its cheaper-cache variants, MQA and GQA, with a KV cache.

Scaled dot-product attention (Vaswani et al. 2017, section 3.2.1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Multi-head attention (MHA) runs `num_attention_heads` of these side by side, each with its own keys and values.
To generate a token, a decoder needs the keys and values of every earlier token in every layer, so it keeps them:
the KV cache, `2 * num_key_value_heads * head_dim` numbers per token per layer, growing linearly with the context.
Two ways to shrink it by sharing keys and values between query heads:

* Multi-Query Attention (MQA, Shazeer 2019): one key/value head serves all query heads;
* Grouped-Query Attention (GQA, Ainslie et al. 2023): `num_key_value_heads` groups, each serving
  `num_attention_heads // num_key_value_heads` consecutive query heads (Llama 2 70B, Llama 3, Mistral).

MHA is GQA with as many key/value heads as query heads, and MQA is GQA with one, so `Attention` implements GQA.
DeepSeek-V2 (section 2.1) compares these with its own answer, Multi-head Latent Attention (`refimpl.mla`).

Parameter names are those of Llama checkpoints (`q_proj`, `k_proj`, `v_proj`, `o_proj`), and RoPE uses Llama's
half-split layout (`refimpl.rope`).

`scaled_dot_product_attention` writes the attention out (the q_len x kv_len score matrix, then the softmax): the
reference every other path is checked against. `fused_attention` computes the same through PyTorch's fused
kernel without that matrix, in memory linear in the context: the path generation takes (`Attention(...,
sdpa=True)`, MLA's mode "naive_sdpa").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.checks import check_int, check_same_dtype_device, check_shape, check_tensor
from refimpl.config import ModelConfig, check_config
from refimpl.rope import RotaryEmbedding, apply_rope, softmax_scale


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, per batch and head.

    q: [batch, heads, q_len, d], k: [batch, heads, kv_len, d], v: [batch, heads, kv_len, d_v]
    -> [batch, heads, q_len, d_v].
    mask: bool, True where a query may attend to a key, shape [batch or 1, heads or 1, q_len, kv_len].
    scale: default d ** -0.5.
    is_causal: the queries are the *last* q_len of the kv_len positions (query i sits at position
    kv_len - q_len + i) and see the keys at or before their position; combined with `mask` if both are given.
    A query that may attend to no key gets NaN.
    """
    check_tensor("q", q, ndim=4, dtype_floating=True)
    batch, heads, q_len, d = q.shape
    check_shape("k", k, (batch, heads, None, d))
    kv_len = k.shape[2]
    check_shape("v", v, (batch, heads, kv_len, None))
    check_same_dtype_device("k", k, q, "q")
    check_same_dtype_device("v", v, q, "q")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    if mask is not None:
        _check_mask(mask, q, batch, heads, q_len, kv_len)

    # softmax in float32 (float64 for float64 input), as DeepSeek's released code does
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.transpose(-2, -1)).to(compute_dtype) * scale  # [batch, heads, q_len, kv_len]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q_len, kv_len, q.device), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)  # [batch, heads, q_len, kv_len]
    return probs @ v  # [batch, heads, q_len, d_v]


def causal_mask(q_len: int, kv_len: int, device: torch.device | None = None,
                sliding_window: int | None = None) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query i (at position kv_len - q_len + i) may see key j (j <= that position).

    sliding_window: if set, query i sees only the last `sliding_window` keys up to its position, itself included
    (Mistral, Jiang et al. 2023, section 2: key j with position - sliding_window < j <= position).

    Note: torch.nn.functional.scaled_dot_product_attention(is_causal=True) aligns the queries with the *first*
    q_len keys instead (top-left); aligning them with the last ones (bottom-right) is what decoding with a cache
    needs, where the q_len new tokens come after the kv_len - q_len cached ones.
    """
    if q_len > kv_len:
        raise ValueError(
            f"is_causal: expected q_len <= kv_len (the queries are the last q_len of the kv_len positions), "
            f"got q_len={q_len}, kv_len={kv_len}"
        )
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    if sliding_window is not None:
        check_int("sliding_window", sliding_window, 1)
        mask = mask.triu(diagonal=kv_len - q_len - sliding_window + 1)
    return mask


def check_attention_mask(attention_mask, batch: int, kv_len: int) -> None:
    """attention_mask: [batch, kv_len], bool or integer, 1 = token, 0 = padding. Padding must be on the left
    (each row is zeros then ones, as transformers' decoder-only models pad), and each row holds a token.

    Raises TypeError (not a tensor, float dtype) or ValueError (shape, values, right padding, an empty row)."""
    check_tensor("attention_mask", attention_mask)
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask: expected a bool or integer tensor (1 = token, 0 = padding), "
                        f"got dtype {attention_mask.dtype}")
    if tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(f"attention_mask: expected shape ({batch}, {kv_len}) (batch, tokens seen: those of "
                         f"input_ids, after those in the cache), got {tuple(attention_mask.shape)}")
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"attention_mask: expected values 0 (padding) and 1 (token), "
                         f"got {sorted(set(mask.unique().tolist()))}")
    if (mask[:, 1:] < mask[:, :-1]).any():
        rows = (mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask: expected left padding (each row zeros, then ones); rows {rows} have a "
                         f"0 after a 1 (right padding: pad on the left for generation)")
    if kv_len and (mask.sum(dim=1) == 0).any():
        rows = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask: expected at least one token (a 1) in every row; rows {rows} are all 0")


def position_ids(attention_mask: torch.Tensor | None, start_pos: int, seq: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """Positions of the last `seq` of the kv_len keys, the queries, for RoPE: [seq], or [batch, seq] with a mask.

    Without a mask: start_pos ... start_pos + seq - 1. With attention_mask [batch, kv_len] (left padding), a
    token's position counts only the tokens before it in its row: cumsum(mask) - 1, as transformers computes
    it, so a padded prompt gets the positions it has alone; padding gets position 0 (it is never attended to).
    (RoPE scores depend only on position differences, so shifting a whole row changes no score in exact
    arithmetic: what keeps a padded row right is the mask. The positions make it compute the same cos and sin
    as alone, and matter wherever absolute positions do, e.g. against max_position_embeddings.)
    The mask starts at position start_pos - (kv_len - seq): 0 when it covers the cache, start_pos without one.
    """
    if attention_mask is None:
        return torch.arange(start_pos, start_pos + seq, device=device)
    first = start_pos - (attention_mask.shape[1] - seq)
    counts = attention_mask.long().cumsum(dim=1)[:, attention_mask.shape[1] - seq:]  # [batch, seq]
    return (first + counts - 1).clamp(min=0)


def decoder_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
                 sliding_window: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The mask a decoder's attention uses: bool [batch or 1, 1, q_len, kv_len], True where a query may see a key.

    Causal (bottom-right aligned, `causal_mask`), within `sliding_window` if set, and only keys that are tokens
    (attention_mask [batch, kv_len], 1 = token, 0 = padding). A padding query sees only itself, so that no
    softmax row is empty (an empty one would give NaN); no token sees it, so its output is never used.
    """
    allowed = causal_mask(q_len, kv_len, device, sliding_window)  # [q_len, kv_len]
    if attention_mask is None:
        return allowed[None, None]
    is_token = attention_mask.bool()[:, None, None, :]  # [batch, 1, 1, kv_len]
    return (allowed & is_token) | causal_mask(q_len, kv_len, device, sliding_window=1)  # a query's own key


QUERY_CHUNK = 1024  # queries per fused call when a mask is needed: the mask is QUERY_CHUNK x kv_len bools


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    attention_mask: torch.Tensor | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """A decoder's attention through PyTorch's fused kernel (torch.nn.functional.scaled_dot_product_attention,
    flash attention on CPU and GPU), in memory linear in kv_len: the engine's path for long prompts.

    Equals `scaled_dot_product_attention(q, k, v, decoder_mask(attention_mask, q_len, kv_len, sliding_window),
    scale)` up to float rounding, which writes the seq x kv_len score matrix out and stays the reference.
    q: [batch, heads, q_len, d], k: [batch, kv_heads, kv_len, d], v: [batch, kv_heads, kv_len, d_v], the
    queries being the last q_len of the kv_len positions; kv_heads divides heads (GQA: query head h reads
    key/value head h // (heads // kv_heads)) -> [batch, heads, q_len, d_v].
    attention_mask: [batch, kv_len], 1 = token, 0 = left padding (checked by the caller).

    Three things the fused kernels need:
      * equal head dims: on CPU they refuse d_v != d (MLA: 192 and 128) and fall back to the quadratic math
        path, so v is padded with zeros to d and the output cut back to d_v;
      * a bottom-right causal mask: `is_causal=True` aligns the queries with the *first* q_len keys, right
        only when q_len == kv_len; otherwise (a cached prefix, padding, a window) an explicit mask;
      * no score matrix: the explicit masks are built for QUERY_CHUNK queries at a time, each chunk reading
        only the keys up to its last query (later ones are masked anyway).
    """
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len, d_v = k.shape[1], k.shape[2], v.shape[-1]
    if d_v != d:
        v = F.pad(v, (0, d - d_v))  # [batch, kv_heads, kv_len, d]
    if attention_mask is None and sliding_window is None and q_len == kv_len:
        n_rep = heads // kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True,
                                             scale=scale)  # [batch, heads, q_len, d]
        return out[..., :d_v]
    chunks = [_fused_masked_chunk(q[:, :, i:i + QUERY_CHUNK], k, v, scale, attention_mask, sliding_window,
                                  kv_end=kv_len - q_len + min(i + QUERY_CHUNK, q_len))
              for i in range(0, q_len, QUERY_CHUNK)]
    return torch.cat(chunks, dim=2)[..., :d_v]  # [batch, heads, q_len, d_v]


def _fused_masked_chunk(q, k, v, scale, attention_mask, sliding_window, kv_end: int) -> torch.Tensor:
    """Queries q: [batch, heads, c, d], the last c of positions 0 ... kv_end - 1, against those keys, with
    `decoder_mask`. The heads sharing a key/value head are stacked along the query axis (no copy of the
    keys and values): [batch, kv_heads, n_rep * c, d] -> [batch, heads, c, d]."""
    batch, heads, c, d = q.shape
    kv_heads = k.shape[1]
    n_rep = heads // kv_heads
    mask = decoder_mask(None if attention_mask is None else attention_mask[:, :kv_end], c, kv_end,
                        sliding_window, q.device)  # [batch or 1, 1, c, kv_end]
    q = q.reshape(batch, kv_heads, n_rep * c, d)  # row r * c + i: query i of head g * n_rep + r
    out = F.scaled_dot_product_attention(q, k[:, :, :kv_end], v[:, :, :kv_end], attn_mask=mask.repeat(1, 1, n_rep, 1),
                                         scale=scale)  # [batch, kv_heads, n_rep * c, d]
    return out.view(batch, heads, c, d)


def _check_mask(mask, q: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = may attend), got {mask.dtype}")
    if (mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)
            or mask.shape[2:] != (q_len, kv_len)):
        raise ValueError(
            f"mask: expected shape ({batch} or 1, {heads} or 1, {q_len}, {kv_len}), got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(f"mask: expected device {q.device} (that of q), got {mask.device}")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, d] -> [batch, kv_heads * n_rep, seq, d]: key/value head g serves query heads
    g * n_rep ... g * n_rep + n_rep - 1 (consecutive, as in Llama and the GQA paper)."""
    check_tensor("x", x, ndim=4)
    check_int("n_rep", n_rep, 1)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class KVCache:
    """The keys and values of one attention layer for every token so far: preallocated for `max_len` tokens.

    k, v: [batch, num_key_value_heads, max_len, head_dim]. Meant for generation under torch.no_grad().
    """

    def __init__(self, batch_size: int, num_key_value_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("num_key_value_heads", num_key_value_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            check_int(name, value, 1)
        self.batch_size, self.num_key_value_heads, self.max_len, self.head_dim = (
            batch_size, num_key_value_heads, max_len, head_dim)
        self.k = torch.zeros(batch_size, num_key_value_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def numbers_per_token(self) -> int:
        """Numbers cached per token (per layer): a key and a value for each key/value head."""
        return 2 * self.num_key_value_heads * self.head_dim

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v: [batch, kv_heads, seq, head_dim] at positions start_pos ... start_pos + seq - 1;
        return the cached keys and values of positions 0 ... start_pos + seq - 1: [batch, kv_heads, end, head_dim]."""
        check_shape("k", k, (self.batch_size, self.num_key_value_heads, None, self.head_dim))
        check_shape("v", v, tuple(k.shape))
        check_same_dtype_device("k", k, self.k, "the cache")
        check_same_dtype_device("v", v, self.v, "the cache")
        _check_start_pos(start_pos)
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"start_pos: {k.shape[2]} tokens at start_pos {start_pos} reach position {end - 1}, "
                f"past the cache length max_len={self.max_len}"
            )
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _check_start_pos(start_pos) -> None:
    check_int("start_pos", start_pos, 0)


class Attention(nn.Module):
    """Grouped-query attention with RoPE (Llama layout): MHA, GQA or MQA depending on `num_key_value_heads`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if config.is_mla:
            raise ValueError(
                f"config: expected a dense-attention config (kv_lora_rank None), got an MLA config "
                f"(kv_lora_rank={config.kv_lora_rank}); use refimpl.mla for it"
            )
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # query heads per KV head
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta, config.rope_scaling)
        self.softmax_scale = softmax_scale(self.head_dim, config.rope_scaling)
        self.sliding_window = config.sliding_window  # Mistral; None: every earlier token

    def forward(self, hidden_states: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, sdpa: bool = False) -> torch.Tensor:
        """hidden_states: [batch, seq, hidden] at positions start_pos ... start_pos + seq - 1 -> [batch, seq, hidden].

        With a cache: the new keys and values are written into it and the queries attend, causally, to every
        cached position up to their own. Without: causal attention within hidden_states.
        attention_mask: [batch, kv_len] (kv_len = start_pos + seq with a cache, seq without), 1 = token,
        0 = left padding: padding is not attended to and positions count tokens only (`position_ids`).
        With `sliding_window` in the config, a query sees only the last sliding_window keys (`causal_mask`); the
        cache still keeps every token and the mask does the windowing (simplest correct; Mistral's rolling
        buffer cache, section 2 of its paper, would keep only the last sliding_window keys and values).
        sdpa: False (default), the written-out `scaled_dot_product_attention` (the reference); True, PyTorch's
        fused kernel through `fused_attention` (the same result up to rounding, memory linear in kv_len).
        """
        check_shape("hidden_states", hidden_states, (None, None, self.hidden_size))
        check_same_dtype_device("hidden_states", hidden_states, self.q_proj.weight)
        batch, seq, _ = hidden_states.shape
        _check_start_pos(start_pos)
        if cache is not None:
            self._check_cache(cache, batch)
        kv_len = start_pos + seq if cache is not None else seq
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, kv_len)
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        # q: [batch, heads, seq, head_dim], k, v: [batch, kv_heads, seq, head_dim]
        positions = position_ids(attention_mask, start_pos, seq, hidden_states.device)  # [seq] or [batch, seq]
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)  # [(batch,) seq, head_dim / 2]
        # Llama's half-split pairs; config.rope_interleave describes DeepSeek's MLA checkpoints and is not used here
        q = apply_rope(q, cos, sin, interleaved=False)
        k = apply_rope(k, cos, sin, interleaved=False)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # [batch, kv_heads, start_pos + seq, head_dim]
        if sdpa:
            out = fused_attention(q, k, v, self.softmax_scale, attention_mask, self.sliding_window)
        else:
            k = repeat_kv(k, self.num_key_value_groups)  # [batch, heads, kv_len, head_dim]
            v = repeat_kv(v, self.num_key_value_groups)
            mask = decoder_mask(attention_mask, seq, kv_len, self.sliding_window, hidden_states.device)
            out = scaled_dot_product_attention(q, k, v, mask, scale=self.softmax_scale)
        # out: [batch, heads, seq, head_dim]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)  # [batch, seq, heads * head_dim]
        return self.o_proj(out)  # [batch, seq, hidden]

    def fill_cache(self, hidden_states: torch.Tensor, start_pos: int, cache: KVCache,
                   attention_mask: torch.Tensor | None = None) -> None:
        """Write the keys and values of hidden_states [batch, seq, hidden] (positions start_pos ...
        start_pos + seq - 1) into the cache without attending: what `forward` stores, for tokens whose output
        nobody reads. attention_mask: [batch, start_pos + seq] or None, as in `forward` (it sets positions)."""
        check_shape("hidden_states", hidden_states, (cache.batch_size, None, self.hidden_size))
        batch, seq, _ = hidden_states.shape
        positions = position_ids(attention_mask, start_pos, seq, hidden_states.device)  # [seq] or [batch, seq]
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cache.update(apply_rope(k, cos, sin, interleaved=False), v, start_pos)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for this layer, with the module's dtype and device."""
        weight = self.q_proj.weight
        return KVCache(batch_size, self.num_key_value_heads, max_len, self.head_dim, weight.dtype, weight.device)

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache or None, got {type(cache).__name__}")
        want = (batch, self.num_key_value_heads, self.head_dim)
        got = (cache.batch_size, cache.num_key_value_heads, cache.head_dim)
        if got != want:
            raise ValueError(f"cache: expected (batch_size, num_key_value_heads, head_dim) = {want}, got {got}")
