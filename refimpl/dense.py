"""The dense baseline: a Llama / Mistral decoder, to compare MLA and DeepSeekMoE against.

    x = embed_tokens(input_ids)                      # [batch, seq, hidden]
    for each layer:                                  # pre-norm residual blocks, as in refimpl.model
        x = x + self_attn(input_layernorm(x))        # MHA / GQA / MQA with RoPE (refimpl.attention)
        x = x + mlp(post_attention_layernorm(x))     # SwiGLU MLP (refimpl.moe.MLP), every layer
    logits = lm_head(norm(x))                        # [batch, seq, vocab]

The same stack as DeepSeek's (`refimpl.model`) with the two things DeepSeek changed put back: ordinary
attention, whose cache holds keys and values per key/value head, instead of MLA's latent; one dense FFN per
layer instead of DeepSeekMoE. Sources: Llama 2 (Touvron et al. 2023) and Llama 3 (Grattafiori et al. 2024) for
GQA, SwiGLU and RMSNorm; Mistral 7B (Jiang et al. 2023, section 2) for the sliding window (`config.sliding_window`,
applied by the attention mask; the cache keeps every token).

Module names are those of Hugging Face Llama / Mistral checkpoints (`model.embed_tokens.weight`,
`model.layers.0.self_attn.q_proj.weight`, `model.layers.0.mlp.gate_proj.weight`, `lm_head.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from refimpl.attention import Attention, KVCache
from refimpl.checkpoint import load_pretrained
from refimpl.checks import check_token_ids
from refimpl.config import ModelConfig, check_config
from refimpl.generation import generate
from refimpl.model import _init_weights, check_logits_to_keep, forward_last_positions
from refimpl.moe import MLP
from refimpl.norm import RMSNorm


class DenseDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, start_pos: int = 0, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, sdpa: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cache, attention_mask, sdpa)  # [batch, seq, hidden]
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseModel(nn.Module):
    """The decoder stack without the output head (checkpoint prefix `model.`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, start_pos: int = 0, caches: list[KVCache] | None = None,
                attention_mask: torch.Tensor | None = None, sdpa: bool = False, keep: int | None = None):
        """-> [batch, seq, hidden]; [batch, keep, hidden] if `keep` and caches are given: the last layer then
        runs only the last `keep` positions (`refimpl.model.forward_last_positions`)."""
        x = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if i == len(self.layers) - 1 and cache is not None and keep is not None and keep < x.shape[1]:
                x = forward_last_positions(layer, x, keep, start_pos, cache, attention_mask, sdpa=sdpa)
            else:
                x = layer(x, start_pos, cache, attention_mask, sdpa)
        return self.norm(x)


class DenseForCausalLM(nn.Module):
    """A Llama / Mistral causal language model: `DenseForCausalLM(config)` for a dense `ModelConfig`
    (kv_lora_rank None, n_routed_experts None), or `DenseForCausalLM.from_pretrained(folder)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if config.is_mla or config.is_moe:
            raise ValueError(
                f"config: DenseForCausalLM needs a dense config (kv_lora_rank None, n_routed_experts None), got "
                f"kv_lora_rank={config.kv_lora_rank}, n_routed_experts={config.n_routed_experts}; "
                "use refimpl.model.DeepSeekForCausalLM"
            )
        self.config = config
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(_init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, start_pos: int = 0, caches: list[KVCache] | None = None,
                attention_mask: torch.Tensor | None = None, sdpa: bool = False,
                logits_to_keep: int | None = None) -> torch.Tensor:
        """input_ids: [batch, seq] -> logits [batch, seq, vocab] (float, the model's dtype; seq may be 0).

        With caches, input_ids start at `start_pos`. attention_mask: [batch, seq] (with caches:
        [batch, start_pos + seq], covering the cached tokens too), 1 = token, 0 = left padding.
        sdpa: False, the written-out attention (the reference); True, PyTorch's fused kernel
        (`refimpl.attention.fused_attention`: memory linear in the context). logits_to_keep: None (all
        positions) or k >= 1, the last k only ([batch, k, vocab]; as in `refimpl.model.DeepSeekForCausalLM`).
        """
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if caches is not None and len(caches) != self.config.num_hidden_layers:
            raise ValueError(f"caches: expected one per layer ({self.config.num_hidden_layers}), got {len(caches)}")
        if not isinstance(sdpa, bool):
            raise TypeError(f"sdpa: expected True or False, got {sdpa!r}")
        check_logits_to_keep(logits_to_keep)
        hidden = self.model(input_ids, start_pos, caches, attention_mask, sdpa, logits_to_keep)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # [batch, seq or k, vocab]

    def new_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One empty KVCache per layer, for `max_len` tokens."""
        return [layer.self_attn.new_cache(batch_size, max_len) for layer in self.model.layers]

    def generate(self, input_ids, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, sdpa: bool = True,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy (temperature 0, the default) or sampled continuation: [batch, prompt] -> [batch, prompt + new],
        with the KV cache; sdpa: the attention of every call (True, default: PyTorch's fused kernel; False:
        the written-out reference). The loop and the other arguments: `refimpl.generation.generate`."""
        return generate(self, input_ids, max_new_tokens, attention_mask, temperature, top_k, seed, eos_token_id,
                        on_token=on_token, sdpa=sdpa)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "DenseForCausalLM":
        """Load a Hugging Face Llama / Mistral checkpoint: its folder (config.json + safetensors, single or
        sharded) or a file inside it. dtype: default the checkpoint's `torch_dtype`; device: default "cpu".
        Names and shapes are checked before anything is read; the steps and errors:
        `refimpl.checkpoint.load_pretrained`."""
        return load_pretrained(cls, path, dtype, device)

