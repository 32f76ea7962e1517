"""Block-scaled FP8 GEMM, DeepSeek-V3's recipe (V3 section 3.3.2): C = A B^T with A [M, K] in 1x128 tiles and
B [N, K] in 128x128 blocks, each tile/block with its own float32 scale, -> C [M, N].

The step after the tiled matmul (`dskernels.matmul`, v2's grouped ordering): each program computes one
BLOCK_M x BLOCK_N tile of C and walks along K in steps of BLOCK_K = 128, V3's tile width. At each step the
tensor cores multiply the FP8 tiles (`tl.dot`, float32 result), and the partial sum is multiplied by the A
tile's per-row scales and the B block's one scale before it is added to the float32 accumulator: V3's
"promotion" every 128 elements, so the scales can differ from one K block to the next and the tensor cores'
limited-precision accumulation never runs longer than 128 elements. BLOCK_N divides 128, so a tile of C's
columns lies inside one 128-row block of B and needs one B scale per K step.

Anchor: DeepGEMM (github.com/deepseek-ai/DeepGEMM), DeepSeek's CUDA kernels for this GEMM ("fp8_gemm_nt":
the same NT layout, 1x128 LHS scales, 128x128 RHS scales, promotion in CUDA-core registers; it adds TMA loads,
warp specialization and persistent scheduling this ladder step leaves out).

Ladder: v1 fixed block sizes; v2 the v1 kernel autotuned over BLOCK_M, BLOCK_N and pipeline stages on a GPU
(the interpreter keeps the first config).

Hardware: float8 `tl.dot` compiles for compute capability >= 8.9 (Ada, Hopper), not for the A100 (sm_80):
refused there by name. On a CPU, Triton's interpreter (TRITON_INTERPRET=1) loads and multiplies float8 and
accumulates `tl.dot` exactly in float32, so it checks the scaling, not the hardware's limited accumulator
(`refimpl.fp8.limited_accumulation_matmul` emulates that). Speed: `bench_case` at DeepSeek-V3's shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dskernels._checks import check_kernel_input, interpreting
from refimpl import fp8 as ref

STEPS = ("v1", "v2")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK_K = ref.BLOCK  # 128: one scale per 128 elements of K
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89), Hopper (sm_90)


@triton.jit
def fp8_gemm_v1_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                       stride_sam, stride_sak, stride_sbn, stride_sbk,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of C; programs in grouped order (as `matmul_v2_kernel`)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_size_m
    pid_n = (pid % programs_per_group) // group_size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    row_ok = rows < M
    col_ok = cols < N
    b_block = (pid_n * BLOCK_N) // BLOCK_K  # the 128-row block of B these columns lie in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        k = kb * BLOCK_K + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K] float8
        b = tl.load(b_ptr + cols[None, :] * stride_bn + k[:, None] * stride_bk,
                    mask=col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] float8 (B^T's tile)
        a_scale = tl.load(a_scale_ptr + rows * stride_sam + kb * stride_sak, mask=row_ok, other=0.0)  # [BLOCK_M]
        b_scale = tl.load(b_scale_ptr + b_block * stride_sbn + kb * stride_sbk)  # one float32
        partial = tl.dot(a, b)  # [BLOCK_M, BLOCK_N] float32: this K block's sum, unscaled
        acc += partial * a_scale[:, None] * b_scale  # promotion: scaled into the float32 accumulator
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _autotune_configs():
    """Block sizes and schedules to try on a GPU (the first is also the interpreter's)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in [(128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
                                          (128, 64, 4, 4), (64, 64, 4, 5)]]


def _first_config_under_interpreter(configs, named_args, **kwargs):
    """The interpreter cannot time kernels: keep one config there (all of them on a GPU)."""
    return configs[:1] if interpreting() else configs


fp8_gemm_v2_kernel = triton.autotune(configs=_autotune_configs(), key=["M", "N", "K"],
                                     prune_configs_by={"early_config_prune": _first_config_under_interpreter})(
    triton.jit(fp8_gemm_v1_kernel.fn))


def check_capability(capability: tuple[int, int]) -> None:
    """Raise RuntimeError if a GPU of this compute capability cannot run float8 `tl.dot` (below sm_89)."""
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        raise RuntimeError(f"fp8_gemm: float8 tl.dot needs compute capability >= 8.9 (Ada sm_89, Hopper sm_90); "
                           f"this GPU is sm_{major}{minor} (an A100 is sm_80): use refimpl.fp8.block_scaled_matmul")


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.float32, step: str = "v2", block_m: int = 64,
             block_n: int = 128) -> torch.Tensor:
    """C = A B^T from V3's block-quantized operands (as `refimpl.fp8.quantize_activation` / `quantize_weight`).

    a: [M, K] float8_e4m3fn (or float8_e5m2), K a multiple of 128; a_scale: [M, K / 128] float32 (1x128
    tiles); b: [N, K], a's dtype; b_scale: [ceil(N / 128), K / 128] float32 (128x128 blocks). All contiguous,
    on one device. -> C [M, N] out_dtype (float32, or bfloat16 on a GPU). step "v1" uses block_m, block_n
    (powers of two, 16 <= block_n <= 128); "v2" autotunes them. Raises TypeError / ValueError naming the
    argument, RuntimeError on a GPU below sm_89.
    """
    check_kernel_input("a", a, (None, None), dtypes=FP8_DTYPES)
    M, K = a.shape
    check_kernel_input("b", b, (None, K), dtypes=(a.dtype,))
    N = b.shape[0]
    if K % BLOCK_K or K == 0:
        raise ValueError(f"a: expected K (the reduction dimension) a positive multiple of {BLOCK_K}, got K={K}")
    check_kernel_input("a_scale", a_scale, (M, K // BLOCK_K), dtypes=(torch.float32,))
    check_kernel_input("b_scale", b_scale, (triton.cdiv(N, BLOCK_K), K // BLOCK_K), dtypes=(torch.float32,))
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype}")
    if out_dtype == torch.bfloat16 and interpreting():
        raise TypeError("out_dtype: bfloat16 needs a GPU (Triton's interpreter computes garbage in it); "
                        "use torch.float32 on the CPU")
    for name, t in (("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        if t.device != a.device:
            raise ValueError(f"{name}: expected device {a.device} (that of a), got {t.device}")
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    if block_n < 16 or block_n > BLOCK_K or block_n & (block_n - 1):
        raise ValueError(f"block_n: expected a power of two from 16 to {BLOCK_K} (inside one 128x128 block of b), "
                         f"got {block_n}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16 (tl.dot's minimum on a GPU), got {block_m}")
    if a.is_cuda:
        check_capability(torch.cuda.get_device_capability(a.device))
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    args = (a, a_scale, b, b_scale, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), *a_scale.stride(),
            *b_scale.stride())
    if step == "v2":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        fp8_gemm_v2_kernel[grid](*args, BLOCK_K=BLOCK_K)
    else:
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        fp8_gemm_v1_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=8)
    return c


def reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """`refimpl.fp8.block_scaled_matmul`: the same product in PyTorch, float32."""
    return ref.block_scaled_matmul(a, a_scale, b, b_scale)


# ---------------------------------------------------------------------------------------------------- benchmark
def bench_case(tiny: bool, device: str, dtype: torch.dtype):
    """The benchmark's FP8 GEMM case (a `dskernels.bench.Case`): M 4096, N 7168, K 7168 (a DeepSeek-V3 GEMM:
    4096 tokens through a 7168 x 7168 projection; --tiny: 128 x 256 x 256).

    Inputs are quantized once, outside the timing, as DeepGEMM's benchmark does: the Triton ladder on the V3
    operands; torch.matmul on the same values dequantized to `dtype` (bfloat16 on a GPU); `torch._scaled_mm`
    with one scale per row of A and per column of B (row-wise: what torch offers without block scales), on a
    CPU or a GPU with float8 tensor cores. The reference is `reference`; elements of C are about N(0, 1), and
    the tolerance (0.3 + 0.3 |C|) covers the largest of row-wise FP8's own rounding errors over millions of
    elements (0.14 at the tiny shape); the other implementations are within 1e-5 (float32) or bf16's rounding.
    """
    from dskernels.bench import Case

    M, N, K = (128, 256, 256) if tiny else (4096, 7168, 7168)

    def make_inputs(g):
        x = torch.randn(M, K, generator=g, device=device)
        w = torch.randn(N, K, generator=g, device=device) / K ** 0.5
        (a, sa), (b, sb) = ref.quantize_activation(x), ref.quantize_weight(w)
        a_deq = ref.dequantize_blocks(a, sa, (1, BLOCK_K)).to(dtype)
        b_deq = ref.dequantize_blocks(b, sb, (BLOCK_K, BLOCK_K)).to(dtype)
        (ar, sar), (br, sbr) = ref.quantize_blocks(a_deq, (1, K)), ref.quantize_blocks(b_deq, (1, K))
        return a, sa, b, sb, a_deq, b_deq, ar, sar, br, sbr

    out = dtype if torch.device(device).type == "cuda" else torch.float32
    impls = {step: (lambda *t, s=step: fp8_gemm(*t[:4], out_dtype=out, step=s, block_m=64)) for step in STEPS}
    impls["torch.matmul"] = lambda *t: t[4] @ t[5].t()
    if torch.device(device).type == "cpu" or torch.cuda.get_device_capability() >= MIN_CAPABILITY:
        impls["torch._scaled_mm (row-wise)"] = lambda *t: torch._scaled_mm(
            t[6], t[8].t(), scale_a=t[7], scale_b=t[9].t().contiguous(), out_dtype=out)
    return Case("FP8 GEMM (V3 block scales)", f"M{M} N{N} K{K}", 2 * M * N * K, M * K + N * K + 2 * M * N,
                make_inputs, impls, lambda *t: reference(*t[:4]), tol=0.3)
