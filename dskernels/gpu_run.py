"""python -m dskernels.gpu_run: the kernels' whole check on a CUDA machine, in one command, in a few minutes.

    python -m dskernels.gpu_run                    # on a CUDA GPU; writes dskernels/results/
    python -m dskernels.gpu_run --tiny --out DIR   # on a CPU under Triton's interpreter: the same stages, tiny

Stages, in order, each timed and recorded (a failing stage is recorded and the next ones still run):
  1. tests: the kernel tests (tests/test_kernels_*.py but `LATER_STAGES`) with pytest, compiled for this
     GPU (with --tiny: the checker's test only);
  2. sweep: every ladder step of every kernel at awkward sizes (odd, 1, not a block multiple, empty experts,
     unequal and zero lengths) in float16, bfloat16 and float32 (float32 and float16 under the interpreter),
     each output against a float32/float64 reference with `dskernels._checks.compare`;
  3. notebooks: the code cells of lessons 13-17 and exercises/src/06_kernels.ipynb run as Python scripts (the
     GPU machine has no Jupyter: IPython magics and shell lines dropped), each in its notebook's folder (with
     --tiny: extracted and compiled to bytecode, not run: they take minutes under the interpreter);
  4. bench: `python -m dskernels.bench` (with --tiny: its --tiny).
Written to --out: gpu_run.json and gpu_run.md (the GPU, driver, torch, triton, date, commit, each stage's
outcome and time, the sweep's table), next to the benchmark's results.json, results.md and roofline.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from dskernels import bench

ROOT = Path(__file__).resolve().parents[1]
# kernel test files the test stage leaves out: the compile check is CI's (CPU work), and the --tiny runs of
# this command and of the benchmark would repeat stages 2 and 4
LATER_STAGES = ("test_kernels_compile.py", "test_kernels_gpu_run.py", "test_kernels_bench.py")
NOTEBOOKS = ["lessons/13_triton_basics.ipynb", "lessons/14_matmul.ipynb", "lessons/15_flash_attention.ipynb",
             "lessons/16_mla_decode.ipynb", "lessons/17_moe_kernels.ipynb", "exercises/src/06_kernels.ipynb"]


def notebook_script(path: Path) -> str:
    """The code cells of a notebook (read with json) as one Python script: IPython magics (`%...`, `%%...`)
    and shell escapes (`!...`) dropped, a cell made only of them becomes `pass`."""
    cells = json.loads(path.read_text())["cells"]
    parts = []
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        if source.lstrip().startswith("%%"):
            continue  # a cell magic: the whole cell is for IPython
        lines = ["pass  # IPython: " + line.strip() if re.match(r"\s*[%!]", line) else line
                 for line in source.splitlines()]
        parts.append(f"# --- code cell {i + 1}\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _stage(record: dict, name: str, fn) -> None:
    """Run one stage; record ok, seconds and its details (or the error) under record[name]."""
    start = time.perf_counter()
    try:
        details = fn()
        ok = details.pop("ok", True) if isinstance(details, dict) else True
    except Exception as error:  # noqa: BLE001 - a failing stage is recorded, the next ones still run
        details, ok = {"error": "".join(traceback.format_exception_only(error)).strip(),
                       "traceback": traceback.format_exc()[-3000:]}, False
    record[name] = dict(ok=ok, seconds=round(time.perf_counter() - start, 1), **(details or {}))
    print(f"== {name}: {'ok' if ok else 'FAILED'} in {record[name]['seconds']} s", flush=True)


def run_tests(tiny: bool, out: Path) -> dict:
    """pytest on the kernel tests in a subprocess; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    if tiny:
        files = ["tests/test_kernels_checks.py"]
    else:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py")
                       if p.name not in LATER_STAGES)
    xml = out / "pytest.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # compiling is most of the time on a GPU (one kernel per configuration and dtype, single-threaded):
    # spread the tests over 8 processes where pytest-xdist is installed
    workers = ["-n", "8"] if not tiny and importlib.util.find_spec("xdist") else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, f"--junitxml={xml}", *files]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    xml.unlink()
    return dict(ok=result.returncode == 0, files=files, passed=passed, **counts,
                summary=result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "",
                failures_tail=result.stdout[-3000:] if result.returncode else "")


def sweep(tiny: bool, device: str) -> dict:
    """Every ladder step at awkward sizes in every dtype this machine runs, checked with `compare`."""
    from dskernels import flash_attention as fa
    from dskernels import matmul as mm
    from dskernels import mla_decode as md
    from dskernels.mla_decode_flash import mla_decode_flash
    from dskernels import moe
    from dskernels import rowwise
    from dskernels._checks import compare, runnable_dtypes
    from refimpl.norm import rms_norm

    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, dtype, scale=1.0: (torch.randn(*shape, generator=g, device=device)  # noqa: E731
                                              * scale).to(dtype)
    rows = []

    def check(kernel: str, step: str, shape: str, dtype, out, ref) -> None:
        result = compare(out, ref, dtype=dtype)
        rows.append(dict(kernel=kernel, step=step, shape=shape, dtype=str(dtype).replace("torch.", ""),
                         ok=result.ok, rel_err=result.rel_err, max_row_err=result.max_row_err,
                         message=result.message))

    for dtype in runnable_dtypes():
        for shape in [(1, 1), (3, 67), (5, 1030)] + ([] if tiny else [(7, 8193), (2, 65537)]):
            x = randn(*shape, dtype=dtype, scale=3)
            for step in rowwise.SOFTMAX_STEPS:
                if step == "v1" and shape[-1] > rowwise.MAX_BLOCK:
                    continue
                check("softmax", step, str(shape), dtype, rowwise.softmax(x, step=step), x.double().softmax(-1))
            if shape[-1] <= rowwise.MAX_BLOCK:
                w = 1 + randn(shape[-1], dtype=dtype, scale=0.1)
                check("rmsnorm", "-", str(shape), dtype, rowwise.rmsnorm(x, w, 1e-6),
                      rms_norm(x.double(), w.double(), 1e-6))
        for M, K, N in [(1, 17, 33), (67, 130, 33)] + ([] if tiny else [(1000, 999, 1001), (4097, 64, 3)]):
            a, b = randn(M, K, dtype=dtype), randn(K, N, dtype=dtype)
            for step in mm.STEPS:
                check("matmul", step, f"{M}x{K}x{N}", dtype, mm.matmul(a, b, step=step), a.double() @ b.double())
        attention_shapes = [(1, 1, 1, 1, 16), (2, 3, 37, 37, 32)]
        attention_shapes += [] if tiny else [(1, 4, 300, 1000, 128), (2, 2, 999, 999, 64)]
        for B, H, S_q, S_kv, D in attention_shapes:
            q, k, v = (randn(B, H, n, D, dtype=dtype) for n in (S_q, S_kv, S_kv))
            want = {causal: fa.reference(q.double(), k.double(), v.double(), causal=causal) for causal in (0, 1)}
            for step in fa.STEPS:
                for causal in (False, True):
                    check("flash attention", f"{step}{' causal' if causal else ''}", f"B{B} H{H} {S_q}/{S_kv} D{D}",
                          dtype, fa.flash_attention(q, k, v, causal=causal, step=step), want[causal])
        mla_shapes = [(4, 20, 64, 16, [0, 1, 65, 130])]
        mla_shapes += [] if tiny else [(5, 128, 512, 64, [0, 1, 63, 1000, 4097])]
        for B, H, C, R, lens in mla_shapes:
            L = max(lens)
            ql, qp = randn(B, H, C, dtype=dtype), randn(B, H, R, dtype=dtype)
            ck, kp = randn(B, L, C, dtype=dtype), randn(B, L, R, dtype=dtype)
            seq_lens = torch.tensor(lens, device=device)
            ref = md.reference(ql.double(), qp.double(), ck.double(), kp.double(), seq_lens, 0.07)
            for step in ("v1", "v2"):
                check("MLA decode", step, f"B{B} H{H} {C}+{R} lens {lens}", dtype,
                      md.mla_decode(ql, qp, ck, kp, seq_lens, 0.07, step=step), ref)
            pages = md.paginate(ck, kp, seq_lens, generator=torch.Generator().manual_seed(0))
            check("MLA decode", "v3", f"B{B} H{H} {C}+{R} lens {lens}", dtype,
                  md.mla_decode_paged(ql, qp, *pages, seq_lens, 0.07), ref)
            check("MLA decode", "v4", f"B{B} H{H} {C}+{R} lens {lens}", dtype,
                  mla_decode_flash(ql, qp, *pages, seq_lens, 0.07), ref)
        for T, Hd, I, E, k in [(1, 48, 40, 8, 3), (37, 48, 40, 8, 3)] + ([] if tiny else [(1000, 512, 352, 64, 6)]):
            used = max(E - 3, k)  # the last 3 experts get no token
            idx = torch.stack([torch.randperm(used, generator=g, device=device)[:k] for _ in range(T)])
            weight = torch.rand(T, k, generator=g, device=device)
            args = (randn(T, Hd, dtype=dtype), idx, weight, randn(E, I, Hd, dtype=dtype, scale=Hd ** -0.5),
                    randn(E, I, Hd, dtype=dtype, scale=Hd ** -0.5), randn(E, Hd, I, dtype=dtype, scale=I ** -0.5))
            ref = moe.reference(*(t.double() if t.is_floating_point() else t for t in args))
            for step in moe.STEPS:
                check("MoE experts", step, f"T{T} H{Hd} I{I} E{E} top{k}, 3 empty", dtype,
                      moe.moe_experts(*args, step=step), ref)
    return dict(ok=all(r["ok"] for r in rows), checked=len(rows), wrong=sum(not r["ok"] for r in rows), rows=rows)


def run_notebooks(tiny: bool, out: Path) -> dict:
    """Each kernel notebook's code as a script, run in its folder (--tiny: compiled only)."""
    results = []
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in NOTEBOOKS:
        path = ROOT / name
        script = notebook_script(path)
        target = out / "notebooks" / (path.stem + ".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(script)
        start = time.perf_counter()
        if tiny:
            compile(script, str(target), "exec")
            ok, tail = True, "compiled (not run under --tiny)"
        else:
            result = subprocess.run([sys.executable, str(target)], cwd=path.parent, env=env, capture_output=True,
                                    text=True, timeout=600)
            ok, tail = result.returncode == 0, (result.stdout + result.stderr)[-2000:]
        results.append(dict(notebook=name, ok=ok, seconds=round(time.perf_counter() - start, 1),
                            output_tail=tail if not ok else ""))
    return dict(ok=all(r["ok"] for r in results), notebooks=results)


def _markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# GPU run: {env['gpu']}", "",
             f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton {env['triton']}; "
             f"{env['date']}; commit {env['commit']}; "
             f"`python -m dskernels.gpu_run{' --tiny' if record['tiny'] else ''}` in {record['seconds']} s", "",
             "| stage | outcome | seconds |", "|---|---|---:|"]
    tests = record.get("tests", {})
    outcome = {"tests": f"{tests.get('passed', '?')} of {tests.get('tests', '?')} passed, "
                        f"{tests.get('skipped', '?')} skipped" if "passed" in tests else tests.get("error", ""),
               "sweep": f"{record.get('sweep', {}).get('checked', '?')} outputs checked, "
                        f"{record.get('sweep', {}).get('wrong', '?')} wrong",
               "notebooks": ", ".join(f"{Path(n['notebook']).stem}: {'ok' if n['ok'] else 'FAILED'}"
                                      for n in record.get("notebooks", {}).get("notebooks", [])),
               "bench": "results.md, results.json, roofline.png"}
    for stage in ("tests", "sweep", "notebooks", "bench"):
        if stage in record:
            r = record[stage]
            text = outcome[stage] if r["ok"] or stage not in ("bench",) else r.get("error", "")
            lines.append(f"| {stage} | {'ok' if r['ok'] else 'FAILED'}: {text} | {r['seconds']} |")
    if "rows" in record.get("sweep", {}):
        lines += ["", "| kernel | step | shape | dtype | rel. error | row error | ok |",
                  "|---|---|---|---|---:|---:|---|"]
        for r in record["sweep"]["rows"]:
            lines.append(f"| {r['kernel']} | {r['step']} | {r['shape']} | {r['dtype']} | {r['rel_err']:.2g} | "
                         f"{r['max_row_err']:.2g} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="on a CPU under Triton's interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, default=bench.RESULTS, help="where the results go")
    parser.add_argument("--skip", action="append", default=[], choices=["tests", "sweep", "notebooks", "bench"],
                        help="leave a stage out (repeatable)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        parser.error("no CUDA GPU: the GPU run needs one; --tiny runs its stages under Triton's interpreter")
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if gpu else "cpu"
    start = time.perf_counter()
    record = dict(tiny=args.tiny, environment=bench.environment(gpu))
    def run_bench() -> dict:
        bench.main((["--tiny", "--no-decode"] if args.tiny else []) + ["--out", str(args.out)])
        return {}

    stages = {"tests": lambda: run_tests(args.tiny, args.out), "sweep": lambda: sweep(args.tiny, device),
              "notebooks": lambda: run_notebooks(args.tiny, args.out), "bench": run_bench}
    for name, fn in stages.items():
        if name not in args.skip:
            _stage(record, name, fn)
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["ok"] = all(record[s]["ok"] for s in stages if s in record)
    (args.out / "gpu_run.json").write_text(json.dumps(record, indent=1))
    (args.out / "gpu_run.md").write_text(_markdown(record))
    print(_markdown(record))
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
