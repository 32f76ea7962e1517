"""Model configurations with the field names of DeepSeek-V2/V3 `config.json` files.

One dataclass, `ModelConfig`, describes every model the course talks about:

* dense models with MHA / GQA / MQA attention (Llama, Mistral): `kv_lora_rank is None`, `n_routed_experts is None`;
* DeepSeek models with Multi-head Latent Attention (`kv_lora_rank` set) and DeepSeekMoE (`n_routed_experts` set).

Every field is checked when the config is created, so a wrong number fails here, with its name, and not
ten calls later as a shape error. `ModelConfig.from_hf` reads a Hugging Face `config.json` (a path or a dict);
`load_known(name)` reads one of the configs shipped in `refimpl/known_configs/` (their sources are listed in
each file's `_source` field).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refimpl.checks import check_int, check_number

KNOWN_CONFIG_DIR = Path(__file__).parent / "known_configs"

# The fields each RoPE scaling type reads (besides `type`); the others keep their defaults.
ROPE_SCALING_FIELDS = {
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
ROPE_SCALING_TYPES = tuple(ROPE_SCALING_FIELDS)
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RopeScaling:
    """A context extension of RoPE: the `rope_scaling` block of a config.json (see `refimpl.rope`).

    * type 'yarn' (DeepSeek-V2/V3): `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`,
      `mscale`, `mscale_all_dim`;
    * type 'llama3' (Llama 3.1 and later): `factor`, `original_max_position_embeddings`, `low_freq_factor`,
      `high_freq_factor`.
    """

    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type: expected one of {ROPE_SCALING_TYPES}, got {self.type!r}")
        check_number("rope_scaling.factor", self.factor, positive=True)
        check_int("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, 1)
        if self.type == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"rope_scaling: expected beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, "
                f"beta_slow={self.beta_slow}"
            )
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling: expected high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RopeScaling":
        d = dict(d)
        kind, alias = d.pop("type", None), d.pop("rope_type", None)  # older files: type; transformers 5: both
        kind = kind or alias
        d.pop("rope_theta", None)  # transformers 5 keeps the base inside `rope_parameters`
        if kind not in ROPE_SCALING_FIELDS:
            raise ValueError(f"rope_scaling.type: expected one of {ROPE_SCALING_TYPES}, got {kind!r}")
        known = ROPE_SCALING_FIELDS[kind]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"rope_scaling: unknown fields {unknown} for type {kind!r}; expected some of "
                             f"{sorted(known)}")
        return cls(type=kind, **d)

    def to_dict(self) -> dict[str, Any]:
        """The `rope_scaling` block of a config.json: the type and its own fields (readable by `from_dict`)."""
        return {"type": self.type, **{name: getattr(self, name) for name in ROPE_SCALING_FIELDS[self.type]}}


@dataclass(frozen=True)
class ModelConfig:
    # --- shared by every decoder-only transformer ---
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # dense FFN width (DeepSeek: only the first `first_k_dense_replace` layers)
    num_key_value_heads: int | None = None  # None: as many as query heads (MHA)
    head_dim: int | None = None  # dense attention only; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # --- Multi-head Latent Attention (DeepSeek-V2 section 2.1); kv_lora_rank None: ordinary attention ---
    q_lora_rank: int | None = None  # None: queries are not compressed (DeepSeek-V2-Lite)
    kv_lora_rank: int | None = None  # d_c, the width of the compressed KV latent
    qk_nope_head_dim: int | None = None  # d_h, per-head query/key part without position
    qk_rope_head_dim: int | None = None  # d_h^R, the decoupled RoPE part (one key shared by all heads)
    v_head_dim: int | None = None
    rope_interleave: bool = True  # DeepSeek checkpoints rotate (x0, x1), (x2, x3), ... pairs; see refimpl.rope
    # --- DeepSeekMoE (DeepSeek-V2 section 2.2, V3 section 2.1.2); n_routed_experts None: dense FFN ---
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int | None = None  # K_r, routed experts per token
    moe_intermediate_size: int | None = None
    n_group: int = 1  # expert groups (devices in V2, nodes in V3) for group-limited routing
    topk_group: int = 1  # groups a token may use
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # V2: softmax, V3: sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3, bias-corrected)
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0
    seq_aux: bool = False
    num_nextn_predict_layers: int = 0  # V3's multi-token prediction modules (not used for inference here)
    # --- DeepSeek Sparse Attention (V3.2-Exp): a lightning indexer per layer; index_topk None: dense MLA ---
    index_topk: int | None = None  # tokens each query attends to (2048 in V3.2-Exp)
    index_n_heads: int | None = None  # H_I, the indexer's heads (64)
    index_head_dim: int | None = None  # the indexer's query/key width (128)
    # --- sliding-window attention (Mistral-7B-v0.1: 4096); None: every token attends to all before it ---
    sliding_window: int | None = None  # a token attends to at most this many tokens (itself included)
    # --- bookkeeping, not architecture ---
    name: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and not self.is_mla:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self._validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head: the no-position part plus the RoPE part (MLA), or head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def _validate(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "num_key_value_heads", "max_position_embeddings", "moe_layer_freq"):
            check_int(name, getattr(self, name), 1)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            check_int(name, getattr(self, name), 0)
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, 1)
        check_number("rms_norm_eps", self.rms_norm_eps, positive=True)
        check_number("rope_theta", self.rope_theta, positive=True)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: expected 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.is_mla:
            self._validate_mla()
        else:
            check_int("head_dim", self.head_dim, 1)
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.is_moe:
            self._validate_moe()
        self._validate_dsa()

    def _validate_mla(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: expected a positive int when kv_lora_rank is set (MLA), got None")
            check_int(name, getattr(self, name), 1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}")
        for name in ("q_lora_rank", "kv_lora_rank"):
            rank = getattr(self, name)
            if rank is None:
                continue
            check_int(name, rank, 1)
            if rank > self.hidden_size:
                raise ValueError(
                    f"{name} ({rank}) must not be larger than hidden_size ({self.hidden_size}): "
                    "a low-rank compression cannot be wider than its input"
                )

    def _validate_moe(self):
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: expected a positive int when n_routed_experts is set (MoE), got None")
            check_int(name, getattr(self, name), 1)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible into n_group ({self.n_group}) groups"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                f"n_group: topk_method 'noaux_tc' ranks groups by the sum of their top-2 scores, so it needs at "
                f"least 2 experts per group, got n_routed_experts={self.n_routed_experts}, n_group={self.n_group}"
            )
        experts_reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_reachable:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {experts_reachable} experts in "
                f"topk_group ({self.topk_group}) groups of {self.n_routed_experts // self.n_group}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func: expected one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method: expected one of {TOPK_METHODS}, got {self.topk_method!r}")
        check_number("routed_scaling_factor", self.routed_scaling_factor, positive=True)

    def _validate_dsa(self):
        fields = ("index_topk", "index_n_heads", "index_head_dim")
        given = [getattr(self, f) is not None for f in fields]
        if not any(given):
            return
        if not all(given):
            raise ValueError(f"index_topk, index_n_heads, index_head_dim: a DSA config sets all three, got "
                             f"{ {f: getattr(self, f) for f in fields} }")
        for name in fields:
            check_int(name, getattr(self, name), 1)
        if not self.is_mla or self.q_lora_rank is None:
            raise ValueError("q_lora_rank: DSA's indexer reads the MLA query latent, so it needs an MLA config "
                             f"with q_lora_rank set, got kv_lora_rank={self.kv_lora_rank}, "
                             f"q_lora_rank={self.q_lora_rank}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"index_head_dim: expected at least qk_rope_head_dim ({self.qk_rope_head_dim}), "
                             f"got {self.index_head_dim}")

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any], name: str = "") -> "ModelConfig":
        """Read a Hugging Face `config.json` (a path to the file or its folder, or the parsed dict).

        Keys that do not describe the architecture (`architectures`, `torch_dtype`, `quantization_config`, ...)
        are ignored, but an unknown key that looks like a misspelled field (`n_routed_expert`) raises a
        ValueError naming both: ignored, it would silently turn an MoE model dense. transformers 5 writes
        `rope_parameters` (with `rope_theta` inside) where older files have `rope_theta` and `rope_scaling`;
        both are read. `sliding_window` is dropped when the file sets `use_sliding_window: false` (Qwen2).
        """
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"config: expected a config.json file or a folder holding one, got {str(source)!r}")
            d = json.loads(path.read_text())
            name = name or path.parent.name
        elif isinstance(source, dict):
            d = dict(source)
        else:
            raise TypeError(f"config source: expected a path or a dict, got {type(source).__name__}")
        d = _normalize_rope_keys(d)
        if d.get("use_sliding_window") is False:
            d["sliding_window"] = None
        _check_no_misspelled_keys(d)
        for key, value in _MODEL_TYPE_DEFAULTS.get(d.get("model_type"), {}).items():
            if d.get(key) is None:
                d[key] = value
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        # a null in the file means "the default" unless None is itself meaningful (q_lora_rank, kv_lora_rank...)
        kwargs = {k: v for k, v in d.items() if k in defaults and not (v is None and defaults[k] is not None)}
        kwargs.setdefault("name", d.get("_name", name))
        kwargs.setdefault("source", d.get("_source", ""))
        if "head_dim" in kwargs and kwargs.get("kv_lora_rank") is not None:
            kwargs.pop("head_dim")  # transformers' DeepSeek configs add head_dim = qk_rope_head_dim; MLA ignores it
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ValueError(f"config: missing required fields {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A dict in the Hugging Face `config.json` layout (readable back by `from_hf`)."""
        d = dataclasses.asdict(self)
        d["_name"], d["_source"] = d.pop("name"), d.pop("source")
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_dict()
        return d


# What a config.json leaves out means different things per model type: transformers' DeepseekV3Config, for
# instance, writes neither scoring_func nor topk_method, because its V3 router is always sigmoid + bias-corrected.
_MODEL_TYPE_DEFAULTS = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    "deepseek_v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},  # V3's router, as transformers
}


# Keys of real config.json files that are close to a field name but mean something else.
_NEAR_MISSES_ALLOWED = {
    "qk_head_dim",  # transformers' DeepSeek configs: qk_nope_head_dim + qk_rope_head_dim (our property)
    "use_sliding_window",  # Qwen2: whether `sliding_window` applies (read by `from_hf`)
}


def _check_no_misspelled_keys(d: dict[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in d:
        if key in fields or key in _NEAR_MISSES_ALLOWED or key.startswith("_"):
            continue
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
        if close:
            raise ValueError(f"config: unknown key {key!r}; did you mean the field {close[0]!r}? (other unknown "
                             "keys, such as architectures or torch_dtype, are ignored)")


def _normalize_rope_keys(d: dict[str, Any]) -> dict[str, Any]:
    params = d.pop("rope_parameters", None)
    if params:
        d.setdefault("rope_theta", params.get("rope_theta", 10000.0))
        if params.get("rope_type", params.get("type", "default")) != "default":
            d.setdefault("rope_scaling", params)
    scaling = d.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        d["rope_scaling"] = None
    return d


def check_config(config) -> None:
    """Raise TypeError unless `config` is a ModelConfig (the one check every module's constructor runs)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a refimpl.config.ModelConfig, got {type(config).__name__}")


def known_configs() -> list[str]:
    """Names of the configs shipped with the course, for `load_known`."""
    return sorted(p.stem for p in KNOWN_CONFIG_DIR.glob("*.json"))


def load_known(name: str) -> ModelConfig:
    """One of the shipped configs, e.g. `load_known("DeepSeek-V3")`."""
    path = KNOWN_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"load_known: expected one of {known_configs()}, got {name!r}")
    return ModelConfig.from_hf(path, name=name)
