"""Pipeline parallelism for a refimpl DeepSeek: stages, PyTorch's schedules, and their bubbles.

A model too big for one device is cut by layers into `n_stages` consecutive stages, each on its own device (a
"rank"); a batch is cut into micro-batches that flow through the stages like cars through a car wash. While the
first micro-batch is still in stage 0 the other stages wait: that idle time is the pipeline *bubble*.
DeepSeek-V3 trains with 16-way pipeline parallelism (V3 report, sec. 3.2) under its own schedule, DualPipe,
whose bubble and memory V3's Table 2 compares with 1F1B and ZB1P:

    schedule    bubble (idle time per rank)         parameters per device    source
    1F1B        (PP-1)(F+B)                          1x                       V3 Table 2
    ZB1P        (PP-1)(F+B-2W)                       1x                       V3 Table 2 (Qi et al. 2023, ZB-H1)
    DualPipe    (PP/2-1)(F&B+B-3W)                   2x                       V3 Table 2
    DualPipeV   (PP/2-1)(F&B+B-3W), on PP/2 devices  the model held once      deepseek-ai/DualPipe README

F: a forward chunk's time; B: a full backward chunk (input and weight gradients); W: the weight-gradient part
of B alone; F&B: a forward and a backward chunk run overlapped (V3 overlaps one micro-batch's all-to-all with
another's computation this way). PP: the number of pipeline ranks.

This module does two things, both with PyTorch's own `torch.distributed.pipelining` (no pipeline engine of
ours):

* `split_stages` cuts a `DeepSeekForCausalLM` into stage modules; `run_schedules` trains a model for a few
  steps under GPipe, 1F1B, interleaved zero-bubble and DualPipeV on CPU processes (gloo), all in one launch,
  and compares the losses and every gradient with the single-process model (`single_process_steps`).
* `pipeline_order` reads each rank's list of actions (forward F, full backward B, input-gradient I,
  weight-gradient W, overlapped forward+backward) from a torch schedule, `zb1p_order` builds ZB1P's (torch has
  no ZB1P), and `simulate` turns such lists into a timeline: each action starts when its rank is free and its
  inputs are ready (a forward needs the previous stage's forward of that micro-batch, a backward the next
  stage's backward). The simulated bubble is checked against the formulas above (`bubble_formula`).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.checks import check_int
from refimpl.model import DeepSeekForCausalLM

# name -> (torch class name, stages per rank, placement of stages on ranks)
#   "loop": rank r holds stages r, r + PP, ...;  "v": rank r holds stages r and 2 PP - 1 - r (a V shape)
SCHEDULES = {
    "GPipe": ("ScheduleGPipe", 1, "loop"),
    "1F1B": ("Schedule1F1B", 1, "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "DualPipeV": ("ScheduleDualPipeV", 2, "v"),
}
TIMEOUT_S = 300  # a group of ranks that outlives this is killed: a hang fails, it never blocks


def available_schedules() -> list[str]:
    """The names of `SCHEDULES` this torch has (ScheduleDualPipeV arrived in torch 2.8)."""
    from torch.distributed.pipelining import schedules

    return [name for name, (cls, _, _) in SCHEDULES.items() if hasattr(schedules, cls)]


# ------------------------------------------------------------------------------------------------ stages
class StageModule(nn.Module):
    """Consecutive decoder layers of a `DeepSeekForCausalLM`; the first stage also embeds the tokens, the last
    also applies the final norm and the output head.

    forward: first stage input_ids [batch, seq] int64, other stages hidden [batch, seq, hidden] ->
    hidden [batch, seq, hidden], or logits [batch, seq, vocab] for the last stage. The submodules are the
    model's own (shared, not copied), so the model's `named_parameters` name every stage's gradients.
    """

    def __init__(self, model: DeepSeekForCausalLM, first: int, stop: int):
        super().__init__()
        n_layers = model.config.num_hidden_layers
        self.embed_tokens = model.model.embed_tokens if first == 0 else None
        self.layers = nn.ModuleList(model.model.layers[first:stop])
        self.norm = model.model.norm if stop == n_layers else None
        self.lm_head = model.lm_head if stop == n_layers else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [batch, seq, hidden]
        for layer in self.layers:
            x = layer(x)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))  # [batch, seq, vocab]
        return x


def split_stages(model: DeepSeekForCausalLM, n_stages: int) -> list[StageModule]:
    """Cut `model` into `n_stages` stages of equal numbers of layers, in order.

    Raises ValueError when n_stages does not divide `num_hidden_layers` (the stages would be unequal, and a
    pipeline runs at the pace of its slowest stage) or when the embedding and the output head are tied (they
    would sit on two ranks as one tensor).
    """
    check_int("n_stages", n_stages, 1)
    n_layers = model.config.num_hidden_layers
    if n_layers % n_stages:
        raise ValueError(f"n_stages: expected a divisor of num_hidden_layers ({n_layers}), got {n_stages}")
    if model.config.tie_word_embeddings and n_stages > 1:
        raise ValueError("config.tie_word_embeddings: a pipeline puts the embedding and the output head on "
                         "different stages; expected untied weights, got tie_word_embeddings=True")
    per = n_layers // n_stages
    return [StageModule(model, i * per, (i + 1) * per) for i in range(n_stages)]


def stages_of_rank(schedule: str, rank: int, world_size: int) -> list[int]:
    """The stage indices `rank` holds under `schedule` (see `SCHEDULES`), in the order torch expects."""
    _, per_rank, style = _schedule_entry(schedule)
    if style == "v":
        return [rank, 2 * world_size - 1 - rank]
    return [rank + k * world_size for k in range(per_rank)]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab], targets [batch, seq] int64 -> mean cross-entropy, in the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _schedule_entry(schedule: str) -> tuple[str, int, str]:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule]


def check_microbatches(schedule: str, n_microbatches: int, batch_size: int, world_size: int) -> None:
    """Refuse by name what a schedule cannot take: micro-batches that do not divide the batch, DualPipeV with
    fewer micro-batches than stages, interleaved zero-bubble with a count that is not a multiple of the ranks."""
    check_int("n_microbatches", n_microbatches, 1)
    _, per_rank, _ = _schedule_entry(schedule)
    if batch_size % n_microbatches:
        raise ValueError(f"n_microbatches: expected a divisor of the batch size ({batch_size}), "
                         f"got {n_microbatches}")
    n_stages = per_rank * world_size
    if schedule == "DualPipeV" and n_microbatches < n_stages:
        raise ValueError(f"n_microbatches: DualPipeV needs at least as many micro-batches as stages "
                         f"({n_stages}), got {n_microbatches}")
    if schedule == "InterleavedZeroBubble" and n_microbatches % world_size:
        raise ValueError(f"n_microbatches: InterleavedZeroBubble needs a multiple of the ranks ({world_size}), "
                         f"got {n_microbatches}")


# ------------------------------------------------------------------------------------------------ training
def single_process_steps(model: DeepSeekForCausalLM, input_ids: torch.Tensor, targets: torch.Tensor,
                         steps: int, lr: float):
    """The reference: `steps` SGD steps on one process, on the same batch.
    -> (losses [steps], {parameter name: gradient of the last step})."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = next_token_loss(model(input_ids), targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads


def _rank_steps(schedule: str, model: DeepSeekForCausalLM, input_ids, targets, n_microbatches: int,
                rank: int, world_size: int, steps: int, lr: float):
    """`steps` SGD steps of this rank's stages under `schedule` (the optimizer updates the parameters that got
    a gradient here, those of this rank's stages). -> (losses [steps] or None, {name: grad of the last step})."""
    from torch.distributed.pipelining import PipelineStage, schedules

    cls_name, per_rank, _ = _schedule_entry(schedule)
    n_stages = per_rank * world_size
    modules = split_stages(model, n_stages)
    mine = stages_of_rank(schedule, rank, world_size)
    stages = [PipelineStage(modules[i], i, n_stages, torch.device("cpu")) for i in mine]
    cls = getattr(schedules, cls_name)
    sched = cls(stages[0] if per_rank == 1 else stages, n_microbatches, loss_fn=next_token_loss)
    has_first, has_last = 0 in mine, n_stages - 1 in mine
    opt = torch.optim.SGD([p for i in mine for p in modules[i].parameters()], lr=lr)
    step_losses = []
    for _ in range(steps):
        losses: list[torch.Tensor] = []
        args = (input_ids,) if has_first else ()
        kwargs = dict(target=targets, losses=losses) if has_last else {}
        opt.zero_grad()
        sched.step(*args, **kwargs)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        if has_last:  # the micro-batches are of equal size: their mean loss is the batch's
            step_losses.append(torch.stack(losses).detach().mean())
    return (torch.stack(step_losses) if has_last else None), grads


def _rank_main(rank: int, world_size: int, port: int, job_file: str, out_dir: str) -> None:
    """One spawned rank: every schedule of the job, each on a fresh copy of the model; results to out_dir."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    job = torch.load(job_file, weights_only=False)
    results = {}
    for schedule in job["schedules"]:
        model = DeepSeekForCausalLM(job["config"]).to(job["dtype"])
        model.load_state_dict(job["state_dict"])
        dist.barrier()
        start = time.perf_counter()
        losses, grads = _rank_steps(schedule, model, job["input_ids"], job["targets"], job["n_microbatches"],
                                    rank, world_size, job["steps"], job["lr"])
        results[schedule] = dict(losses=losses, grads=grads, seconds=time.perf_counter() - start)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size: int, job_file: str, out_dir: str) -> None:
    """Start the ranks and wait; kill them all and raise if one fails or they outlive TIMEOUT_S."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, job_file, out_dir))
             for r in range(world_size)]
    for p in procs:
        p.start()
    start = time.monotonic()
    while any(p.is_alive() for p in procs):
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if failed or time.monotonic() - start > TIMEOUT_S:
            for p in procs:
                p.kill()
            raise RuntimeError(f"pipeline ranks: exit codes {[p.exitcode for p in procs]}"
                               + ("" if failed else f" (killed after {TIMEOUT_S} s)"))
        time.sleep(0.05)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"pipeline ranks: exit codes {[p.exitcode for p in procs]}")


@dataclass
class ScheduleResult:
    """One schedule's training steps against the single-process model."""

    losses: list[float]  # the pipeline's loss at each step (mean over micro-batches)
    loss_error: float  # largest |pipeline loss - single-process loss| over the steps
    max_grad_error: float  # largest |difference| over every gradient element of the model, last step
    n_grads: int  # parameters with a gradient, gathered from all ranks
    seconds: float  # the slowest rank's wall time for the steps (CPU: a measure of nothing but overheads)


def run_schedules(model: DeepSeekForCausalLM, input_ids: torch.Tensor, targets: torch.Tensor, *,
                  world_size: int = 2, n_microbatches: int = 4, schedules: list[str] | None = None,
                  steps: int = 2, lr: float = 0.1) -> dict[str, ScheduleResult]:
    """Train `model` for `steps` SGD steps (learning rate `lr`, the same batch each step) under each schedule
    on `world_size` CPU processes (gloo), all schedules in one launch, each from the same initial weights, and
    compare each with `single_process_steps` of the same model. `model` itself is not changed.

    input_ids, targets: [batch, seq] int64, batch divisible by n_microbatches. world_size: 1 to 4. The model's
    dtype is kept (float64 makes the comparison exact to rounding). Raises ValueError for a schedule this torch
    lacks, a split that does not divide the layers or micro-batches a schedule cannot take; RuntimeError when a
    rank fails or hangs (after TIMEOUT_S).
    """
    check_int("world_size", world_size, 1)
    if world_size > 4:
        raise ValueError(f"world_size: expected at most 4 CPU processes, got {world_size}")
    schedules = available_schedules() if schedules is None else schedules
    for name in schedules:
        if name not in available_schedules():
            raise ValueError(f"schedule: {name!r} is not in this torch ({torch.__version__}); "
                             f"available: {available_schedules()}")
        check_microbatches(name, n_microbatches, input_ids.shape[0], world_size)
        split_stages(model, SCHEDULES[name][1] * world_size)  # refuses a split that does not divide
    check_int("steps", steps, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = DeepSeekForCausalLM(model.config).to(next(model.parameters()).dtype)
    reference.load_state_dict(state)
    ref_losses, ref_grads = single_process_steps(reference, input_ids, targets, steps, lr)
    with tempfile.TemporaryDirectory() as tmp:
        job = dict(config=model.config, dtype=next(model.parameters()).dtype, schedules=schedules,
                   state_dict=state, input_ids=input_ids, targets=targets, n_microbatches=n_microbatches,
                   steps=steps, lr=lr)
        torch.save(job, os.path.join(tmp, "job.pt"))
        _spawn(world_size, os.path.join(tmp, "job.pt"), tmp)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    return {name: compare(name, [r[name] for r in ranks], ref_losses, ref_grads) for name in schedules}


def compare(name: str, ranks: list[dict], ref_losses: torch.Tensor, ref_grads: dict) -> ScheduleResult:
    """Gather one schedule's results from its ranks (each a dict: losses [steps] or None, grads {name: grad},
    seconds) and measure them against the single-process reference. Raises RuntimeError when the ranks
    together miss a gradient or report no loss."""
    grads = {}
    for rank in ranks:
        grads.update(rank["grads"])
    if set(grads) != set(ref_grads):
        raise RuntimeError(f"{name}: gradients missing for {sorted(set(ref_grads) - set(grads))}")
    losses = [r["losses"] for r in ranks if r["losses"] is not None]
    if not losses:
        raise RuntimeError(f"{name}: no rank reported the loss (the last stage's rank reports it)")
    err = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
    return ScheduleResult(losses=losses[0].tolist(), loss_error=float((losses[0] - ref_losses).abs().max()),
                          max_grad_error=err, n_grads=len(grads), seconds=max(r["seconds"] for r in ranks))


# ------------------------------------------------------------------------------------------------ simulation
@dataclass(frozen=True)
class Op:
    """One computation of a schedule: kind "F" (forward), "B" (full backward), "I" (input-gradient backward)
    or "W" (weight-gradient backward), of one stage on one micro-batch."""

    kind: str
    stage: int
    microbatch: int


Action = tuple[Op, ...]  # one op, or two run overlapped (a forward and a backward: DualPipe's F&B)


@dataclass(frozen=True)
class Slot:
    """An action placed on the timeline: rank, start and end time (units of the durations given)."""

    rank: int
    start: float
    end: float
    ops: Action


class _FakeStage:
    """The attributes torch's schedules read from their stages to build the action lists (no process group)."""

    def __init__(self, index: int, n_stages: int, rank: int, world_size: int):
        self.stage_index, self.num_stages = index, n_stages
        self.group_rank, self.group_size = rank, world_size
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.submod = nn.Linear(1, 1)
        self.stage_index_to_group_rank: dict[int, int] = {}

    def has_backward(self) -> bool:
        return True


def pipeline_order(schedule: str, world_size: int, n_microbatches: int) -> dict[int, list[Action]]:
    """Each rank's compute actions, in order, for `world_size` ranks.

    GPipe and 1F1B are written here from their definitions (all forwards then all backwards; 1F1B: PP-1-r
    warm-up forwards on rank r, then one forward one backward, then the remaining backwards), because torch
    2.13's `_get_pipeline_order` of its single-stage schedules, a visualisation helper, numbers rank r's 1F1B
    micro-batches from 1 instead of 0. The multi-stage schedules (interleaved zero-bubble, DualPipeV) are read
    from the schedule's `pipeline_order`, the action lists torch's runtime executes (not a public API: checked
    against torch 2.13); their idle slots (None) and communication actions are dropped, since `simulate`
    derives the waiting from the dependencies.
    """
    cls_name, per_rank, _ = _schedule_entry(schedule)
    check_microbatches(schedule, n_microbatches, n_microbatches, world_size)
    if schedule == "GPipe":
        return {r: [(Op(k, r, m),) for k in "FB" for m in range(n_microbatches)] for r in range(world_size)}
    if schedule == "1F1B":
        return {r: _one_f_one_b(r, world_size, n_microbatches) for r in range(world_size)}
    from torch.distributed.pipelining import schedules

    n_stages = per_rank * world_size
    stages = [_FakeStage(i, n_stages, 0, world_size) for i in stages_of_rank(schedule, 0, world_size)]
    raw = getattr(schedules, cls_name)(stages, n_microbatches, loss_fn=next_token_loss).pipeline_order
    return {rank: [_to_action(a) for a in acts if a is not None and a.is_compute_op]
            for rank, acts in raw.items()}


def _one_f_one_b(rank: int, world_size: int, m: int) -> list[Action]:
    warmup = min(world_size - 1 - rank, m)
    acts = [(Op("F", rank, i),) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: the next forward, then the oldest backward
        acts += [(Op("F", rank, warmup + i),), (Op("B", rank, i),)]
    return acts + [(Op("B", rank, i),) for i in range(m - warmup, m)]


def _to_action(a) -> Action:
    if a.sub_actions is not None:  # OVERLAP_F_B: a forward and a backward, run overlapped
        return tuple(Op(s.computation_type.value, s.stage_index, s.microbatch_index) for s in a.sub_actions)
    return (Op(a.computation_type.value, a.stage_index, a.microbatch_index),)


def zb1p_order(world_size: int, n_microbatches: int) -> dict[int, list[Action]]:
    """ZB1P (zero-bubble ZB-H1: Qi et al. 2023, arXiv 2401.10241, sec. 3), which torch lacks: 1F1B's order with
    each full backward split into its input-gradient part I, which the previous stage waits for, and its
    weight-gradient part W, which nobody waits for. Rank r postpones each W until r more I's have run (at most
    r W's pending): the previous stages get their gradients W sooner at every step, and the postponed W's fill
    the time rank r would have waited. The activations held stay within 1F1B's PP micro-batches per rank.
    `simulate` on this order gives exactly (PP-1)(F+B-2W) whenever W is no longer than F and than I = B - W (a
    postponed W then fits the gap it fills); a longer W overflows it (tests/test_pipeline.py)."""
    out = {}
    for rank in range(world_size):
        acts, pending = [], []
        for (op,) in _one_f_one_b(rank, world_size, n_microbatches):
            if op.kind == "F":
                acts.append((op,))
                continue
            acts.append((Op("I", rank, op.microbatch),))
            pending.append(op.microbatch)
            if len(pending) > rank:
                acts.append((Op("W", rank, pending.pop(0)),))
        out[rank] = acts + [(Op("W", rank, m),) for m in pending]
    return out


def _deps(op: Op, n_stages: int) -> list[tuple[str, int, int]]:
    """(kind group, stage, micro-batch) that must be done before `op` starts; "bwd" is a B or an I."""
    if op.kind == "F":
        return [("F", op.stage - 1, op.microbatch)] if op.stage > 0 else []
    if op.kind in ("B", "I"):
        deps = [("F", op.stage, op.microbatch)]
        return deps + ([("bwd", op.stage + 1, op.microbatch)] if op.stage < n_stages - 1 else [])
    return [("bwd", op.stage, op.microbatch)]  # W after the input gradient of its stage


def _key(op: Op) -> tuple[str, int, int]:
    return ("F" if op.kind == "F" else "bwd" if op.kind in ("B", "I") else "W", op.stage, op.microbatch)


def simulate(order: dict[int, list[Action]], durations: dict[str, float]) -> list[Slot]:
    """Place every action on a timeline: in its rank's order, each starts when the rank is free and its
    dependencies (`_deps`) are done. durations: "F", "B" (full backward), "W" (weight part of B), and "F&B"
    (an overlapped forward + backward action); I = B - W. Raises ValueError when the order deadlocks (an
    action waits for one that can only come after it). -> the slots, by rank and start time.
    """
    for key in ("F", "B", "W", "F&B"):
        if key not in durations:
            raise ValueError(f"durations: expected keys F, B, W, F&B, missing {key!r}")
    dur = {"F": durations["F"], "B": durations["B"], "W": durations["W"], "I": durations["B"] - durations["W"]}
    n_stages = 1 + max(op.stage for acts in order.values() for a in acts for op in a)
    done: dict[tuple[str, int, int], float] = {}  # (kind group, stage, micro-batch) -> end time
    todo = {r: list(acts) for r, acts in order.items()}
    free = {r: 0.0 for r in order}
    slots: list[Slot] = []
    while any(todo.values()):
        placed = False
        for r, acts in todo.items():
            needs = [d for op in acts[0] for d in _deps(op, n_stages)] if acts else None
            if acts and all(d in done for d in needs):
                action = acts.pop(0)
                start = max([free[r]] + [done[d] for d in needs])
                end = start + (durations["F&B"] if len(action) > 1 else dur[action[0].kind])
                slots.append(Slot(r, start, end, action))
                free[r] = end
                done.update({_key(op): end for op in action})
                placed = True
        if not placed:
            stuck = {r: [str(o) for o in acts[0]] for r, acts in todo.items() if acts}
            raise ValueError(f"order: deadlock, every rank waits: next actions {stuck}")
    return sorted(slots, key=lambda s: (s.rank, s.start))


def bubble(slots: list[Slot]) -> dict[int, float]:
    """Each rank's idle time: the whole step's length (first start to last end over all ranks) minus the time
    the rank computes. -> {rank: idle time}."""
    span = max(s.end for s in slots) - min(s.start for s in slots)
    busy: dict[int, float] = {}
    for s in slots:
        busy[s.rank] = busy.get(s.rank, 0.0) + s.end - s.start
    return {r: span - b for r, b in sorted(busy.items())}


def bubble_formula(schedule: str, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """V3 Table 2's bubble for `schedule` ("1F1B", "ZB1P", "DualPipe", "DualPipeV") with `pp` pipeline ranks
    (DualPipeV: pp = twice its ranks, as in the DualPipe README). F, B, W, FB: see the module docstring."""
    formulas = {"1F1B": (pp - 1) * (F + B), "ZB1P": (pp - 1) * (F + B - 2 * W),
                "DualPipe": (pp / 2 - 1) * (FB + B - 3 * W), "DualPipeV": (pp / 2 - 1) * (FB + B - 3 * W)}
    if schedule not in formulas:
        raise ValueError(f"schedule: expected one of {sorted(formulas)}, got {schedule!r}")
    return formulas[schedule]
