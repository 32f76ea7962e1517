"""The block-scaled FP8 GEMM (dskernels.fp8_gemm) against refimpl.fp8, under TRITON_INTERPRET=1 on a CPU
(float8 loads and tl.dot work there) and on a GPU of compute capability >= 8.9 when there is one."""

import pytest
import torch

from dskernels import fp8_gemm
from refimpl import fp8

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_fp8_gpu = pytest.mark.skipif(
    device.type == "cuda" and torch.cuda.get_device_capability() < fp8_gemm.MIN_CAPABILITY,
    reason="float8 tl.dot needs sm_89+")

# (M, N, K): one tile; rows and columns that end in partial tiles (N with a partial 128-row block of b);
# several K blocks with different scales; a single row
SHAPES = [(16, 128, 128), (100, 200, 384), (1, 64, 256)]


def operands(M, N, K, dtype=torch.float8_e4m3fn, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=device)
    x[:, 5] *= 300.0  # an outlier channel: its K block gets its own scales
    w = torch.randn(N, K, generator=g, device=device) * torch.logspace(-2, 1, K, device=device)
    return (*fp8.quantize_activation(x, dtype), *fp8.quantize_weight(w, dtype))


@needs_fp8_gpu
@pytest.mark.parametrize("step", fp8_gemm.STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", fp8_gemm.FP8_DTYPES)
def test_fp8_gemm_matches_refimpl(step, shape, dtype):
    a, sa, b, sb = operands(*shape, dtype=dtype)
    got = fp8_gemm.fp8_gemm(a, sa, b, sb, step=step, block_m=32, block_n=64)
    want = fp8_gemm.reference(a, sa, b, sb)
    # both sum exact float32 products of float8 values; they differ in the order of float32 additions
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@needs_fp8_gpu
def test_scales_are_applied_per_k_block():
    """A kernel that applied only the first K block's scales (or none) would fail: the scales differ by 1e3."""
    a, sa, b, sb = operands(32, 128, 256)
    sa[:, 1] *= 1000.0
    got = fp8_gemm.fp8_gemm(a, sa, b, sb, step="v1", block_m=32, block_n=128)
    want = fp8_gemm.reference(a, sa, b, sb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    first_only = fp8.block_scaled_matmul(a[:, :128], sa[:, :1], b[:, :128], sb[:, :1])
    assert (want - first_only).abs().max() > 100 * (got - want).abs().max() + 1e-3


@pytest.mark.skipif(device.type != "cuda" or torch.cuda.get_device_capability() < fp8_gemm.MIN_CAPABILITY,
                    reason="bfloat16 output needs a GPU with float8 tensor cores")
def test_fp8_gemm_bfloat16_output_on_gpu():
    a, sa, b, sb = operands(300, 256, 512)
    got = fp8_gemm.fp8_gemm(a, sa, b, sb, out_dtype=torch.bfloat16)
    want = fp8_gemm.reference(a, sa, b, sb)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_capability_is_refused_by_name():
    with pytest.raises(RuntimeError, match="compute capability >= 8.9 .* this GPU is sm_80"):
        fp8_gemm.check_capability((8, 0))
    fp8_gemm.check_capability((9, 0))  # Hopper
    fp8_gemm.check_capability((8, 9))  # Ada


def test_bad_input_is_named():
    a, sa, b, sb = operands(16, 128, 256)
    with pytest.raises(TypeError, match="a: expected dtype torch.float8_e4m3fn or torch.float8_e5m2"):
        fp8_gemm.fp8_gemm(a.float(), sa, b, sb)
    with pytest.raises(TypeError, match="b: expected dtype torch.float8_e4m3fn, got torch.float8_e5m2"):
        fp8_gemm.fp8_gemm(a, sa, b.to(torch.float8_e5m2), sb)
    x = torch.zeros(16, 100, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="a: expected K .* multiple of 128, got K=100"):
        fp8_gemm.fp8_gemm(x, sa, torch.zeros(128, 100, device=device).to(torch.float8_e4m3fn), sb)
    with pytest.raises(ValueError, match=r"a_scale: expected shape \(16, 2\), got \(16, 1\)"):
        fp8_gemm.fp8_gemm(a, sa[:, :1].contiguous(), b, sb)
    with pytest.raises(ValueError, match=r"b_scale: expected shape \(1, 2\), got \(128, 2\)"):
        fp8_gemm.fp8_gemm(a, sa, b, torch.ones(128, 2, device=device))  # 1x128 tiles where blocks belong
    with pytest.raises(TypeError, match="b_scale: expected dtype torch.float32"):
        fp8_gemm.fp8_gemm(a, sa, b, sb.double())
    with pytest.raises(ValueError, match="block_n: expected a power of two from 16 to 128"):
        fp8_gemm.fp8_gemm(a, sa, b, sb, step="v1", block_n=256)
    with pytest.raises(ValueError, match="step: expected one of"):
        fp8_gemm.fp8_gemm(a, sa, b, sb, step="v9")
    with pytest.raises(TypeError, match="out_dtype: expected torch.float32 or torch.bfloat16"):
        fp8_gemm.fp8_gemm(a, sa, b, sb, out_dtype=torch.float16)


@needs_fp8_gpu
def test_empty_rows():
    a, sa, b, sb = operands(16, 128, 128)
    assert fp8_gemm.fp8_gemm(a[:0], sa[:0], b, sb).shape == (0, 128)


@needs_fp8_gpu
def test_bench_case_runs_tiny():
    """The benchmark entry (wired into dskernels.bench by the lead) runs and every implementation agrees."""
    from dskernels import bench

    case = fp8_gemm.bench_case(tiny=True, device=device.type,
                               dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    bench._run_case(case, device.type, warmup=0, reps=1, input_sets=1)
    assert {r["impl"] for r in case.results} >= {"v1", "v2", "torch.matmul", "torch._scaled_mm (row-wise)"}
    assert all(r["ok"] for r in case.results), [(r["impl"], r["max_error"]) for r in case.results]
