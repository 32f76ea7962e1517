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

Training (report sec. 2.1), as lesson 22 runs it on lesson 11's tiny DeepSeek: `DeepSeekV32ForCausalLM.from_dense`
adds new indexers to a trained DeepSeek (V3.2-Exp started from V3.1-Terminus); `train_indexer` runs the dense
warm-up (main model frozen, dense attention, L^I = sum_t KL(p_t || Softmax(I_t)) with p_t the main attention
summed over heads and L1-normalized: `attention_target`, `indexer_kl_loss`) or the sparse stage (selection on,
KL over the selected tokens, the main model trained by the next-token loss); `recovered_mass` is the share of
p_t that a selection keeps. `set_sparse(..., selection="recent")` selects the last k tokens instead (a baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.attention import check_attention_mask, decoder_mask, position_ids
from refimpl.checks import check_int, check_shape
from refimpl.config import ModelConfig, check_config
from refimpl.mla import MODES, MLACache, MultiHeadLatentAttention
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


SELECTIONS = ("indexer", "recent")


def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """The indexer's training target (V3.2-Exp report sec. 2.1): the main attention probabilities
    probs [batch, heads, seq, kv_len] summed over heads, then L1-normalized over the keys -> p [batch, seq, kv_len]
    (each row sums to 1)."""
    summed = probs.sum(dim=1)
    return summed / summed.sum(dim=-1, keepdim=True)


def indexer_kl_loss(target: torch.Tensor, index_scores: torch.Tensor, selected: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """L^I = D_KL(p_t || Softmax(I_t)), averaged over the queries t (the report sums over t; the mean only scales
    the learning rate). target p: [batch, seq, kv_len] (rows sum to 1, 0 at masked keys); index_scores I: same
    shape, -inf at masked keys. selected: optional bool [batch, seq, kv_len], the sparse stage's S_t: both
    distributions restricted to it, p renormalized. -> a scalar (nats), float32 (float64 for float64 input)."""
    check_shape("index_scores", index_scores, target.shape)
    if selected is not None:
        check_shape("selected", selected, target.shape)
        index_scores = index_scores.masked_fill(~selected, float("-inf"))
        target = target * selected
        target = target / target.sum(dim=-1, keepdim=True)
    log_q = torch.log_softmax(index_scores, dim=-1)
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), 0.0)
    return terms.sum(dim=-1).mean()


def recovered_mass(target: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The share of each query's attention distribution that its selected keys hold: target [batch, seq, kv_len]
    (`attention_target`), indices [batch, seq, k] (`select_topk`) -> [batch, seq], in [0, 1]."""
    check_shape("indices", indices, (*target.shape[:2], None))
    return target.gather(-1, indices).sum(dim=-1)


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

    forward as `MultiHeadLatentAttention.forward`. Attributes that change it (`DeepSeekV32ForCausalLM.set_sparse`
    sets them in every layer):
      * `sparse` (default True; False: dense MLA, the selection still computed but not applied: the warm-up);
      * `index_topk` (default the config's), the k of the selection;
      * `selection`: "indexer" (default) or "recent" (the last k tokens, a baseline of lesson 22);
      * `record_attention` (default False): also keep `last_attention`, the main attention distribution
        [batch, seq, kv_len] summed over heads and L1-normalized (`attention_target`), no gradient: the target
        the indexer is trained to (report sec. 2.1).
    After each call, `last_index_scores` ([batch, seq, kv_len]) and `last_topk` ([batch, seq, k]) hold what the
    indexer computed. The indexer reads its inputs detached from the main model's graph, as in V3.2's sparse
    training stage (sec. 2.1): its loss trains the indexer only, and the language-model
    loss, which the discrete top-k cannot carry back anyway, trains the main model only.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        check_config(config)
        if config.index_topk is None:
            raise ValueError("config: expected a DSA config (index_topk, index_n_heads, index_head_dim set), "
                             "got index_topk=None")
        self.index_topk = config.index_topk
        self.indexer = LightningIndexer(config)
        self.sparse, self.selection, self.record_attention = True, "indexer", False

    def forward(self, hidden_states: torch.Tensor, start_pos: int = 0, cache: DSACache | None = None,
                mode: str = "absorbed", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_shape("hidden_states", hidden_states, (None, None, self.hidden_size))
        check_int("start_pos", start_pos, 0)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
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
        x = hidden_states.detach()  # the indexer's input, cut from the main model's graph
        index_k = self.indexer.keys(x, cos, sin)  # [batch, seq, index_head_dim]
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, start_pos)
            index_k = cache.update_index(index_k, start_pos)
        mask = decoder_mask(attention_mask, seq, kv_len, device=hidden_states.device)
        q_latent = self.q_a_layernorm(self.q_a_proj(x)).detach()  # c^Q, what the indexer's queries read
        self.last_index_scores = self.indexer.scores(x, q_latent, index_k, cos, sin, mask)
        self.last_topk = select_topk(self._selection_scores(mask), self.index_topk)
        if self.sparse:
            mask = mask & selection_mask(self.last_topk, kv_len)
        if self.record_attention:
            with torch.no_grad():
                probs = self._absorbed_probs(q_nope, q_pe, c_kv, k_pe, mask)
            self.last_attention = attention_target(probs)
        # the selection is a mask: "naive_sdpa" takes the written-out naive path, which applies any mask
        attend = self._attend_absorbed if mode == "absorbed" else self._attend_naive
        out = attend(q_nope, q_pe, c_kv, k_pe, mask)  # [batch, heads, seq, v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))

    def fill_cache(self, hidden_states: torch.Tensor, start_pos: int, cache: DSACache,
                   attention_mask: torch.Tensor | None = None) -> None:
        """`MultiHeadLatentAttention.fill_cache` plus the indexer's keys: a later query's indexer scores every
        cached token, those written without attending too."""
        super().fill_cache(hidden_states, start_pos, cache, attention_mask)
        positions = position_ids(attention_mask, start_pos, hidden_states.shape[1], hidden_states.device)
        cos, sin = self.rotary_emb(positions, dtype=hidden_states.dtype)
        cache.update_index(self.indexer.keys(hidden_states.detach(), cos, sin), start_pos)

    def _selection_scores(self, mask: torch.Tensor) -> torch.Tensor:
        """What top-k ranks: the index scores, or for selection "recent" the key positions (the most recent
        visible tokens first). mask: [batch or 1, 1, seq, kv_len] -> [batch, seq, kv_len]."""
        if self.selection == "indexer":
            return self.last_index_scores
        if self.selection != "recent":
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {self.selection!r}")
        batch, seq, kv_len = self.last_index_scores.shape
        positions = torch.arange(kv_len, dtype=torch.float32, device=mask.device).expand(batch, seq, kv_len)
        return positions.masked_fill(~mask[:, 0], float("-inf"))

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

    @classmethod
    def from_dense(cls, model: DeepSeekForCausalLM, index_topk: int, index_n_heads: int, index_head_dim: int,
                   seed: int = 0) -> "DeepSeekV32ForCausalLM":
        """A V3.2-shaped copy of a trained DeepSeek: its weights, plus new indexers (initialized from `seed`,
        the global RNG left as it was), as V3.2-Exp was made from V3.1-Terminus (report sec. 2.1)."""
        if type(model) is not DeepSeekForCausalLM:
            raise TypeError(f"model: expected a DeepSeekForCausalLM, got {type(model).__name__}")
        config = model.config.replace(index_topk=index_topk, index_n_heads=index_n_heads,
                                      index_head_dim=index_head_dim)
        weight = model.lm_head.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sparse = cls(config).to(dtype=weight.dtype, device=weight.device)
        missing, unexpected = sparse.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(".indexer." in name for name in missing), (missing, unexpected)
        return sparse.train(model.training)

    def set_sparse(self, sparse: bool, topk: int | None = None, selection: str | None = None,
                   record_attention: bool | None = None) -> None:
        """Set, in every layer, whether the selection applies, and where given its k, its rule ("indexer" or
        "recent") and whether the main attention distribution is kept (`SparseMLA`)."""
        if topk is not None:
            check_int("topk", topk, 1)
        if selection is not None and selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.sparse = sparse
            attn.index_topk = attn.index_topk if topk is None else topk
            attn.selection = attn.selection if selection is None else selection
            attn.record_attention = attn.record_attention if record_attention is None else record_attention

    def indexers(self) -> list[LightningIndexer]:
        return [layer.self_attn.indexer for layer in self.model.layers]


def train_indexer(model: DeepSeekV32ForCausalLM, batches, *, steps: int, lr: float = 1e-3, stage: str = "warmup",
                  seed: int = 0) -> list[float]:
    """Train the indexers of `model` as V3.2-Exp was trained (report sec. 2.1) on `batches`, an iterator of
    (inputs [batch, seq], targets [batch, seq]) token ids; -> the loss of each step.

    stage "warmup" (dense warm-up): attention stays dense, every parameter but the indexers' is frozen, and the
    loss is the sum over layers of `indexer_kl_loss` to the main attention distribution (V3.2: lr 1e-3,
    1000 steps). stage "sparse" (sparse training): the selection is applied, the indexers' KL counts only the
    selected keys S_t, and the main model trains on the next-token loss at the same time (V3.2: lr 7.3e-6,
    15000 steps); the indexer's detached input keeps the two losses apart. The returned loss is the indexers'
    KL (summed over layers) in both stages. AdamW (betas 0.9, 0.95, no weight decay); the model's sparse
    setting and train/eval mode are restored afterwards; the selection rule must be "indexer".
    Raises TypeError when `model` is not a DeepSeekV32ForCausalLM (a dense model has no indexers: use
    `DeepSeekV32ForCausalLM.from_dense`); ValueError for steps < 1, another stage, lr <= 0, another selection
    rule, or fewer batches than steps."""
    if not isinstance(model, DeepSeekV32ForCausalLM):
        raise TypeError(f"model: expected a DeepSeekV32ForCausalLM (DeepSeekV32ForCausalLM.from_dense adds "
                        f"indexers to a dense model), got {type(model).__name__}")
    check_int("steps", steps, 1)
    if stage not in ("warmup", "sparse"):
        raise ValueError(f"stage: expected 'warmup' or 'sparse', got {stage!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    layers = [layer.self_attn for layer in model.model.layers]
    if any(attn.selection != "indexer" for attn in layers):
        raise ValueError("selection: train_indexer trains the indexer's selection; set_sparse(selection='indexer')")
    indexer_params = [p for ix in model.indexers() for p in ix.parameters()]
    main_params = [p for name, p in model.named_parameters() if ".indexer." not in name]
    trained = indexer_params + (main_params if stage == "sparse" else [])
    saved = [(attn.sparse, attn.record_attention) for attn in layers]
    flags = [p.requires_grad for p in model.parameters()]
    for p in main_params:
        p.requires_grad_(stage == "sparse")
    model.set_sparse(stage == "sparse", record_attention=True)
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    try:
        for _, (inputs, targets) in zip(range(steps), batches):
            logits = model(inputs)
            kl = sum(indexer_kl_loss(attn.last_attention, attn.last_index_scores,
                                     selection_mask(attn.last_topk, inputs.shape[1])[:, 0]
                                     if stage == "sparse" else None) for attn in layers)
            loss = kl
            if stage == "sparse":
                loss = kl + F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(kl.item())
    finally:
        for attn, (sparse, record) in zip(layers, saved):
            attn.sparse, attn.record_attention = sparse, record
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if len(losses) < steps:
        raise ValueError(f"batches: expected {steps} batches, got {len(losses)}")
    return losses
