"""A DeepSeek-V2/V3 decoder: MLA attention, a dense FFN in the first layers, DeepSeekMoE after that.

    x = embed_tokens(input_ids)                      # [batch, seq, hidden]
    for each layer:                                  # pre-norm residual blocks
        x = x + self_attn(input_layernorm(x))        # Multi-head Latent Attention (refimpl.mla)
        x = x + mlp(post_attention_layernorm(x))     # MLP for layer < first_k_dense_replace, else DeepSeekMoE
    logits = lm_head(norm(x))                        # [batch, seq, vocab]

Module names follow the Hugging Face checkpoints (`model.layers.3.self_attn.kv_b_proj.weight`,
`model.layers.3.mlp.experts.17.up_proj.weight`, ...), so `from_pretrained` loads a checkpoint folder by those
names, with nothing renamed. `generate` keeps the latent MLA cache and, by default (mode "auto"), takes the
faster MLA path for each call (`refimpl.mla.auto_mode`): the prompt on the naive path through PyTorch's fused
attention (memory linear in its length), each new token on the absorbed path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from refimpl.checkpoint import load_pretrained
from refimpl.checks import check_int, check_token_ids
from refimpl.config import ModelConfig, check_config
from refimpl.generation import generate
from refimpl.mla import MODES, MLACache, MultiHeadLatentAttention, auto_mode
from refimpl.moe import MLP, DeepSeekMoE, Router
from refimpl.norm import RMSNorm

INIT_STD = 0.02  # std of the normal init for a model trained from scratch (transformers' initializer_range)
MODEL_MODES = MODES + ("auto",)  # "auto": per call, the faster of "absorbed" and "naive_sdpa" (`auto_mode`)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, start_pos: int = 0, cache: MLACache | None = None, mode: str = "naive",
                attention_mask: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cache, mode, attention_mask)  # [batch, seq, hidden]
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepSeekModel(nn.Module):
    """The decoder stack without the output head (checkpoint prefix `model.`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, start_pos: int = 0, caches: list[MLACache] | None = None, mode: str = "naive",
                attention_mask: torch.Tensor | None = None):
        x = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos, None if caches is None else caches[i], mode, attention_mask)
        return self.norm(x)


class DeepSeekForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if not config.is_mla:
            raise ValueError("config: DeepSeekForCausalLM needs an MLA config (kv_lora_rank set), got kv_lora_rank=None")
        self.config = config
        self.model = DeepSeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(_init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, start_pos: int = 0, caches: list[MLACache] | None = None,
                mode: str = "naive", attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | None = None) -> torch.Tensor:
        """input_ids: [batch, seq] -> logits [batch, seq, vocab] (float, the model's dtype; seq may be 0).

        With caches, input_ids start at `start_pos`. mode: the MLA path, one of MODEL_MODES: "naive",
        "absorbed" or "naive_sdpa" (`refimpl.mla`), or "auto", the faster of the last two for this call.
        attention_mask: [batch, seq] (with caches: [batch, start_pos + seq], covering the cached tokens too),
        1 = token, 0 = left padding; padding is not attended to and positions count tokens only, so each row
        gets the logits its tokens get alone (`refimpl.attention.position_ids`, `decoder_mask`).
        logits_to_keep: None (all positions) or k >= 1: the logits of the last k positions only, [batch, k,
        vocab] (generation needs the last one: the output head of a long prompt is then one row, not seq).
        """
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if caches is not None and len(caches) != self.config.num_hidden_layers:
            raise ValueError(f"caches: expected one per layer ({self.config.num_hidden_layers}), got {len(caches)}")
        if mode not in MODEL_MODES:
            raise ValueError(f"mode: expected one of {MODEL_MODES}, got {mode!r}")
        if mode == "auto":
            mode = auto_mode(self.config, input_ids.shape[1])
        hidden = self.model(input_ids, start_pos, caches, mode, attention_mask)  # [batch, seq, hidden]
        return self.lm_head(keep_last(hidden, logits_to_keep))

    def new_caches(self, batch_size: int, max_len: int) -> list[MLACache]:
        return [layer.self_attn.new_cache(batch_size, max_len) for layer in self.model.layers]

    def moe_layers(self) -> list[DeepSeekMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, DeepSeekMoE)]

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, mode: str = "auto",
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy (temperature 0, the default) or sampled continuation: [batch, prompt] -> [batch, prompt + new].

        The prompt is processed in one prefill call, then one token per call, each reading the latent cache.
        mode: one of MODEL_MODES for every call; "auto" (default) picks per call (`refimpl.mla.auto_mode`):
        "naive_sdpa" for the prompt, "absorbed" for each new token. The same tokens come out of every mode
        (up to float rounding). The loop and the other arguments: `refimpl.generation.generate`.
        """
        return generate(self, input_ids, max_new_tokens, attention_mask, temperature, top_k, seed, eos_token_id,
                        on_token=on_token, mode=mode)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "DeepSeekForCausalLM":
        """Load a Hugging Face DeepSeek-V2/V3 checkpoint: its folder (config.json + safetensors, single or
        sharded) or a file inside it.

        dtype: default the checkpoint's `torch_dtype`; the routers stay float32. device: default "cpu".
        Every tensor is checked (names and shapes) before anything is read; missing, extra or wrongly shaped
        tensors raise one ValueError that lists them all. V3's multi-token-prediction layers (stored after the
        decoder layers, `model.layers.61.*` in V3) are skipped with a warning; V3's FP8 weights are
        dequantized. The steps, errors and memory: `refimpl.checkpoint.load_pretrained`.
        """
        return load_pretrained(cls, path, dtype, device)


def keep_last(hidden: torch.Tensor, logits_to_keep: int | None) -> torch.Tensor:
    """hidden: [batch, seq, hidden] -> its last `logits_to_keep` positions (all if None). Raises on an int < 1."""
    if logits_to_keep is None:
        return hidden
    check_int("logits_to_keep", logits_to_keep, 1, note=" or None")
    return hidden[:, -logits_to_keep:]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding, Router)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
