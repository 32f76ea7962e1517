"""`python -m dskernels.bench --tiny` runs end to end on a CPU under Triton's interpreter (no torch.compile),
every implementation agrees with its reference, and the three result files are written. Not a timing test."""

import json

from dskernels import bench


def test_bench_tiny_runs_end_to_end(tmp_path):
    results = bench.main(["--tiny", "--out", str(tmp_path)])
    assert all(r["ok"] for r in results), [(r["op"], r["impl"], r["max_error"]) for r in results if not r["ok"]]
    saved = json.loads((tmp_path / "results.json").read_text())
    ops = {r["op"] for r in saved["ops"]}
    assert ops == {"softmax", "rmsnorm", "matmul", "flash attention (causal)", "MLA decode (absorbed)",
                   "MoE experts"}
    impls = {(r["op"], r["impl"]) for r in saved["ops"]}
    for step in ("v1", "v2", "v3 (paged)"):  # every ladder step is there
        assert ("MLA decode (absorbed)", step) in impls
    assert not any("compile" in impl for _, impl in impls)
    assert {d["impl"] for d in saved["decode"]} == {"refimpl", "with kernels"}
    assert all(d["same_tokens_fraction"] == 1.0 for d in saved["decode"])  # float32: the same greedy tokens
    assert "| MoE experts |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "roofline.png").stat().st_size > 10_000
