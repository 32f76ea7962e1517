"""refimpl.pipeline: stages, PyTorch's pipeline schedules on 2 CPU processes (gloo) against the single-process
model in float64, and the dependency simulator against V3 Table 2's bubble formulas."""

import random

import pytest
import torch

from refimpl import pipeline as P
from refimpl.model import DeepSeekForCausalLM
from refimpl.pipeline import Op
from refimpl.train import tiny_config

SCHEDULES = P.available_schedules()


def _model(layers: int = 4, **overrides) -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    return DeepSeekForCausalLM(tiny_config(num_hidden_layers=layers, **overrides)).double()


@pytest.fixture(scope="module")
def trained():
    """Every schedule of this torch, 2 SGD steps on 2 ranks, in one launch (spawning costs seconds)."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (8, 17), generator=torch.Generator().manual_seed(1))
    return model, P.run_schedules(model, ids[:, :-1], ids[:, 1:], world_size=2, n_microbatches=4, steps=2)


def test_this_torch_has_every_schedule():
    assert SCHEDULES == list(P.SCHEDULES), f"torch {torch.__version__} lacks some: {SCHEDULES}"


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_equals_single_process_in_float64(trained, name):
    model, results = trained
    r = results[name]
    assert r.loss_error < 1e-12 and r.max_grad_error < 1e-12, r
    assert r.n_grads == sum(1 for p in model.parameters() if p.requires_grad)
    assert r.losses[1] < r.losses[0]  # the second step trained on the first step's update


def test_run_leaves_the_model_unchanged(trained):
    model, _ = trained
    fresh = _model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_compare_catches_a_wrong_gradient():
    losses = torch.tensor([1.0, 0.5], dtype=torch.float64)
    grads = {"a": torch.ones(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    ranks = [dict(losses=None, grads={"a": grads["a"]}, seconds=1.0),
             dict(losses=losses.clone(), grads={"b": grads["b"] + 1e-6}, seconds=2.0)]
    r = P.compare("x", ranks, losses, grads)
    assert r.max_grad_error == pytest.approx(1e-6) and r.loss_error == 0 and r.seconds == 2.0
    with pytest.raises(RuntimeError, match=r"gradients missing for \['b'\]"):
        P.compare("x", ranks[:1], losses, grads)
    with pytest.raises(RuntimeError, match="no rank reported the loss"):
        P.compare("x", [dict(ranks[0], grads=grads)], losses, grads)


def test_stages_chained_equal_the_model():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    x = ids
    stages = P.split_stages(model, 4)
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(ids), rtol=0, atol=1e-12)
    assert stages[0].layers[0] is model.model.layers[0]  # shared, not copied
    assert stages[0].lm_head is None and stages[-1].embed_tokens is None


def test_bad_splits_and_microbatches_are_refused_by_name():
    with pytest.raises(ValueError, match=r"n_stages: expected a divisor of num_hidden_layers \(4\), got 3"):
        P.split_stages(_model(), 3)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        P.split_stages(_model(tie_word_embeddings=True), 2)
    with pytest.raises(ValueError, match="at least as many micro-batches as stages"):
        P.check_microbatches("DualPipeV", 2, 8, 2)
    with pytest.raises(ValueError, match=r"n_microbatches: expected a divisor of the batch size \(8\), got 3"):
        P.check_microbatches("1F1B", 3, 8, 2)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        P.pipeline_order("Zigzag", 2, 4)
    model = _model()
    ids = torch.zeros(8, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="n_stages: expected a divisor"):  # 2 ranks x 2 stages of 6 layers
        P.run_schedules(_model(layers=6), ids, ids, schedules=["DualPipeV"], n_microbatches=4)
    with pytest.raises(ValueError, match="world_size: expected at most 4"):
        P.run_schedules(model, ids, ids, world_size=5)


# ------------------------------------------------------------------------------------------------ simulator
def _durations(seed: int) -> dict[str, float]:
    """Random durations with W no longer than F or I = B - W (as in real layers, where W is about I)."""
    rng = random.Random(seed)
    F, I = rng.uniform(0.5, 2), rng.uniform(0.5, 2.5)
    W = rng.uniform(0.1, min(F, I))
    return {"F": F, "B": I + W, "W": W, "F&B": rng.uniform(max(F, I + W), F + I + W)}


def _max_bubble(order, d) -> float:
    return max(P.bubble(P.simulate(order, d)).values())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pp, m", [(2, 2), (4, 8), (6, 13)])
def test_1f1b_and_gpipe_bubble_is_exactly_the_formula(seed, pp, m):
    d = _durations(seed)
    formula = P.bubble_formula("1F1B", pp, d["F"], d["B"], d["W"], d["F&B"])
    assert _max_bubble(P.pipeline_order("1F1B", pp, m), d) == pytest.approx(formula, abs=1e-9)
    assert _max_bubble(P.pipeline_order("GPipe", pp, m), d) == pytest.approx(formula, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (6, 13)])
def test_zb1p_bubble_is_exactly_the_formula(seed, pp, m):
    d = _durations(seed)
    formula = P.bubble_formula("ZB1P", pp, d["F"], d["B"], d["W"], d["F&B"])
    assert _max_bubble(P.zb1p_order(pp, m), d) == pytest.approx(formula, abs=1e-9)
    assert formula < P.bubble_formula("1F1B", pp, d["F"], d["B"], d["W"], d["F&B"])


def test_zb1p_formula_needs_w_no_longer_than_f():
    """A W longer than F no longer fits the gap it is postponed into: the bubble exceeds the formula."""
    d = {"F": 1.0, "B": 3.0, "W": 1.5, "F&B": 4.0}
    assert _max_bubble(P.zb1p_order(4, 8), d) > P.bubble_formula("ZB1P", 4, 1.0, 3.0, 1.5, 4.0) + 0.1


@pytest.mark.skipif("DualPipeV" not in SCHEDULES, reason="this torch has no ScheduleDualPipeV")
@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("F, FB", [(1.0, 2.0), (1.0, 2.6), (1.5, 4.5)])
def test_dualpipev_bubble_is_the_formula_when_f_i_w_are_equal(ranks, F, FB):
    """With F = I = W (a backward twice a forward, split evenly: the report's setting) and any overlap gain
    (B <= F&B <= F + B), the torch DualPipeV order's worst rank idles exactly (PP/2-1)(F&B+B-3W),
    PP = 2 x ranks; its overlapped actions are there (two ops in one slot). Other ratios move it
    (`test_dualpipev_departs_from_the_formula_otherwise`)."""
    d = {"F": F, "B": 2 * F, "W": F, "F&B": FB}
    order = P.pipeline_order("DualPipeV", ranks, 4 * ranks)
    assert any(len(a) == 2 for acts in order.values() for a in acts)
    assert _max_bubble(order, d) == pytest.approx(P.bubble_formula("DualPipeV", 2 * ranks, F, 2 * F, F, FB))


@pytest.mark.skipif("DualPipeV" not in SCHEDULES, reason="this torch has no ScheduleDualPipeV")
def test_dualpipev_departs_from_the_formula_otherwise():
    formula = P.bubble_formula("DualPipeV", 8, 1.0, 2.0, 0.8, 2.5)
    assert _max_bubble(P.pipeline_order("DualPipeV", 4, 16), {"F": 1.0, "B": 2.0, "W": 0.8, "F&B": 2.5}) \
        == pytest.approx(formula - 0.6)


def test_every_op_runs_once_after_its_inputs():
    d = _durations(0)
    order = P.pipeline_order("InterleavedZeroBubble", 4, 8)
    slots = P.simulate(order, d)
    ends = {(op.kind, op.stage, op.microbatch): s.end for s in slots for op in s.ops}
    n_ops = sum(len(a) for acts in order.values() for a in acts)
    assert len(ends) == n_ops == 8 * 8 * 3  # 8 stages x 8 micro-batches x (F, I, W)
    for s in slots:
        for op in s.ops:
            if op.kind == "F" and op.stage > 0:
                assert ends[("F", op.stage - 1, op.microbatch)] <= s.start


def test_a_deadlocked_order_is_refused():
    order = {0: [(Op("B", 0, 0),), (Op("F", 0, 0),)], 1: [(Op("F", 1, 0),), (Op("B", 1, 0),)]}
    with pytest.raises(ValueError, match="deadlock"):
        P.simulate(order, {"F": 1, "B": 2, "W": 1, "F&B": 3})
