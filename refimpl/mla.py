"""Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1 (eqs 9-19, full formulas in appendix C), as in
DeepSeek-V2/V3 and their Hugging Face checkpoints.

Each token t with hidden state h_t is compressed into one small latent vector, and every head's key and value
are read back out of it (low-rank key-value joint compression, section 2.1.2):

    c_t^KV  = W^DKV h_t                       (9)   [kv_lora_rank]          down-projection, shared by all heads
    k_t,i^C = W^UK_i c_t^KV                   (10)  [qk_nope_head_dim]      up-projection, per head i
    v_t,i^C = W^UV_i c_t^KV                   (11)  [v_head_dim]

The queries get the same treatment to save activation memory in training, not cache (eqs 12-13: c_t^Q = W^DQ h_t,
q_t,i^C = W^UQ_i c_t^Q; DeepSeek-V2-Lite skips it and has one `q_proj`).

Why the cache holds only `kv_lora_rank + qk_rope_head_dim` numbers per token per layer: everything per head is
a linear function of c_t^KV, so c_t^KV is all a decoder must keep, instead of the 2 * n_h * d_h numbers of the
keys and values of multi-head attention. Only positions need extra room (below). For DeepSeek-V2 that is
512 + 64 = 576 numbers against 2 * 128 * 128 = 32768 for MHA with the same heads (Table 1 of the paper: like
GQA with 2.25 groups, 4.5 * d_h).

Why the keys need not be decompressed at inference ("absorption", section 2.1.2, last paragraph): matrix
products are associative. Head i's score between query t and key j is

    q_t,i^C . k_j,i^C = q_t,i^C . (W^UK_i c_j^KV) = (W^UK_i^T q_t,i^C) . c_j^KV

so the query can be mapped into the latent space once (`q_latent`, kv_lora_rank numbers per head) and dotted
with the cached latents directly; likewise sum_j p_tj W^UV_i c_j^KV = W^UV_i (sum_j p_tj c_j^KV), so the
values are averaged in latent space and W^UV_i applied once per query (it could even be folded into W^O).

Why a separate RoPE key exists (decoupled RoPE, section 2.1.3): RoPE multiplies a key by a rotation R_j that
depends on its position j. Applied to k^C, the score would be q^T R_t^T R_j W^UK_i c_j, and the matrix between
q and c_j would change with the positions, so W^UK_i could no longer be absorbed once. So positions travel in
a few extra dimensions instead: a query part q_t,i^R = RoPE(W^QR_i c_t^Q) (14) per head and ONE key
k_t^R = RoPE(W^KR h_t) (15) shared by all heads (as in MQA), cached after rotation next to c_t^KV. Then

    q_t,i = [q_t,i^C; q_t,i^R]   k_j,i = [k_j,i^C; k_j^R]                                      (16), (17)
    o_t,i = sum_{j<=t} softmax_j(q_t,i . k_j,i / sqrt(d_h + d_h^R)) v_j,i^C                   (18)
    u_t   = W^O [o_t,1; ...; o_t,n_h]                                                        (19)

Two equal paths are implemented, selected by `mode`:
  * "naive": decompress every cached latent into per-head keys and values (eqs 10, 11, 17), then attend;
  * "absorbed": attend in latent space as above (what DeepSeek-V3's own inference code does).
Both write the attention out (the score matrix, then the softmax): the readable reference. A third mode is the
naive path's keys and values through PyTorch's fused kernel (`refimpl.attention.fused_attention`):
  * "naive_sdpa": memory linear in the context, and the fastest way to prefill a prompt.
Which is fastest depends on the call (`auto_mode`): the absorbed path's cost grows with queries x cached tokens
x kv_lora_rank, the naive path's with cached tokens x the decompression (kv_lora_rank x heads x (d_h + d_v)), so
decoding (few new tokens) is cheaper absorbed, a prompt naive.

Names follow the checkpoints: `kv_a_proj_with_mqa` holds W^DKV stacked over W^KR ("with MQA": the shared RoPE
key), `kv_b_proj` holds W^UK_i and W^UV_i interleaved per head, `q_b_proj` (or `q_proj`) holds W^UQ_i and
W^QR_i interleaved per head, `o_proj` is W^O.

Differences from the paper's equations, as in DeepSeek's released code and checkpoints:
  * RMSNorm after each compressed latent (`q_a_layernorm` on c^Q, `kv_a_layernorm` on c^KV); the cache holds
    the normalized c^KV;
  * the softmax scale is YaRN-corrected when context extension is on (`refimpl.rope.softmax_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from refimpl.attention import (check_attention_mask, decoder_mask, fused_attention, position_ids,
                                scaled_dot_product_attention)
from refimpl.checks import check_int, check_same_dtype_device, check_shape
from refimpl.config import ModelConfig, check_config
from refimpl.norm import RMSNorm
from refimpl.rope import RotaryEmbedding, apply_rope, softmax_scale

MODES = ("naive", "absorbed", "naive_sdpa")


def auto_mode(config: ModelConfig, seq: int) -> str:
    """The faster MLA path for `seq` new tokens (per cached token, multiply-adds per layer):

        absorbed:   seq x heads x (2 kv_lora_rank + qk_rope_head_dim)    scores on c^KV and k^R, sum of c^KV
        naive_sdpa: heads x kv_lora_rank x (qk_nope_head_dim + v_head_dim)   decompressing k^C and v^C
                    + seq x heads x (qk_nope + qk_rope + v_head_dim)      attention

    -> "absorbed" when its count is the smaller (DeepSeek-V2-Lite's dims: seq <= 170), else "naive_sdpa".
    """
    c = config
    absorbed = seq * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    naive = c.num_attention_heads * (c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim)
                                     + seq * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim))
    return "absorbed" if absorbed <= naive else "naive_sdpa"


class MLACache:
    """The latent cache of one MLA layer, preallocated for `max_len` tokens.

    c_kv: [batch, max_len, kv_lora_rank], the normalized latents c_t^KV (after kv_a_layernorm);
    k_pe: [batch, max_len, qk_rope_head_dim], the shared RoPE keys k_t^R, already rotated.
    Meant for generation under torch.no_grad().
    """

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("kv_lora_rank", kv_lora_rank),
                            ("qk_rope_head_dim", qk_rope_head_dim)):
            check_int(name, value, 1)
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.c_kv = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(batch_size, max_len, qk_rope_head_dim, dtype=dtype, device=device)

    @property
    def numbers_per_token(self) -> int:
        """Numbers cached per token (per layer): the latent and the shared RoPE key, whatever the head count."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv: [batch, seq, kv_lora_rank] and k_pe: [batch, seq, qk_rope_head_dim] at positions
        start_pos ... start_pos + seq - 1; return those of positions 0 ... start_pos + seq - 1:
        [batch, start_pos + seq, kv_lora_rank] and [batch, start_pos + seq, qk_rope_head_dim]."""
        check_shape("c_kv", c_kv, (self.batch_size, None, self.kv_lora_rank))
        check_shape("k_pe", k_pe, (self.batch_size, c_kv.shape[1], self.qk_rope_head_dim))
        check_same_dtype_device("c_kv", c_kv, self.c_kv, "the cache")
        check_same_dtype_device("k_pe", k_pe, self.k_pe, "the cache")
        seq = c_kv.shape[1]
        check_int("start_pos", start_pos, 0, note=f" (cache length max_len={self.max_len})")
        end = start_pos + seq
        if end > self.max_len:
            raise ValueError(f"start_pos: {seq} tokens at start_pos {start_pos} reach position {end - 1}, "
                             f"past the cache length max_len={self.max_len}")
        self.c_kv[:, start_pos:end] = c_kv
        self.k_pe[:, start_pos:end] = k_pe
        return self.c_kv[:, :end], self.k_pe[:, :end]


class MultiHeadLatentAttention(nn.Module):
    """MLA with the parameter names of DeepSeek-V2/V3 checkpoints (`self_attn.*` of each decoder layer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if not config.is_mla:
            raise ValueError("config: expected an MLA config (kv_lora_rank set), got kv_lora_rank=None; "
                             "use refimpl.attention for dense attention")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        bias = config.attention_bias
        # DeepSeek's code builds the two latent RMSNorms with their default eps, 1e-6, ignoring rms_norm_eps; we
        # use rms_norm_eps, which is 1e-6 in every released config, so the two agree there.
        if self.q_lora_rank is None:  # uncompressed queries (DeepSeek-V2-Lite)
            self.q_proj = nn.Linear(self.hidden_size, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(self.hidden_size, self.q_lora_rank, bias=bias)  # W^DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_head_dim, bias=False)  # W^UQ, W^QR
        self.kv_a_proj_with_mqa = nn.Linear(self.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim,
                                            bias=bias)  # W^DKV stacked over W^KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)  # W^UK, W^UV
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, self.hidden_size, bias=bias)  # W^O
        self.rotary_emb = RotaryEmbedding(self.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        # eq 18 divides by sqrt(d_h + d_h^R): both parts of the key count
        self.softmax_scale = softmax_scale(qk_head_dim, config.rope_scaling)

    def forward(self, hidden_states: torch.Tensor, start_pos: int = 0, cache: MLACache | None = None,
                mode: str = "naive", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [batch, seq, hidden] at positions start_pos ... start_pos + seq - 1 -> [batch, seq, hidden].

        With a cache: the new latents are written into it and the queries attend, causally, to every cached
        position up to their own. Without: causal attention within hidden_states.
        attention_mask: [batch, kv_len] (kv_len = start_pos + seq with a cache, seq without), 1 = token,
        0 = left padding: padding is not attended to and positions count tokens only
        (`refimpl.attention.position_ids`), on every path.
        mode: one of MODES (see the module docstring); all give the same output up to float rounding.
        """
        check_shape("hidden_states", hidden_states, (None, None, self.hidden_size))
        check_same_dtype_device("hidden_states", hidden_states, self.kv_a_proj_with_mqa.weight)
        check_int("start_pos", start_pos, 0)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        batch, seq, _ = hidden_states.shape
        if cache is not None:
            self._check_cache(cache, batch)
        kv_len = start_pos + seq if cache is not None else seq
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, kv_len)

        positions = position_ids(attention_mask, start_pos, seq, hidden_states.device)  # [seq] or [batch, seq]
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)  # [(batch,) seq, qk_rope_head_dim / 2]
        q_nope, q_pe = self._queries(hidden_states, cos, sin)  # [batch, heads, seq, qk_nope / qk_rope_head_dim]
        c_kv, k_pe = self._latents(hidden_states, cos, sin)  # [batch, seq, kv_lora_rank / qk_rope_head_dim]
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, start_pos)  # [batch, start_pos + seq, ...]
        if mode == "naive_sdpa":
            out = self._attend_naive_sdpa(q_nope, q_pe, c_kv, k_pe, attention_mask)
        else:
            mask = decoder_mask(attention_mask, seq, kv_len, device=hidden_states.device)  # [batch or 1, 1, seq, kv_len]
            attend = self._attend_naive if mode == "naive" else self._attend_absorbed
            out = attend(q_nope, q_pe, c_kv, k_pe, mask)  # [batch, heads, seq, v_head_dim]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim)  # [o_t,1; ...; o_t,n_h]
        return self.o_proj(out)  # eq 19: [batch, seq, hidden]

    def fill_cache(self, hidden_states: torch.Tensor, start_pos: int, cache: MLACache,
                   attention_mask: torch.Tensor | None = None) -> None:
        """Write the latents of hidden_states [batch, seq, hidden] (positions start_pos ... start_pos + seq - 1)
        into the cache without attending: what `forward` stores, for tokens whose output nobody reads (the
        last layer of a prefill needs the output of the last token only; later tokens still attend to all).
        attention_mask: [batch, start_pos + seq] or None, as in `forward` (it sets the RoPE positions)."""
        check_shape("hidden_states", hidden_states, (cache.batch_size, None, self.hidden_size))
        seq = hidden_states.shape[1]
        positions = position_ids(attention_mask, start_pos, seq, hidden_states.device)  # [seq] or [batch, seq]
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)
        cache.update(*self._latents(hidden_states, cos, sin), start_pos)

    def new_cache(self, batch_size: int, max_len: int) -> MLACache:
        """An empty latent cache for this layer, with the module's dtype and device."""
        weight = self.kv_a_proj_with_mqa.weight
        return MLACache(batch_size, max_len, self.kv_lora_rank, self.qk_rope_head_dim, weight.dtype, weight.device)

    # ------------------------------------------------------------------ the steps of forward
    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, seq, hidden] -> q_nope (q^C): [batch, heads, seq, qk_nope_head_dim] and
        q_pe (q^R, rotated): [batch, heads, seq, qk_rope_head_dim]. Eqs 12-14."""
        batch, seq, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # c^Q = norm(W^DQ h), then W^UQ, W^QR
        q = q.view(batch, seq, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim).transpose(1, 2)
        # q: [batch, heads, seq, qk_nope + qk_rope]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, interleaved=self.rope_interleave)

    def _latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, seq, hidden] -> c_kv (c^KV, normalized): [batch, seq, kv_lora_rank] and
        k_pe (k^R, rotated): [batch, seq, qk_rope_head_dim], the two things the cache keeps. Eqs 9, 15."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        # apply_rope wants a heads axis: k^R is one head shared by all
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin, interleaved=self.rope_interleave).squeeze(1)
        # Note: with interleaved pairs, the Hugging Face code (DeepSeek's modeling_deepseek.py and transformers')
        # outputs the rotated pairs in the half-split layout; here they stay in place, as in DeepSeek-V3's own
        # inference code. q^R and k^R are permuted alike, so every score is the same; only the order of the
        # numbers in the cached k_pe differs.
        return c_kv, k_pe

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK: [heads, qk_nope_head_dim, kv_lora_rank] and W^UV: [heads, v_head_dim, kv_lora_rank], read out of
        kv_b_proj, whose rows are, per head, its qk_nope_head_dim key rows then its v_head_dim value rows."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return w_uk, w_uv

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Decompress keys and values for every cached token, then ordinary attention (eqs 10, 11, 16-18).

        q_nope: [batch, heads, seq, qk_nope], q_pe: [batch, heads, seq, qk_rope], c_kv: [batch, kv_len, kv_lora_rank],
        k_pe: [batch, kv_len, qk_rope], mask: bool [batch or 1, 1, seq, kv_len] (`refimpl.attention.decoder_mask`)
        -> [batch, heads, seq, v_head_dim].
        """
        q, k, v = self._decompress(q_nope, q_pe, c_kv, k_pe)
        return scaled_dot_product_attention(q, k, v, mask, scale=self.softmax_scale)

    def _attend_naive_sdpa(self, q_nope, q_pe, c_kv, k_pe, attention_mask) -> torch.Tensor:
        """`_attend_naive` through PyTorch's fused attention (`refimpl.attention.fused_attention`): no score
        matrix. attention_mask: [batch, kv_len] or None (1 = token, 0 = left padding); the rest as there."""
        q, k, v = self._decompress(q_nope, q_pe, c_kv, k_pe)
        return fused_attention(q, k, v, self.softmax_scale, attention_mask)

    def _decompress(self, q_nope, q_pe, c_kv, k_pe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The naive path's per-head queries, keys and values (eqs 10, 11, 16, 17): q: [batch, heads, seq,
        qk_nope + qk_rope], k: [batch, heads, kv_len, qk_nope + qk_rope], v: [batch, heads, kv_len, v_head_dim]."""
        batch, kv_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(batch, kv_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        kv = kv.transpose(1, 2)  # [batch, heads, kv_len, qk_nope + v_head_dim]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # k^C, v^C
        k_pe = k_pe.unsqueeze(1).expand(-1, self.num_heads, -1, -1)  # the one k^R, for every head
        q = torch.cat((q_nope, q_pe), dim=-1)  # eq 16: [batch, heads, seq, qk_nope + qk_rope]
        k = torch.cat((k_nope, k_pe), dim=-1)  # eq 17: [batch, heads, kv_len, qk_nope + qk_rope]
        return q, k, v

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Attend in latent space: W^UK folded into the query, W^UV applied after the weighted sum.

        Same shapes in and out as `_attend_naive`; no per-head key or value is ever built.
        """
        _, w_uv = self._w_uk_uv()
        probs = self._absorbed_probs(q_nope, q_pe, c_kv, k_pe, mask)  # [batch, heads, seq, kv_len]
        out_latent = torch.einsum("bhst,btc->bhsc", probs, c_kv)  # sum_j p_tj c_j^KV: [batch, heads, seq, kv_lora_rank]
        return torch.einsum("bhsc,hvc->bhsv", out_latent, w_uv)  # W^UV_i (...): [batch, heads, seq, v_head_dim]

    def _absorbed_probs(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """The attention probabilities of eq 18, scored in latent space (shapes as `_attend_naive`)
        -> [batch, heads, seq, kv_len], c_kv's dtype; 0 where mask is False."""
        w_uk, _ = self._w_uk_uv()
        q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)  # W^UK_i^T q^C: [batch, heads, seq, kv_lora_rank]
        scores = (torch.einsum("bhsc,btc->bhst", q_latent, c_kv)  # = q^C . k^C: [batch, heads, seq, kv_len]
                  + torch.einsum("bhsr,btr->bhst", q_pe, k_pe))  # + q^R . k^R
        # softmax in float32 (float64 for float64 input), as in refimpl.attention and DeepSeek's code
        compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        scores = scores.to(compute_dtype) * self.softmax_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1).to(c_kv.dtype)

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, MLACache):
            raise TypeError(f"cache: expected an MLACache or None, got {type(cache).__name__}")
        want = (batch, self.kv_lora_rank, self.qk_rope_head_dim)
        got = (cache.batch_size, cache.kv_lora_rank, cache.qk_rope_head_dim)
        if got != want:
            raise ValueError(f"cache: expected (batch_size, kv_lora_rank, qk_rope_head_dim) = {want}, got {got}")
        check_same_dtype_device("cache", cache.c_kv, self.kv_a_proj_with_mqa.weight)
