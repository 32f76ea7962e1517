"""Greedy speculative decoding with the MTP modules as the drafter (DeepSeek-V3 section 5.4.3).

Each round, the MTP modules draft `draft_len` tokens past the newest one (depth k drafts the k-th), and the main
model checks them all in one forward over [newest, draft_1, ..., draft_n]:

    main logits at the newest token  -> greedy token g_1; draft_1 is kept if it equals g_1
    main logits at draft_1           -> g_2; draft_2 is kept if draft_1 was and it equals g_2  ... and so on
    the first main token after the kept drafts is emitted too (it is greedy by construction)

so a round emits 1 .. n + 1 tokens for one main forward, and the output is plain greedy decoding's token for
token (lossless): every emitted token is the main model's argmax given the tokens before it. Rejected drafts
leave stale entries in the position-indexed MLA caches past the kept tokens; the next round writes over them.

Drafting: depth k at position i reads h_i^{k-1} and t_{i+k} and predicts t_{i+k+1} (`refimpl.mtp`). Its cache
entry at i is kept as long as the tokens and hidden states it read were final (not drafts); later rounds
recompute the others. The main model's hidden states h^0 and each depth's outputs are kept per position.

What this relies on in the model: `DeepSeekMTPForCausalLM.hidden_and_logits`, `mtp_step`, `new_caches`,
`new_mtp_caches`, and MLA caches indexed by position (`refimpl.mla.MLACache`). Batch size 1 only: rows of a
batch would keep different numbers of drafts (transformers' `generate(use_mtp=True)` has the same limit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from refimpl.checks import check_int, check_token_ids


@dataclass
class SpeculativeStats:
    """What a speculative run did. main_forwards counts the prefill too, which emits the first token."""

    new_tokens: int = 0
    main_forwards: int = 0
    drafted: list[int] = field(default_factory=list)  # per depth k: drafts proposed for the k-th next token
    accepted: list[int] = field(default_factory=list)  # per depth k: of those, kept

    @property
    def tokens_per_forward(self) -> float:
        """Tokens emitted per main-model forward (plain greedy decoding: exactly 1)."""
        return self.new_tokens / self.main_forwards

    @property
    def acceptance_rate(self) -> list[float]:
        """Per depth: accepted / drafted (V3 section 5.4.3 reports 85-90% for the one depth it has)."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, draft_len: int = 1,
                         mode: str = "absorbed",
                         force_draft: Callable[[torch.Tensor, int], int] | None = None
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of a `refimpl.mtp.DeepSeekMTPForCausalLM`, drafted by its MTP modules and verified by
    the main model: [1, prompt_len] -> ([1, prompt_len + max_new_tokens], SpeculativeStats).

    The tokens equal `model.generate(input_ids, max_new_tokens)` (greedy), whatever the drafts. draft_len: tokens
    drafted per round, 1 .. num_nextn_predict_layers (V3: 1). mode: the MLA path ("absorbed" or "naive").
    force_draft(tokens [seq], drafted token) -> the token to propose instead (tokens: the sequence the draft
    continues, drafts included): for tests and bounds, e.g. an always-right or always-wrong drafter.
    Raises ValueError naming the argument: batch size != 1, an empty prompt, max_new_tokens < 0, draft_len
    outside 1..num_nextn_predict_layers, a length past max_position_embeddings; a model without MTP modules.
    """
    config = model.config
    depths = len(getattr(model, "mtp", ()))
    if depths == 0:
        raise ValueError("model: expected a DeepSeekMTPForCausalLM with MTP modules (num_nextn_predict_layers "
                         f">= 1), got {type(model).__name__} without any")
    check_int("draft_len", draft_len, 1)
    if draft_len > depths:
        raise ValueError(f"draft_len: expected 1..{depths} (num_nextn_predict_layers), got {draft_len}")
    check_token_ids("input_ids", input_ids, config.vocab_size)
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected one non-empty prompt, shape [1, prompt_len], got "
                         f"{tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens, 0)
    prompt_len = input_ids.shape[1]
    total = prompt_len + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens: expected at most max_position_embeddings "
                         f"({config.max_position_embeddings}), got {total}")
    stats = SpeculativeStats(drafted=[0] * draft_len, accepted=[0] * draft_len)
    if max_new_tokens == 0:
        return input_ids.clone(), stats

    tokens = input_ids[0].tolist()
    caches, mtp_caches = model.new_caches(1, total), model.new_mtp_caches(1, total)
    # hidden[k][:, i]: h_i^k (k = 0: the main model's); valid[k]: positions whose entry read final inputs only
    hidden = [torch.empty(1, total, config.hidden_size, dtype=model.lm_head.weight.dtype)
              for _ in range(draft_len + 1)]
    valid = [0] * (draft_len + 1)
    h, logits = model.hidden_and_logits(input_ids, 0, caches, mode)  # prefill
    hidden[0][:, :prompt_len], valid[0] = h, prompt_len
    tokens.append(int(logits[0, -1].argmax()))
    stats.main_forwards, stats.new_tokens = 1, 1

    while stats.new_tokens < max_new_tokens:
        newest = len(tokens) - 1  # m: the newest token's position; the main model has read positions < m
        n = min(draft_len, max_new_tokens - stats.new_tokens - 1)  # never emit past max_new_tokens
        drafts = _draft(model, tokens, n, hidden, valid, mtp_caches, mode, force_draft)
        h, logits = model.hidden_and_logits(torch.tensor([tokens[newest:] + drafts]), newest, caches, mode)
        greedy = logits[0].argmax(-1).tolist()  # [n + 1]: the main model's token after each input
        kept = 0
        while kept < n and drafts[kept] == greedy[kept]:
            kept += 1
        for depth in range(n):
            stats.drafted[depth] += 1
            stats.accepted[depth] += depth < kept
        tokens += drafts[:kept] + [greedy[kept]]
        hidden[0][:, newest:newest + kept + 1] = h[:, :kept + 1]
        valid[0] = newest + kept + 1
        stats.main_forwards += 1
        stats.new_tokens += kept + 1
    return torch.tensor([tokens[:total]], dtype=input_ids.dtype), stats


def _draft(model, tokens: list[int], n: int, hidden, valid: list[int], mtp_caches, mode: str,
           force_draft) -> list[int]:
    """Draft n tokens past tokens[-1] with depths 1..n, all at position m - 1 (m = len(tokens) - 1), first
    bringing each depth's cache and outputs up to date from its first stale position. Updates `valid`."""
    newest = len(tokens) - 1
    drafts: list[int] = []
    for depth in range(1, n + 1):
        start = min(valid[depth], valid[depth - 1])  # the first position to (re)compute
        ids = (tokens + drafts)[start + depth:newest + depth]  # t_{i+k} for i = start .. m - 1
        h, logits = model.mtp_step(depth, hidden[depth - 1][:, start:newest], torch.tensor([ids]), start,
                                   mtp_caches[depth - 1], mode)
        hidden[depth][:, start:newest] = h
        # entries that read a draft (t_{i+k} with i + k > m) or a stale h^{k-1} are recomputed next round
        valid[depth] = min(newest - depth + 1, valid[depth - 1])
        draft = int(logits[0, -1].argmax())
        if force_draft is not None:
            draft = int(force_draft(torch.tensor(tokens + drafts), draft))
        drafts.append(draft)
    return drafts
