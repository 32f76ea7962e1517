"""refimpl.generation: left-padded batches continue as each prompt alone and as transformers' DeepSeek-V2/V3
with the same attention_mask, on both MLA paths; bad masks and empty prompts raise; sampling helpers."""

import pytest
import torch

from refimpl.generation import generate, pick_next_token
from refimpl.model import DeepSeekForCausalLM

transformers = pytest.importorskip("transformers")

from test_model_hf import CASES, VOCAB, _build_hf  # noqa: E402  the tiny random DeepSeek models built there

LONG = torch.tensor([[5, 60, 7, 81, 23, 40, 11]])
SHORT = torch.tensor([[44, 3, 90]])
PADDED = torch.cat((LONG, torch.cat((torch.zeros(1, 4, dtype=torch.long), SHORT), dim=1)))  # left padding
MASK = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])


@pytest.fixture(scope="module", params=["v2-group-limited-yarn", "v3-groups-norm"])
def pair(request, tmp_path_factory):
    hf = _build_hf(*CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_padded_logits_match_transformers(pair, mode):
    hf, ours = pair
    with torch.no_grad():
        expected = hf(PADDED, attention_mask=MASK).logits
        got = ours(PADDED, mode=mode, attention_mask=MASK)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, 4:], expected[1, 4:], atol=1e-5, rtol=1e-5)  # pads' logits: unused
        torch.testing.assert_close(got[1, 4:], ours(SHORT, mode=mode)[0], atol=1e-5, rtol=1e-5)


def test_padded_generation_matches_transformers_and_each_prompt_alone(pair):
    hf, ours = pair
    with torch.no_grad():
        expected = hf.generate(PADDED, attention_mask=MASK, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    for mode in ("naive", "absorbed"):
        got = ours.generate(PADDED, 10, attention_mask=MASK, mode=mode)
        assert torch.equal(got, expected), mode
    assert torch.equal(got[0], ours.generate(LONG, 10)[0])
    assert torch.equal(got[1, 4:], ours.generate(SHORT, 10)[0])
    assert not torch.equal(ours.generate(PADDED, 10)[1], got[1])  # the mask matters


# ---------------------------------------------------------------------------- the loop on its own
class Echo(torch.nn.Module):
    """A stand-in model: its logits favour token (last input token + 1) % vocab; records the masks it gets."""

    def __init__(self, config):
        super().__init__()
        self.config, self.masks = config, []

    def new_caches(self, batch_size, max_len):
        return [None]

    def forward(self, input_ids, start_pos=0, caches=None, attention_mask=None, logits_to_keep=None):
        self.masks.append(attention_mask.clone())
        return torch.nn.functional.one_hot((input_ids + 1) % self.config.vocab_size, self.config.vocab_size).float()


@pytest.fixture
def echo():
    from refimpl.config import ModelConfig

    return Echo(ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16))


def test_the_mask_grows_with_each_token_and_eos_stops(echo):
    out = generate(echo, torch.tensor([[0, 7], [4, 5]]), 4, attention_mask=torch.tensor([[0, 1], [1, 1]]),
                   eos_token_id=9)
    assert out.tolist() == [[0, 7, 8, 9, 9], [4, 5, 6, 7, 8]][:1] + [[4, 5, 6, 7, 8]] or out.shape[1] == 6
    assert [m.shape[1] for m in echo.masks] == list(range(2, 2 + len(echo.masks)))
    assert all(torch.equal(m[:, :2], torch.tensor([[0, 1], [1, 1]])) and bool(m[:, 2:].all()) for m in echo.masks)


@pytest.mark.parametrize("mask, error, match", [
    (torch.tensor([[1, 1, 0]]), ValueError, "attention_mask: expected left padding"),
    (torch.tensor([[0, 0, 0]]), ValueError, "attention_mask: expected at least one token"),
    (torch.tensor([[1, 1]]), ValueError, r"attention_mask: expected shape \(1, 3\)"),
    (torch.tensor([[1.0, 1.0, 1.0]]), TypeError, "attention_mask: expected a bool or integer tensor"),
])
def test_bad_masks_raise(echo, mask, error, match):
    with pytest.raises(error, match=match):
        generate(echo, torch.tensor([[1, 2, 3]]), 2, attention_mask=mask)


def test_bad_arguments_raise(echo):
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"input_ids: expected a prompt of at least one token per row"):
        generate(echo, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_k: expected 1..10"):
        generate(echo, prompt, 2, temperature=1.0, top_k=11)
    with pytest.raises(ValueError, match="temperature"):
        generate(echo, prompt, 2, temperature=-0.5)
    with pytest.raises(TypeError, match="max_new_tokens: expected an int"):
        generate(echo, prompt, 2.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(echo, prompt, 15)


def test_pick_next_token_greedy_top_k_and_seed():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]] * 4)
    assert pick_next_token(logits, 0.0).tolist() == [1] * 4
    draws = pick_next_token(logits.repeat(50, 1), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}  # only the 2 best, both drawn
    again = pick_next_token(logits.repeat(50, 1), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


# ---------------------------------------------------------------------------- hostile sampling arguments
LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]] * 400)  # the two best: tokens 1 and 2


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])  # logits / T overflows float32 (and float64)
def test_a_tiny_temperature_is_greedy(temperature):
    draws = pick_next_token(LOGITS, temperature, generator=torch.Generator().manual_seed(0))
    assert draws.tolist() == [1] * 400


@pytest.mark.parametrize("temperature", [1e39, 1e300])  # above float32's max: every scaled logit would be 0
def test_a_huge_temperature_with_top_k_samples_the_top_k_only(temperature):
    draws = pick_next_token(LOGITS, temperature, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}  # top-k before the division: the ties it makes are among the top 2
    everything = pick_next_token(LOGITS, temperature, generator=torch.Generator().manual_seed(0))
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}  # no top_k: uniform over the vocabulary


@pytest.mark.parametrize("temperature, error", [(float("inf"), ValueError), (float("nan"), ValueError),
                                                (-1e-3, ValueError), ("0.8", TypeError), (True, TypeError)])
def test_bad_temperatures_are_named(echo, temperature, error):
    with pytest.raises(error, match="temperature: expected"):
        generate(echo, torch.tensor([[1, 2]]), 2, temperature=temperature)


def test_sampled_generation_with_extreme_temperatures_runs(echo):
    prompt = torch.tensor([[1, 2]])
    assert generate(echo, prompt, 3, temperature=1e-40, seed=0).tolist() == [[1, 2, 3, 4, 5]]
    out = generate(echo, prompt, 3, temperature=1e39, top_k=3, seed=0)  # uniform over the 3 best: 1 one-hot
    assert out.shape == (1, 5)


def test_eos_token_id_may_be_a_list(echo):
    # Echo continues 4, 5, 6, 7, ...: stop at whichever eos comes first, then repeat it
    out = generate(echo, torch.tensor([[3], [5]]), 6, eos_token_id=[9, 6])
    assert out.tolist() == [[3, 4, 5, 6], [5, 6, 6, 6]]  # stops once every row has an eos
    assert generate(echo, torch.tensor([[3]]), 6, eos_token_id=(9, 6)).tolist() == [[3, 4, 5, 6]]
    assert generate(echo, torch.tensor([[3]]), 6, eos_token_id=[]).tolist() == [[3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("eos, error, match", [
    ("2", TypeError, "eos_token_id: expected an int, a list of ints or None, got '2'"),
    (2.0, TypeError, "eos_token_id: expected an int, a list of ints or None, got 2.0"),
    ([2, "3"], TypeError, r"eos_token_id: expected an int, a list of ints or None, got \[2, '3'\]"),
    ({2}, TypeError, r"eos_token_id: expected an int, a list of ints or None, got \{2\}"),
    ([2, 10], ValueError, r"eos_token_id: expected ids in 0..9 \(vocab_size 10\), got \[2, 10\]"),
])
def test_bad_eos_token_ids_are_named(echo, eos, error, match):
    with pytest.raises(error, match=match):
        generate(echo, torch.tensor([[1]]), 2, eos_token_id=eos)


def test_seeds_up_to_64_bits(echo):
    prompt = torch.tensor([[1]])
    generate(echo, prompt, 2, temperature=1.0, seed=2 ** 64 - 1)
    with pytest.raises(ValueError, match=r"seed: expected an int in 0..2\*\*64 - 1 \(a 64-bit seed\), got 18446744073709551616"):
        generate(echo, prompt, 2, temperature=1.0, seed=2 ** 64)
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        generate(echo, prompt, 2, temperature=1.0, seed=-1)


def test_on_token_sees_each_step(echo):
    seen = []
    out = generate(echo, torch.tensor([[1], [4]]), 3, on_token=lambda t: seen.append(t.tolist()))
    assert seen == [[2, 5], [3, 6], [4, 7]] and out[:, 1:].T.tolist() == seen
