"""`python -m dskernels.bench --tiny` runs end to end on a CPU under Triton's interpreter (no torch.compile),
every checked implementation agrees with its reference, and the three result files are written. Not a timing
test.
The benchmark picks its device itself: the GPU when there is one, else the CPU."""

import json

import pytest

from dskernels import bench


def test_bench_tiny_runs_end_to_end(tmp_path):
    results = bench.main(["--tiny", "--out", str(tmp_path)])
    checked = [r for r in results if r["checked"]]
    assert all(r["ok"] for r in checked), [(r["op"], r["impl"], r["rel_err"]) for r in checked if not r["ok"]]
    assert {r["impl"] for r in results if not r["checked"]} == {
        "dense GEMMs, same FLOPs (not the op)", "torch.matmul", "torch._scaled_mm (row-wise)"}
    saved = json.loads((tmp_path / "results.json").read_text())
    ops = {r["op"] for r in saved["ops"]}
    assert ops == {"softmax", "rmsnorm", "matmul", "flash attention (causal)", "MLA decode (absorbed)",
                   "MoE experts", "MoE experts (decode)", "FP8 GEMM (V3 block scales)",
                   "flash attention backward (causal)"}
    impls = {(r["op"], r["impl"]) for r in saved["ops"]}
    for step in ("v1", "v2", "v3 (paged)", "v4 (FlashMLA design)", "v2, plan + launch"):  # every ladder step is there
        assert ("MLA decode (absorbed)", step) in impls
    assert not any("compile" in impl for _, impl in impls)
    assert all(r["timed"] for r in saved["ops"])
    assert set(saved["environment"]) >= {"gpu", "driver", "torch", "triton", "date", "commit"}
    assert {d["impl"] for d in saved["decode"]} == {"refimpl", "with kernels"}
    assert all(d["same_tokens_fraction"] == 1.0 for d in saved["decode"])  # float32: the same greedy tokens
    markdown = (tmp_path / "results.md").read_text()
    assert "| MoE experts |" in markdown and "timed region" in markdown
    assert (tmp_path / "roofline.png").stat().st_size > 10_000


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5), ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H200", "H200 SXM", 989.5), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312)])
def test_peaks_are_those_of_the_gpu_it_runs_on(name, label, tflops):
    peaks = bench.datasheet_peaks(name)
    assert (peaks.label, peaks.flops / 1e12) == (label, tflops)
    assert bench._floor_ms(peaks.flops, 1, peaks.flops, peaks.bytes_per_s) == pytest.approx(1e3)


def test_an_unknown_gpu_has_no_datasheet_floor():
    peaks = bench.datasheet_peaks("NVIDIA GeForce RTX 4090")
    assert peaks.flops is None and bench._floor_ms(1e12, 1e9, peaks.flops, peaks.bytes_per_s) is None
