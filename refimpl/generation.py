"""Autoregressive generation, written once for every model family here (`refimpl.model`, `refimpl.dense`).

    prefill:  logits = model(prompt, start_pos=0, caches)         # every prompt token in one call
    decode:   repeat: pick a token from the last logits, append it, and run the model on that one token,
              which reads the keys/values (or MLA latents) of all earlier tokens from the caches.

A model plugs in with three things: `model.config` (a `refimpl.config.ModelConfig`), `model.new_caches(batch,
max_len)` (one cache per layer) and `model(input_ids, start_pos=, caches=, attention_mask=, logits_to_keep=1,
**forward_kwargs) -> logits [batch, 1, vocab]`, the logits of the last position (the output head of a long
prompt is then one row, and its last layer runs one position: `refimpl.model.forward_last_positions`).

Batches of prompts of different lengths are left-padded, as transformers' decoder-only models are: an
`attention_mask` [batch, prompt_len] (1 = token, 0 = padding) keeps the padding out of attention and gives each
row its own positions, so each row continues exactly as its prompt alone would. The mask grows by a column of
ones with each generated token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from refimpl.attention import check_attention_mask
from refimpl.checks import check_int, check_number, check_token_ids

SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes a 64-bit unsigned seed


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
             **forward_kwargs) -> torch.Tensor:
    """Greedy (temperature 0, the default) or sampled continuation: [batch, prompt_len] -> [batch, prompt_len + new].

    input_ids: int64/int32 [batch, prompt_len], prompt_len >= 1, left-padded if `attention_mask` is given.
    attention_mask: [batch, prompt_len], 1 = token, 0 = padding (left padding only); None: no padding.
    temperature: 0 takes the most likely token; any finite temperature > 0 samples from softmax(logits /
    temperature) over the `top_k` best tokens if set (`pick_next_token`: no temperature overflows);
    `seed` (0 <= seed < 2**64) makes sampling repeatable.
    eos_token_id: an id, a list of ids (Hugging Face configs often have several) or None. A row that produced
    one keeps repeating it; decoding stops early when every row has.
    on_token: called after each step with the new tokens, int64 [batch] (e.g. to print them as they come).
    forward_kwargs go to every model call (e.g. `mode="absorbed"` for MLA).

    Raises ValueError (TypeError for wrong types) naming the argument: an empty prompt, max_new_tokens < 0,
    temperature < 0, infinite or NaN, top_k outside 1..vocab_size, seed outside 0..2**64 - 1, an eos id outside
    0..vocab_size - 1, prompt_len + max_new_tokens > max_position_embeddings, a bad attention_mask
    (`refimpl.attention.check_attention_mask`).
    """
    config = model.config
    check_token_ids("input_ids", input_ids, config.vocab_size)
    batch_size, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError(f"input_ids: expected a prompt of at least one token per row, got shape "
                         f"{tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens, 0)
    check_temperature(temperature)
    if top_k is not None:
        check_int("top_k", top_k, 1)
        if top_k > config.vocab_size:
            raise ValueError(f"top_k: expected 1..{config.vocab_size} (vocab_size) or None, got {top_k}")
    eos_ids = torch.tensor(eos_token_ids(eos_token_id, config.vocab_size), dtype=torch.long,
                           device=input_ids.device)  # [n_eos]
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
        if seed >= SEED_LIMIT:
            raise ValueError(f"seed: expected an int in 0..2**64 - 1 (a 64-bit seed), got {seed}")
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    caches = model.new_caches(batch_size, total)
    tokens = input_ids
    logits = model(input_ids, start_pos=0, caches=caches, attention_mask=attention_mask, logits_to_keep=1,
                   **forward_kwargs)[:, -1]  # prefill: [batch, vocab]
    done = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_token = pick_next_token(logits, temperature, top_k, generator)  # [batch]
        next_token = torch.where(done, tokens[:, -1].long(), next_token)  # a finished row repeats its eos
        done |= torch.isin(next_token, eos_ids)
        tokens = torch.cat((tokens, next_token[:, None].to(tokens.dtype)), dim=1)
        if on_token is not None:
            on_token(next_token)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch_size, 1)), dim=1)
        logits = model(next_token[:, None], start_pos=prompt_len + step, caches=caches,
                       attention_mask=attention_mask, logits_to_keep=1, **forward_kwargs)[:, -1]
    return tokens


def check_temperature(temperature) -> None:
    """0 (greedy) or a finite number > 0. Raises TypeError (not a number) or ValueError (< 0, inf, NaN)."""
    check_number("temperature", temperature)
    if not math.isfinite(temperature):
        raise ValueError(f"temperature: expected 0 (greedy) or a finite number > 0, got {temperature}")


def eos_token_ids(eos_token_id, vocab_size: int) -> list[int]:
    """eos_token_id as a list of ids: None -> [], an id -> [id], a list or tuple of ids -> as a list.

    Raises TypeError for anything else (a string, a float, a list holding one) naming eos_token_id, and
    ValueError for an id outside 0..vocab_size - 1."""
    if eos_token_id is None:
        return []
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for eos in ids:
        if isinstance(eos, bool) or not isinstance(eos, int):
            raise TypeError(f"eos_token_id: expected an int, a list of ints or None, got {eos_token_id!r}")
        if not 0 <= eos < vocab_size:
            raise ValueError(f"eos_token_id: expected ids in 0..{vocab_size - 1} (vocab_size {vocab_size}), "
                             f"got {eos_token_id!r}")
    return ids


def pick_next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> next token ids int64 [batch]: argmax if temperature is 0, else a sample from
    softmax(logits / temperature) over the top_k largest logits (all if top_k is None; ties with the k-th
    are kept).

    Top-k comes first, on the logits themselves, and the best logit is subtracted before the division (in
    float64), so no finite temperature overflows: a tiny one (1e-40) sends every token but the best ones to
    -inf, i.e. greedy among exact ties; a huge one (1e39) makes the kept tokens equally likely, the top k
    only, never the whole vocabulary.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    if top_k is not None:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # [batch, 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # <= 0, the best 0: [batch, vocab]
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)[:, 0]
