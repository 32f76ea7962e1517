"""The routed experts of a DeepSeekMoE layer (`refimpl.moe.dispatch`, `run_experts`, `combine`) as kernels.

Each token t picked k experts (topk_idx [T, k]) with weights g (topk_weight [T, k]); expert e is the SwiGLU
FFN down_e(silu(gate_e(x)) * up_e(x)) with weights w_gate, w_up [E, I, H] and w_down [E, H, I] (the experts'
nn.Linear weights stacked: `stack_expert_weights`). The routed output is out_t = sum_j g_tj expert_{e_tj}(x_t).

Ladder:
  v1: a Python loop over the experts: gather each expert's rows (`refimpl.moe.dispatch`), run its three
      matrix products with `dskernels.matmul` (silu * up in PyTorch), and combine. E x 3 launches, many of them
      tiny; an expert that got no token is skipped. The weights are read in place (transposed views), as the
      eager loop's F.linear reads them.
  v2: one grouped GEMM over all experts per projection.
      align: sort the (token, expert) pairs by expert and pad each expert's rows to a multiple of BLOCK_M
             (`align_to_experts`), so that every block of BLOCK_M rows belongs to one expert; padding rows
             point at a sentinel pair and are masked. An expert with no token gets no block.
      gate/up: one launch; program (block, n) gathers its rows of x by token index, multiplies them by the
             block's expert's w_gate and w_up tiles (two accumulators, x loaded once) and stores
             silu(gate) * up: the SwiGLU is fused, the [rows, I] gate and up activations never reach memory.
      down:  one launch; the same blocks times w_down, each row scaled by its weight g and stored at its pair's
             place (t * k + j); the k rows of a token are then summed (the combine, in token order).

  v3: the combine fused into the down launch, and blocks sized for decode.
      down + combine: each row's weighted output g * expert(x) is added (tl.atomic_add, float32) straight
             into its token's output row: no [T * k, H] buffer written and read back, no separate sum.
      decode: with a few tokens per expert (T * k / E rows each) a 64-row block is mostly padding; v3's
             blocks are the power of two >= 16 that covers the expected rows per expert (at most block_m),
             so the launch reads each used expert's weights once with little wasted work: the time is the
             weight bytes (`decode_bytes`), the floor `dskernels.bench` compares it with.

`moe_experts` = `plan_experts` (validation, the alignment: host syncs) + `launch_experts` (the launches).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from dskernels import matmul as tiled_matmul
from dskernels._checks import (check_kernel_input, check_like, device_arch, most_stages_that_fit,
                               pipeline_buffers, shared_memory_budget)
from refimpl.checks import check_int
from refimpl.moe import MLP, combine, dispatch, run_experts

STEPS = ("v1", "v2", "v3")


def align_to_experts(topk_idx: torch.Tensor, n_experts: int, block_m: int):
    """Sort the T*k (token, expert) pairs by expert and pad each expert's run to a multiple of block_m.

    topk_idx: int64 [T, k] -> (sorted_pairs int32 [num_blocks * block_m]: pair ids (t * k + j) expert by
    expert, each run padded with the sentinel T*k; block_expert int32 [num_blocks]: the expert of each block).
    The order within an expert is the token order (a stable sort, as `refimpl.moe.dispatch`).
    """
    flat = topk_idx.flatten()  # [P], P = T * k: the expert of pair p
    counts = torch.bincount(flat, minlength=n_experts)  # [E] pairs per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E] rows per expert after padding
    order = torch.argsort(flat, stable=True)  # [P] pair ids, expert by expert
    # position of the i-th sorted pair: its expert's padded start + its rank within the expert
    start = torch.cumsum(counts, 0) - counts  # [E] first sorted index of each expert
    padded_start = torch.cumsum(padded, 0) - padded  # [E] first padded row of each expert
    expert = flat[order]  # [P]
    rank = torch.arange(flat.numel(), device=flat.device) - start[expert]
    sorted_pairs = torch.full((int(padded.sum()),), flat.numel(), dtype=torch.int32, device=flat.device)
    sorted_pairs[padded_start[expert] + rank] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(n_experts, device=flat.device), padded // block_m)
    return sorted_pairs, block_expert.to(torch.int32)


@triton.jit
def gate_up_kernel(x_ptr, w_gate_ptr, w_up_ptr, sorted_pairs_ptr, block_expert_ptr, h_ptr,
                   num_pairs, H, I, TOP_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (block, n): h[rows of block, n tile] = silu(x_rows @ w_gate[e]^T) * (x_rows @ w_up[e]^T).
    x [T, H], w_gate, w_up [E, I, H], h [num_blocks * BLOCK_M, I] (padded row order)."""
    block = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate units [BLOCK_N]
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows [BLOCK_M]; 64-bit: rows * I
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + rows).to(tl.int64)  # [BLOCK_M]; num_pairs marks padding
    is_row = pair < num_pairs
    token = pair // TOP_K  # the row of x each pair reads (64-bit: token * H may pass 2^31)
    ks = tl.arange(0, BLOCK_K)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + token[:, None] * H + k[None, :], mask=is_row[:, None] & (k[None, :] < H),
                    other=0.0)  # gathered rows [BLOCK_M, BLOCK_K]
        w_offsets = expert * I * H + cols[None, :] * H + k[:, None]  # w[e]^T tile [BLOCK_K, BLOCK_N]
        w_mask = (cols[None, :] < I) & (k[:, None] < H)
        w_g = tl.load(w_gate_ptr + w_offsets, mask=w_mask, other=0.0)
        w_u = tl.load(w_up_ptr + w_offsets, mask=w_mask, other=0.0)
        if IEEE:
            gate = tl.dot(x, w_g, gate, input_precision="ieee")
            up = tl.dot(x, w_u, up, input_precision="ieee")
        else:
            gate = tl.dot(x, w_g, gate)
            up = tl.dot(x, w_u, up)
    h = gate * tl.sigmoid(gate) * up  # SwiGLU: silu(gate) * up
    tl.store(h_ptr + rows[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=is_row[:, None] & (cols[None, :] < I))


@triton.jit
def down_kernel(h_ptr, w_down_ptr, sorted_pairs_ptr, block_expert_ptr, topk_weight_ptr, out_ptr,
                num_pairs, H, I,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (block, n): out[pair, n tile] = g_pair * (h[rows of block] @ w_down[e]^T), stored at each row's
    pair id. h [num_blocks * BLOCK_M, I], w_down [E, H, I], topk_weight [T * k] float32, out [T * k, H]."""
    block = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units [BLOCK_N]
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: rows * I may pass 2^31
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + rows).to(tl.int64)  # 64-bit: pair * H may pass 2^31
    is_row = pair < num_pairs
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + rows[:, None] * I + k[None, :], mask=is_row[:, None] & (k[None, :] < I), other=0.0)
        w = tl.load(w_down_ptr + expert * H * I + cols[None, :] * I + k[:, None],
                    mask=(cols[None, :] < H) & (k[:, None] < I), other=0.0)  # w_down[e]^T tile
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    # as refimpl.moe.combine: the expert's output in the activations' dtype, times the float32 weight
    g = tl.load(topk_weight_ptr + pair, mask=is_row, other=0.0)  # [BLOCK_M]
    weighted = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * g[:, None]
    tl.store(out_ptr + pair[:, None] * H + cols[None, :], weighted.to(out_ptr.dtype.element_ty),
             mask=is_row[:, None] & (cols[None, :] < H))


def stack_expert_weights(experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ModuleList of `refimpl.moe.MLP` -> (w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I]), contiguous."""
    return tuple(torch.stack([getattr(e, name).weight.detach() for e in experts]).contiguous()
                 for name in ("gate_proj", "up_proj", "down_proj"))


def shared_memory_estimate(block_m: int, block_n: int, block_k: int, itemsize: int, num_stages: int,
                           weight_tiles: int = 2, arch: int = 90) -> int:
    """An upper estimate of a grouped-GEMM program's shared memory (bytes) on compute capability `arch`
    (90: H100, H200; 80: A100): `pipeline_buffers(num_stages, arch)` buffers (num_stages on sm_90,
    max(num_stages - 1, 1) on sm_80) of one x tile [block_m, block_k] and `weight_tiles` weight tiles
    [block_k, block_n] (2 in gate/up, 1 in down). tests/test_kernels_compile.py checks, for every config on
    sm_80 and sm_90 (Triton 3.9, aligned launches), that it is not below the compiled size."""
    per_stage = (block_m * block_k + weight_tiles * block_k * block_n) * itemsize
    return pipeline_buffers(num_stages, arch) * per_stage


NUM_STAGES = (4, 3, 2, 1)  # tried in this order: the first whose estimate fits the shared memory budget


def pick_num_stages(block_m: int, block_n: int, block_k: int, dtype: torch.dtype, budget: int,
                    arch: int = 90) -> int:
    """The most pipeline stages whose gate/up `shared_memory_estimate` on `arch` fits `budget`; ValueError
    naming the blocks when even one stage does not fit."""
    def estimate(stages: int) -> int:
        return shared_memory_estimate(block_m, block_n, block_k, dtype.itemsize, stages, arch=arch)
    return most_stages_that_fit(estimate, budget, NUM_STAGES,
                                f"block_m={block_m}, block_n={block_n}, block_k={block_k}: the grouped GEMM in {dtype}")


@dataclass(frozen=True)
class ExpertsPlan:
    """What `plan_experts` checked and chose for one routing; `launch_experts` runs it."""
    step: str
    shapes: tuple  # x, topk_idx, topk_weight, w_gate, w_up, w_down shapes
    dtype: torch.dtype
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    sorted_pairs: torch.Tensor | None  # v2: `align_to_experts` of this routing
    block_expert: torch.Tensor | None
    topk_weight: torch.Tensor | None  # v2: float32, contiguous [T * k]


def plan_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                 w_up: torch.Tensor, w_down: torch.Tensor, step: str = "v2", block_m: int = 64,
                 block_n: int = 64, block_k: int = 64) -> ExpertsPlan:
    """Validate the inputs (the expert ids are read on the host) and, for "v2", align the routing to expert
    blocks (`align_to_experts`: a sort and a host sync for the number of blocks): the scheduling metadata of
    one routing, computed once, as FlashMLA's get_mla_metadata. Arguments as `moe_experts`."""
    check_kernel_input("x", x, (None, None))
    T, H = x.shape
    check_like("w_gate", w_gate, x, "x", (None, None, H))
    E, I, _ = w_gate.shape
    check_like("w_up", w_up, x, "x", (E, I, H))
    check_like("w_down", w_down, x, "x", (E, H, I))
    check_kernel_input("topk_idx", topk_idx, (T, None), dtypes=(torch.int64,))
    check_kernel_input("topk_weight", topk_weight, (T, topk_idx.shape[1]), dtypes=(torch.float32, x.dtype))
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= E):
        raise ValueError(f"topk_idx: expected expert ids in [0, {E}), got values from {int(topk_idx.min())} "
                         f"to {int(topk_idx.max())}")
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_int(name, size, 16)
        if size & (size - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {size}")
    if step == "v3":  # decode regime: blocks no taller than an expert's expected rows
        block_m = decode_block_m(T * topk_idx.shape[1], E, block_m)
    stages = pick_num_stages(block_m, block_n, block_k, x.dtype, shared_memory_budget(x.device),
                             device_arch(x.device))
    shapes = tuple(tuple(t.shape) for t in (x, topk_idx, topk_weight, w_gate, w_up, w_down))
    if step == "v1" or T == 0:
        return ExpertsPlan(step, shapes, x.dtype, block_m, block_n, block_k, stages, None, None, None)
    sorted_pairs, block_expert = align_to_experts(topk_idx, E, block_m)
    return ExpertsPlan(step, shapes, x.dtype, block_m, block_n, block_k, stages, sorted_pairs, block_expert,
                       topk_weight.float().contiguous())


def launch_experts(plan: ExpertsPlan, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Run a plan on the tensors it was made for (shapes and dtype compared, no host sync in "v2"; "v1"
    reads the experts' row counts, as any loop over experts must). -> [T, H], x's dtype."""
    shapes = tuple(tuple(t.shape) for t in (x, topk_idx, topk_weight, w_gate, w_up, w_down))
    if shapes != plan.shapes or x.dtype != plan.dtype:
        raise ValueError(f"launch_experts: expected the planned shapes {plan.shapes} and dtype {plan.dtype}, got "
                         f"{shapes}, {x.dtype}; plan again (plan_experts) for a new routing")
    T, H = x.shape
    if T == 0:
        return x.new_zeros(0, H)
    if plan.step == "v1":
        return _experts_loop(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    if plan.step == "v3":
        return _launch_v3(plan, x, topk_idx, w_gate, w_up, w_down)
    I = w_gate.shape[1]
    top_k = topk_idx.shape[1]
    num_blocks = plan.block_expert.numel()
    h = torch.empty(num_blocks * plan.block_m, I, dtype=x.dtype, device=x.device)
    meta = dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, IEEE=x.dtype == torch.float32,
                num_stages=plan.num_stages)
    gate_up_kernel[(num_blocks, triton.cdiv(I, plan.block_n))](
        x, w_gate, w_up, plan.sorted_pairs, plan.block_expert, h, T * top_k, H, I, TOP_K=top_k, **meta)
    out_pairs = torch.empty(T * top_k, H, dtype=x.dtype, device=x.device)
    down_kernel[(num_blocks, triton.cdiv(H, plan.block_n))](
        h, w_down, plan.sorted_pairs, plan.block_expert, plan.topk_weight, out_pairs, T * top_k, H, I, **meta)
    return out_pairs.view(T, top_k, H).sum(dim=1)  # combine: the k weighted rows of each token


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, step: str = "v2", block_m: int = 64,
                block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """The routed experts' output sum_j g_tj expert_{e_tj}(x_t): x [T, H] float16/float32 (bfloat16 on a GPU),
    topk_idx int64 [T, k] (expert ids in [0, E)), topk_weight float32 or x's dtype [T, k], w_gate, w_up
    [E, I, H] and w_down [E, H, I] of x's dtype -> [T, H], x's dtype. `plan_experts` then `launch_experts`.
    Raises TypeError/ValueError naming the bad argument.
    """
    plan = plan_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, step, block_m, block_n, block_k)
    return launch_experts(plan, x, topk_idx, topk_weight, w_gate, w_up, w_down)


def _experts_loop(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """Step v1: `refimpl.moe.dispatch`, then per expert three `dskernels.matmul` launches, then `combine`."""
    x_sorted, token_idx, sort_order, counts = dispatch(x, topk_idx, w_gate.shape[0])
    outs = []
    for e, rows in enumerate(x_sorted.split(counts.tolist())):  # rows: [counts[e], H]
        if rows.shape[0] == 0:
            continue
        # matmul step v2 (fixed tiles): v3 would autotune again for every new row count. w[e].t() is a
        # transposed view (column-major [K, N]), read in place through its strides, as F.linear reads weights
        gate = tiled_matmul.matmul(rows, w_gate[e].t(), step="v2")  # [rows, I]
        up = tiled_matmul.matmul(rows, w_up[e].t(), step="v2")
        outs.append(tiled_matmul.matmul(F.silu(gate) * up, w_down[e].t(), step="v2"))  # [rows, H]
    return combine(torch.cat(outs), token_idx, sort_order, topk_weight, x.shape[0])


def reference(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """`refimpl.moe.dispatch`, `run_experts` (on `refimpl.moe.MLP` experts holding these weights), `combine`."""
    E, I, H = w_gate.shape
    experts = nn.ModuleList(MLP(H, I).to(x.dtype) for _ in range(E))
    with torch.no_grad():
        for e, expert in enumerate(experts):
            expert.gate_proj.weight.copy_(w_gate[e])
            expert.up_proj.weight.copy_(w_up[e])
            expert.down_proj.weight.copy_(w_down[e])
        x_sorted, token_idx, sort_order, counts = dispatch(x, topk_idx, E)
        expert_out = run_experts(experts, x_sorted, counts)
        return combine(expert_out, token_idx, sort_order, topk_weight, x.shape[0])


# ------------------------------------------------------------------------------------------------ step v3


def decode_block_m(pairs: int, n_experts: int, block_m: int) -> int:
    """Rows per aligned block in step v3: the power of two >= 16 covering the mean rows per expert
    (pairs / n_experts), at most block_m. DeepSeek-V2-Lite decode, 64 tokens x top-6 over 64 experts: 16."""
    return min(block_m, max(16, triton.next_power_of_2(-(-pairs // max(n_experts, 1)))))


def decode_bytes(T: int, H: int, I: int, experts_used: int, itemsize: int) -> int:
    """The least bytes one routed-experts call moves: each used expert's three [I, H] weights, read once,
    and the activations x and out [T, H] (the floor of the decode regime, where the weights dominate)."""
    return (3 * experts_used * I * H + 2 * T * H) * itemsize


@triton.jit
def down_combine_kernel(h_ptr, w_down_ptr, sorted_pairs_ptr, block_expert_ptr, topk_weight_ptr, out_ptr,
                        num_pairs, H, I, TOP_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr):
    """As `down_kernel`, with the combine fused: out[token, n tile] += g_pair * (h[row] @ w_down[e]^T) for
    each row of the block (tl.atomic_add; the k pairs of a token may sit in different programs).
    out [T, H] float32, zeroed before the launch."""
    block = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units [BLOCK_N]
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: rows * I may pass 2^31
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + rows).to(tl.int64)
    is_row = pair < num_pairs
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + rows[:, None] * I + k[None, :], mask=is_row[:, None] & (k[None, :] < I), other=0.0)
        w = tl.load(w_down_ptr + expert * H * I + cols[None, :] * I + k[:, None],
                    mask=(cols[None, :] < H) & (k[:, None] < I), other=0.0)  # w_down[e]^T tile
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    g = tl.load(topk_weight_ptr + pair, mask=is_row, other=0.0)  # [BLOCK_M]
    # as refimpl.moe.combine: the expert's output rounded to the activations' dtype, times the weight
    weighted = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * g[:, None]
    token = pair // TOP_K  # [BLOCK_M]
    tl.atomic_add(out_ptr + token[:, None] * H + cols[None, :], weighted,
                  mask=is_row[:, None] & (cols[None, :] < H))


def _launch_v3(plan: ExpertsPlan, x, topk_idx, w_gate, w_up, w_down) -> torch.Tensor:
    """Step v3: v2's gate/up launch (SwiGLU fused), then the down launch with the combine fused."""
    T, H = x.shape
    I = w_gate.shape[1]
    top_k = topk_idx.shape[1]
    num_blocks = plan.block_expert.numel()
    h = torch.empty(num_blocks * plan.block_m, I, dtype=x.dtype, device=x.device)
    meta = dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, IEEE=x.dtype == torch.float32,
                num_stages=plan.num_stages)
    gate_up_kernel[(num_blocks, triton.cdiv(I, plan.block_n))](
        x, w_gate, w_up, plan.sorted_pairs, plan.block_expert, h, T * top_k, H, I, TOP_K=top_k, **meta)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    down_combine_kernel[(num_blocks, triton.cdiv(H, plan.block_n))](
        h, w_down, plan.sorted_pairs, plan.block_expert, plan.topk_weight, out, T * top_k, H, I,
        TOP_K=top_k, **meta)
    return out.to(x.dtype)
