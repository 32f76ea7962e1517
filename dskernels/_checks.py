"""Checks shared by the kernels, their tests and the benchmark.

* Input checks every kernel's entry point runs before launching: a kernel reads raw pointers, so a wrong shape,
  dtype, stride or device gives garbage or a crash instead of an error. Each failure names the argument.
* `shared_memory_budget(device)`: the shared memory a block may use there, for the wrappers' configurations;
  `device_arch(device)` and `pipeline_buffers(num_stages, arch)`: how many tile buffers a pipelined loop keeps
  on that architecture, for the wrappers' shared memory estimates.
* The output checker, `compare` / `assert_close`: a kernel's output against a float32/float64 reference, on
  both the global relative norm error and each row's maximum error, with a bound per dtype (`bounds`).
"""

import os
from dataclasses import dataclass

import torch

from refimpl.checks import check_shape, check_tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1, set on CPU machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runnable_dtypes() -> list[torch.dtype]:
    """The dtypes the kernels run in on this machine: float32, float16, and bfloat16 only when compiled for a
    GPU (Triton's interpreter computes garbage in it)."""
    return list(FLOAT_DTYPES) if not interpreting() else [torch.float32, torch.float16]


def check_kernel_input(name: str, x, shape: tuple | None, dtypes: tuple = FLOAT_DTYPES,
                       matrix_layout: bool = False) -> None:
    """x: a tensor of `shape` (None in it = any size; shape None: any shape with at least one dimension), one
    of `dtypes`, contiguous (matrix_layout: a 2-d tensor row-major or column-major, e.g. a transposed view),
    on a device Triton can run on: a CUDA GPU, or the CPU under the interpreter.
    bfloat16 is refused under the interpreter, which computes garbage in it (values kept as raw 16-bit
    integers; see the shared notes on Triton on CPU)."""
    if shape is None:
        check_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name}: expected at least one dimension, got a 0-d tensor")
    else:
        check_shape(name, x, shape)
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")
    if x.dtype == torch.bfloat16 and interpreting():
        raise TypeError(f"{name}: bfloat16 needs a GPU: Triton's interpreter (TRITON_INTERPRET=1) computes "
                        f"garbage in bfloat16; use float16 or float32 on the CPU")
    if matrix_layout:
        if not (x.is_contiguous() or x.t().is_contiguous()):
            raise ValueError(f"{name}: expected a row-major or column-major matrix (call .contiguous()), got "
                             f"strides {x.stride()}")
    elif not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {x.stride()}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                         f"got device {x.device}")


# Shared memory one block may use (the opt-in maximum), by compute capability: NVIDIA CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability" (227 KB on 9.0: H100, H200; 163 KB on 8.0: A100;
# 99 KB on 8.6 / 8.9: consumer Ampere and Ada cards; 227 KB on 10.0 / 12.0 is not assumed).
SHARED_MEMORY_PER_BLOCK = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376}
# Under the interpreter there is no GPU to ask: plan for an H100's limit, so that CPU runs pick the configs
# an H100 or H200 would.
INTERPRETER_SHARED_MEMORY = 232448


def shared_memory_budget(device: torch.device | str) -> int:
    """Bytes of shared memory a kernel's block may use on `device`: the GPU's opt-in maximum per block
    (torch.cuda.get_device_properties(...).shared_memory_per_block_optin, else the table above by compute
    capability, else 48 KiB, the default every CUDA GPU allows); INTERPRETER_SHARED_MEMORY on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return SHARED_MEMORY_PER_BLOCK.get((props.major, props.minor), 48 * 1024)


def device_arch(device: torch.device | str) -> int:
    """The compute capability of `device` as major * 10 + minor (90: H100, H200; 80: A100); 90 under the
    interpreter (CPU), which plans as for an H100 (`INTERPRETER_SHARED_MEMORY`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 90
    props = torch.cuda.get_device_properties(device)
    return props.major * 10 + props.minor


def pipeline_buffers(num_stages: int, arch: int, rows: int = 64) -> int:
    """How many copies of each tile a loop's loads keep in shared memory when Triton pipelines them over
    `num_stages` on a GPU of compute capability `arch` (major * 10 + minor), for a `tl.dot` whose result has
    `rows` rows per program.

    Measured with Triton 3.9 (`dskernels.compile_check`, launches with aligned pointers, as every launch
    on freshly allocated tensors): on sm_90 the pipelined tiles take `num_stages` buffers (matmul v2
    128x128x64 float16: 32 KiB per stage, 32/64/96/128 KiB at 1/2/3/4 stages; flash attention 64 x 64,
    d=128: 32 KiB of K and V per stage, 81,920 / 114,688 B at 2 / 3 stages); on sm_80
    max(num_stages - 1, 1) (matmul 32/32/64/96 KiB; flash attention 57,344 / 90,112 B). Hopper's
    `wgmma.mma_async` reads its operands from shared memory while it runs, so the buffer it reads is still
    busy while the next num_stages - 1 loads land; Ampere's `mma.sync` reads registers loaded beforehand.
    wgmma works on 64-row warpgroup tiles: a dot of fewer rows (MLA decode v1-v3's 16-head blocks) is an
    `mma.sync` on sm_90 too and keeps sm_80's count (C=512, R=64, 16 x 64 bfloat16 blocks, 2 stages:
    94,208 B on both). A float32 dot with input_precision="ieee" (the course's float32 path: fused
    multiply-adds, no tensor cores) also keeps sm_80's count on sm_90 (matmul 64x64x64 float32, 4 stages:
    98,304 B on both); counted as num_stages here, one buffer to spare. Later architectures (10.0, 12.0)
    are counted as sm_90, the larger."""
    return num_stages if arch >= 90 and rows >= 64 else max(num_stages - 1, 1)


def most_stages_that_fit(estimate, budget: int, stages: tuple, what: str) -> int:
    """The first of `stages` (most first) whose shared memory `estimate(stages)` (bytes) fits `budget`;
    ValueError "{what}: ... needs about N B of shared memory, more than this GPU's budget" when none does."""
    for count in stages:
        if estimate(count) <= budget:
            return count
    raise ValueError(f"{what} needs about {estimate(min(stages))} B of shared memory, more than this GPU's "
                     f"{budget} B per block; use smaller blocks")


def check_like(name: str, x, like: torch.Tensor, like_name: str, shape: tuple, matrix_layout: bool = False) -> None:
    """x: of `shape`, with the dtype and device of `like`, contiguous (or as `check_kernel_input`'s
    matrix_layout)."""
    check_kernel_input(name, x, shape, dtypes=(like.dtype,), matrix_layout=matrix_layout)
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of {like_name}), got {x.device}")


# ------------------------------------------------------------------------------------------- output checker
# Bounds on the error of a kernel's output against a float64 reference computed from the same inputs (upcast),
# as (relative norm error, per-row max error). u = 2^-(mantissa bits + 1) is the unit roundoff.
#
# float16 / bfloat16 (u = 2^-11 / 2^-8): the kernels accumulate in float32 (its rounding, sqrt(n) * 2^-24 for
# a sum of n terms, is below 1e-4 * u up to n = 10^6), so their error comes from roundings to the low
# precision dtype: the output itself (<= u per element, about u / sqrt(3) in norm) and at most two
# intermediates (flash attention and MLA decode round the probabilities before the product with V; MoE rounds
# the SwiGLU activations and each expert's output; RMSNorm rounds the normalized x before the weight). Measured
# in float16 on the kernels (CPU, interpreter; the same arithmetic in units of u as bfloat16 on a GPU):
# relative norm error 0.15u (MLA decode) to 1.2u (MoE loop), per-row error 0.9u to 2.2u. Bound: 2u in
# relative norm and 4u per row (max over a row of |out - ref| / max |ref row|), about 1.7x the worst measured.
# All zeros, one wrong row, a wrong last block, a softmax scale off by 1% on logits of size ~3 (about 2.5u
# in bfloat16), or a dropped causal mask exceed these (tests/test_kernels_checks.py).
#
# float32 (u = 2^-24): no rounding to a narrower type, but sums in another order than the reference (a
# relative error up to sqrt(n) * u, 6e-6 at n = 10^4) and, on a GPU, exp computed with ex2.approx (relative
# error 2^-22, PTX ISA "ex2"): bound 1e-5 in relative norm and 1e-4 per row (the per-row bound also covers
# an element of a sum with cancellation, whose error is relative to the sum of |terms|).
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FLOAT32_BOUNDS = (1e-5, 1e-4)


def bounds(dtype: torch.dtype) -> tuple[float, float]:
    """(relative norm error bound, per-row max error bound) for outputs of `dtype`; see the comment above."""
    if dtype == torch.float32:
        return FLOAT32_BOUNDS
    if dtype not in UNIT_ROUNDOFF:
        raise TypeError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u, 4 * u


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`: ok, both errors, their bounds, the worst row, and a one-line message."""
    ok: bool
    rel_err: float  # ||out - ref||_2 / ||ref||_2
    max_row_err: float  # max over rows of max_j |out_ij - ref_ij| / max_j |ref_ij|
    worst_row: int  # the row of max_row_err (rows: all dimensions but the last, flattened)
    rel_bound: float
    row_bound: float
    message: str


def compare(out: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None) -> Comparison:
    """Compare a kernel's output with a reference (computed in float32 or float64 from the same inputs).

    out, ref: tensors of the same shape (rows = the last dimension; a 1-d tensor is one row). dtype: the
    precision the bounds are for (default out.dtype; float16, bfloat16 or float32). Errors are computed in
    float64. Not ok when a shape differs, out has a NaN or inf that ref has not, or an error exceeds its bound
    (`bounds`). A row of ref that is all zeros must be matched exactly (up to 1e-6 of ref's largest value).
    Raises TypeError for a non-tensor or an unsupported dtype.
    """
    check_tensor("out", out)
    check_tensor("ref", ref)
    dtype = out.dtype if dtype is None else dtype
    rel_bound, row_bound = bounds(dtype)
    if out.shape != ref.shape:
        return Comparison(False, float("inf"), float("inf"), -1, rel_bound, row_bound,
                          f"WRONG: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    got = out.detach().to(torch.float64).reshape(-1, out.shape[-1] if out.dim() else 1)  # on out's device
    want = ref.detach().to(got.device, torch.float64).reshape(got.shape)
    if got.numel() == 0:
        return Comparison(True, 0.0, 0.0, -1, rel_bound, row_bound, "empty output")
    bad = ~torch.isfinite(got) & torch.isfinite(want)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0])
        return Comparison(False, float("nan"), float("nan"), row, rel_bound, row_bound,
                          f"WRONG: {int(bad.sum())} NaN/inf values where the reference is finite (first in row {row})")
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))  # equal infinities and NaNs count as equal
    diff = torch.where(same, 0.0, (got - want).abs())  # [rows, n]
    ref_max = want.abs().nan_to_num(0.0, 0.0, 0.0)
    floor = max(float(ref_max.max()) * 1e-6, torch.finfo(torch.float64).tiny)
    rel_err = float(diff.norm() / max(float(want.nan_to_num(0.0, 0.0, 0.0).norm()), floor))
    row_errs = diff.amax(dim=1) / ref_max.amax(dim=1).clamp_min(floor)  # [rows]
    worst_row = int(row_errs.argmax())
    max_row_err = float(row_errs[worst_row])
    ok = rel_err <= rel_bound and max_row_err <= row_bound
    message = (f"{'ok' if ok else 'WRONG'}: relative norm error {rel_err:.3g} (bound {rel_bound:.3g}), "
               f"worst row {worst_row} of {got.shape[0]}: error {max_row_err:.3g} (bound {row_bound:.3g}), {dtype}")
    return Comparison(ok, rel_err, max_row_err, worst_row, rel_bound, row_bound, message)


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None,
                 what: str = "output") -> Comparison:
    """`compare`, raising AssertionError("{what}: WRONG: ...") when not ok; returns the comparison."""
    result = compare(out, ref, dtype=dtype)
    if not result.ok:
        raise AssertionError(f"{what}: {result.message}")
    return result
