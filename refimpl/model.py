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
        self.config = config
        self.self_attn = MultiHeadLatentAttention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, start_pos: int = 0, cache: MLACache | None = None, mode: str = "naive",
                attention_mask: torch.Tensor | None = None):
        if mode == "auto":
            mode = auto_mode(self.config, x.shape[1])
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
                attention_mask: torch.Tensor | None = None, keep: int | None = None):
        """-> [batch, seq, hidden]; [batch, keep, hidden] if `keep` and caches are given: the last layer then
        runs only the last `keep` positions (`forward_last_positions`)."""
        x = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if i == len(self.layers) - 1 and cache is not None and keep is not None and keep < x.shape[1]:
                x = forward_last_positions(layer, x, keep, start_pos, cache, attention_mask, mode=mode)
            else:
                x = layer(x, start_pos, cache, mode, attention_mask)
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
        vocab]. Generation needs the last one: the output head of a long prompt is then one row, not seq,
        and, with caches, the last layer runs k positions, not seq (`forward_last_positions`).
        """
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if caches is not None and len(caches) != self.config.num_hidden_layers:
            raise ValueError(f"caches: expected one per layer ({self.config.num_hidden_layers}), got {len(caches)}")
        if mode not in MODEL_MODES:
            raise ValueError(f"mode: expected one of {MODEL_MODES}, got {mode!r}")
        check_logits_to_keep(logits_to_keep)
        hidden = self.model(input_ids, start_pos, caches, mode, attention_mask, logits_to_keep)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # [batch, seq or k, vocab]

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


def check_logits_to_keep(logits_to_keep) -> None:
    if logits_to_keep is not None:
        check_int("logits_to_keep", logits_to_keep, 1, note=" or None")


def forward_last_positions(layer: nn.Module, x: torch.Tensor, keep: int, start_pos: int, cache,
                           attention_mask: torch.Tensor | None, **layer_kwargs) -> torch.Tensor:
    """A decoder layer's output at the last `keep` positions only: x [batch, seq, hidden] -> [batch, keep,
    hidden], equal to layer(x, ...)[:, -keep:] up to float rounding.

    The last layer of a prefill is read only where logits are: its other positions need no query, attention
    output or MLP, only their cache entries, which later tokens attend to. So those positions' keys/latents are
    written unattended (`self_attn.fill_cache`), and the layer runs on the last `keep` tokens as on tokens that
    follow a cached prefix. Saves all but the cache projection of one layer: for a model of n layers, close to
    1/n of a long prefill. layer: `DecoderLayer` or `refimpl.dense.DenseDecoderLayer`; layer_kwargs: its
    attention options (mode= or sdpa=).
    """
    done = x.shape[1] - keep
    prefix_mask = None if attention_mask is None else attention_mask[:, :start_pos + done]
    layer.self_attn.fill_cache(layer.input_layernorm(x[:, :done]), start_pos, cache, prefix_mask)
    return layer(x[:, done:], start_pos + done, cache, attention_mask=attention_mask, **layer_kwargs)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding, Router)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
