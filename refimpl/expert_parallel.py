"""Expert parallelism: a DeepSeekMoE layer whose routed experts are spread over the ranks of torch.distributed.

DeepSeek-V3 has 256 routed experts per layer, too many for one GPU; it trains with "64-way Expert
Parallelism (EP) spanning 8 nodes" (V3 report, arXiv 2412.19437, sec. 3.2). Here rank r of W holds the
E / W routed experts r * E / W, ..., (r + 1) * E / W - 1 (E = `n_routed_experts`); the router and the shared
experts are replicated, and every rank brings its own tokens (its share of the batch). One forward:

1. route: the (replicated) router picks each local token's K_r experts, hence the ranks that hold them;
2. dispatch: a token whose K_r experts sit on r distinct ranks is sent r times, once per destination rank
   (not once per expert), with its expert ids and gate weights. The ranks first exchange how many rows each
   sends to each (`all_to_all_single` of W counts), then the rows themselves (one `all_to_all_single`, rows
   grouped by destination rank, in token order within a group);
3. the local experts run on the rows they received, each on one contiguous block (`refimpl.moe.dispatch`,
   `run_experts`, `combine`), and each received row becomes one weighted partial sum
   sum_{i on this rank} g_{i,t} FFN_i(u_t);
4. combine: the partial sums travel back by the reverse all-to-all, one row per (token, destination rank),
   and each token adds its rows up; the shared experts run locally on the rank's own tokens.

So a token's hidden state crosses the network once per distinct *rank* it reaches, not once per expert: per
token and layer, dispatch moves hidden_size * bytes per element * (ranks reached) bytes, and combine as many.
`Traffic` records what each rank sent; rows a rank keeps for itself (its own tokens routed to its own experts)
are copied in memory, not sent, and are *not* counted. `traffic_formula` gives the same numbers from the
routing alone.

Node-limited routing (V3 sec. 2.1.2: "each token will be sent to at most M nodes, which are selected according
to the sum of the highest K_r/M affinity scores of the experts distributed on each node") is the router's
group-limited top-k with groups = nodes: set `topk_method="noaux_tc"`, `n_group` = the number of nodes and
`topk_group` = M in the config. Expert group g is experts g * E / n_group, ..., so with W ranks a node is
W / n_group consecutive ranks (when n_group divides W; when W divides n_group, each rank holds n_group / W
whole groups and a "node" is smaller than a rank). Like DeepSeek's released code (and V3's config, where
K_r / M = 8 / 4), `noaux_tc` scores a group by the sum of its best *two* experts: the paper's rule when
K_r / M = 2. DeepSeek-V2's device-limited routing (`group_limited_greedy`, V2 sec. 2.2.2) is the same with
groups = ranks (n_group = W).

Every rank must call `forward` (with its tokens, possibly none) and, when training, `backward`, in the same
order: the all-to-alls are collectives. The backward of an all-to-all is the all-to-all the other way
(`_AllToAll`), so gradients reach the experts on other ranks and come back to the tokens.

Run the self-checking demo (it compares against the single-process `DeepSeekMoE` and prints the traffic):

    torchrun --nproc-per-node 4 -m refimpl.expert_parallel            # CPU: gloo, 4 processes
    torchrun --nproc-per-node 4 -m refimpl.expert_parallel --json     # one JSON line, for lesson 18

On a machine with a GPU for each rank the same command uses NCCL, one GPU per rank (the backend follows the
device); with fewer GPUs it runs on the CPU with gloo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from refimpl.checks import check_last_dim, check_same_dtype_device, check_shape, check_tensor
from refimpl.config import ModelConfig
from refimpl.moe import MLP, DeepSeekMoE, Router, Routing, combine, dispatch, run_experts


# ---------------------------------------------------------------------------------------------------- all-to-all
def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Rows x[sum(send_counts[:d]) : sum(send_counts[:d+1])] go to rank d; rank s's rows arrive in block s.

    x: [sum(send_counts), ...] -> [sum(recv_counts), ...].
    """
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`_all_to_all` of several tensors (same rows) with a backward: the gradients travel back the reverse way.

    One Function for all the tensors of a dispatch, so that every rank runs their backward collectives in the
    same order.
    """

    @staticmethod
    def forward(ctx, send_counts, recv_counts, group, *xs):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return tuple(_all_to_all(x, send_counts, recv_counts, group) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        back = (_all_to_all(g, ctx.recv_counts, ctx.send_counts, ctx.group) for g in grads)
        return (None, None, None, *back)


# ---------------------------------------------------------------------------------------------------- traffic
@dataclass
class Traffic:
    """What one rank sent to the *other* ranks in one forward (its rows to itself are not counted).

    dispatch_bytes: token rows (hidden_size elements of the input's dtype each) sent to the experts' ranks;
    combine_bytes: partial-sum rows (same size) sent back to the tokens' ranks;
    metadata_bytes: the expert ids (int64) and gate weights sent along with the dispatched rows, and the
      row counts exchanged first (int64);
    rows_kept: the rank's own tokens routed to its own experts (a copy in memory, no traffic);
    expert_pairs: (token, expert) pairs this rank's experts computed: its share of the work.
    """

    dispatch_bytes: int
    combine_bytes: int
    metadata_bytes: int
    rows_kept: int
    expert_pairs: int


def ranks_reached(topk_idx: torch.Tensor, experts_per_rank: int, world_size: int) -> torch.Tensor:
    """Which ranks hold at least one of each token's experts: topk_idx [tokens, k] int64 -> [tokens, W] bool."""
    dest = topk_idx // experts_per_rank  # [tokens, k]: the rank of each chosen expert
    reached = torch.zeros(topk_idx.shape[0], world_size, dtype=torch.bool, device=topk_idx.device)
    return reached.scatter_(1, dest, True)


def traffic_formula(topk_idx: torch.Tensor, tokens_per_rank: list[int], experts_per_rank: int,
                    row_bytes: int) -> tuple[list[int], list[int]]:
    """Dispatch and combine bytes each rank sends to the others, from the routing of all tokens.

    topk_idx: [sum(tokens_per_rank), k] int64, the tokens of rank 0 first, then rank 1's, ...;
    row_bytes: hidden_size * bytes per element. A token of rank s reaching the set D of ranks costs rank s
    row_bytes * |D - {s}| in dispatch and costs each rank d in D - {s} row_bytes in combine.
    Returns (dispatch [W], combine [W]) in bytes.
    """
    world_size = len(tokens_per_rank)
    check_shape("topk_idx", topk_idx, (sum(tokens_per_rank), None))
    reached = ranks_reached(topk_idx, experts_per_rank, world_size).long()  # [tokens, W]
    source = torch.repeat_interleave(torch.arange(world_size), torch.tensor(tokens_per_rank))  # [tokens]
    reached[torch.arange(len(source)), source] = 0  # a rank's rows to itself are not sent
    rows = torch.zeros(world_size, world_size, dtype=torch.long).index_add_(0, source, reached)  # [from, to]
    return (rows.sum(1) * row_bytes).tolist(), (rows.sum(0) * row_bytes).tolist()


# ---------------------------------------------------------------------------------------------------- the layer
class ExpertParallelMoE(nn.Module):
    """DeepSeekMoE with its routed experts sharded over the ranks of `group` (default: all ranks).

    Same parameter names as `DeepSeekMoE` (`gate.weight`, `experts.<global id>.*`, `shared_experts.*`), for
    this rank's experts only; `load_shard` takes the single-process layer's state dict. `forward` takes this
    rank's tokens [batch, seq, hidden] (any number, 0 included) and returns what `DeepSeekMoE` returns for
    them. After each call `last_routing` holds the routing of the local tokens and `last_traffic` a `Traffic`.

    Raises ValueError if n_routed_experts is not divisible by the number of ranks, or if group-limited
    routing's groups (nodes) do not line up with the ranks (n_group must divide, or be a multiple of, W).
    """

    def __init__(self, config: ModelConfig, group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE: expected torch.distributed to be initialized "
                               "(dist.init_process_group, or launch with torchrun)")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if config.n_routed_experts % self.world_size:
            raise ValueError(f"n_routed_experts ({config.n_routed_experts}) must be divisible by the number of "
                             f"ranks ({self.world_size})")
        if config.n_group % self.world_size and self.world_size % config.n_group:
            raise ValueError(f"n_group ({config.n_group}): expected a divisor or a multiple of the number of "
                             f"ranks ({self.world_size}), so that each expert group (node) lies on whole ranks")
        self.experts_per_rank = config.n_routed_experts // self.world_size
        self.first_expert = self.rank * self.experts_per_rank
        self.gate = Router(config)
        self.experts = nn.ModuleDict({
            str(e): MLP(config.hidden_size, config.moe_intermediate_size)
            for e in range(self.first_expert, self.first_expert + self.experts_per_rank)
        })
        self.shared_experts = (  # as in DeepSeekMoE: the N_s shared experts fused into one wide MLP
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        self.hidden_size = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.last_routing: Routing | None = None
        self.last_traffic: Traffic | None = None

    def load_shard(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load this rank's part of a `DeepSeekMoE` state dict (router, shared experts, its routed experts)."""
        own = self.state_dict().keys()
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise KeyError(f"state_dict: expected the keys of a DeepSeekMoE layer, missing {missing[:4]}...")
        self.load_state_dict({name: state_dict[name] for name in own})

    def _route(self, x: torch.Tensor) -> Routing:
        """The router on the local tokens x [tokens, hidden], also when there are none."""
        if x.shape[0] > 0:
            return self.gate(x)
        # No tokens: route one placeholder token and keep none of it. The empty routing then has the dtypes
        # of the other ranks' and, like theirs, an autograd graph: every rank must record the same
        # all-to-alls for backward.
        routing = self.gate(x.new_zeros(1, x.shape[1]))
        return Routing(topk_idx=routing.topk_idx[:0], topk_weight=routing.topk_weight[:0],
                       scores=routing.scores[:0])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: [batch, seq, hidden] (this rank's tokens) -> [batch, seq, hidden]."""
        check_tensor("hidden_states", hidden_states, ndim=3, dtype_floating=True)
        check_last_dim("hidden_states", hidden_states, self.hidden_size)
        check_same_dtype_device("hidden_states", hidden_states, self.gate.weight)
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(batch * seq, hidden)  # [tokens, hidden]
        routing = self._route(x)
        self.last_routing = routing

        # dispatch: one row per (token, destination rank), grouped by rank, tokens in order within a group
        reached = ranks_reached(routing.topk_idx, self.experts_per_rank, self.world_size)  # [tokens, W]
        _, token_idx = reached.T.nonzero(as_tuple=True)  # [sent]: the token of each row, sorted by rank
        send_counts = reached.sum(dim=0)  # [W] int64
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # the counts first
        send, recv = send_counts.tolist(), recv_counts.tolist()
        x_recv, weight_recv = _AllToAll.apply(send, recv, self.group, x[token_idx],
                                              routing.topk_weight[token_idx])  # [received, hidden], [received, k]
        idx_recv = _all_to_all(routing.topk_idx[token_idx], send, recv, self.group)  # [received, k]

        partial, pairs_here = self._local_experts(x_recv, idx_recv, weight_recv)  # [received, hidden]

        # combine: the partial sums go back the reverse way, and each token adds its rows up
        (partial_back,) = _AllToAll.apply(recv, send, self.group, partial)  # [sent, hidden]
        out = x.new_zeros(x.shape[0], hidden).index_add(0, token_idx, partial_back)  # [tokens, hidden]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        row_bytes = hidden * x.element_size()
        sent_away = sum(send) - send[self.rank]
        meta_per_row = self.top_k * (idx_recv.element_size() + weight_recv.element_size())
        self.last_traffic = Traffic(
            dispatch_bytes=sent_away * row_bytes,
            combine_bytes=(sum(recv) - recv[self.rank]) * row_bytes,
            metadata_bytes=sent_away * meta_per_row + (self.world_size - 1) * send_counts.element_size(),
            rows_kept=send[self.rank],
            expert_pairs=pairs_here,
        )
        return out.view(batch, seq, hidden)

    def _local_experts(self, x_recv: torch.Tensor, idx_recv: torch.Tensor, weight_recv: torch.Tensor):
        """This rank's experts on the rows it received: one partial sum per row.

        x_recv [rows, hidden], idx_recv [rows, k] (global expert ids), weight_recv [rows, k] -> (
            partial [rows, hidden]  sum over the row's experts held here of g_{i,t} FFN_i(u_t),
            pairs                   the number of (row, expert) pairs computed here
        ). The ids of experts held elsewhere become a placeholder expert, last in `dispatch`'s sorted order,
        whose output rows are zeros: `combine` then adds nothing for them.
        """
        local_idx = idx_recv - self.first_expert  # [rows, k]
        here = (local_idx >= 0) & (local_idx < self.experts_per_rank)
        local_idx = local_idx.where(here, self.experts_per_rank)
        x_sorted, row_idx, sort_order, counts = dispatch(x_recv, local_idx, self.experts_per_rank + 1)
        pairs = int(counts[:-1].sum())
        expert_out = run_experts(list(self.experts.values()), x_sorted[:pairs], counts[:-1])
        elsewhere = expert_out.new_zeros(x_sorted.shape[0] - pairs, x_recv.shape[1])
        partial = combine(torch.cat([expert_out, elsewhere]), row_idx, sort_order, weight_recv, x_recv.shape[0])
        return partial, pairs

    def extra_repr(self) -> str:
        return (f"rank {self.rank} of {self.world_size}: experts {self.first_expert}.."
                f"{self.first_expert + self.experts_per_rank - 1}")


# ---------------------------------------------------------------------------------------------------- the demo
DEMO_CONFIG = ModelConfig(  # a small V3-style layer: sigmoid scores, bias-corrected top-k, normalized weights
    vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=32,
    scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
)


def demo_config(nodes: int, max_nodes: int) -> ModelConfig:
    """`DEMO_CONFIG` with node-limited routing: experts in `nodes` groups, each token on at most `max_nodes`."""
    return DEMO_CONFIG.replace(n_group=nodes, topk_group=max_nodes)


def _init_from_environment() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...): NCCL with one GPU per rank when
    there are enough GPUs, else gloo on the CPU. Exits with a usage line when not started by torchrun."""
    if "RANK" not in os.environ:
        raise SystemExit("python -m refimpl.expert_parallel: expected to be launched by torchrun (RANK is not set), "
                         "e.g. torchrun --nproc-per-node 4 -m refimpl.expert_parallel")
    if torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))  # a hang fails, after 2 min
    return device


def run_demo(tokens_per_rank: list[int], nodes: int, max_nodes: int, seed: int, device: torch.device) -> dict:
    """One forward of `ExpertParallelMoE` on every rank, checked against `DeepSeekMoE` on all the tokens.

    Every rank builds the same single-process layer and tokens from `seed`, loads its shard, and runs its own
    slice of the tokens. Returns (on every rank) the traffic of all ranks and the largest output difference.
    """
    torch.manual_seed(seed)
    reference = DeepSeekMoE(demo_config(nodes, max_nodes)).to(device)
    x_all = torch.randn(1, sum(tokens_per_rank), DEMO_CONFIG.hidden_size, device=device)
    with torch.no_grad():
        expected = reference(x_all)
        layer = ExpertParallelMoE(demo_config(nodes, max_nodes)).to(device)
        layer.load_shard(reference.state_dict())
        start = sum(tokens_per_rank[:layer.rank])
        mine = slice(start, start + tokens_per_rank[layer.rank])
        out = layer(x_all[:, mine])
    max_diff = torch.tensor((out - expected[:, mine]).abs().max().item() if out.numel() else 0.0,
                            device=device)
    dist.all_reduce(max_diff, op=dist.ReduceOp.MAX)
    traffic = [None] * layer.world_size
    dist.all_gather_object(traffic, asdict(layer.last_traffic))
    dispatch_bytes, combine_bytes = traffic_formula(reference.last_routing.topk_idx.cpu(), tokens_per_rank,
                                                    layer.experts_per_rank,
                                                    DEMO_CONFIG.hidden_size * x_all.element_size())
    return dict(nodes=nodes, max_nodes=max_nodes, tokens_per_rank=tokens_per_rank, seed=seed,
                max_abs_diff=max_diff.item(), traffic=traffic, formula_dispatch_bytes=dispatch_bytes,
                formula_combine_bytes=combine_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Expert-parallel DeepSeekMoE demo; launch with torchrun.")
    parser.add_argument("--tokens-per-rank", type=int, default=64, help="tokens on each rank (default 64)")
    parser.add_argument("--nodes", type=int, default=0, help="expert groups = nodes (default: one per rank)")
    parser.add_argument("--max-nodes", type=int, nargs="+", default=None,
                        help="node limits M to try, one run each (default: 1 2 ... nodes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line (rank 0) instead of a table")
    args = parser.parse_args(argv)
    device = _init_from_environment()
    world_size = dist.get_world_size()
    nodes = args.nodes or world_size
    runs = [run_demo([args.tokens_per_rank] * world_size, nodes, m, args.seed, device)
            for m in (args.max_nodes or range(1, nodes + 1))]
    ok = True  # judged on rank 0, which prints
    if dist.get_rank() == 0:
        ok = all(run["max_abs_diff"] < 1e-4
                 and run["formula_dispatch_bytes"] == [t["dispatch_bytes"] for t in run["traffic"]]
                 and run["formula_combine_bytes"] == [t["combine_bytes"] for t in run["traffic"]] for run in runs)
        if args.json:
            print(json.dumps(dict(world_size=world_size, backend=dist.get_backend(), ok=ok, runs=runs)))
        else:
            print(f"{world_size} ranks ({dist.get_backend()}), {nodes} nodes, {DEMO_CONFIG.n_routed_experts} experts, "
                  f"top-{DEMO_CONFIG.num_experts_per_tok}, {args.tokens_per_rank} tokens per rank")
            for run in runs:
                sent = [t["dispatch_bytes"] for t in run["traffic"]]
                pairs = [t["expert_pairs"] for t in run["traffic"]]
                print(f"  at most {run['max_nodes']} node(s): dispatch bytes per rank {sent}, expert pairs per "
                      f"rank {pairs}, max |EP - single| = {run['max_abs_diff']:.1e}")
            print("matches the single-process layer and the byte formula" if ok else "MISMATCH")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)  # a failed check is a failed run, for scripts and CI


if __name__ == "__main__":
    main()
