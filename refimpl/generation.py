"""Autoregressive generation, written once for every model family here (`refimpl.model`, `refimpl.dense`).

    prefill:  logits = model(prompt, start_pos=0, caches)         # every prompt token in one call
    decode:   repeat: pick a token from the last logits, append it, and run the model on that one token,
              which reads the keys/values (or MLA latents) of all earlier tokens from the caches.

A model plugs in with three things: `model.config` (a `refimpl.config.ModelConfig`), `model.new_caches(batch,
max_len)` (one cache per layer) and `model(input_ids, start_pos=, caches=, attention_mask=, **forward_kwargs)
-> logits [batch, seq, vocab]`.

Batches of prompts of different lengths are left-padded, as transformers' decoder-only models are: an
`attention_mask` [batch, prompt_len] (1 = token, 0 = padding) keeps the padding out of attention and gives each
row its own positions, so each row continues exactly as its prompt alone would. The mask grows by a column of
ones with each generated token.
"""

from __future__ import annotations

import torch

from refimpl.attention import check_attention_mask
from refimpl.checks import check_int, check_number, check_token_ids


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             eos_token_id: int | None = None, **forward_kwargs) -> torch.Tensor:
    """Greedy (temperature 0, the default) or sampled continuation: [batch, prompt_len] -> [batch, prompt_len + new].

    input_ids: int64/int32 [batch, prompt_len], prompt_len >= 1, left-padded if `attention_mask` is given.
    attention_mask: [batch, prompt_len], 1 = token, 0 = padding (left padding only); None: no padding.
    temperature > 0 samples from softmax(logits / temperature), restricted to the `top_k` best tokens if set;
    `seed` makes sampling repeatable. Rows that produced `eos_token_id` keep producing it; decoding stops early
    when every row has. forward_kwargs go to every model call (e.g. `mode="absorbed"` for MLA).

    Raises ValueError (TypeError for wrong types) naming the argument: an empty prompt, max_new_tokens < 0,
    temperature < 0, top_k outside 1..vocab_size, prompt_len + max_new_tokens > max_position_embeddings, a bad
    attention_mask (`refimpl.attention.check_attention_mask`).
    """
    config = model.config
    check_token_ids("input_ids", input_ids, config.vocab_size)
    batch_size, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError(f"input_ids: expected a prompt of at least one token per row, got shape "
                         f"{tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens, 0)
    check_number("temperature", temperature)
    if top_k is not None:
        check_int("top_k", top_k, 1)
        if top_k > config.vocab_size:
            raise ValueError(f"top_k: expected 1..{config.vocab_size} (vocab_size) or None, got {top_k}")
    total = prompt_len + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens: expected at most max_position_embeddings "
                         f"({config.max_position_embeddings}), got {total}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_attention_mask(attention_mask, batch_size, prompt_len)
    generator = None
    if seed is not None:
        check_int("seed", seed, 0)
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    caches = model.new_caches(batch_size, total)
    tokens = input_ids
    logits = model(input_ids, start_pos=0, caches=caches, attention_mask=attention_mask,
                   **forward_kwargs)[:, -1]  # prefill: [batch, vocab]
    done = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_token = pick_next_token(logits, temperature, top_k, generator)  # [batch]
        if eos_token_id is not None:
            next_token = next_token.masked_fill(done, eos_token_id)
            done |= next_token == eos_token_id
        tokens = torch.cat((tokens, next_token[:, None].to(tokens.dtype)), dim=1)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch_size, 1)), dim=1)
        logits = model(next_token[:, None], start_pos=prompt_len + step, caches=caches,
                       attention_mask=attention_mask, **forward_kwargs)[:, -1]
    return tokens


def pick_next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> next token ids int64 [batch]: argmax if temperature is 0, else a sample from
    softmax(logits / temperature) (in float32) over the top_k largest logits (all if top_k is None)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # [batch, 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
