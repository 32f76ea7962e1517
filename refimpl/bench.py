"""The engine's performance record on a CPU: refimpl against transformers, same weights, same thread count.

    python -m refimpl.bench                 # the full run: prompts of 1K, 4K and 16K tokens (several minutes)
    python -m refimpl.bench --quick         # a small model and a short prompt: a check that it all runs (< 1 min)

Builds two random models with transformers and saves each as a Hugging Face checkpoint (no download):

  * "deepseek": DeepSeek-V3-shaped with DeepSeek-V2-Lite's attention (hidden 2048, 16 heads, kv_lora_rank
    512, qk_nope_head_dim 128 + qk_rope_head_dim 64, v_head_dim 128, uncompressed queries), a small MoE
    (8 routed experts, top-2, 1 shared, the first layer dense), 2 layers;
  * "dense": a Llama of the same width (16 heads of 128, 4 key/value heads, SwiGLU), 2 layers;

both float32, vocabulary 32000. Each (model, engine, prompt length) runs in a fresh subprocess with
torch.set_num_threads(--threads): it loads the checkpoint (refimpl's `from_pretrained`, transformers'
`AutoModelForCausalLM.from_pretrained` with its default attention implementation), generates greedily from a
random prompt, and reports

  * prefill: seconds from the call to the first new token;
  * decode: milliseconds per token after that (mean over --new-tokens - 1 tokens);
  * peak memory: the subprocess's peak resident set size (ru_maxrss), weights included.

transformers is skipped where its attention would not fit in --max-gb (on CPU its DeepSeek attention falls back
to the math path, which holds heads x prompt^2 float32 scores; MLA's unequal head dims refuse the fused kernels).

The decode floor: the bytes a decode step must read (every weight a token uses: attention, dense MLP, the
router, the shared and top-k routed experts, norms, the output head, one embedding row; plus the cache of all
layers at the mean context) over the memory bandwidth measured in the same run (the best of a few sums of a
512 MiB float32 tensor, with the same thread count).

Prints a table and writes it with everything measured (machine, load average, versions) to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FAMILIES = ("deepseek", "dense")
ENGINES = ("refimpl", "transformers")
VOCAB = 32000
FULL_LENGTHS = (1024, 4096, 16384)
QUICK_LENGTHS = (128,)
DEFAULT_OUT = Path(__file__).resolve().parent / "bench_results" / "cpu.json"


# ---------------------------------------------------------------------------------------------- the models
def hf_config(family: str, quick: bool, max_len: int):
    """The transformers config of a benchmark model; quick: a narrow one (hidden 256) with the same shape."""
    import transformers

    width = dict(hidden_size=256, num_attention_heads=4) if quick else dict(hidden_size=2048, num_attention_heads=16)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=max_len, tie_word_embeddings=False,
                  torch_dtype="float32", eos_token_id=None, bos_token_id=None, pad_token_id=None, **width)
    if family == "dense":
        return transformers.LlamaConfig(intermediate_size=704 if quick else 5632, num_key_value_heads=width[
            "num_attention_heads"] // 4, **common)
    mla = (dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32) if quick else
           dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128))
    return transformers.DeepseekV3Config(
        q_lora_rank=None, **mla, intermediate_size=512 if quick else 4096, moe_intermediate_size=176 if quick else 1408,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        first_k_dense_replace=1, num_key_value_heads=width["num_attention_heads"], **common)


def build_checkpoint(family: str, quick: bool, max_len: int, folder: Path) -> None:
    """A random model (transformers' own init, seed 0) saved to `folder` as a Hugging Face checkpoint."""
    import transformers

    torch.manual_seed(0)
    config = hf_config(family, quick, max_len)
    model_cls = transformers.LlamaForCausalLM if family == "dense" else transformers.DeepseekV3ForCausalLM
    model_cls(config).save_pretrained(folder)


def decode_bytes(family: str, quick: bool, context: int) -> int:
    """Bytes one decode step reads at `context` cached tokens: the weights a token uses and the cache."""
    c = hf_config(family, quick, 1)
    h, layers, f32 = c.hidden_size, c.num_hidden_layers, 4
    per_layer_norms = 2 * h
    if family == "dense":
        head_dim = h // c.num_attention_heads
        attention = h * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlps = layers * 3 * h * c.intermediate_size
        cache = layers * 2 * c.num_key_value_heads * head_dim * context
        weights = layers * (attention + per_layer_norms) + mlps
    else:
        heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        attention = (h * heads * qk + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                     + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h)
        dense_layers = c.first_k_dense_replace
        mlps = dense_layers * 3 * h * c.intermediate_size
        experts_used = c.num_experts_per_tok + c.n_shared_experts
        mlps += (layers - dense_layers) * (experts_used * 3 * h * c.moe_intermediate_size + c.n_routed_experts * h)
        cache = layers * (c.kv_lora_rank + c.qk_rope_head_dim) * context
        weights = layers * (attention + per_layer_norms) + mlps
    head = h + h * c.vocab_size + h  # final norm, lm_head, one embedding row
    return f32 * (weights + head + cache)


def hf_attention_bytes(family: str, quick: bool, length: int) -> int:
    """Memory transformers' attention needs beyond the linear terms: 0 where PyTorch's fused kernels run (equal
    query/key and value head dims), else ~3 float32 [heads, length, length] tensors (scores, mask, softmax)."""
    if family == "dense":
        return 0
    c = hf_config(family, quick, 1)
    return 3 * c.num_attention_heads * length * length * 4


def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second reading a float32 tensor of `mib` MiB (the best of `repeats` sums)."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


# ---------------------------------------------------------------------------------------------- one run
class TokenClock:
    """Time stamps of the new tokens: `refimpl` calls it with each step's tokens (`on_token`); transformers
    calls `put` with the prompt first, then with each new token (its streamer interface)."""

    def __init__(self, skip_first_put: bool):
        self.times: list[float] = []
        self.skip = skip_first_put

    def __call__(self, tokens) -> None:
        self.times.append(time.perf_counter())

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        self(value)

    def end(self) -> None:
        pass


def run_one(engine: str, family: str, folder: str, length: int, new_tokens: int, threads: int) -> dict:
    """Load the checkpoint with `engine`, generate `new_tokens` greedily after a random prompt of `length`:
    prefill s, decode ms/token, peak RSS bytes, the tokens."""
    torch.set_num_threads(threads)
    prompt = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    if engine == "refimpl":
        from refimpl.generate import model_class

        model = model_class(folder).from_pretrained(folder)
        clock = TokenClock(skip_first_put=False)
        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, on_token=clock)
        attention = "mode auto" if family == "deepseek" else "sdpa"
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        clock = TokenClock(skip_first_put=True)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
        attention = model.config._attn_implementation
    times = clock.times
    decode = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return dict(engine=engine, family=family, length=length, attention=attention,
                prefill_s=times[0] - start, decode_ms=1e3 * decode,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                new_tokens=out[0, length:].tolist())


def run_subprocess(engine: str, family: str, folder: Path, length: int, new_tokens: int, threads: int) -> dict:
    """`run_one` in a fresh Python (its peak RSS is this run's alone)."""
    job = json.dumps(dict(engine=engine, family=family, folder=str(folder), length=length, new_tokens=new_tokens,
                          threads=threads))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "refimpl.bench", "--worker", job], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"bench worker {engine}/{family}/{length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the report
def summarize(runs: list[dict], bandwidth: float, quick: bool, new_tokens: int) -> list[dict]:
    """One row per (family, length): both engines side by side, the ratios and the decode floor."""
    rows = []
    for family in FAMILIES:
        for length in sorted({r["length"] for r in runs if r["family"] == family}):
            ours = next(r for r in runs if (r["family"], r["length"], r["engine"]) == (family, length, "refimpl"))
            theirs = next((r for r in runs if (r["family"], r["length"], r["engine"]) ==
                           (family, length, "transformers") and "prefill_s" in r), None)
            floor_ms = 1e3 * decode_bytes(family, quick, length + new_tokens // 2) / bandwidth
            row = dict(family=family, length=length, prefill_s=ours["prefill_s"], decode_ms=ours["decode_ms"],
                       peak_rss_gb=ours["peak_rss_bytes"] / 1e9, floor_ms=floor_ms,
                       decode_over_floor=ours["decode_ms"] / floor_ms)
            if theirs is not None:
                row.update(hf_prefill_s=theirs["prefill_s"], hf_decode_ms=theirs["decode_ms"],
                           hf_peak_rss_gb=theirs["peak_rss_bytes"] / 1e9,
                           prefill_speedup=theirs["prefill_s"] / ours["prefill_s"],
                           decode_speedup=theirs["decode_ms"] / ours["decode_ms"],
                           same_tokens=theirs["new_tokens"] == ours["new_tokens"])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table; '-' where transformers did not run."""
    lines = ["| model | prompt | prefill s (ours / HF) | prefill speedup | decode ms/token (ours / HF) | "
             "decode speedup | floor ms | ours / floor | peak RSS GB (ours / HF) | same tokens |",
             "|" + "---|" * 10]
    for r in rows:
        hf = "hf_prefill_s" in r
        cells = [r["family"], str(r["length"]),
                 f"{r['prefill_s']:.2f} / " + (f"{r['hf_prefill_s']:.2f}" if hf else "-"),
                 f"{r['prefill_speedup']:.2f}x" if hf else "-",
                 f"{r['decode_ms']:.1f} / " + (f"{r['hf_decode_ms']:.1f}" if hf else "-"),
                 f"{r['decode_speedup']:.2f}x" if hf else "-",
                 f"{r['floor_ms']:.1f}", f"{r['decode_over_floor']:.2f}",
                 f"{r['peak_rss_gb']:.2f} / " + (f"{r['hf_peak_rss_gb']:.2f}" if hf else "-"),
                 ("yes" if r["same_tokens"] else "no") if hf else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m refimpl.bench", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m refimpl.bench --quick --out /tmp/bench.json",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a narrow model and a 128-token prompt (< 1 min)")
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 1024 4096 16384)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 16; quick 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="skip transformers where its attention needs more (default 12)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON file written")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(**json.loads(args.worker))))
        return {}

    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("transformers is not installed: the benchmark compares with it (pip install 'transformers>=5')")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    new_tokens = args.new_tokens or (4 if args.quick else 16)
    if new_tokens < 2 or min(lengths) < 1:
        parser.error("--new-tokens: expected >= 2 (decode is timed between tokens); --lengths: >= 1")
    load_before = os.getloadavg()
    started = time.time()
    bandwidth = memory_bandwidth(args.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="refimpl-bench-") as tmp:
        for family in args.families:
            folder = Path(tmp) / family
            build_checkpoint(family, args.quick, max(lengths) + new_tokens, folder)
            for length in lengths:
                for engine in ENGINES:
                    need = hf_attention_bytes(family, args.quick, length) if engine == "transformers" else 0
                    if need > args.max_gb * 1e9:
                        runs.append(dict(engine=engine, family=family, length=length,
                                         skipped=f"attention needs ~{need / 1e9:.0f} GB > --max-gb {args.max_gb}"))
                        continue
                    runs.append(run_subprocess(engine, family, folder, length, new_tokens, args.threads))
                    print(f"{family} {length} {engine}: prefill {runs[-1]['prefill_s']:.2f} s, decode "
                          f"{runs[-1]['decode_ms']:.1f} ms/token", file=sys.stderr, flush=True)
    rows = summarize(runs, bandwidth, args.quick, new_tokens)
    report = dict(
        machine=dict(cpu=_cpu_name(), cores=os.cpu_count(),
                     load_average_before=load_before, load_average_after=os.getloadavg(),
                     memory_bandwidth_gb_s=bandwidth / 1e9),
        versions=dict(torch=torch.__version__, transformers=_version("transformers"), python=platform.python_version()),
        settings=dict(quick=args.quick, threads=args.threads, new_tokens=new_tokens, lengths=list(lengths),
                      dtype="float32", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                      seconds=round(time.time() - started)),
        rows=rows, runs=runs, table=table(rows))
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {args.out}")
    return report


def _cpu_name() -> str:
    """The 'model name' of /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
