"""DeepSeekMoE: many small routed experts, a few shared experts, and a router that keeps them balanced.

DeepSeekMoE (arXiv 2401.06066) replaces the dense feed-forward network (FFN) of a transformer layer with

    h'_t = u_t + sum_{i=1..N_s} FFN^(s)_i(u_t) + sum_{i=1..N_r} g_{i,t} FFN^(r)_i(u_t)     (DeepSeek-V2 eq. 20)

* fine-grained experts: N_r = `n_routed_experts` small FFNs (`moe_intermediate_size` wide), of which each token
  uses only K_r = `num_experts_per_tok`, so the compute per token is that of a few small FFNs;
* shared experts: N_s = `n_shared_experts` FFNs every token goes through, for the knowledge all tokens need;
* the gate g_{i,t} is the token-to-expert affinity s_{i,t} for the K_r chosen experts and 0 for the others
  (the residual u_t is added by the decoder layer, not here).

The router (`Router`) computes s_{i,t} = softmax(u_t^T e_i) in DeepSeek-V2 (sec. 2.2) or sigmoid(u_t^T e_i) in
DeepSeek-V3 (sec. 2.1.2), optionally limits each token to the experts of `topk_group` of `n_group` groups
(devices in V2, nodes in V3: fewer places to send a token to), takes the top K_r, and turns the chosen scores
into weights (normalized to sum 1 in V3, then multiplied by `routed_scaling_factor`).

Experts must be used evenly, or some idle while others are overloaded. Two remedies are here:

* auxiliary balance losses added to the training loss (`expert_balance_loss`, `device_balance_loss`,
  `communication_balance_loss`: V2 sec. 2.2.3; `sequence_balance_loss`: V3 sec. 2.1.2). The papers count T
  over the tokens of one *sequence* (V2's config.json has `seq_aux: true`); `sequence_balance_loss` computes
  that form for a batch of sequences, the others take whatever tokens they are given (a whole batch in
  `refimpl.train` unless the config has `seq_aux=True`, the batch-level form of Switch Transformer);
* V3's auxiliary-loss-free balancing: a per-expert bias b_i added to the scores *only to choose* the experts,
  nudged after each step towards under-loaded experts (`update_bias`).

`dispatch`, `run_experts` and `combine` compute the routed part the way fast implementations do: sort the
(token, expert) pairs by expert, run each expert on one contiguous block of rows, and add the rows back to
their tokens with their weights. The grouped-GEMM kernel in `dskernels/` is checked against exactly these steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.checks import check_int, check_last_dim, check_same_dtype_device, check_shape, check_tensor
from refimpl.config import ModelConfig


class MLP(nn.Module):
    """The SwiGLU FFN: down(silu(gate(x)) * up(x)). A dense layer's FFN, one routed expert, or the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # [intermediate, hidden]
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # [intermediate, hidden]
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)  # [hidden, intermediate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """What the router decided for a batch of tokens."""

    topk_idx: torch.Tensor  # [tokens, k] int64: the chosen experts
    topk_weight: torch.Tensor  # [tokens, k] float32 (float64): g_{i,t}, normalized (k > 1) and scaled
    scores: torch.Tensor  # [tokens, n_routed_experts]: the unbiased affinities s_{i,t} (float32 or float64)


class Router(nn.Module):
    """The gate of a DeepSeekMoE layer (checkpoint names `mlp.gate.weight`, `mlp.gate.e_score_correction_bias`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_moe:
            raise ValueError("config: expected an MoE config (n_routed_experts set), got n_routed_experts=None")
        self.n_routed_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # float32 whatever the default dtype (see `_apply`): e_i, one row per expert, [n_routed_experts, hidden]
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, as DeepSeek's MoEGate does
        if config.topk_method == "noaux_tc":
            # b_i of V3's auxiliary-loss-free balancing: not trained by gradients, moved by `update_bias`
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)`, `.half()`, `.bfloat16()` (all of them call `_apply`) leave the router float32.

        Routing is decided by small differences: released V3 biases sit near 5 with a spread of a few
        hundredths, where bfloat16 steps by 1/32, so in bfloat16 neighbouring biases merge and tokens go to
        other experts; and a bias step of gamma = 1e-3 is lost on a bfloat16 bias near 0.5 (step 1/256).
        So, as transformers' DeepSeek routers do, the gate weight and the bias stay float32 whatever the
        model's dtype: a cast to a narrower floating dtype is not applied to them, while device moves,
        `to_empty`, and casts to float64 are. (`fn` is probed on an empty tensor to learn where it sends one.)
        """

        def at_least_float32(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return fn(t)
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if target.dtype.itemsize < 4:  # bfloat16, float16, float8: only the device change applies
                return t.to(device=target.device)
            return fn(t)

        return super()._apply(at_least_float32, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A bfloat16 checkpoint (or `load_state_dict(..., assign=True)`) must not narrow the router: the
        loaded weight and bias are widened to float32 first (exactly: every bfloat16 is a float32)."""
        for name in ("weight", "e_score_correction_bias"):
            key = prefix + name
            if key in state_dict and state_dict[key].is_floating_point() and state_dict[key].dtype.itemsize < 4:
                state_dict[key] = state_dict[key].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [tokens, hidden] in any floating dtype -> Routing, computed in float32 (float64 for float64 x).

        The hidden states are cast up for the gate's matmul (as transformers does): the routing weights come
        out float32 and `combine` multiplies them in float32 before casting to the activations' dtype.
        0 tokens give an empty routing ([0, k] experts and weights).
        """
        check_tensor("x", x, ndim=2, dtype_floating=True)
        check_last_dim("x", x, self.weight.shape[1])
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = F.linear(x.to(compute_dtype), self.weight.to(compute_dtype))  # [tokens, n_routed_experts]
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        choice = scores  # [tokens, n_routed_experts]: what top-k ranks
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.to(compute_dtype)
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            choice = self._limit_to_groups(choice)
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # [tokens, k]
        # The bias only chooses: the weights are the unbiased scores of the chosen experts (V3 eq. 16 and 13).
        topk_weight = scores.gather(1, topk_idx)  # [tokens, k]
        # Normalize only when k > 1, as DeepSeek's released modeling_deepseek.py (V2 and V3, the code shipped
        # with the checkpoints) does for every scoring function: `if self.top_k > 1 and self.norm_topk_prob`.
        # For k = 1 the weight divided by itself would always be 1, and the gate a constant
        # routed_scaling_factor. Others differ at k = 1: transformers' DeepseekV3TopkRouter normalizes for
        # any k, DeepSeek-V3's inference/model.py normalizes sigmoid scores for any k and softmax ones never,
        # and transformers' DeepseekV2TopkRouter ignores norm_topk_prob (the released V2 configs set it False).
        if self.norm_topk_prob and self.top_k > 1:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)  # 1e-20: DeepSeek's code
        topk_weight = topk_weight * self.routed_scaling_factor
        return Routing(topk_idx=topk_idx, topk_weight=topk_weight, scores=scores)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the best `topk_group` groups, set the others to -inf. [tokens, E] -> [tokens, E]."""
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, self.n_routed_experts // self.n_group)  # [tokens, groups, E/groups]
        if self.topk_method == "group_limited_greedy":
            group_scores = grouped.max(dim=-1).values  # V2: a group is as good as its best expert
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: the sum of its best two
        kept = group_scores.topk(self.topk_group, dim=-1).indices  # [tokens, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [tokens, n_group]
        # -inf, not 0: with V3's bias the choice scores can be negative, and a zeroed expert of a dropped group
        # would then beat the kept ones. transformers' V2 router fills with 0.0, which is the same only because
        # softmax scores (and V2 has no bias) are always positive.
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, self.n_routed_experts)

    def extra_repr(self) -> str:
        return (f"{self.n_routed_experts} experts, top_k={self.top_k}, {self.scoring_func}, {self.topk_method}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}")


# ---------------------------------------------------------------------------------------------------- balance
def _check_routing(scores, topk_idx, n_routed_experts: int) -> None:
    check_shape("scores", scores, (None, n_routed_experts))
    check_shape("topk_idx", topk_idx, (scores.shape[0], None))
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx: expected dtype torch.int64, got {topk_idx.dtype}")


def expert_load(topk_idx: torch.Tensor, n_routed_experts: int) -> torch.Tensor:
    """How many (token, expert) pairs each expert received: topk_idx [tokens, k] -> [n_routed_experts] float."""
    check_tensor("topk_idx", topk_idx, ndim=2)
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx: expected dtype torch.int64, got {topk_idx.dtype}")
    if topk_idx.numel() and (topk_idx.min() < 0 or topk_idx.max() >= n_routed_experts):
        raise ValueError(f"topk_idx: expected expert ids in [0, {n_routed_experts}), got values from "
                         f"{int(topk_idx.min())} to {int(topk_idx.max())}")
    return torch.bincount(topk_idx.flatten(), minlength=n_routed_experts).float()


def expert_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_routed_experts: int,
                        alpha: float) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss (eq. 23-25), over the T tokens it is given:

        L_ExpBal = alpha * sum_i f_i P_i,   f_i = N' / (K' T) * (tokens choosing expert i),   P_i = mean_t s_{i,t}

    N' = n_routed_experts, K' = k. f_i is 1 for every expert when the load is even; only P_i carries a gradient.
    In DeepSeek-V2 (and DeepSeekMoE, eq. 12-14) T is the tokens of one sequence: V2's config.json has
    `seq_aux: true`, and `sequence_balance_loss` computes that form per sequence of a batch (for softmax scores
    its normalization is a no-op). Given all the tokens of a batch, this is the batch-level form (Switch
    Transformer, eq. 4-6, there with alpha * N).
    scores: [tokens, n_routed_experts], topk_idx: [tokens, k] -> a scalar. 0 tokens give 0 (see `_no_tokens`).
    """
    _check_routing(scores, topk_idx, n_routed_experts)
    tokens, k = topk_idx.shape
    if tokens == 0:
        return _no_tokens(scores)
    f = expert_load(topk_idx, n_routed_experts).to(scores.dtype) * n_routed_experts / (k * tokens)  # [E]
    P = scores.mean(dim=0)  # [E]
    return alpha * (f * P).sum()


def device_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_routed_experts: int, n_group: int,
                        alpha: float) -> torch.Tensor:
    """DeepSeek-V2's device-level balance loss (eq. 26-28); device d holds group d of n_routed_experts / n_group:

        L_DevBal = alpha * sum_d f'_d P'_d,   f'_d = mean_{i in E_d} f_i,   P'_d = sum_{i in E_d} P_i

    with f_i and P_i as in `expert_balance_loss`. scores: [tokens, E], topk_idx: [tokens, k] -> a scalar;
    0 tokens give 0.
    """
    _check_routing(scores, topk_idx, n_routed_experts)
    _check_n_group(n_group, n_routed_experts)
    tokens, k = topk_idx.shape
    if tokens == 0:
        return _no_tokens(scores)
    f = expert_load(topk_idx, n_routed_experts).to(scores.dtype) * n_routed_experts / (k * tokens)  # [E]
    P = scores.mean(dim=0)  # [E]
    f_device = f.view(n_group, -1).mean(dim=-1)  # [n_group]
    P_device = P.view(n_group, -1).sum(dim=-1)  # [n_group]
    return alpha * (f_device * P_device).sum()


def communication_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_routed_experts: int,
                               n_group: int, topk_group: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V2's communication balance loss (eq. 29-31), for D = n_group devices and device-limited
    routing to at most M = topk_group of them; device d holds group d of n_routed_experts / n_group:

        L_CommBal = alpha * sum_d f''_d P''_d,   f''_d = D / (M T) * (tokens sent to device d),
        P''_d = sum_{i in E_d} P_i

    A token is sent to a device once if any of its chosen experts is there (not once per expert). f''_d is
    1 for every device when each token goes to M devices and every device receives the same number, M T / D;
    so the loss pushes each device to *receive* about M T hidden states, as device-limited routing bounds
    what each one *sends*. P_i as in `expert_balance_loss`; only P''_d carries a gradient.
    scores: [tokens, E], topk_idx: [tokens, k] -> a scalar; 0 tokens give 0.
    """
    _check_routing(scores, topk_idx, n_routed_experts)
    _check_n_group(n_group, n_routed_experts)
    check_int("topk_group", topk_group, 1)
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected at most n_group ({n_group}) devices per token, got {topk_group}")
    expert_load(topk_idx, n_routed_experts)  # checks the expert ids
    tokens = topk_idx.shape[0]
    if tokens == 0:
        return _no_tokens(scores)
    device = topk_idx // (n_routed_experts // n_group)  # [tokens, k]: the device of each chosen expert
    sent = F.one_hot(device, n_group).amax(dim=1)  # [tokens, n_group]: 1 where the token goes
    f_device = sent.sum(dim=0).to(scores.dtype) * n_group / (topk_group * tokens)  # [n_group]
    P_device = scores.mean(dim=0).view(n_group, -1).sum(dim=-1)  # [n_group]
    return alpha * (f_device * P_device).sum()


def _check_n_group(n_group: int, n_routed_experts: int) -> None:
    check_int("n_group", n_group, 1)
    if n_routed_experts % n_group:
        raise ValueError(f"n_group: expected a positive divisor of n_routed_experts ({n_routed_experts}), "
                         f"got {n_group}")


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_routed_experts: int, alpha: float,
                          batch_size: int, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), for each sequence of T tokens:

        L_Bal = alpha * sum_i f_i P_i,   f_i = N_r / (K_r T) * (tokens of the sequence choosing expert i),
        s'_{i,t} = s_{i,t} / sum_j s_{j,t},   P_i = mean_t s'_{i,t}

    The paper defines it for one sequence; for a batch we average over the sequences (as DeepSeek-V2's released
    `seq_aux` code does). With softmax scores (s' = s) this is also DeepSeek-V2's expert-level loss (eq. 23-25)
    in the per-sequence form its paper and config (`seq_aux: true`) use. Rows are tokens in [batch, seq] order
    (row = b * seq_len + t), as DeepSeekMoE flattens them. scores: [batch * seq, E], topk_idx: [batch * seq, k] -> a scalar; 0 tokens give 0.
    """
    _check_routing(scores, topk_idx, n_routed_experts)
    if scores.shape[0] != batch_size * seq_len:
        raise ValueError(f"scores: expected batch_size * seq_len = {batch_size} * {seq_len} rows, "
                         f"got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        return _no_tokens(scores)
    k = topk_idx.shape[1]
    one_hot = F.one_hot(topk_idx, n_routed_experts).to(scores.dtype)  # [tokens, k, E]
    counts = one_hot.sum(dim=1).view(batch_size, seq_len, n_routed_experts).sum(dim=1)  # [batch, E]
    f = counts * n_routed_experts / (k * seq_len)  # [batch, E]
    normalized = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}; a no-op for softmax scores
    P = normalized.view(batch_size, seq_len, n_routed_experts).mean(dim=1)  # [batch, E]
    return alpha * (f * P).sum(dim=-1).mean()


def _no_tokens(scores: torch.Tensor) -> torch.Tensor:
    """The balance loss of 0 tokens: 0, since no expert is overloaded (f_i = 0), rather than the 0/0 = NaN of the
    formulas. With expert parallelism a rank can be handed no tokens; it then adds nothing to the loss."""
    return scores.new_zeros(())


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing (sec. 2.1.2): after a step, b_i -= gamma for each overloaded
    expert and b_i += gamma for each underloaded one (load above / below the mean), in place.

    bias: [E] float32 or float64 (the router's `e_score_correction_bias`, float32 in any model, see
    `Router._apply`), load: [E] (`expert_load` of the step) -> bias. A narrower bias raises a TypeError:
    a bfloat16 bias near 0.5 steps by 1/256, so a gamma of 1e-3 would round away or one-sidedly.
    """
    check_tensor("bias", bias, ndim=1, dtype_floating=True)
    if bias.dtype.itemsize < 4:
        raise TypeError(f"bias: expected a float32 or float64 tensor (steps of gamma={gamma} are lost in "
                        f"narrower dtypes), got dtype {bias.dtype}")
    check_shape("load", load, tuple(bias.shape))
    load = load.to(bias.dtype)
    bias += gamma * torch.sign(load.mean() - load)
    return bias


# ---------------------------------------------------------------------------------------------------- experts
def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n_routed_experts: int):
    """Sort the (token, expert) pairs by expert so that each expert's rows are one contiguous block.

    x: [tokens, hidden], topk_idx: [tokens, k] -> (
        x_sorted [tokens * k, hidden]  the input row of each pair, expert 0's rows first, then expert 1's, ...
        token_idx [tokens * k]         the token each row came from
        sort_order [tokens * k]        each row's position in topk_idx.flatten()
        counts [n_routed_experts]      rows per expert (int64)
    ). The sort is stable: within an expert's block, tokens keep their order.
    """
    check_tensor("x", x, ndim=2)
    check_shape("topk_idx", topk_idx, (x.shape[0], None))
    counts = expert_load(topk_idx, n_routed_experts).long()  # also checks the dtype and the expert ids
    k = topk_idx.shape[1]
    sort_order = torch.argsort(topk_idx.flatten(), stable=True)  # [tokens * k]
    token_idx = sort_order // k  # pair (t, j) sits at t * k + j in the flattened topk_idx
    return x[token_idx], token_idx, sort_order, counts


def run_experts(experts: nn.ModuleList, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Expert e on its block of `counts[e]` rows: [tokens * k, hidden] -> [tokens * k, hidden]."""
    check_shape("counts", counts, (len(experts),))
    if int(counts.sum()) != x_sorted.shape[0]:
        raise ValueError(f"counts: expected to sum to the {x_sorted.shape[0]} rows of x_sorted, "
                         f"got {int(counts.sum())}")
    blocks = x_sorted.split(counts.tolist())
    return torch.cat([expert(block) for expert, block in zip(experts, blocks)])


def combine(expert_out: torch.Tensor, token_idx: torch.Tensor, sort_order: torch.Tensor,
            topk_weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Undo `dispatch`: weight each row by its g_{i,t} and add it to its token.

    expert_out: [tokens * k, hidden] (rows in dispatch order), topk_weight: [tokens, k] -> [tokens, hidden].
    """
    check_tensor("expert_out", expert_out, ndim=2)
    check_shape("topk_weight", topk_weight, (num_tokens, None))
    check_shape("token_idx", token_idx, (expert_out.shape[0],))
    check_shape("sort_order", sort_order, (topk_weight.numel(),))
    weight = topk_weight.flatten()[sort_order]  # [tokens * k], in dispatch order
    # The product is taken in the weights' dtype (float32 when the model runs in bfloat16) and then cast,
    # as transformers' DeepseekV3Experts does.
    weighted = (expert_out * weight[:, None]).to(expert_out.dtype)  # [tokens * k, hidden]
    out = expert_out.new_zeros(num_tokens, expert_out.shape[1])  # [tokens, hidden]
    return out.index_add(0, token_idx, weighted)


# ---------------------------------------------------------------------------------------------------- the layer
class DeepSeekMoE(nn.Module):
    """Shared experts + routed experts (checkpoint prefix `model.layers.<i>.mlp.`).

    After each call, `last_routing` holds that call's `Routing` (with its autograd graph): the training loop
    reads it for the balance losses and the expert load that `update_bias` needs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        # The checkpoints store the N_s shared experts fused as one MLP N_s times as wide: the sum of N_s SwiGLU
        # FFNs of width I is one SwiGLU FFN of width N_s * I (their gate/up rows and down columns concatenated).
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        self.hidden_size = config.hidden_size
        self.n_routed_experts = config.n_routed_experts
        self.last_routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: [batch, seq, hidden] -> [batch, seq, hidden] (0 tokens give an empty output).

        The router works in float32 whatever the activations' dtype (see `Router`); the experts in theirs.
        """
        check_tensor("hidden_states", hidden_states, ndim=3, dtype_floating=True)
        check_last_dim("hidden_states", hidden_states, self.hidden_size)
        check_same_dtype_device("hidden_states", hidden_states, self.experts[0].gate_proj.weight)
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(batch * seq, hidden)  # [tokens, hidden]
        routing = self.gate(x)
        self.last_routing = routing
        x_sorted, token_idx, sort_order, counts = dispatch(x, routing.topk_idx, self.n_routed_experts)
        expert_out = run_experts(self.experts, x_sorted, counts)  # [tokens * k, hidden]
        out = combine(expert_out, token_idx, sort_order, routing.topk_weight, batch * seq)  # [tokens, hidden]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(batch, seq, hidden)
