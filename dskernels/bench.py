"""python -m dskernels.bench: every ladder step next to PyTorch and the hardware floor, on one GPU.

    python -m dskernels.bench                      # GPU, bfloat16, the issue's shapes; writes dskernels/results/
    python -m dskernels.bench --tiny --out DIR     # tiny shapes, float32; on a CPU under Triton's interpreter

For each op, each implementation (the kernel ladder; PyTorch eager; torch.compile, SDPA or cuBLAS where they
apply) is timed so that it cannot be gamed:
  * CUDA events around the call alone, after warm-up runs, median of `--reps` runs;
  * inputs random (no zeros), several sets used in turn, and the L2 cache flushed (a 256 MiB buffer
    overwritten) before every run, so no run finds its inputs in L2 from the previous one;
  * the output of each implementation checked against the reference in the same run (ok column).
The floor is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): the least time the op needs on the GPU if it
reads and writes each byte once and runs at the tensor cores' peak. Results: a printed table, results.json,
results.md and roofline.png in --out.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Peak numbers of an NVIDIA H200 SXM, from NVIDIA's H200 datasheet (nvidia.com/en-us/data-center/h200):
H200_PEAK_BF16_FLOPS = 989.5e12  # dense BF16 tensor core (the datasheet's 1,979 TFLOPS is with 2:4 sparsity)
H200_PEAK_HBM_BYTES_PER_S = 4.8e12  # HBM3e, 4.8 TB/s
L2_FLUSH_BYTES = 256 * 2**20  # more than the 50 MB L2 of Hopper GPUs (NVIDIA H100 whitepaper)
RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    """One op at one shape: how to make inputs, the implementations to time, the reference to check against."""
    op: str
    shape: str
    flops: float
    bytes: float  # the least bytes the op must move from and to memory
    make_inputs: Callable[[torch.Generator], tuple]
    impls: dict[str, Callable]
    reference: Callable
    tol: float
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
    """The ops at the issue's shapes (tiny ones with --tiny)."""
    from dskernels import flash_attention as fa
    from dskernels import matmul as mm
    from dskernels import mla_decode as md
    from dskernels import moe
    from dskernels import rowwise
    from dskernels._checks import tolerance
    from refimpl.moe import combine, dispatch

    size = dtype.itemsize
    maybe_compile = (lambda f: {"torch.compile": torch.compile(f)}) if compile_ else (lambda f: {})
    cases = []

    rows, cols = (4, 100) if tiny else (16384, 8192)
    cases.append(Case(
        "softmax", f"{rows}x{cols}", 5 * rows * cols, 2 * rows * cols * size,
        lambda g: (_randn(g, rows, cols, dtype=dtype, device=device, scale=3),),
        {"v1": lambda x: rowwise.softmax(x, step="v1"), "v2": lambda x: rowwise.softmax(x, step="v2"),
         "PyTorch eager": rowwise.softmax_reference, **maybe_compile(rowwise.softmax_reference)},
        rowwise.softmax_reference, tolerance(dtype, cols)))

    cases.append(Case(
        "rmsnorm", f"{rows}x{cols}", 4 * rows * cols, (2 * rows * cols + cols) * size,
        lambda g: (_randn(g, rows, cols, dtype=dtype, device=device),
                   1 + _randn(g, cols, dtype=dtype, device=device, scale=0.1)),
        {"kernel": lambda x, w: rowwise.rmsnorm(x, w, 1e-6),
         "refimpl eager": lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6),
         **maybe_compile(lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6))},
        lambda x, w: rowwise.rmsnorm_reference(x, w, 1e-6), tolerance(dtype, cols, scale=4)))

    n = 64 if tiny else 8192
    cases.append(Case(
        "matmul", f"{n}^3", 2 * n**3, 3 * n * n * size,
        lambda g: (_randn(g, n, n, dtype=dtype, device=device), _randn(g, n, n, dtype=dtype, device=device)),
        {"v1": lambda a, b: mm.matmul(a, b, step="v1", block_m=128, block_n=128),
         "v2": lambda a, b: mm.matmul(a, b, step="v2", block_m=128, block_n=128),
         "v3": lambda a, b: mm.matmul(a, b, step="v3"), "torch.matmul": torch.matmul},
        mm.reference, tolerance(dtype, n, scale=n ** 0.5)))

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
        lambda q, k, v: fa.reference(q, k, v, causal=True), tolerance(dtype, S, scale=2)))

    B, H, L, C, R = (2, 16, 100, 64, 16) if tiny else (64, 128, 4096, 512, 64)
    scale = (C // 4 + R) ** -0.5  # DeepSeek-V3: (qk_nope_head_dim 128 + qk_rope_head_dim 64) ** -0.5

    def make_mla(g):
        q_latent, q_pe = (_randn(g, B, H, d, dtype=dtype, device=device) for d in (C, R))
        c_kv, k_pe = (_randn(g, B, L, d, dtype=dtype, device=device) for d in (C, R))
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
        pages = md.paginate(c_kv, k_pe, seq_lens, generator=torch.Generator().manual_seed(0))
        return q_latent, q_pe, c_kv, k_pe, seq_lens, pages

    def absorbed_eager(q_latent, q_pe, c_kv, k_pe, seq_lens, pages):  # refimpl.mla._attend_absorbed's einsums
        scores = torch.einsum("bhc,btc->bht", q_latent, c_kv) + torch.einsum("bhr,btr->bht", q_pe, k_pe)
        probs = (scores.float() * scale).softmax(dim=-1).to(c_kv.dtype)
        return torch.einsum("bht,btc->bhc", probs, c_kv)

    cases.append(Case(
        "MLA decode (absorbed)", f"B{B} heads{H} ctx{L} {C}+{R}", 2 * B * H * L * (2 * C + R),
        (B * L * (C + R) + 2 * B * H * C + B * H * R) * size, make_mla,
        {"v1": lambda q, p, c, k, s, pages: md.mla_decode(q, p, c, k, s, scale, step="v1"),
         "v2": lambda q, p, c, k, s, pages: md.mla_decode(q, p, c, k, s, scale, step="v2"),
         "v3 (paged)": lambda q, p, c, k, s, pages: md.mla_decode_paged(q, p, *pages, s, scale),
         "PyTorch eager": absorbed_eager, **maybe_compile(absorbed_eager)},
        lambda q, p, c, k, s, pages: md.reference(q, p, c, k, s, scale), tolerance(dtype, L, scale=2)))

    T, Hd, E, I, K = (16, 32, 4, 32, 2) if tiny else (8192, 2048, 64, 1408, 6)  # DeepSeek-V2-Lite's experts

    def make_moe(g):
        logits = torch.randn(T, E, generator=g, device=device)
        topk_weight, topk_idx = logits.softmax(-1).topk(K, dim=-1)  # random routing, softmax weights
        return (_randn(g, T, Hd, dtype=dtype, device=device), topk_idx, topk_weight.contiguous(),
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, I, Hd, dtype=dtype, device=device, scale=Hd ** -0.5),
                _randn(g, E, Hd, I, dtype=dtype, device=device, scale=I ** -0.5))

    def experts_eager(x, topk_idx, topk_weight, w_gate, w_up, w_down):  # refimpl.moe's dispatch, loop, combine
        x_sorted, token_idx, sort_order, counts = dispatch(x, topk_idx, E)
        outs = [F.linear(F.silu(F.linear(rows, w_gate[e])) * F.linear(rows, w_up[e]), w_down[e])
                for e, rows in enumerate(x_sorted.split(counts.tolist()))]  # refimpl.moe.MLP per expert
        return combine(torch.cat(outs), token_idx, sort_order, topk_weight, x.shape[0])

    cases.append(Case(
        "MoE experts", f"T{T} H{Hd} E{E} I{I} top{K}", 2 * T * K * 3 * Hd * I,
        (2 * T * Hd + 3 * E * Hd * I) * size, make_moe,
        {"v1 (loop)": lambda *a: moe.moe_experts(*a, step="v1"),
         "v2 (grouped)": lambda *a: moe.moe_experts(*a, step="v2"),
         "PyTorch eager (loop)": experts_eager},
        moe.reference, tolerance(dtype, Hd, scale=4)))
    return cases


def _run_case(case: Case, device: str, warmup: int, reps: int, input_sets: int) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [case.make_inputs(g) for _ in range(input_sets)]
    want = case.reference(*inputs[0]).float()
    for name, fn in case.impls.items():
        got = fn(*inputs[0]).float()
        error = float((got - want).abs().max())
        ok = bool(torch.allclose(got, want, atol=case.tol, rtol=case.tol))
        ms = _time_ms(fn, inputs, device, warmup, reps)
        case.results.append(dict(op=case.op, shape=case.shape, impl=name, ms=ms,
                                 tflops=case.flops / ms / 1e9, gbps=case.bytes / ms / 1e6, max_error=error,
                                 tolerance=case.tol, ok=ok, flops=case.flops, bytes=case.bytes))
        print(f"{case.op:26s} {name:24s} {ms:10.4f} ms  {'ok' if ok else 'WRONG: max error %.3g' % error}",
              flush=True)


def _floor_ms(flops: float, nbytes: float) -> float:
    return max(flops / H200_PEAK_BF16_FLOPS, nbytes / H200_PEAK_HBM_BYTES_PER_S) * 1e3


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


def _markdown(results: list[dict], decode: list[dict], header: str) -> str:
    lines = [header, "", "| op | shape | implementation | time (ms) | TFLOP/s | GB/s | H200 floor (ms) | "
             "floor / time | max error | ok |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        floor = _floor_ms(r["flops"], r["bytes"])
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.4f} | {r['tflops']:.1f} | "
                     f"{r['gbps']:.0f} | {floor:.4f} | {floor / r['ms']:.0%} | {r['max_error']:.2g} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "| model | implementation | batch | prompt | new tokens | tokens/s | same tokens |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for d in decode:
        lines.append(f"| {d['model']} | {d['impl']} | {d['batch']} | {d['prompt']} | {d['new_tokens']} | "
                     f"{d['tokens_per_s']:.1f} | {d['same_tokens_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def _roofline(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensity = [r["flops"] / r["bytes"] for r in results]
    x = torch.logspace(-1, 4, 200).tolist()
    roof = [min(H200_PEAK_BF16_FLOPS, i * H200_PEAK_HBM_BYTES_PER_S) / 1e12 for i in x]
    ax.plot(x, roof, "k-", label="H200 roofline (989.5 TFLOP/s BF16, 4.8 TB/s)")
    for op in dict.fromkeys(r["op"] for r in results):
        points = [(i, r["tflops"], r["impl"]) for i, r in zip(intensity, results) if r["op"] == op]
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o", alpha=0.7, label=op)
        for i, tflops, impl in points:
            ax.annotate(impl, (i, tflops), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)",
           ylabel="achieved TFLOP/s", title=title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes in float32, no torch.compile; on a CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results.{json,md} and roofline.png go")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per implementation (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        if not args.tiny:
            parser.error("no CUDA GPU: the full benchmark needs one; --tiny runs under Triton's interpreter")
        assert os.environ.get("TRITON_INTERPRET") == "1", "dskernels/__init__.py sets it without a GPU"
    device = "cuda" if gpu else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    reps = args.reps or (2 if args.tiny else 50)
    warmup = 0 if args.tiny else 5
    compile_ = gpu and not args.tiny and not args.no_compile
    results = []
    for case in _cases(args.tiny, device, dtype, compile_):
        _run_case(case, device, warmup, reps, input_sets=2 if args.tiny else 3)
        results += case.results
    decode = _decode_tokens_per_s(args.tiny, device, dtype)
    where = torch.cuda.get_device_name() if gpu else "CPU, Triton interpreter (times are not performance)"
    import triton
    header = (f"{where}; torch {torch.__version__}, triton {triton.__version__}; {dtype}; "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}; median of {reps} runs")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(header=header, ops=results, decode=decode), indent=1))
    table = _markdown(results, decode, header)
    (args.out / "results.md").write_text(table)
    _roofline(results, args.out / "roofline.png", header.split(";")[0])
    print(table)
    return results


if __name__ == "__main__":
    main()
