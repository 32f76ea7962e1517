"""refimpl.expert_parallel against the single-process DeepSeekMoE, on 2 and 4 CPU ranks (gloo, spawned
processes): outputs, the gradients of every weight and of the input, and the bytes each rank sends.

Each world size is one group of spawned processes that runs every case (spawning costs seconds, the cases
milliseconds) and saves its results; the tests compare them with the single-process layer. A rank that fails
or hangs (a collective waiting for a rank that never comes) fails the tests after `TIMEOUT_S`, never hangs CI.
"""

import datetime
import os
import socket
import time
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refimpl.config import ModelConfig
from refimpl.expert_parallel import ExpertParallelMoE
from refimpl.moe import DeepSeekMoE

TIMEOUT_S = 240  # seconds for a group of ranks: generous, as CI machines can be busy
BASE = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=6,
            routed_scaling_factor=1.5)
V2 = dict(scoring_func="softmax", topk_method="greedy")
V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
# name -> config overrides, tokens per rank for 2 and for 4 ranks, and the experts the router must avoid
# (a large negative V3 correction bias: some experts, and all of one rank's, receive no token)
CASES = {
    "uneven-v2": (V2, {2: (3, 21), 4: (2, 30, 7, 12)}, []),
    "node-limited": ({**V3, "n_group": 4, "topk_group": 2}, {2: (16, 11)}, []),  # 2 groups per rank
    "node-limited-2-nodes": ({**V3, "n_group": 2, "topk_group": 1}, {4: (10, 10, 10, 10)}, []),  # 2 ranks a node
    "empty-rank": (V3, {2: (0, 13), 4: (13, 0, 5, 20)}, []),
    "idle-experts": (V3, {2: (9, 7), 4: (9, 0, 7, 11)}, [0, 4, 5]),  # expert 0, and rank 2's of 4 (or half
}                                                                     # of rank 1's experts with 2 ranks)
IDLE_RANK = {4: 2}  # ranks whose experts all sit in the avoided list


def _config(overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the ranks
def _rank_main(rank: int, world_size: int, port: int, cases_file: str, out_dir: str) -> None:
    """One rank: every case forward and backward on its slice of the tokens; results saved to out_dir."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    for name, case in torch.load(cases_file, weights_only=False).items():
        layer = ExpertParallelMoE(case["config"]).double()
        layer.load_shard(case["state_dict"])
        mine = case["slices"][rank]
        x = case["x"][mine].clone().requires_grad_(True)  # [tokens, hidden]
        out = layer(x[None])[0]
        (out * case["grad_out"][mine]).sum().backward()
        results[name] = dict(out=out.detach(), x_grad=x.grad, traffic=asdict(layer.last_traffic),
                             grads={n: p.grad for n, p in layer.named_parameters()})
    for name, overrides in (("indivisible", dict(n_routed_experts=6, num_experts_per_tok=2)),
                            ("misaligned-nodes", dict(n_routed_experts=12, n_group=3, topk_group=1))):
        try:
            ExpertParallelMoE(_config(overrides))
        except ValueError as e:
            results[name] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_ranks(world_size: int, cases_file: str, out_dir: str) -> float:
    """Spawn the ranks and wait; kill them all and fail if one fails or they outlive TIMEOUT_S. -> seconds."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children
    start = time.monotonic()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, cases_file, out_dir))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        late = time.monotonic() - start > TIMEOUT_S
        if failed or late:
            for p in procs:
                p.kill()
                p.join()
            pytest.fail(f"{world_size} ranks: " + (f"a rank exited with code {failed[0]} (its traceback is "
                        "in the captured stderr)" if failed else f"still running after {TIMEOUT_S} s: a hung "
                        "collective?"))
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, f"exit codes of the ranks: {codes}"
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------------ the reference
def _reference_case(overrides, tokens_per_rank, avoided, seed):
    """The single-process layer, its tokens and upstream gradient, its output and gradients."""
    torch.manual_seed(seed)
    config = _config(overrides)
    reference = DeepSeekMoE(config).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # far from routing ties
        if reference.gate.e_score_correction_bias is not None:
            reference.gate.e_score_correction_bias[avoided] = -10.0
    x = torch.randn(sum(tokens_per_rank), config.hidden_size, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(sum(tokens_per_rank), config.hidden_size, dtype=torch.float64)
    out = reference(x[None])[0]
    (out * grad_out).sum().backward()
    bounds = torch.tensor((0, *tokens_per_rank)).cumsum(0).tolist()
    slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    return dict(config=config, state_dict=reference.state_dict(), x=x.detach(), grad_out=grad_out, slices=slices,
                out=out.detach(), x_grad=x.grad, topk_idx=reference.last_routing.topk_idx,
                grads={n: p.grad for n, p in reference.named_parameters()})


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def run(request, tmp_path_factory):
    world_size = request.param
    cases = {name: _reference_case(overrides, tokens[world_size], avoided, seed)
             for seed, (name, (overrides, tokens, avoided)) in enumerate(CASES.items()) if world_size in tokens}
    tmp = tmp_path_factory.mktemp(f"ep{world_size}")
    sent = {name: {k: case[k] for k in ("config", "state_dict", "x", "grad_out", "slices")}
            for name, case in cases.items()}
    torch.save(sent, tmp / "cases.pt")
    seconds = _run_ranks(world_size, str(tmp / "cases.pt"), str(tmp))
    print(f"{world_size} ranks: {seconds:.1f} s wall time")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return world_size, cases, ranks


# ------------------------------------------------------------------------------------------------ the tests
def test_forward_equals_single_process(run):
    world_size, cases, ranks = run
    for name, case in cases.items():
        for rank, mine in enumerate(case["slices"]):
            torch.testing.assert_close(ranks[rank][name]["out"], case["out"][mine], rtol=0, atol=1e-12,
                                       msg=lambda m: f"{name}, rank {rank}: {m}")


def test_input_gradients_equal(run):
    world_size, cases, ranks = run
    for name, case in cases.items():
        for rank, mine in enumerate(case["slices"]):
            got = ranks[rank][name]["x_grad"]
            if got is None:  # a rank without tokens: nothing to compare
                assert case["x_grad"][mine].numel() == 0
                continue
            torch.testing.assert_close(got, case["x_grad"][mine], rtol=0, atol=1e-12,
                                       msg=lambda m: f"{name}, rank {rank}: {m}")


def test_every_expert_weight_gradient_equal(run):
    world_size, cases, ranks = run
    for name, case in cases.items():
        experts_per_rank = case["config"].n_routed_experts // world_size
        for param, want in case["grads"].items():
            if not param.startswith("experts."):
                continue
            owner = int(param.split(".")[1]) // experts_per_rank
            got = ranks[owner][name]["grads"][param]
            got = torch.zeros_like(want) if got is None else got  # an expert no token chose
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"{name}, {param}: {m}")
            for other in set(range(world_size)) - {owner}:
                assert param not in ranks[other][name]["grads"], f"{param} held by rank {other} too"


def test_replicated_weight_gradients_sum_to_single_process(run):
    """The router and the shared experts see each rank's tokens: their gradients add up over the ranks
    (what data parallelism's all-reduce does)."""
    world_size, cases, ranks = run
    for name, case in cases.items():
        for param, want in case["grads"].items():
            if param.startswith("experts."):
                continue
            got = sum(ranks[r][name]["grads"][param] for r in range(world_size))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"{name}, {param}: {m}")


def test_bytes_sent_equal_the_formula(run):
    """A token of rank s whose experts sit on the ranks D: rank s sends its row to each rank of D but itself,
    and each of them sends one row back; row = hidden_size * 8 bytes (float64)."""
    world_size, cases, ranks = run
    for name, case in cases.items():
        experts_per_rank = case["config"].n_routed_experts // world_size
        row_bytes = case["config"].hidden_size * 8
        dispatch, combine = [0] * world_size, [0] * world_size
        for source, mine in enumerate(case["slices"]):
            for experts in case["topk_idx"][mine].tolist():
                for dest in {e // experts_per_rank for e in experts} - {source}:
                    dispatch[source] += row_bytes
                    combine[dest] += row_bytes
        assert [ranks[r][name]["traffic"]["dispatch_bytes"] for r in range(world_size)] == dispatch, name
        assert [ranks[r][name]["traffic"]["combine_bytes"] for r in range(world_size)] == combine, name
        assert sum(dispatch) > 0, name


def test_the_cases_are_what_they_claim(run):
    world_size, cases, ranks = run
    empty = cases["empty-rank"]
    assert min(s.stop - s.start for s in empty["slices"]) == 0  # a rank with no token of its own
    idle = cases["idle-experts"]
    chosen = set(idle["topk_idx"].flatten().tolist())
    assert chosen.isdisjoint(CASES["idle-experts"][2])  # experts that receive no token
    if world_size in IDLE_RANK:  # a rank that receives no token at all
        assert ranks[IDLE_RANK[world_size]]["idle-experts"]["traffic"]["expert_pairs"] == 0
        assert ranks[IDLE_RANK[world_size]]["idle-experts"]["traffic"]["combine_bytes"] == 0
    uneven = cases["uneven-v2"]
    assert len({s.stop - s.start for s in uneven["slices"]}) == world_size  # every rank a different load
    for name in ("node-limited", "node-limited-2-nodes"):
        if name in cases:
            config = cases[name].get("config")
            experts_per_group = config.n_routed_experts // config.n_group
            groups = (cases[name]["topk_idx"] // experts_per_group)  # [tokens, k]: the group (node) of each
            assert max(len(set(row)) for row in groups.tolist()) <= config.topk_group, name


def test_layout_errors_name_the_fields(run):
    world_size, cases, ranks = run
    if world_size == 4:
        assert "n_routed_experts (6) must be divisible by the number of ranks (4)" in ranks[0]["indivisible"]
    assert "n_group (3)" in ranks[0]["misaligned-nodes"]


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed to be initialized"):
        ExpertParallelMoE(_config(V3))


def test_demo_without_torchrun_says_how_to_launch_it(monkeypatch):
    from refimpl.expert_parallel import main

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node"):
        main([])
    assert not dist.is_initialized()


def test_demo_mismatch_exits_with_failure(monkeypatch, capsys):
    """The self-checking demo fails (exit status 1) when it prints MISMATCH, so scripts and CI can see it."""
    import refimpl.expert_parallel as ep

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    wrong = dict(max_nodes=1, max_abs_diff=1.0, traffic=[dict(dispatch_bytes=0, combine_bytes=0, expert_pairs=0)],
                 formula_dispatch_bytes=[0], formula_combine_bytes=[0])
    monkeypatch.setattr(ep, "run_demo", lambda *args: wrong)
    with pytest.raises(SystemExit) as exit_info:
        ep.main([])
    assert exit_info.value.code == 1 and "MISMATCH" in capsys.readouterr().out
    assert not dist.is_initialized()
