"""refimpl.speculative: MTP-drafted greedy decoding equals plain greedy decoding, token for token."""

import pytest
import torch

from refimpl.mtp import DeepSeekMTPForCausalLM
from refimpl.speculative import speculative_generate
from refimpl.train import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DeepSeekMTPForCausalLM(tiny_config(num_nextn_predict_layers=2)).to(torch.float64).eval()
    with torch.no_grad():  # larger weights than the init: logits far from ties, drafts often wrong
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(5)
    return m


PROMPT = torch.tensor([[5, 17, 200, 33, 90, 41]])


@pytest.mark.parametrize("draft_len, mode", [(1, "absorbed"), (2, "absorbed"), (2, "naive")])
def test_equals_plain_greedy_token_for_token(model, draft_len, mode):
    greedy = model.generate(PROMPT, 24, mode=mode)
    tokens, stats = speculative_generate(model, PROMPT, 24, draft_len=draft_len, mode=mode)
    assert torch.equal(tokens, greedy)
    assert stats.new_tokens == 24 and stats.main_forwards <= 24
    assert sum(stats.drafted) > 0


def _forced(greedy, right: bool):
    def force(tokens, drafted):
        truth = int(greedy[0, len(tokens)])
        return truth if right else (truth + 1) % 257
    return force


@pytest.mark.parametrize("draft_len", [1, 2])
def test_a_drafter_forced_right_emits_draft_len_plus_one_tokens_per_forward(model, draft_len):
    greedy = model.generate(PROMPT, 20)
    tokens, stats = speculative_generate(model, PROMPT, 20, draft_len, force_draft=_forced(greedy, True))
    assert torch.equal(tokens, greedy)
    assert stats.accepted == stats.drafted
    # the prefill emits 1 token, then each round draft_len + 1 (the last round is cut at 20)
    assert stats.main_forwards == 1 + -(-19 // (draft_len + 1))
    assert stats.tokens_per_forward > (1.8 if draft_len == 1 else 2.4)


def test_a_drafter_forced_wrong_emits_one_token_per_forward_and_stays_greedy(model):
    greedy = model.generate(PROMPT, 20)
    tokens, stats = speculative_generate(model, PROMPT, 20, 2, force_draft=_forced(greedy, False))
    assert torch.equal(tokens, greedy)  # every continuation after a rejection is still greedy
    assert stats.accepted == [0, 0] and stats.main_forwards == 20 and stats.tokens_per_forward == 1


def test_a_drafter_alternately_right_and_wrong_stays_greedy(model):
    greedy = model.generate(PROMPT, 20)

    def force(tokens, drafted):
        truth = int(greedy[0, len(tokens)])
        return truth if len(tokens) % 5 else (truth + 1) % 257

    tokens, stats = speculative_generate(model, PROMPT, 20, 2, force_draft=force)
    assert torch.equal(tokens, greedy)
    assert 0 < stats.accepted[0] < stats.drafted[0]


def test_a_wrong_verification_would_be_caught(model):
    """The equality check can fail: a drafter whose drafts are all kept unverified is not greedy."""
    greedy = model.generate(PROMPT, 20)
    wrong = torch.cat([PROMPT, (greedy[:, 6:] + 1) % 257], dim=1)
    assert not torch.equal(wrong, greedy)


def test_bad_input_is_refused_by_name(model):
    with pytest.raises(ValueError, match=r"draft_len: expected 1\.\.2"):
        speculative_generate(model, PROMPT, 5, draft_len=3)
    with pytest.raises(ValueError, match="draft_len"):
        speculative_generate(model, PROMPT, 5, draft_len=0)
    with pytest.raises(ValueError, match=r"input_ids: expected one non-empty prompt"):
        speculative_generate(model, PROMPT.repeat(2, 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative_generate(model, PROMPT, 600)
    from refimpl.model import DeepSeekForCausalLM
    with pytest.raises(ValueError, match="model: expected a DeepSeekMTPForCausalLM"):
        speculative_generate(DeepSeekForCausalLM(tiny_config()), PROMPT, 5)
