"""DeepSeek Sparse Attention (DSA), DeepSeek-V3.2-Exp: a lightning indexer picks the top-k cached tokens each
query attends to, on top of MLA.

Sources: the DeepSeek-V3.2-Exp report ("DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek
Sparse Attention", 2025, sec. 2.1), its released `config.json` (`index_n_heads` 64, `index_head_dim` 128,
`index_topk` 2048) and inference code (`inference/model.py`, class `Indexer`), and transformers'
`DeepseekV32Indexer`, which this module matches (tests/test_dsa.py). For query token t and cached token s
(report, eq. 1):

    I_{t,s} = sum_{j=1..H_I} w_{t,j} * ReLU(q_{t,j} . k_s)

H_I = `index_n_heads` small indexer heads of dimension `index_head_dim`; the query of head j comes from the
query latent c_t^Q of MLA (`wq_b`), the ONE key per token from the hidden state (`wk`, then a LayerNorm:
`k_norm`), the per-query head weights w_{t,j} from the hidden state (`weights_proj`, kept float32). Each query
then attends, with the ordinary MLA of the model, only to the min(index_topk, T) cached tokens of highest
I_{t,s} (causal: never a later one). With index_topk 2048 and contexts of 128K, the main attention reads 2048
latents per query instead of all of them; the indexer still reads every token's key (128 numbers, stored in
FP8 in the release), which is the cost DSA keeps (lesson 22).

Details that differ from the main MLA, each as transformers and the corrected release code have them:
  * the indexer's RoPE is NOT interleaved (half-split), on the first `qk_rope_head_dim` numbers of each
    indexer query and key (DeepSeek's first V3.2-Exp demo code interleaved it; corrected in November 2025);
  * its key norm is a LayerNorm (with bias), not an RMSNorm;
  * the scores are scaled by index_head_dim^-1/2 and the head weights by index_n_heads^-1/2;
  * it needs `q_lora_rank` (its queries read the MLA query latent).
The release computes the indexer in FP8 after a Hadamard rotation of q and k; the rotation is orthogonal
(it changes no dot product) and FP8 is a precision choice, so here, as in transformers, it is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.attention import check_attention_mask, decoder_mask, position_ids
from refimpl.checks import check_int, check_shape
from refimpl.config import ModelConfig, check_config
from refimpl.mla import MLACache, MultiHeadLatentAttention
from refimpl.model import DeepSeekForCausalLM, _init_weights
from refimpl.rope import apply_rope


class Float32Linear(nn.Linear):
    """A bias-free linear layer that stays float32 when the model is cast to a narrower dtype (as
    transformers' `_keep_in_fp32_modules = ["indexer.weights_proj"]`); its input is cast up for the matmul."""

    def _apply(self, fn, recurse=True):
        def keep(t: torch.Tensor) -> torch.Tensor:
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return t.to(device=target.device) if target.dtype.itemsize < 4 else fn(t)

        return super()._apply(keep, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype.itemsize < 4:
            state_dict[key] = state_dict[key].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class DSACache(MLACache):
    """The latent cache of one DSA layer: MLA's c_kv and k_pe, plus the indexer's key per token,
    index_k: [batch, max_len, index_head_dim] (rotated, normalized)."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 index_head_dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(batch_size, max_len, kv_lora_rank, qk_rope_head_dim, dtype, device)
        self.index_k = torch.zeros(batch_size, max_len, index_head_dim, dtype=dtype, device=device)

    @property
    def numbers_per_token(self) -> int:
        return super().numbers_per_token + self.index_k.shape[-1]

    def update_index(self, index_k: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Write index_k: [batch, seq, index_head_dim] at start_pos...; return positions 0 ... start_pos + seq - 1."""
        check_shape("index_k", index_k, (self.batch_size, None, self.index_k.shape[-1]))
        end = start_pos + index_k.shape[1]
        self.index_k[:, start_pos:end] = index_k
        return self.index_k[:, :end]


class LightningIndexer(nn.Module):
    """The indexer of one DSA layer (checkpoint names `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`).

    wq_b: [index_n_heads * index_head_dim, q_lora_rank]; wk: [index_head_dim, hidden]; k_norm: LayerNorm over
    index_head_dim (eps 1e-6); weights_proj: [index_n_heads, hidden], float32.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Float32Linear(config.hidden_size, self.n_heads, bias=False)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, hidden] -> k_s: [batch, seq, index_head_dim], normalized, its first qk_rope_head_dim
        numbers rotated (half-split RoPE)."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(1), cos, sin).squeeze(1)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """I_{t,s} (report eq. 1) for the queries x: [batch, seq, hidden] (q_latent: their MLA query latent
        c^Q after q_a_layernorm, [batch, seq, q_lora_rank]) against keys: [batch, kv_len, index_head_dim].
        mask: bool [batch or 1, 1, seq, kv_len], True where the query may see the key.
        -> [batch, seq, kv_len] float32 (float64 for float64 input), -inf where masked."""
        batch, seq, _ = x.shape
        q = self.wq_b(q_latent).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        q = self._rotate(q, cos, sin)  # [batch, index heads, seq, index_head_dim]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = torch.einsum("bhsd,btd->bhst", q.to(dtype), keys.to(dtype)) * self.head_dim ** -0.5
        w = self.weights_proj(x).to(dtype) * self.n_heads ** -0.5  # w_{t,j}: [batch, seq, index heads]
        index = torch.einsum("bsh,bhst->bst", w, F.relu(logits))  # sum_j w_{t,j} ReLU(q_{t,j} . k_s)
        return index.masked_fill(~mask[:, 0], float("-inf"))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE, half-split (not interleaved), on the first qk_rope_head_dim numbers of x: [batch, h, seq, d]."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleaved=False), rest), dim=-1)


def select_topk(index_scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The min(topk, kv_len) keys of highest index score per query: index_scores [batch, seq, kv_len] ->
    indices [batch, seq, min(topk, kv_len)] int64 (a query with fewer visible keys than that also gets some
    masked ones, at score -inf; the attention mask keeps them out). Ties, which ReLU makes common (a token
    every head scores below zero gets exactly 0), go to the earlier token: a stable sort, so that a query
    selects the same tokens whether its scores were computed alone (decoding) or with others (prefill);
    `torch.topk`, which transformers uses, breaks ties in no fixed order."""
    check_int("topk", topk, 1)
    order = index_scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., : min(topk, index_scores.shape[-1])]


def selection_mask(indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """indices [batch, seq, k] -> bool [batch, 1, seq, kv_len], True at the selected keys."""
    batch, seq, _ = indices.shape
    mask = torch.zeros(batch, seq, kv_len, dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, indices, True)[:, None]


class SparseMLA(MultiHeadLatentAttention):
    """MLA whose queries attend only to the tokens their lightning indexer selects (`self_attn.*` of a
    DeepSeek-V3.2 checkpoint: MLA's tensors plus `indexer.*`).

    forward as `MultiHeadLatentAttention.forward`, plus `sparse` (default True; False: dense MLA with the
    indexer unused, for the warm-up and the comparisons of lesson 22). After each call, `last_index_scores`
    ([batch, seq, kv_len]) and `last_topk` ([batch, seq, k]) hold what the indexer computed.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        check_config(config)
        if config.index_topk is None:
            raise ValueError("config: expected a DSA config (index_topk, index_n_heads, index_head_dim set), "
                             "got index_topk=None")
        self.index_topk = config.index_topk
        self.indexer = LightningIndexer(config)
        self.sparse = True

    def forward(self, hidden_states: torch.Tensor, start_pos: int = 0, cache: DSACache | None = None,
                mode: str = "absorbed", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_shape("hidden_states", hidden_states, (None, None, self.hidden_size))
        check_int("start_pos", start_pos, 0)
        batch, seq, _ = hidden_states.shape
        if cache is not None and not isinstance(cache, DSACache):
            raise TypeError(f"cache: expected a DSACache (SparseMLA.new_cache), got {type(cache).__name__}")
        if cache is not None:
            self._check_cache(cache, batch)
        kv_len = start_pos + seq if cache is not None else seq
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, kv_len)
        positions = position_ids(attention_mask, start_pos, seq, hidden_states.device)
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)
        q_nope, q_pe = self._queries(hidden_states, cos, sin)  # [batch, heads, seq, ...]
        c_kv, k_pe = self._latents(hidden_states, cos, sin)  # [batch, seq, ...]
        index_k = self.indexer.keys(hidden_states, cos, sin)  # [batch, seq, index_head_dim]
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, start_pos)
            index_k = cache.update_index(index_k, start_pos)
        mask = decoder_mask(attention_mask, seq, kv_len, device=hidden_states.device)
        q_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))  # c^Q, what the indexer's queries read
        self.last_index_scores = self.indexer.scores(hidden_states, q_latent, index_k, cos, sin, mask)
        self.last_topk = select_topk(self.last_index_scores, self.index_topk)
        if self.sparse:
            mask = mask & selection_mask(self.last_topk, kv_len)
        attend = self._attend_naive if mode == "naive" else self._attend_absorbed
        out = attend(q_nope, q_pe, c_kv, k_pe, mask)  # [batch, heads, seq, v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))

    def new_cache(self, batch_size: int, max_len: int) -> DSACache:
        """An empty cache for this layer (MLA latents and indexer keys), with the module's dtype and device."""
        w = self.kv_a_proj_with_mqa.weight
        return DSACache(batch_size, max_len, self.kv_lora_rank, self.qk_rope_head_dim, self.indexer.head_dim,
                        w.dtype, w.device)


class DeepSeekV32ForCausalLM(DeepSeekForCausalLM):
    """DeepSeek-V3.2-Exp: `DeepSeekForCausalLM` with `SparseMLA` in every layer (checkpoint names of
    transformers' `DeepseekV32ForCausalLM`). Loads with `from_pretrained(folder)`; `set_sparse(False)` turns
    every layer's selection off (dense MLA, same weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn = SparseMLA(config)
        self.apply(_init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_sparse(self, sparse: bool) -> None:
        for layer in self.model.layers:
            layer.self_attn.sparse = sparse

    def indexers(self) -> list[LightningIndexer]:
        return [layer.self_attn.indexer for layer in self.model.layers]
