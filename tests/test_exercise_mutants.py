"""The mutant corpus (issue 22): wrong answers that a learner writes must fail the visible check and lose hidden
points at every seed tried, and the right answers must pass both.

Mutants: the common mistakes each question names (`exercises.questions.MISTAKES`, whose message the visible check
must print) and the answers in tests/exercise_mutants/ (plain PyTorch and Triton). The hidden cases are compared
here, in-process, with exercises.compare (as the grader compares what the sandbox sends back), each call under
the question's memory budget as the sandbox's memory limit would refuse the naive MLA path.
"""

import sys
from pathlib import Path

import pytest

from exercises import feedback
from exercises.questions import QUESTIONS

sys.path.insert(0, str(Path(__file__).parent))
from exercise_mutants import answers, flash, kernels, report  # noqa: E402
from exercise_mutants.corpus import MUTANTS, SEEDS, hidden_units_lost, values_only, visible_message  # noqa: E402

KERNEL_HINTS = {("softmax_rows", "no max subtracted"): "did not subtract the row max",
                ("softmax_rows", "masked lanes loaded as 0.0"): "loaded the masked lanes as 0.0",
                ("mla_decode_block", "no tail mask on the scores"): "did not mask the positions past kv_len",
                ("mla_decode_block", "no scale"): "left out the scale", **flash.HINTS}


@pytest.mark.parametrize("name, what, fn, hint", MUTANTS, ids=[f"{m[0]}: {m[1]}" for m in MUTANTS])
def test_mutant_fails_the_visible_check_and_loses_hidden_points(name, what, fn, hint):
    message = visible_message(name, fn)
    assert message is not None and message.startswith(f"{name} fails the visible"), message
    hint = hint or KERNEL_HINTS.get((name, what))
    if hint and not (QUESTIONS[name].memory_budget_mb and "ran out of memory" in message):  # the rule names it
        assert f"this is the answer you get if you {hint}" in message, message
    assert [s for s in SEEDS if hidden_units_lost(name, fn, s)[0]] == list(SEEDS)


@pytest.mark.parametrize("name, fn", kernels.RIGHT_ANSWERS + flash.RIGHT_ANSWERS,
                         ids=[n for n, _ in kernels.RIGHT_ANSWERS + flash.RIGHT_ANSWERS])
def test_right_kernels_pass_the_visible_and_the_hidden_cases(name, fn):
    with values_only(name):
        feedback.check(name, fn)
    assert not [s for s in SEEDS if hidden_units_lost(name, fn, s)[0]]


def test_the_report_lists_every_wrong_answer_of_the_issue():
    """Each wrong answer issue 22 lists (and the dense torch.where moe_forward, the naive mla_absorbed) is in the
    corpus (report.ISSUE_ANSWERS names them; a missing one raises)."""
    rows = report.selected()
    assert len(rows) == len(report.ISSUE_ANSWERS) == 18


def test_naive_mla_is_told_it_ran_out_of_memory():
    with pytest.raises(AssertionError, match=r"mla_absorbed fails the visible \d case.*ran out of memory"):
        feedback.check("mla_absorbed", answers.mla_absorbed_naive)


def test_check_names_the_learners_line_and_a_failing_earlier_function():
    def causal_sdpa(q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v  # no scale (and no mask)

    def decode_step(q, k_new, v_new, cache_k, cache_v, pos):
        cache_k[:, :, pos:pos + 1], cache_v[:, :, pos:pos + 1] = k_new, v_new
        return causal_sdpa(q, cache_k[:, :, :pos + 1], cache_v[:, :, :pos + 1])

    with pytest.raises(AssertionError, match="it calls your causal_sdpa, which fails its own check"):
        feedback.check("decode_step", decode_step)

    def rope_interleaved(x, cos, sin):
        pairs = x.view(*x.shape[:-1], 2, -1)
        return pairs[..., 0, :] * cos  # drops half the coordinates, multiplies by cos only

    with pytest.raises(AssertionError, match=r"raised RuntimeError.*\(line \d+ of your code in rope_interleaved: "
                                             r"`return pairs\[\.\.\., 0, :\] \* cos"):
        feedback.check("rope_interleaved", lambda x, cos, sin: rope_interleaved(x, cos[:1].expand(3, -1), sin))


def test_routing_message_reports_experts_in_the_learners_order():
    def route_topk(gate, x):
        scores = (x @ gate.weight.T).softmax(dim=-1)
        weight, idx = scores.topk(gate.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True) if gate.norm_topk_prob else weight
        weight[:, 0] += 0.5  # wrong in the learner's first slot
        return idx, weight * gate.routed_scaling_factor

    with pytest.raises(AssertionError, match=r"element 1 of the result is wrong at index \(0, 0\)"):
        feedback.check("route_topk", route_topk)


def test_merge_splits_reference_is_attention_over_the_whole_cache():
    import torch

    from exercises.questions import _split_ref
    from refimpl.attention import scaled_dot_product_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (1, 11, 11))
    scores = (q @ k.transpose(-2, -1))[:, :, 0] * 8 ** -0.5  # [b, h, 11]
    parts = [(s, val) for s, val in zip(scores.split([4, 0, 7], -1), v.split([4, 0, 7], -2))]
    lses = torch.stack([s.logsumexp(-1) for s, _ in parts])
    outs = torch.stack([(s.softmax(-1)[..., None] * val).sum(-2) for s, val in parts])  # empty part: zeros
    whole = scaled_dot_product_attention(q, k, v)[:, :, 0]
    assert torch.allclose(_split_ref(outs.float(), lses.float()).double(), whole, atol=1e-6)


def test_flash_kernel_must_walk_the_keys_in_tiles(tmp_path, monkeypatch):
    """13_flash_kernel's rule: tiles only of BLOCK_M, BLOCK_N, HEAD_DIM. The notebook's kernel passes; the same
    kernel holding a row of 512 scores (an arange, a shape), or growing a tile with tl.cat, is refused by grading
    and by the check."""
    import importlib

    from exercises import assignments, grade, static_check
    from exercises.contracts import CONTRACTS

    contract = CONTRACTS["flash_attention_fwd"]
    cells = grade.read_cells(assignments.load("13_flash_kernel").path)
    source = next(c for c in cells if "def flash_fwd_kernel" in c)
    static_check.kernel_source([source], contract, ())
    whole_row = source.replace("tl.arange(0, BLOCK_N)", "tl.arange(0, 512)")
    grown = source.replace("d = tl.arange(0, HEAD_DIM)", "d = tl.cat(tl.arange(0, HEAD_DIM), tl.arange(0, HEAD_DIM))")
    row_sum = source.replace("tl.zeros([BLOCK_M], dtype", "tl.zeros([BLOCK_M, 512], dtype")
    for wrong, what in ((whole_row, r"tl\.arange\(0, 512\)"), (grown, r"uses tl\.cat"),
                        (row_sum, r"shape \[BLOCK_M, 512\]")):
        assert wrong != source
        with pytest.raises(static_check.KernelRefused, match=what):
            static_check.kernel_source([wrong], contract, ())
    (tmp_path / "whole_row.py").write_text("import torch\nimport triton\nimport triton.language as tl\n\n\n" + whole_row
                                           + "\n\ndef flash_attention_fwd(q, k, v, is_causal):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("whole_row")
    with pytest.raises(AssertionError, match=r"grading refuses your kernel: .*tl.arange\(0, 512\)"):
        feedback.check("flash_attention_fwd", module.flash_attention_fwd)
