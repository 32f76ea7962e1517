"""refimpl.moe against transformers' DeepSeek-V2/V3 routers and MoE layers, a naive per-token loop, and
balance losses worked out by hand."""

import warnings

import pytest
import torch
from torch.func import functional_call

from refimpl.config import ModelConfig
from refimpl.moe import (MLP, DeepSeekMoE, Router, Routing, combine, communication_balance_loss,
                         device_balance_loss, dispatch, expert_balance_loss, expert_load, run_experts,
                         sequence_balance_loss, update_bias)

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

BASE = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=6,
            routed_scaling_factor=1.5)

V2_CASES = {
    "v2-greedy": dict(scoring_func="softmax", topk_method="greedy"),
    "v2-group-limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2),
}
V3_CASES = {
    "v3-groups-norm": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                           norm_topk_prob=True),
    "v3-groups-nonorm": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2),
    "v3-nogroup-norm": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True),
}
HF_KEYS = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
           "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "topk_method")


def _config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def _hf_config(cfg: ModelConfig):
    kind = "v3" if cfg.topk_method == "noaux_tc" else "v2"
    kwargs = {k: getattr(cfg, k) for k in HF_KEYS if not (kind == "v3" and k == "topk_method")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
        return kind, cls(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu",
                         **kwargs)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights larger than the default init (routing far from ties) and a nonzero correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _by_expert(topk_idx, topk_weight):
    """Sort each token's experts by index (top-k order is not part of the result)."""
    idx, order = topk_idx.sort(dim=-1)
    return idx, topk_weight.gather(1, order)


def _x(tokens=64, hidden=16, seed=1, dtype=torch.float32):
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ router
@pytest.mark.parametrize("case", sorted(V2_CASES) + sorted(V3_CASES))
def test_router_equals_transformers(case):
    cfg = _config(**{**V2_CASES, **V3_CASES}[case])
    kind, hf_cfg = _hf_config(cfg)
    hf = (hf_v3.DeepseekV3TopkRouter if kind == "v3" else hf_v2.DeepseekV2TopkRouter)(hf_cfg)
    _randomize(hf, seed=0)
    ours = Router(cfg)
    ours.load_state_dict(hf.state_dict())  # same names: weight (+ e_score_correction_bias)
    if kind == "v3":
        assert ours.e_score_correction_bias.abs().min() > 0
    x = _x()
    _, hf_weight, hf_idx = hf(x)
    routing = ours(x)
    idx, weight = _by_expert(routing.topk_idx, routing.topk_weight)
    hf_idx, hf_weight = _by_expert(hf_idx, hf_weight)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(weight, hf_weight, atol=1e-6, rtol=1e-6)
    logits = x @ ours.weight.T
    expected_scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    torch.testing.assert_close(routing.scores, expected_scores)
    assert routing.topk_idx.dtype == torch.int64 and routing.scores.dtype == torch.float32


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_v2_router_honours_norm_topk_prob(case):
    """transformers' V2 router ignores norm_topk_prob; ours normalizes: its weights / their sum * scaling."""
    cfg = _config(**V2_CASES[case], norm_topk_prob=True)
    hf = hf_v2.DeepseekV2TopkRouter(_hf_config(cfg)[1])
    _randomize(hf, seed=2)
    ours = Router(cfg)
    ours.load_state_dict(hf.state_dict())
    x = _x(seed=3)
    _, hf_weight, hf_idx = hf(x)
    routing = ours(x)
    idx, weight = _by_expert(routing.topk_idx, routing.topk_weight)
    hf_idx, hf_weight = _by_expert(hf_idx, hf_weight)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(weight, hf_weight / hf_weight.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    torch.testing.assert_close(weight.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


def test_dropped_groups_are_masked_to_minus_inf_not_zero():
    """With a negative correction bias every choice score is negative: a dropped group masked to 0 would win."""
    cfg = _config(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, scoring_func="sigmoid",
                  topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()  # every score sigmoid(0) = 0.5
        router.e_score_correction_bias.copy_(torch.tensor([-2.0, -2.2, -3.0, -3.1]))
    x = torch.randn(5, 4)
    choice = torch.full((5, 4), 0.5) + router.e_score_correction_bias  # [-1.5, -1.7, -2.5, -2.6]
    # group {0, 1} has the larger top-2 sum (-3.2 > -5.1) and is kept; masking the other group with 0.0 ...
    zero_masked = choice.masked_fill(torch.tensor([False, False, True, True]), 0.0)
    assert set(zero_masked.topk(2).indices[0].tolist()) == {2, 3}  # ... would pick the dropped group
    routing = router(x)
    assert (routing.topk_idx.sort(-1).values == torch.tensor([0, 1])).all()
    torch.testing.assert_close(routing.topk_weight, torch.full((5, 2), 0.75))  # 0.5 / (0.5 + 0.5) * 1.5


def test_bias_chooses_but_weights_are_unbiased_scores():
    cfg = _config(scoring_func="sigmoid", topk_method="noaux_tc", routed_scaling_factor=2.0)
    router = Router(cfg)
    x = _x(seed=4)
    unbiased = router(x).topk_idx
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0  # expert 5 now wins every token's choice
    routing = router(x)
    assert (routing.topk_idx == 5).any(-1).all() and not (unbiased == 5).any(-1).all()
    scores = (x @ router.weight.T).sigmoid()
    torch.testing.assert_close(routing.scores, scores)
    torch.testing.assert_close(routing.topk_weight, 2.0 * scores.gather(1, routing.topk_idx))  # no bias in it
    assert (routing.topk_weight < 2.0).all()  # a weight with the bias of 10 in it would be above 20


def test_router_float64_input_is_computed_in_float64():
    router = Router(_config(scoring_func="sigmoid", topk_method="noaux_tc")).double()
    x = _x(dtype=torch.float64)
    routing = router(x)
    assert routing.scores.dtype == routing.topk_weight.dtype == torch.float64
    torch.testing.assert_close(routing.scores, (x @ router.weight.T).sigmoid(), atol=1e-15, rtol=1e-15)


# ------------------------------------------------------------------------------------------------ the layer
def _naive_moe(moe: DeepSeekMoE, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
    """For each token: shared(x) + sum over its experts of weight * expert(x)."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    rows = []
    for t in range(x.shape[0]):
        y = moe.shared_experts(x[t]) if moe.shared_experts is not None else torch.zeros_like(x[t])
        for j in range(routing.topk_idx.shape[1]):
            y = y + routing.topk_weight[t, j] * moe.experts[int(routing.topk_idx[t, j])](x[t])
        rows.append(y)
    return torch.stack(rows).view_as(hidden_states)


@pytest.mark.parametrize("case", ["v2-group-limited", "v3-groups-norm", "no-shared"])
def test_moe_equals_naive_per_token_loop(case):
    overrides = {**V2_CASES, **V3_CASES}.get(case, dict(n_shared_experts=0))
    moe = DeepSeekMoE(_config(**overrides)).double()
    _randomize(moe, seed=5)
    assert (moe.shared_experts is None) == (case == "no-shared")
    hidden_states = torch.randn(2, 7, 16, dtype=torch.float64)
    out = moe(hidden_states)
    routing = moe.last_routing
    assert routing.topk_idx.shape == (14, 3) and routing.scores.shape == (14, 8)
    torch.testing.assert_close(routing.topk_idx, moe.gate(hidden_states.view(14, 16)).topk_idx)
    torch.testing.assert_close(out, _naive_moe(moe, hidden_states, routing), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", ["v2-greedy", "v2-group-limited", "v3-groups-norm", "v3-nogroup-norm"])
def test_moe_equals_transformers(case):
    cfg = _config(**{**V2_CASES, **V3_CASES}[case])
    kind, hf_cfg = _hf_config(cfg)
    hf = (hf_v3.DeepseekV3MoE if kind == "v3" else hf_v2.DeepseekV2Moe)(hf_cfg)
    _randomize(hf, seed=6)
    ours = DeepSeekMoE(cfg)
    I = cfg.moe_intermediate_size
    with torch.no_grad():  # transformers fuses the experts: gate_up_proj [E, 2I, H] = cat(gate, up), down [E, H, I]
        ours.gate.load_state_dict(hf.gate.state_dict())
        ours.shared_experts.load_state_dict(hf.shared_experts.state_dict())
        for e, expert in enumerate(ours.experts):
            expert.gate_proj.weight.copy_(hf.experts.gate_up_proj[e, :I])
            expert.up_proj.weight.copy_(hf.experts.gate_up_proj[e, I:])
            expert.down_proj.weight.copy_(hf.experts.down_proj[e])
    hidden_states = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden_states), hf(hidden_states), atol=1e-5, rtol=1e-5)


def test_state_dict_names_are_the_checkpoint_names():
    names = set(DeepSeekMoE(_config(scoring_func="sigmoid", topk_method="noaux_tc")).state_dict())
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.7.down_proj.weight",
            "shared_experts.up_proj.weight"} <= names
    assert "gate.e_score_correction_bias" not in DeepSeekMoE(_config()).state_dict()
    shared = DeepSeekMoE(_config(n_shared_experts=2)).shared_experts  # two experts fused into one of width 2 * 6
    assert shared.gate_proj.weight.shape == (12, 16) and shared.down_proj.weight.shape == (16, 12)


def test_mlp_is_swiglu():
    mlp = MLP(5, 7).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


@pytest.mark.parametrize("case", ["v2-greedy", "v3-groups-norm"])
def test_gradcheck_moe(case):
    routing = {**V2_CASES, **V3_CASES}[case] | ({"n_group": 2, "topk_group": 1} if "groups" in case else {})
    cfg = _config(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=3,
                  n_shared_experts=1, **routing)
    moe = DeepSeekMoE(cfg).double()
    _randomize(moe, seed=8)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    w = moe.gate.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: functional_call(moe, {"gate.weight": w}, (x,)), (x, w))
    moe(x).sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # the router learns through topk_weight


def test_last_routing_carries_the_graph_for_the_balance_loss():
    moe = DeepSeekMoE(_config())
    moe(torch.randn(2, 4, 16))
    r = moe.last_routing
    expert_balance_loss(r.scores, r.topk_idx, 8, alpha=0.01).backward()
    assert moe.gate.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_combine_round_trip():
    g = torch.Generator().manual_seed(9)
    tokens, k, n_experts = 10, 3, 6
    topk_idx = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(tokens)])  # expert 5 never used
    x = torch.randn(tokens, 4, generator=g, dtype=torch.float64)
    x_sorted, token_idx, sort_order, counts = dispatch(x, topk_idx, n_experts)
    assert x_sorted.shape == (tokens * k, 4) and counts[5] == 0
    assert torch.equal(counts.double(), expert_load(topk_idx, n_experts).double())
    expert_of_row = topk_idx.flatten()[sort_order]
    assert torch.equal(expert_of_row, torch.repeat_interleave(torch.arange(n_experts), counts))  # contiguous blocks
    for block in token_idx.split(counts.tolist()):
        assert torch.equal(block, block.sort().values)  # stable: tokens in order within a block
    assert all(int(e) in topk_idx[t].tolist() for e, t in zip(expert_of_row, token_idx))
    torch.testing.assert_close(x_sorted, x[token_idx], atol=0, rtol=0)
    ones = torch.ones(tokens, k, dtype=torch.float64)
    torch.testing.assert_close(combine(x_sorted, token_idx, sort_order, ones, tokens), k * x)
    experts = torch.nn.ModuleList(MLP(4, 2).double() for _ in range(n_experts))
    out = run_experts(experts, x_sorted, counts)  # the empty block of expert 5 is fine
    torch.testing.assert_close(out[:3], experts[0](x_sorted[:3]))


# ------------------------------------------------------------------------------------------------ balance
def test_expert_balance_loss_is_alpha_for_balanced_routing_and_uniform_scores():
    # f_i = N / (K T) * K T / N = 1 and P_i = 1 / N, so alpha * sum_i f_i P_i = alpha
    topk_idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])  # every expert twice: T = 4, K = 2, N = 4
    scores = torch.full((4, 4), 0.25)
    torch.testing.assert_close(expert_balance_loss(scores, topk_idx, 4, alpha=0.3), torch.tensor(0.3))


def test_expert_balance_loss_by_hand_and_its_gradient():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]], requires_grad=True)
    topk_idx = torch.tensor([[0], [0]])  # both tokens on expert 0: f = 4 / (1 * 2) * [2, 0, 0, 0] = [4, 0, 0, 0]
    loss = expert_balance_loss(scores, topk_idx, 4, alpha=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 4 * 0.6))  # P_0 = 0.6
    loss.backward()  # dL/ds_{i,t} = alpha * f_i / T
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))


def test_expert_balance_loss_equals_deepseek_v2_formulation():
    scores = torch.rand(20, 8).softmax(-1)
    topk_idx = scores.topk(3).indices
    fi = torch.nn.functional.one_hot(topk_idx.view(-1), 8).float().mean(0) * 8  # DeepSeek-V2's released code
    torch.testing.assert_close(expert_balance_loss(scores, topk_idx, 8, 0.1), (fi * scores.mean(0)).sum() * 0.1)


def test_device_balance_loss_by_hand():
    # devices {0, 1}, {2, 3}; counts [2, 1, 1, 0]; f = 4 / (2 * 2) * counts = [2, 1, 1, 0]; f' = [1.5, 0.5]
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.1, 0.4, 0.1]])  # P = [0.4, 0.2, 0.3, 0.1], P' = [0.6, 0.4]
    topk_idx = torch.tensor([[0, 1], [0, 2]])
    torch.testing.assert_close(device_balance_loss(scores, topk_idx, 4, 2, alpha=2.0),
                               torch.tensor(2.0 * (1.5 * 0.6 + 0.5 * 0.4)))
    # one expert per device: the device loss is the expert loss
    torch.testing.assert_close(device_balance_loss(scores, topk_idx, 4, 4, 2.0),
                               expert_balance_loss(scores, topk_idx, 4, 2.0))


def test_communication_balance_loss_by_hand():
    # 6 experts on D = 3 devices {0, 1}, {2, 3}, {4, 5}; each token may reach M = 2 devices.
    # token 0 -> experts 0, 1: device 0 only (sent once, not twice); token 1 -> experts 0, 4: devices 0, 2
    scores = torch.tensor([[0.3, 0.3, 0.1, 0.1, 0.1, 0.1], [0.4, 0.0, 0.1, 0.1, 0.4, 0.0]], requires_grad=True)
    topk_idx = torch.tensor([[0, 1], [0, 4]])
    # received tokens [2, 0, 1] -> f'' = 3 / (2 * 2) * [2, 0, 1] = [1.5, 0, 0.75]; P'' = [0.5, 0.2, 0.3]
    loss = communication_balance_loss(scores, topk_idx, 6, 3, 2, alpha=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.1 * (1.5 * 0.5 + 0.75 * 0.3)))
    loss.backward()  # dL/ds_{i,t} = alpha * f''_{device of i} / T
    torch.testing.assert_close(scores.grad, torch.tensor([[0.075, 0.075, 0, 0, 0.0375, 0.0375]] * 2))


def test_communication_balance_loss_is_alpha_when_every_device_receives_M_T_over_D():
    # D = 4 devices of 2 experts, M = 2, T = 4 tokens, each sent to 2 devices, each device receiving 2 tokens:
    # f'' = 4 / (2 * 4) * 2 = 1 on every device, and P'' sums to 1 for softmax scores, so the loss is alpha
    topk_idx = torch.tensor([[0, 2], [3, 5], [4, 7], [6, 1]])  # devices {0, 1}, {1, 2}, {2, 3}, {3, 0}
    scores = torch.randn(4, 8).softmax(-1)
    torch.testing.assert_close(communication_balance_loss(scores, topk_idx, 8, 4, 2, 0.3), torch.tensor(0.3))
    # one expert per device and M = K: a token reaches K devices, and the loss is the expert-level one
    topk_idx = scores.topk(2).indices
    torch.testing.assert_close(communication_balance_loss(scores, topk_idx, 8, 8, 2, 0.3),
                               expert_balance_loss(scores, topk_idx, 8, 0.3))


def test_sequence_balance_loss_by_hand():
    # sequence 0: s' = [[.75, .25], [.5, .5]], P = [.625, .375], both tokens on expert 0: f = [2, 0] -> 1.25
    # sequence 1: s' = [[.5, .5], [.9, .1]], P = [.7, .3], one token each: f = [1, 1] -> 1.0
    scores = torch.tensor([[0.6, 0.2], [0.2, 0.2], [0.5, 0.5], [0.9, 0.1]])
    topk_idx = torch.tensor([[0], [0], [0], [1]])
    loss = sequence_balance_loss(scores, topk_idx, 2, alpha=0.1, batch_size=2, seq_len=2)
    torch.testing.assert_close(loss, torch.tensor(0.1 * (1.25 + 1.0) / 2))
    # one sequence of 4 tokens is a different loss (f = [1.5, 0.5], P = [.6625, .3375]): the split matters
    whole = sequence_balance_loss(scores, topk_idx, 2, alpha=0.1, batch_size=1, seq_len=4)
    torch.testing.assert_close(whole, torch.tensor(0.1 * (1.5 * 0.6625 + 0.5 * 0.3375)))


def test_sequence_balance_loss_of_one_softmax_sequence_is_the_expert_loss():
    scores = torch.randn(12, 8).softmax(-1)
    topk_idx = scores.topk(2).indices
    torch.testing.assert_close(sequence_balance_loss(scores, topk_idx, 8, 0.2, batch_size=1, seq_len=12),
                               expert_balance_loss(scores, topk_idx, 8, 0.2))


def test_update_bias_moves_by_exactly_gamma():
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0])
    start = bias.clone()
    load = torch.tensor([10.0, 2.0, 5.0, 3.0])  # mean 5: overloaded, under, even, under
    out = update_bias(bias, load, gamma=0.001)
    assert out is bias  # in place
    assert torch.equal(bias, start + torch.tensor([-0.001, 0.001, 0.0, 0.001]))


def test_expert_load_counts():
    assert torch.equal(expert_load(torch.tensor([[0, 2], [2, 3]]), 5), torch.tensor([1.0, 0, 2, 1, 0]))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides, field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
])
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_router_rejects_configs_it_cannot_route():
    with pytest.raises(ValueError, match="n_routed_experts"):
        Router(_config(n_routed_experts=None))
    with pytest.raises(ValueError, match="n_group.*top-2"):  # groups of one expert have no top-2
        Router(_config(n_routed_experts=4, num_experts_per_tok=2, topk_method="noaux_tc", n_group=4, topk_group=2))


@pytest.fixture(scope="module")
def moe():
    return DeepSeekMoE(_config())


@pytest.mark.parametrize("hidden_states, error, match", [
    (torch.randn(2, 3, 15), ValueError, "hidden_states.*last dimension 16"),
    (torch.randn(6, 16), ValueError, "hidden_states.*3-d"),
    (torch.randn(2, 3, 16, dtype=torch.float64), TypeError, "hidden_states.*float32"),
    (torch.ones(2, 3, 16, dtype=torch.int64), TypeError, "hidden_states.*floating"),
    ([[1.0] * 16], TypeError, "hidden_states.*torch.Tensor"),
])
def test_moe_forward_bad_input(moe, hidden_states, error, match):
    with pytest.raises(error, match=match):
        moe(hidden_states)


def test_router_forward_bad_input(moe):
    with pytest.raises(ValueError, match="x.*2-d"):
        moe.gate(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="x.*last dimension 16"):
        moe.gate(torch.randn(2, 8))


def test_update_bias_bad_input():
    with pytest.raises(ValueError, match="load.*expected shape \\(4,\\)"):
        update_bias(torch.zeros(4), torch.zeros(5), 0.1)
    with pytest.raises(ValueError, match="bias.*1-d"):
        update_bias(torch.zeros(2, 4), torch.zeros(2, 4), 0.1)


def test_balance_and_dispatch_bad_input():
    scores, topk_idx = torch.rand(4, 6), torch.tensor([[0, 1]] * 4)
    with pytest.raises(ValueError, match="topk_idx.*\\[0, 6\\).*7"):
        expert_load(torch.tensor([[0, 7]]), 6)
    with pytest.raises(TypeError, match="topk_idx.*int64"):
        expert_balance_loss(scores, topk_idx.int(), 6, 0.1)
    with pytest.raises(ValueError, match="scores.*8.*got \\(4, 6\\)"):
        expert_balance_loss(scores, topk_idx, 8, 0.1)
    with pytest.raises(ValueError, match="topk_idx.*\\(4, .*got \\(3, 2\\)"):
        expert_balance_loss(scores, topk_idx[:3], 6, 0.1)
    with pytest.raises(ValueError, match="n_group.*divisor"):
        device_balance_loss(scores, topk_idx, 6, 4, 0.1)
    with pytest.raises(ValueError, match="n_group.*divisor"):
        communication_balance_loss(scores, topk_idx, 6, 4, 1, 0.1)
    with pytest.raises(ValueError, match="topk_group.*at most n_group \\(3\\).*got 4"):
        communication_balance_loss(scores, topk_idx, 6, 3, 4, 0.1)
    with pytest.raises(ValueError, match="topk_idx.*\\[0, 6\\).*6"):
        communication_balance_loss(scores, topk_idx + 5, 6, 3, 1, 0.1)
    with pytest.raises(TypeError, match="topk_group.*int"):
        communication_balance_loss(scores, topk_idx, 6, 3, 1.0, 0.1)
    with pytest.raises(ValueError, match="scores.*batch_size \\* seq_len"):
        sequence_balance_loss(scores, topk_idx, 6, 0.1, batch_size=3, seq_len=2)
    with pytest.raises(ValueError, match="topk_idx.*\\(4, .*got \\(2, 2\\)"):
        dispatch(torch.randn(4, 3), topk_idx[:2], 6)
    with pytest.raises(ValueError, match="counts.*sum to the 8 rows"):
        run_experts(torch.nn.ModuleList(MLP(3, 2) for _ in range(2)), torch.randn(8, 3), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="counts.*\\(2,\\)"):
        run_experts(torch.nn.ModuleList(MLP(3, 2) for _ in range(2)), torch.randn(8, 3), torch.tensor([8]))
    with pytest.raises(ValueError, match="sort_order.*\\(8,\\)"):
        combine(torch.randn(8, 3), torch.arange(8), torch.arange(6), torch.ones(4, 2), 4)


# ------------------------------------------------------------------------------------------------ routing precision
def _v3_router_config(**overrides) -> ModelConfig:
    return _config(**{**dict(n_routed_experts=2, num_experts_per_tok=1, scoring_func="sigmoid",
                             topk_method="noaux_tc", norm_topk_prob=True), **overrides})


@pytest.mark.parametrize("cast", ["to(bfloat16)", "bfloat16()", "half()", "to(float8)"])
def test_router_stays_float32_under_dtype_casts(cast):
    """Released V3 biases sit near 5, where bfloat16 steps by 1/32: 5.0 and 5.01 would merge into 5.0 and the
    tie would go to expert 0. With equal scores (gate weight 0) the bias alone must pick expert 1."""
    router = Router(_v3_router_config())
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.copy_(torch.tensor([5.0, 5.01]))
    cast_it = {"to(bfloat16)": lambda m: m.to(torch.bfloat16), "bfloat16()": lambda m: m.bfloat16(),
               "half()": lambda m: m.half(), "to(float8)": lambda m: m.to(torch.float8_e4m3fn)}[cast]
    router = cast_it(router)
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[1].item() == torch.tensor(5.01).item()  # not rounded on the way
    routing = router(torch.randn(3, 16).to(torch.bfloat16))
    assert routing.topk_idx.flatten().tolist() == [1, 1, 1]
    assert routing.topk_weight.dtype == torch.float32


def test_router_loads_a_float32_checkpoint_into_a_bfloat16_model_exactly():
    state = {"weight": torch.zeros(2, 16), "e_score_correction_bias": torch.tensor([5.0, 5.01])}
    router = Router(_v3_router_config()).to(torch.bfloat16)
    router.load_state_dict(state)
    assert torch.equal(router.e_score_correction_bias, state["e_score_correction_bias"])
    assert router(torch.randn(2, 16, dtype=torch.bfloat16)).topk_idx.flatten().tolist() == [1, 1]
    assigned = Router(_v3_router_config())
    assigned.load_state_dict({k: v.bfloat16() for k, v in state.items()}, assign=True)  # a bfloat16 file
    assert assigned.weight.dtype == assigned.e_score_correction_bias.dtype == torch.float32


def test_router_is_float32_under_a_bfloat16_default_dtype_and_meta_init():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        router = Router(_v3_router_config())
        with torch.device("meta"):
            meta = DeepSeekMoE(_v3_router_config())
    finally:
        torch.set_default_dtype(previous)
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    meta.to_empty(device="cpu")  # what loading a big checkpoint does: build on meta, allocate, then load
    assert meta.gate.weight.device.type == "cpu" and meta.gate.weight.dtype == torch.float32
    assert meta.experts[0].gate_proj.weight.dtype == torch.bfloat16
    assert meta.gate.e_score_correction_bias.dtype == torch.float32


def test_router_follows_device_moves_and_float64_casts():
    router = Router(_v3_router_config()).double()
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float64  # wider is exact
    router = router.float().to("cpu").to(torch.bfloat16)
    assert router.weight.dtype == torch.float32 and router.weight.device.type == "cpu"


def test_bfloat16_model_routes_like_float32_and_its_bias_update_is_exact():
    """A tiny DeepSeek model cast to bfloat16: router float32, choices follow a 0.01 bias spread near 5, and
    one bias step of 1e-3 around 0.5 (bfloat16's step there is 1/256) is applied exactly."""
    from refimpl.model import DeepSeekForCausalLM
    from refimpl.train import tiny_config

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(num_hidden_layers=2)).to(torch.bfloat16)
    gate = model.moe_layers()[0].gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        gate.weight.zero_()
        gate.e_score_correction_bias.copy_(5.0 + 0.01 * torch.arange(8))  # in bfloat16: 5.0, 5.0, 5.0, 5.03, ...
    model(torch.randint(0, 257, (2, 5)))
    routing = model.moe_layers()[0].last_routing
    assert (routing.topk_idx.sort(-1).values == torch.tensor([6, 7])).all()

    bias = gate.e_score_correction_bias
    with torch.no_grad():
        bias.fill_(0.5)
    update_bias(bias, torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6]), gamma=1e-3)  # mean load 2
    expected = torch.tensor([0.499] + [0.501] * 6 + [0.499])
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-7)


def test_update_bias_refuses_a_bfloat16_bias():
    with pytest.raises(TypeError, match="bias: expected a float32 or float64 tensor .* got dtype torch.bfloat16"):
        update_bias(torch.full((4,), 0.5, dtype=torch.bfloat16), torch.tensor([3.0, 1, 0, 0]), gamma=1e-3)


# ------------------------------------------------------------------------------------------------ top-1, no tokens
def test_top1_softmax_weight_is_not_normalized_to_one():
    """DeepSeek's released gate normalizes only when top_k > 1: with k = 1 the gate is the expert's score
    times routed_scaling_factor, not a constant routed_scaling_factor."""
    cfg = _config(hidden_size=4, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                  scoring_func="softmax", topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=2.0)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))  # logits = x
    routing = router(torch.tensor([[1.0, 0.2, -0.5, 0.3]]))
    assert routing.topk_idx.tolist() == [[0]]
    assert routing.topk_weight.item() == pytest.approx(0.922065, abs=1e-6)  # 2 * softmax([1, .2, -.5, .3])[0]


def test_top1_sigmoid_weight_is_the_scaled_score():
    cfg = _v3_router_config(hidden_size=4, n_routed_experts=4, routed_scaling_factor=2.5)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    routing = router(torch.tensor([[1.0, 0.2, -0.5, 0.3]]))
    assert routing.topk_weight.item() == pytest.approx(2.5 * torch.tensor(1.0).sigmoid().item(), abs=1e-6)


@pytest.mark.parametrize("case", sorted(V2_CASES) + sorted(V3_CASES))
def test_no_tokens_give_an_empty_routing_and_output(case):
    cfg = _config(**{**V2_CASES, **V3_CASES}[case])
    moe = DeepSeekMoE(cfg)
    routing = moe.gate(torch.zeros(0, 16))
    assert routing.topk_idx.shape == routing.topk_weight.shape == (0, 3) and routing.scores.shape == (0, 8)
    assert routing.topk_idx.dtype == torch.int64
    assert moe(torch.zeros(0, 4, 16)).shape == (0, 4, 16) and moe(torch.zeros(2, 0, 16)).shape == (2, 0, 16)


def test_balance_losses_of_no_tokens_are_zero():
    scores, topk_idx = torch.zeros(0, 8), torch.zeros(0, 3, dtype=torch.int64)
    assert expert_balance_loss(scores, topk_idx, 8, alpha=0.1).item() == 0.0
    assert device_balance_loss(scores, topk_idx, 8, 4, alpha=0.1).item() == 0.0
    assert sequence_balance_loss(scores, topk_idx, 8, 0.1, batch_size=0, seq_len=5).item() == 0.0
    assert communication_balance_loss(scores, topk_idx, 8, 4, 2, alpha=0.1).item() == 0.0
