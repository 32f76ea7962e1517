"""Accounting: parameters, FLOPs, KV-cache bytes and training dollars of a model, from its config alone.

Every number the course prints about a real model comes from here, and each one is counted from the shapes
in `ModelConfig`, tensor by tensor, with the names of the Hugging Face checkpoints:

* parameters (`param_counts`): total, and *activated* per token. An MoE layer holds `n_routed_experts` routed
  experts but a token runs through only `num_experts_per_tok` of them (DeepSeekMoE, DeepSeek-V2 sec. 2.2), so
  DeepSeek-V3 stores 671B parameters but a token touches about 37B (V3 report, arXiv 2412.19437, sec. 4.2);
* compute (`flops_per_token`, `training_flops`): 2 FLOPs per activated weight per token forward, plus the
  attention scores and weighted values, which grow with the context; training is ~6N FLOPs per token;
* memory (`kv_cache_elements_per_token`, `kv_cache_bytes`): the formulas of DeepSeek-V2's Table 1 (arXiv
  2405.04434): MHA caches 2 n_h d_h numbers per token per layer, GQA 2 n_g d_h, MQA 2 d_h, and MLA only
  d_c + d_h^R (its latent and its one shared RoPE key). The cache grows *linearly* with context length,
  except that a sliding-window model (Mistral-7B, `sliding_window` 4096) caches at most its window;
* money (`training_cost`): GPU-hours times a rental price, as the V3 report's Table 1 does.

What the papers report is rounded and they do not give their formula; `param_counts` says which counting
comes closest and how close (DeepSeek's activated counts are matched only to about 1-2%, see there).
"""

from __future__ import annotations

from dataclasses import dataclass

from refimpl.checks import check_int, check_number
from refimpl.config import ModelConfig

KV_CACHE_KINDS = ("mha", "gqa", "mqa", "mla")

# DeepSeek-V3 report (arXiv 2412.19437), Table 1: training cost in H800 GPU-hours, priced at $2 per GPU-hour.
# The report notes these cover only the official training run, "excluding the costs associated with prior
# research and ablation experiments on architectures, algorithms, or data".
DEEPSEEK_V3_GPU_HOURS = {
    "pre_training": 2_664_000,
    "context_extension": 119_000,
    "post_training": 5_000,
}
DEEPSEEK_V3_PRICE_PER_GPU_HOUR = 2.0  # US dollars, the report's assumed H800 rental price


# ---------------------------------------------------------------------------------------------------- parameters
def attention_params(config: ModelConfig) -> dict[str, int]:
    """Weights of one attention block, by checkpoint tensor name (`model.layers.i.self_attn.<name>`).

    MLA (DeepSeek-V2 sec. 2.1): queries through a low-rank bottleneck (`q_a_proj`, `q_a_layernorm`, `q_b_proj`)
    or directly (`q_proj`, V2-Lite); keys and values from one latent c^KV plus the shared RoPE key
    (`kv_a_proj_with_mqa` makes both), normalized (`kv_a_layernorm`) and expanded per head (`kv_b_proj`).
    Biases where transformers' DeepseekV2/V3 attention has them when `attention_bias` is set.
    Dense attention (Llama, Mistral): `q_proj`, `k_proj`, `v_proj`, `o_proj`, all with biases if set.
    """
    h, n_h = config.hidden_size, config.num_attention_heads
    bias = config.attention_bias
    if not config.is_mla:
        q, kv = n_h * config.head_dim, config.num_key_value_heads * config.head_dim
        p = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h}
        if bias:
            p.update({"q_proj.bias": q, "k_proj.bias": kv, "v_proj.bias": kv, "o_proj.bias": h})
        return p
    q_width = n_h * config.qk_head_dim  # every head: qk_nope_head_dim + qk_rope_head_dim
    if config.q_lora_rank is None:
        p = {"q_proj": h * q_width}
    else:
        p = {"q_a_proj": h * config.q_lora_rank, "q_a_layernorm": config.q_lora_rank,
             "q_b_proj": config.q_lora_rank * q_width}
        if bias:
            p["q_a_proj.bias"] = config.q_lora_rank
    latent = config.kv_lora_rank + config.qk_rope_head_dim  # c^KV and the RoPE key k^R, cached per token
    p.update({
        "kv_a_proj_with_mqa": h * latent,
        "kv_a_layernorm": config.kv_lora_rank,
        "kv_b_proj": config.kv_lora_rank * n_h * (config.qk_nope_head_dim + config.v_head_dim),
        "o_proj": n_h * config.v_head_dim * h,
    })
    if bias:
        p.update({"kv_a_proj_with_mqa.bias": latent, "o_proj.bias": h})
    return p


def ffn_params(config: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Weights of layer `layer_idx`'s feed-forward part, which is dense or MoE by `config.is_moe_layer`.

    A SwiGLU FFN has three matrices (gate_proj, up_proj, down_proj): 3 * hidden * width. An MoE layer has the
    router's expert centroids (`gate.weight`, [n_routed_experts, hidden]), V3's `e_score_correction_bias`
    (topk_method 'noaux_tc'; transformers keeps it as a buffer, but it is in the checkpoint), the routed
    experts and the shared experts (`moe_intermediate_size` wide each).
    """
    h = config.hidden_size
    if not config.is_moe_layer(layer_idx):
        return {"dense_ffn": 3 * h * config.intermediate_size}
    expert = 3 * h * config.moe_intermediate_size
    n = config.n_routed_experts
    correction_bias = n if config.topk_method == "noaux_tc" else 0
    return {"router": n * h + correction_bias, "shared_experts": config.n_shared_experts * expert,
            "routed_experts": n * expert}


def decoder_layer_params(config: ModelConfig, layer_idx: int) -> int:
    """All weights of one decoder layer: attention, FFN, and its two RMSNorms (input, post-attention)."""
    return sum(attention_params(config).values()) + sum(ffn_params(config, layer_idx).values()) \
        + 2 * config.hidden_size


def mtp_params(config: ModelConfig) -> int:
    """Weights of DeepSeek-V3's multi-token prediction modules (V3 sec. 2.2), not counted in the main model.

    Each module k is one more decoder layer (checkpoint layer id num_hidden_layers + k, so an MoE layer in
    V3), RMSNorms `enorm` and `hnorm` on its two inputs, the projection `eh_proj` ([hidden, 2 * hidden]) and the
    norm before the output head (`shared_head.norm`; README_WEIGHTS.md of DeepSeek-V3 omits it, the
    checkpoint has it). The embedding and the output head are shared with the main model, so not counted,
    although the checkpoint stores a copy of each (`model.layers.61.embed_tokens`, `...shared_head.head`).
    For V3 this gives 11.61B; README_WEIGHTS.md says "11.5B unique parameters" (the decoder layer alone is
    11.51B).
    """
    h, L = config.hidden_size, config.num_hidden_layers
    return sum(decoder_layer_params(config, L + k) + 3 * h + 2 * h * h
               for k in range(config.num_nextn_predict_layers))


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model by part, summed over all layers; `mtp` is apart from `total` (V3's convention)."""

    embedding: int  # embed_tokens: vocab_size * hidden_size
    lm_head: int  # 0 when tied to the embedding
    attention: int  # every layer's attention_params, the q_a/kv_a layernorms included
    norms: int  # input_layernorm, post_attention_layernorm of every layer, and the final norm
    dense_ffn: int  # the FFNs of the dense layers
    router: int  # MoE layers' gate.weight (+ e_score_correction_bias)
    shared_experts: int
    routed_experts: int  # all of them
    routed_experts_activated: int  # the num_experts_per_tok a token uses in each MoE layer
    mtp: int  # multi-token prediction modules (training objective / speculative decoding), see `mtp_params`

    @property
    def total(self) -> int:
        """Every parameter of the main model (not the MTP modules)."""
        return (self.embedding + self.lm_head + self.attention + self.norms + self.dense_ffn + self.router
                + self.shared_experts + self.routed_experts)

    @property
    def activated(self) -> int:
        """Parameters one token touches: all but the routed experts it is not sent to."""
        return self.total - self.routed_experts + self.routed_experts_activated

    @property
    def activated_non_embedding(self) -> int:
        """`activated` without the embedding table, a lookup, not a matmul: the N of the 6N rule."""
        return self.activated - self.embedding


def param_counts(config: ModelConfig) -> ParamCounts:
    """Count a model's parameters from its config, tensor by tensor (see `attention_params`, `ffn_params`).

    How DeepSeek counts, checked against the shipped configs:

    * total: every tensor of the main model, embedding and output head included, MTP modules excluded.
      V3: 671.03B ("671B", report; the Hugging Face card's 685B is the checkpoint: this, the MTP module and
      the copies of embedding and head the MTP module stores, 684.5B here), V2: 235.74B ("236B"),
      V2-Lite: 15.71B ("15.7B"); all within 0.2%.
    * activated: no counting reproduces the reports' figures exactly. Counting everything a token touches
      (`activated`, embedding and head included) gives V3 37.55B (report: 37B, +1.5%), V2 21.38B
      (21B, +1.8%), V2-Lite 2.66B (2.4B, +11%; an open question, DeepSeek-V2 GitHub issue #73).
      Leaving out the embedding table (`activated_non_embedding`) comes closest for all three:
      V3 36.63B (37B, -1.0%; README_WEIGHTS.md of DeepSeek-V3 says 36.7B, -0.2%), V2 20.85B (21B, -0.7%),
      V2-Lite 2.45B (2.4B, +2.1%). README_WEIGHTS.md says its 36.7B includes "0.9B for Embedding and 0.9B for
      the output Head", but counting both gives 37.55B; its figure is close to a count with only one of them.
    """
    h, L = config.hidden_size, config.num_hidden_layers
    ffn = {"dense_ffn": 0, "router": 0, "shared_experts": 0, "routed_experts": 0}
    for i in range(L):
        for part, n in ffn_params(config, i).items():
            ffn[part] += n
    routed_activated = 0
    if config.is_moe:  # every MoE layer: num_experts_per_tok of its n_routed_experts equal experts
        routed_activated = ffn["routed_experts"] // config.n_routed_experts * config.num_experts_per_tok
    embedding = config.vocab_size * h
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if config.tie_word_embeddings else embedding,
        attention=L * sum(attention_params(config).values()),
        norms=L * 2 * h + h,
        **ffn,
        routed_experts_activated=routed_activated,
        mtp=mtp_params(config),
    )


# ---------------------------------------------------------------------------------------------------- FLOPs
def attention_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """FLOPs of the attention scores and weighted values per token, averaged over a causal sequence.

    A token at position t attends to t + 1 keys; per layer and head the scores q.k cost 2 * qk_head_dim FLOPs
    per key and the weighted sum of values 2 * v_head_dim. Averaged over the seq_len positions (mean
    (seq_len + 1) / 2 keys): n_layers * n_heads * (qk_head_dim + v_head_dim) * (seq_len + 1). This is Kaplan
    et al.'s 2 * n_layer * n_ctx * d_attn (arXiv 2001.08361, Table 1) up to the +1, for d_qk = d_v. For MLA it
    counts the naive path (keys and values decompressed per head), the one used in training. It counts full
    causal attention even for a sliding-window config (whose tokens past the window attend to fewer keys).
    """
    check_int("seq_len", seq_len, 1)
    v_head_dim = config.v_head_dim if config.is_mla else config.head_dim
    return config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + v_head_dim) * (seq_len + 1)


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of the main model on a causal sequence of seq_len tokens (training or prefill).

    2 FLOPs (a multiply and an add) per activated non-embedding parameter, plus `attention_flops_per_token`.
    The norm and bias vectors are counted as weights too (a few per layer, < 0.01% of the total); the MTP
    modules, softmax, activations and routing arithmetic are not counted.
    """
    return 2 * param_counts(config).activated_non_embedding + attention_flops_per_token(config, seq_len)


def training_flops(config: ModelConfig, tokens: float) -> float:
    """Training FLOPs by the 6N rule (Kaplan et al. 2020, arXiv 2001.08361, sec. 2.1): 6 * N * tokens.

    N = activated non-embedding parameters: forward 2N and backward 4N FLOPs per token. The attention
    scores/values (`attention_flops_per_token`, times 3 for training) and the MTP modules are left out.
    """
    check_number("tokens", tokens)
    return 6 * param_counts(config).activated_non_embedding * tokens


# ---------------------------------------------------------------------------------------------------- KV cache
def kv_cache_kind(config: ModelConfig) -> str:
    """'mla' for DeepSeek configs; else 'mha', 'mqa' or 'gqa' from num_key_value_heads."""
    if config.is_mla:
        return "mla"
    if config.num_key_value_heads == config.num_attention_heads:
        return "mha"
    return "mqa" if config.num_key_value_heads == 1 else "gqa"


def kv_cache_elements_per_token(config: ModelConfig, kind: str | None = None) -> int:
    """Numbers cached per token over all layers, by DeepSeek-V2's Table 1 (l = num_hidden_layers):

        MHA 2 n_h d_h l,   GQA 2 n_g d_h l,   MQA 2 d_h l,   MLA (d_c + d_h^R) l

    n_h = num_attention_heads, n_g = num_key_value_heads. `kind` None: the config's own kind; another kind
    answers "what would this model cache with that attention". d_h is `head_dim`, or for an MLA config
    `qk_nope_head_dim` (128 in V2/V3), as in the table, which ignores that V2's MHA keys would also carry
    the RoPE part. For V2, MLA's d_c + d_h^R = 512 + 64 = 4.5 d_h, the cache of GQA with 2.25 groups.
    """
    kind = kv_cache_kind(config) if kind is None else kind
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"kind: expected one of {KV_CACHE_KINDS} or None, got {kind!r}")
    L = config.num_hidden_layers
    if kind == "mla":
        if not config.is_mla:
            raise ValueError(f"kind: 'mla' needs an MLA config (kv_lora_rank set), got kv_lora_rank=None "
                             f"for {config.name or 'this config'}")
        return (config.kv_lora_rank + config.qk_rope_head_dim) * L
    d_h = config.qk_nope_head_dim if config.is_mla else config.head_dim
    kv_heads = {"mha": config.num_attention_heads, "gqa": config.num_key_value_heads, "mqa": 1}[kind]
    return 2 * kv_heads * d_h * L  # a key and a value per KV head


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_element: float = 2, kind: str | None = None) -> float:
    """`kv_cache_elements_per_token` times bytes_per_element (2: BF16/FP16, 1: FP8)."""
    check_number("bytes_per_element", bytes_per_element, positive=True)
    return kv_cache_elements_per_token(config, kind) * bytes_per_element


def cached_tokens(config: ModelConfig, context_len: int) -> int:
    """Tokens a sequence of context_len tokens keeps in its KV cache: all of them, or at most
    `config.sliding_window` when the model attends only to that many (Mistral-7B-v0.1: 4096, config.json;
    its rolling-buffer cache overwrites the oldest entry, Jiang et al. 2023, arXiv 2310.06825, sec. 2)."""
    check_int("context_len", context_len, 0)
    if config.sliding_window is None:
        return context_len
    return min(context_len, config.sliding_window)


def kv_cache_bytes(config: ModelConfig, context_len: int, batch_size: int = 1, bytes_per_element: float = 2,
                   kind: str | None = None) -> float:
    """Bytes of KV cache for batch_size sequences of context_len tokens: linear in context_len (one entry per
    token; attention's *compute* is what grows quadratically with the sequence, not its cache), up to
    `config.sliding_window` tokens for a sliding-window model, after which it stays flat (`cached_tokens`)."""
    check_int("batch_size", batch_size, 1)
    return kv_cache_bytes_per_token(config, bytes_per_element, kind) * cached_tokens(config, context_len) * batch_size


# ---------------------------------------------------------------------------------------------------- money
def training_cost(gpu_hours: float, price_per_gpu_hour: float = DEEPSEEK_V3_PRICE_PER_GPU_HOUR) -> float:
    """Dollars for gpu_hours at a rental price: V3's 2.788M H800 GPU-hours at $2 are $5.576M (V3 Table 1).

    Like the report's figure, this prices one training run only, not the research, ablations, staff or the
    cluster's purchase.
    """
    check_number("gpu_hours", gpu_hours)
    check_number("price_per_gpu_hour", price_per_gpu_hour)
    return gpu_hours * price_per_gpu_hour


# ---------------------------------------------------------------------------------------------------- printing
def summary(config: ModelConfig) -> str:
    """One line of a model's numbers for the lessons (4 significant digits, KV cache in BF16), e.g.

    'DeepSeek-V3: 671B parameters, 37.55B activated per token (36.63B without the embedding), +11.61B in
     1 MTP module; KV cache (MLA): 35,136 elements = 70.3 KB per token in BF16'
    """
    p = param_counts(config)
    text = f"{config.name or 'model'}: {p.total / 1e9:.4g}B parameters"
    if config.is_moe:
        text += f", {p.activated / 1e9:.4g}B activated per token"
    text += f" ({p.activated_non_embedding / 1e9:.4g}B without the embedding)"
    if p.mtp:
        n = config.num_nextn_predict_layers
        text += f", +{p.mtp / 1e9:.4g}B in {n} MTP module{'s' if n > 1 else ''}"
    elements = kv_cache_elements_per_token(config)
    kilobytes = kv_cache_bytes_per_token(config, bytes_per_element=2) / 1e3
    return (text + f"; KV cache ({kv_cache_kind(config).upper()}): {elements:,} elements = {kilobytes:.1f} KB "
            "per token in BF16")
