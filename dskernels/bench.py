"""python -m dskernels.bench: every ladder step next to PyTorch and the hardware floor, on one GPU.

    python -m dskernels.bench                      # GPU, bfloat16, the issue's shapes; writes dskernels/results/
    python -m dskernels.bench --tiny --out DIR     # tiny shapes, float32; on a CPU under Triton's interpreter

For each op, each implementation (the kernel ladder; PyTorch eager; torch.compile, SDPA or cuBLAS where they
apply) is timed the same way, so that it cannot be gamed:
  * CUDA events around the call alone, after warm-up runs, median of `--reps` runs;
  * inputs random (no zeros), several sets used in turn, and the L2 cache flushed (a 256 MiB buffer
    overwritten) before every run, so no run finds its inputs in L2 from the previous one;
  * what a serving engine runs per step is timed: MLA decode and MoE v2 are split into a plan (validation
    with host syncs, scheduling metadata, configuration; once per batch, as FlashMLA's get_mla_metadata) and
    a launch, and the launch is timed, with a "plan + launch" row beside it; the results say, per op, what
    the timed region holds;
  * the output of each implementation checked in the same run with `dskernels._checks.compare` against the
    op in float32 on the same inputs (relative norm error and worst row's error, bounds per dtype).
The floor is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): the least time the op needs if it reads and
writes each byte once and runs at the tensor cores' peak, for the GPU it runs on: from its datasheet (`PEAKS`,
keyed by device name) and from the bf16 matmul rate and copy bandwidth measured in the same run (the baselines
of the 2026-11 H200 anchors, measured again here). Results: a printed table, results.json, results.md and
roofline.png in --out, labelled with the GPU, driver, CUDA, torch and triton versions, date and commit.

In --tiny mode the times are those of Triton's interpreter on a CPU (meaningless as performance): it checks
that the benchmark runs end to end and that every implementation agrees with its reference. torch.compile is
skipped there (about a minute per graph on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Datasheet peaks by GPU: (name patterns in torch.cuda.get_device_name(), label, dense BF16 tensor-core FLOP/s
# (the datasheets' headline figures are with 2:4 sparsity: half of them), memory bandwidth in bytes/s, source).
PEAKS = [
    (("H200 NVL",), "H200 NVL", 835.5e12, 4.8e12, "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)"),
    (("H200",), "H200 SXM", 989.5e12, 4.8e12, "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)"),
    (("H100 NVL",), "H100 NVL", 835.5e12, 3.9e12, "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100)"),
    (("H100 PCIe",), "H100 PCIe", 756.5e12, 2.0e12, "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100)"),
    (("H100",), "H100 SXM", 989.5e12, 3.35e12, "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100)"),
    (("A100-SXM4-40GB", "A100-PCIE-40GB"), "A100 40GB", 312e12, 1.555e12,
     "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100)"),
    (("A100 80GB PCIe",), "A100 80GB PCIe", 312e12, 1.935e12, "NVIDIA A100 datasheet"),
    (("A100",), "A100 80GB SXM", 312e12, 2.039e12, "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100)"),
]
L2_FLUSH_BYTES = 256 * 2**20  # more than the 50 MB L2 of Hopper GPUs (NVIDIA H100 whitepaper)
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Peaks:
    """The ceilings the floor column divides by: the datasheet's, and what this run measured."""
    label: str
    flops: float | None  # datasheet dense BF16 FLOP/s (None: GPU not in PEAKS, or no GPU)
    bytes_per_s: float | None
    source: str
    measured_flops: float | None = None  # bf16 torch.matmul 8192^3 (--tiny: not measured)
    measured_bytes_per_s: float | None = None  # 1 GiB device-to-device copy, bytes read + written / time


def datasheet_peaks(device_name: str) -> Peaks:
    """The PEAKS entry whose pattern is in `device_name` (first match), else one with no figures."""
    for patterns, label, flops, bandwidth, source in PEAKS:
        if any(p in device_name for p in patterns):
            return Peaks(label, flops, bandwidth, source)
    return Peaks(device_name, None, None, "not in dskernels.bench.PEAKS: no datasheet floor")


@dataclass
class Case:
    """One op at one shape: how to make inputs, the implementations to time, the reference to check against."""
    op: str
    shape: str
    flops: float
    bytes: float  # the least bytes the op must move from and to memory
    make_inputs: Callable[[torch.Generator], tuple]
    impls: dict[str, Callable]
    reference: Callable  # the same op in float32 on the same inputs (compared with dskernels._checks.compare)
    timed: str  # what the timed region holds (the plan / metadata steps are outside unless said)
    unchecked: tuple = ()  # baselines that compute another op of the same size (e.g. dense GEMMs)
    results: list = field(default_factory=list)


def _randn(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _time_ms(fn, input_sets, device, warmup, reps) -> float:
    """Median time of fn(*inputs) in milliseconds, inputs cycling through input_sets."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    times = []
    if device == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
        torch.cuda.synchronize()
        for i in range(reps):
            inputs = input_sets[i % len(input_sets)]
            flush.fill_(i)  # evict everything from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            inputs = input_sets[i % len(input_sets)]
            start = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cases(tiny: bool, device: str, dtype: torch.dtype, compile_: bool) -> list[Case]:
    """The ops at the issue's shapes (tiny ones with --tiny). Each reference runs in float32 on the inputs."""
    from dskernels import flash_attention as fa
    from dskernels import matmul as mm
    from dskernels import mla_decode as md
    from dskernels import mla_decode_flash as mf
    from dskernels import moe
    from dskernels import rowwise
    from refimpl.moe import combine, dispatch

    size = dtype.itemsize
    maybe_compile = (lambda f: {"torch.compile": torch.compile(f)}) if compile_ else (lambda f: {})
    f32 = lambda f: lambda *a: f(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
                                   for t in a))
    cases = []

    rows, cols = (4, 100) if tiny else (16384, 8192)
    cases.append(Case(
        "softmax", f"{rows}x{cols}", 5 * rows * cols, 2 * rows * cols * size,
        lambda g: (_randn(g, rows, cols, dtype=dtype, device=device, scale=3),),
        {"v1": lambda x: rowwise.softmax(x, step="v1"), "v2": lambda x: rowwise.softmax(x, step="v2"),
         "PyTorch eager": rowwise.softmax_reference, **maybe_compile(rowwise.softmax_reference)},
        f32(lambda x: x.softmax(dim=-1)), "the call (no host sync in the wrapper)"))

    cases.append(Case(
        "rmsnorm", f"{rows}x{cols}", 4 * rows * cols, (2 * rows * cols + cols) * size,
        lambda g: (_randn(g, rows, cols, dtype=dtype, device=device),
                   1 + _randn(g, cols, dtype=dtype, device=device, scale=0.1)),
        {"kernel": lambda x, w: rowwise.rmsnorm(x, w, 1e-6),
         "refimpl eager": lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6),
         **maybe_compile(lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6))},
        f32(lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6)), "the call (no host sync in the wrapper)"))

    n = 64 if tiny else 8192
    cases.append(Case(
        "matmul", f"{n}^3", 2 * n**3, 3 * n * n * size,
        lambda g: (_randn(g, n, n, dtype=dtype, device=device), _randn(g, n, n, dtype=dtype, device=device)),
        {"v1": lambda a, b: mm.matmul(a, b, step="v1", block_m=128, block_n=128),
         "v2": lambda a, b: mm.matmul(a, b, step="v2", block_m=128, block_n=128),
         "v3": lambda a, b: mm.matmul(a, b, step="v3"), "torch.matmul (cuBLAS)": torch.matmul},
        f32(torch.matmul), "the call (no host sync in the wrapper)"))

    B, H, S, D = (1, 2, 64, 32) if tiny else (4, 32, 4096, 128)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    cases.append(Case(
        "flash attention (causal)", f"B{B} H{H} S{S} D{D}", 4 * B * H * S * S * D / 2, 4 * B * H * S * D * size,
        lambda g: tuple(_randn(g, B, H, S, D, dtype=dtype, device=device) for _ in range(3)),
        {"v1": lambda q, k, v: fa.flash_attention(q, k, v, causal=True, step="v1", block_m=64, block_n=64),
         "v2": lambda q, k, v: fa.flash_attention(q, k, v, causal=True, step="v2", block_m=64, block_n=64),
         "v3": lambda q, k, v: fa.flash_attention(q, k, v, causal=True, step="v3", block_m=64, block_n=64),
         "SDPA": sdpa, "refimpl eager": lambda q, k, v: fa.reference(q, k, v, causal=True),
         **maybe_compile(lambda q, k, v: fa.reference(q, k, v, causal=True))},
        f32(sdpa), "the call (no host sync in the wrapper)"))

    B, H, L, C, R = (3, 16, 100, 64, 16) if tiny else (64, 128, 4096, 512, 64)
    scale = (C // 4 + R) ** -0.5  # DeepSeek-V3: (qk_nope_head_dim 128 + qk_rope_head_dim 64) ** -0.5

    def make_mla(g):
        q_latent, q_pe = (_randn(g, B, H, d, dtype=dtype, device=device) for d in (C, R))
        c_kv, k_pe = (_randn(g, B, L, d, dtype=dtype, device=device) for d in (C, R))
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
        pages = md.paginate(c_kv, k_pe, seq_lens, generator=torch.Generator().manual_seed(0))
        plans = {step: md.plan_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, step=step) for step in ("v1", "v2")}
        plans["v3"] = md.plan_decode(q_latent, q_pe, pages[0], pages[1], seq_lens, step="v3", block_table=pages[2])
        plans["v4"] = mf.plan_flash_decode(q_latent, q_pe, *pages, seq_lens)
        return q_latent, q_pe, c_kv, k_pe, seq_lens, pages, plans

    def absorbed_eager(q_latent, q_pe, c_kv, k_pe, seq_lens, pages, plans):  # refimpl.mla's einsums
        scores = torch.einsum("bhc,btc->bht", q_latent, c_kv) + torch.einsum("bhr,btr->bht", q_pe, k_pe)
        probs = (scores.float() * scale).softmax(dim=-1).to(c_kv.dtype)
        return torch.einsum("bht,btc->bhc", probs, c_kv)

    def launch(step):
        def run(q, p, c, k, s, pages, plans):
            if step == "v4":
                return mf.launch_flash_decode(plans["v4"], q, p, *pages, s, scale)
            if step == "v3":
                return md.launch_decode(plans["v3"], q, p, pages[0], pages[1], s, scale, pages[2])
            return md.launch_decode(plans[step], q, p, c, k, s, scale)
        return run

    cases.append(Case(
        "MLA decode (absorbed)", f"B{B} heads{H} ctx{L} {C}+{R}", 2 * B * H * L * (2 * C + R),
        (B * L * (C + R) + 2 * B * H * C + B * H * R) * size, make_mla,
        {"v1": launch("v1"), "v2": launch("v2"), "v3 (paged)": launch("v3"), "v4 (FlashMLA design)": launch("v4"),
         "v2, plan + launch": lambda q, p, c, k, s, pages, plans: md.mla_decode(q, p, c, k, s, scale, step="v2"),
         "PyTorch eager": absorbed_eager, **maybe_compile(absorbed_eager)},
        lambda q, p, c, k, s, pages, plans: md.reference(q.float(), p.float(), c.float(), k.float(), s, scale),
        "v1, v2, v3, v4: the launch (kernels) only; the plan (validation of seq_lens / block table: host syncs; "
        "the configuration) once per batch outside, as FlashMLA's get_mla_metadata; 'plan + launch': both"))

    T, Hd, E, I, K = (16, 32, 4, 32, 2) if tiny else (8192, 2048, 64, 1408, 6)  # DeepSeek-V2-Lite's experts

    def make_moe(g):
        logits = torch.randn(T, E, generator=g, device=device)
        topk_weight, topk_idx = logits.softmax(-1).topk(K, dim=-1)  # random routing, softmax weights
        args = (_randn(g, T, Hd, dtype=dtype, device=device), topk_idx, topk_weight.contiguous(),
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, Hd, I, dtype=dtype, device=device, scale=I ** -0.5))
        dense = (_randn(g, T * K, Hd, dtype=dtype, device=device), _randn(g, 2 * I, Hd, dtype=dtype, device=device),
                 _randn(g, Hd, I, dtype=dtype, device=device))
        return *args, moe.plan_experts(*args, step="v2"), dense

    def experts_eager(x, topk_idx, topk_weight, w_gate, w_up, w_down, plan, dense):  # refimpl.moe's loop
        x_sorted, token_idx, sort_order, counts = dispatch(x, topk_idx, E)
        outs = [F.linear(F.silu(F.linear(rows, w_gate[e])) * F.linear(rows, w_up[e]), w_down[e])
                for e, rows in enumerate(x_sorted.split(counts.tolist()))]  # refimpl.moe.MLP per expert
        return combine(torch.cat(outs), token_idx, sort_order, topk_weight, x.shape[0])

    def dense_gemms(*args):  # the same FLOPs as one dense GEMM pair over all T * K rows: not the op
        rows, w_gate_up, w_down = args[-1]
        gate, up = F.linear(rows, w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    cases.append(Case(
        "MoE experts", f"T{T} H{Hd} E{E} I{I} top{K}", 2 * T * K * 3 * Hd * I,
        (2 * T * Hd + 3 * E * Hd * I) * size, make_moe,
        {"v1 (loop)": lambda *a: moe.moe_experts(*a[:6], step="v1"),
         "v2 (grouped)": lambda *a: moe.launch_experts(a[6], *a[:6]),
         "v2, plan + launch": lambda *a: moe.moe_experts(*a[:6], step="v2"),
         "PyTorch eager (loop)": experts_eager, "dense GEMMs, same FLOPs (not the op)": dense_gemms},
        lambda *a: moe.reference(*(t.float() if t.is_floating_point() else t for t in a[:6])),
        "v2 (grouped): the two grouped GEMM launches and the combine; its plan (expert id check, "
        "align_to_experts: a sort and a host sync) outside, once per routing; 'plan + launch', v1 and the eager "
        "loop: everything (a loop over experts reads their row counts on the host)",
        unchecked=("dense GEMMs, same FLOPs (not the op)",)))
    cases.append(_moe_decode_case(2 if tiny else 64, Hd, E, I, K, device, dtype, experts_eager))

    from dskernels import fp8_gemm  # the FP8 GEMM of lesson 20 (DeepSeek-V3's block scales)

    cases.append(fp8_gemm.bench_case(tiny, device, dtype))
    from dskernels import flash_attention_v4  # forward tuned for Hopper, and the backward pass (lesson 15)

    cases += flash_attention_v4.bench_cases(tiny, device, dtype)
    return cases


def _moe_decode_case(T: int, Hd: int, E: int, I: int, K: int, device: str, dtype: torch.dtype,
                     experts_eager: Callable) -> Case:
    """MoE experts in the decode regime: T tokens (64 at DeepSeek-V2-Lite's shapes: 6 rows per expert),
    routed round-robin so every expert is used; the floor is the bytes of all experts' weights read once
    (`dskernels.moe.decode_bytes`)."""
    from dskernels import moe

    def make(g):
        pairs = torch.arange(T * K, device=device)
        topk_idx = (pairs % E).view(T, K)  # distinct experts per token while K <= E; all E used
        topk_weight = torch.rand(T, K, generator=g, device=device)
        args = (_randn(g, T, Hd, dtype=dtype, device=device), topk_idx, topk_weight,
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, Hd, I, dtype=dtype, device=device, scale=I ** -0.5))
        return *args, {step: moe.plan_experts(*args, step=step) for step in ("v2", "v3")}

    return Case(
        "MoE experts (decode)", f"T{T} H{Hd} E{E} I{I} top{K}", 2 * T * K * 3 * Hd * I,
        moe.decode_bytes(T, Hd, I, E, dtype.itemsize), make,
        {"v2 (grouped)": lambda *a: moe.launch_experts(a[6]["v2"], *a[:6]),
         "v3 (decode blocks, fused combine)": lambda *a: moe.launch_experts(a[6]["v3"], *a[:6]),
         "PyTorch eager (loop)": lambda *a: experts_eager(*a[:6], None, None)},
        lambda *a: moe.reference(*(t.float() if t.is_floating_point() else t for t in a[:6])),
        "v2, v3: the launches (and the combine); their plans (alignment: a sort, a host sync) outside, once "
        "per routing; the eager loop: everything")


def _run_case(case: Case, device: str, warmup: int, reps: int, input_sets: int) -> None:
    from dskernels._checks import compare

    g = torch.Generator(device=device).manual_seed(0)
    inputs = [case.make_inputs(g) for _ in range(input_sets)]
    want = case.reference(*inputs[0])
    for name, fn in case.impls.items():
        got = fn(*inputs[0])
        check = None if name in case.unchecked else compare(got, want, dtype=got.dtype)
        ms = _time_ms(fn, inputs, device, warmup, reps)
        case.results.append(dict(
            op=case.op, shape=case.shape, impl=name, ms=ms, tflops=case.flops / ms / 1e9, gbps=case.bytes / ms / 1e6,
            checked=check is not None, ok=check.ok if check else None,
            rel_err=check.rel_err if check else None, max_row_err=check.max_row_err if check else None,
            rel_bound=check.rel_bound if check else None, row_bound=check.row_bound if check else None,
            flops=case.flops, bytes=case.bytes, timed=case.timed))
        verdict = "not checked (another op)" if check is None else check.message
        print(f"{case.op:26s} {name:38s} {ms:10.4f} ms  {verdict}", flush=True)
    del inputs


def _floor_ms(flops: float, nbytes: float, peak_flops: float | None, peak_bytes: float | None) -> float | None:
    """max(FLOPs / peak FLOP/s, bytes / peak bandwidth) in ms; None without peaks."""
    if not peak_flops or not peak_bytes:
        return None
    return max(flops / peak_flops, nbytes / peak_bytes) * 1e3


def measure_peaks(peaks: Peaks, device: str, warmup: int, reps: int) -> Peaks:
    """The achieved copy bandwidth (1 GiB device to device) and bf16 matmul rate (8192^3, torch.matmul),
    timed as every row (`_time_ms`); the anchors of ../shared/gpu-anchors measured the same two."""
    if device != "cuda":
        return peaks
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(2**29, generator=g, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda a, b: b.copy_(a), [(src, dst)], device, warmup, reps)
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = _time_ms(torch.matmul, [(a, b)], device, warmup, reps)
    return replace(peaks, measured_bytes_per_s=2 * 2**30 / (copy_ms / 1e3),
                   measured_flops=2 * n**3 / (matmul_ms / 1e3))


def _decode_tokens_per_s(tiny: bool, device: str, dtype: torch.dtype) -> list[dict]:
    """Greedy decode throughput of a DeepSeek-V2-Lite-shaped model (random weights, 4 of its 27 layers) with
    and without `dskernels.model.use_kernels`; --tiny: a 3-layer toy model."""
    from dskernels.model import use_kernels
    from refimpl.config import ModelConfig, load_known
    from refimpl.model import DeepSeekForCausalLM

    if tiny:
        config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                             qk_rope_head_dim=16, v_head_dim=8, n_routed_experts=6, n_shared_experts=1,
                             num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                             max_position_embeddings=64)
        batch, prompt_len, new = 2, 4, 3
    else:
        config = load_known("DeepSeek-V2-Lite").replace(num_hidden_layers=4)
        batch, prompt_len, new = 32, 128, 64
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekForCausalLM(config).to(dtype).eval()
        prompt = torch.randint(0, config.vocab_size, (batch, prompt_len))
    rows, outputs = [], {}
    for label, switch in (("refimpl", None), ("with kernels", use_kernels)):
        def generate():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = model.generate(prompt, new)
            if device == "cuda":
                torch.cuda.synchronize()
            return tokens, time.perf_counter() - start
        if switch is None:
            generate()  # warm-up
            tokens, seconds = generate()
        else:
            with switch(model):
                generate()  # warm-up (compiles the kernels on a GPU)
                tokens, seconds = generate()
        outputs[label] = tokens
        rows.append(dict(model=f"{'toy' if tiny else 'DeepSeek-V2-Lite shape'}, {config.num_hidden_layers} layers",
                         impl=label, batch=batch, prompt=prompt_len, new_tokens=new,
                         tokens_per_s=batch * new / seconds))
    same = float((outputs["refimpl"] == outputs["with kernels"]).float().mean())
    for row in rows:
        row["same_tokens_fraction"] = same
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _markdown(results: list[dict], decode: list[dict], header: str, peaks: Peaks) -> str:
    notes = (f"Floors: max(FLOPs / peak, bytes / bandwidth), from the datasheet of the {peaks.label} "
             f"({_fmt(peaks.flops and peaks.flops / 1e12, '.1f')} TFLOP/s dense BF16, "
             f"{_fmt(peaks.bytes_per_s and peaks.bytes_per_s / 1e12, '.2f')} TB/s; {peaks.source}) and from this "
             f"run's measured bf16 torch.matmul 8192^3 "
             f"({_fmt(peaks.measured_flops and peaks.measured_flops / 1e12, '.0f')} "
             f"TFLOP/s) and 1 GiB copy "
             f"({_fmt(peaks.measured_bytes_per_s and peaks.measured_bytes_per_s / 1e9, '.0f')} GB/s). "
             f"Errors: `dskernels._checks.compare` against a float32 reference of the same inputs "
             f"(relative norm error / worst row's error, each with its bound).")
    # the table's header within the first 3 lines: lessons 13-17 print those and the rows of their ops
    lines = [header, "", "| op | shape | implementation | time (ms) | TFLOP/s | GB/s | floor, datasheet (ms) | "
             "floor / time | floor, measured (ms) | rel. error | row error | ok |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        floor = _floor_ms(r["flops"], r["bytes"], peaks.flops, peaks.bytes_per_s)
        measured = _floor_ms(r["flops"], r["bytes"], peaks.measured_flops, peaks.measured_bytes_per_s)
        ok = "not checked" if not r["checked"] else "yes" if r["ok"] else "NO"
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.4f} | {r['tflops']:.1f} | "
                     f"{r['gbps']:.0f} | {_fmt(floor, '.4f')} | {_fmt(floor and floor / r['ms'], '.0%')} | "
                     f"{_fmt(measured, '.4f')} | {_fmt(r['rel_err'], '.2g')} | {_fmt(r['max_row_err'], '.2g')} | "
                     f"{ok} |")
    lines += ["", notes, "", "What each op's timed region holds:", ""]
    lines += [f"- {op}: {timed}" for op, timed in dict.fromkeys((r["op"], r["timed"]) for r in results)]
    lines += ["", "| model | implementation | batch | prompt | new tokens | tokens/s | same tokens |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for d in decode:
        lines.append(f"| {d['model']} | {d['impl']} | {d['batch']} | {d['prompt']} | {d['new_tokens']} | "
                     f"{d['tokens_per_s']:.1f} | {d['same_tokens_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def _roofline(results: list[dict], path: Path, title: str, peaks: Peaks) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensity = [r["flops"] / r["bytes"] for r in results]
    x = torch.logspace(-1, 4, 200).tolist()
    for flops, bandwidth, style, label in (
            (peaks.flops, peaks.bytes_per_s, "k-", f"{peaks.label} datasheet roofline"),
            (peaks.measured_flops, peaks.measured_bytes_per_s, "k--", "measured: bf16 matmul, 1 GiB copy")):
        if flops and bandwidth:
            ax.plot(x, [min(flops, i * bandwidth) / 1e12 for i in x], style,
                    label=f"{label} ({flops / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s)")
    for op in dict.fromkeys(r["op"] for r in results):
        points = [(i, r["tflops"], r["impl"]) for i, r in zip(intensity, results) if r["op"] == op]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", alpha=0.7, label=op)
        for i, tflops, impl in points:
            ax.annotate(impl, (i, tflops), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)",
           ylabel="achieved TFLOP/s", title=title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(gpu: bool) -> dict:
    """GPU name, driver, CUDA, torch and triton versions, date and commit: what the results are labelled with."""
    import subprocess

    import triton

    def output(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).parent).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"
    commit = os.environ.get("DSKERNELS_COMMIT") or output(["git", "rev-parse", "--short", "HEAD"])
    return dict(gpu=torch.cuda.get_device_name() if gpu else "CPU, Triton interpreter (times are not performance)",
                driver=output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else "-",
                cuda=torch.version.cuda or "-", torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes in float32, no torch.compile; on a CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results.{json,md} and roofline.png go")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per implementation (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-decode", action="store_true", help="skip the generation throughput")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        if not args.tiny:
            parser.error("no CUDA GPU: the full benchmark needs one; --tiny runs under Triton's interpreter")
        assert os.environ.get("TRITON_INTERPRET") == "1", "dskernels/__init__.py sets it without a GPU"
    device = "cuda" if gpu else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    reps = args.reps or (2 if args.tiny else 30)
    warmup = 0 if args.tiny else 3
    compile_ = gpu and not args.tiny and not args.no_compile
    env = environment(gpu)
    peaks = measure_peaks(datasheet_peaks(env["gpu"]) if gpu else Peaks("no GPU", None, None, "-"), device,
                          warmup, reps)
    results = []
    for case in _cases(args.tiny, device, dtype, compile_):
        _run_case(case, device, warmup, reps, input_sets=2 if args.tiny else 3)
        results += case.results
    decode = [] if args.no_decode else _decode_tokens_per_s(args.tiny, device, dtype)
    header = (f"{env['gpu']}; driver {env['driver']}, CUDA {env['cuda']}; torch {env['torch']}, triton "
              f"{env['triton']}; {dtype}; {env['date']}; commit {env['commit']}; median of {reps} runs, CUDA "
              f"events, L2 flushed before each")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        dict(header=header, environment=env, peaks=asdict(peaks), ops=results, decode=decode), indent=1))
    table = _markdown(results, decode, header, peaks)
    (args.out / "results.md").write_text(table)
    _roofline(results, args.out / "roofline.png", header.split(";")[0], peaks)
    print(table)
    return results


if __name__ == "__main__":
    main()
