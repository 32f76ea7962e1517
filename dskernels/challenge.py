"""A learner's number to beat: check your own kernel against the reference and put it next to the course's.

    python -m dskernels.challenge NAME --kernel my_kernel.py [--function kernel] [--size small|full]
    run_challenge(NAME, my_kernel)                                     # the same from a notebook cell

NAME is one challenge per kernel lesson (`CHALLENGES`): softmax (13), matmul (14), flash_attention (15),
mla_decode (16), moe (17). The file defines a function (default name `kernel`) with the signature the
challenge states (`python -m dskernels.challenge --list`). It runs as follows:

1. Correctness: on each of the challenge's input sets (awkward sizes: odd, not a block multiple, empty rows
   or experts, length-0 and length-1 sequences), the output is compared with the float64 reference by the
   course's one checker (`dskernels._checks.compare`, the bounds per dtype). A wrong or all-zero kernel, an
   output that is not a tensor or not in the inputs' dtype, or a kernel that overwrote an input is refused:
   nothing is timed or counted, and the command exits with status 1. A file that does not load, a function
   that cannot take the challenge's arguments or raises, or `--size full` without a GPU: one line naming
   what was expected (`ChallengeError`), status 2.
2. On a GPU: the learner's kernel and every rung of the lesson's ladder are timed exactly as
   `python -m dskernels.bench` times them (`bench._time_ms`: CUDA events around the call, after warm-up, L2
   flushed, median), at the benchmark's shape ("full", bfloat16), next to the floor (`bench._floor_ms`:
   FLOPs / peak and bytes / bandwidth of the GPU it runs on). Planning (a plan made from the inputs: the
   split plan, the alignment, the pages) is outside the timed region for the rungs, as in the benchmark;
   a learner's kernel is timed whole.
3. On a CPU (Triton's interpreter): what the lessons' CPU challenge is about, counted in one call at the
   small shape: Triton launches, programs launched, and bytes loaded and stored by Triton loads, stores and
   atomics (`count_traffic` wraps the interpreter's load/store builder functions for the duration of the
   call; masked-off elements are not counted; PyTorch operations between launches are not), next to the
   rungs and to the least bytes the op must move.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dskernels._checks import compare, interpreting


@dataclass
class Traffic:
    """What Triton kernels did in one call (interpreter only)."""
    launches: int = 0
    programs: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0


@contextlib.contextmanager
def count_traffic():
    """Count Triton launches, programs and bytes loaded/stored while the block runs, by wrapping the
    interpreter's builder functions (`triton.runtime.interpreter.interpreter_builder`: set_grid_dim per launch,
    set_grid_idx per program, create_masked_load / create_masked_store / create_atomic_rmw /
    create_atomic_cas per access; create_load, create_store, the atomic loads and stores and the tensor
    descriptors' loads and stores go through the masked ones). Yields a `Traffic`, filled as kernels run.
    RuntimeError outside the interpreter (TRITON_INTERPRET=1)."""
    if not interpreting():
        raise RuntimeError("count_traffic: needs Triton's interpreter (TRITON_INTERPRET=1, set without a GPU)")
    from triton.runtime.interpreter import interpreter_builder as builder

    traffic = Traffic()
    real = {name: getattr(builder, name) for name in ("set_grid_dim", "set_grid_idx", "create_masked_load",
                                                      "create_masked_store", "create_atomic_rmw",
                                                      "create_atomic_cas")}

    def size(ptrs, mask) -> int:  # bytes of the elements the mask lets through
        return int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8

    def set_grid_dim(*grid):
        traffic.launches += 1
        return real["set_grid_dim"](*grid)

    def set_grid_idx(*index):
        traffic.programs += 1
        return real["set_grid_idx"](*index)

    def load(ptrs, mask, *args, **kwargs):  # tensor descriptors pass cache_policy= by keyword
        traffic.bytes_loaded += size(ptrs, mask)
        return real["create_masked_load"](ptrs, mask, *args, **kwargs)

    def store(ptrs, value, mask, *args, **kwargs):
        traffic.bytes_stored += size(ptrs, mask)
        return real["create_masked_store"](ptrs, value, mask, *args, **kwargs)

    def atomic(op, ptrs, value, mask, *args):  # read, modify, write
        traffic.bytes_loaded += size(ptrs, mask)
        traffic.bytes_stored += size(ptrs, mask)
        return real["create_atomic_rmw"](op, ptrs, value, mask, *args)

    def compare_and_swap(ptrs, compare, value, *args):  # no mask: every element read, and written
        nbytes = ptrs.data.size * ptrs.get_element_ty().primitive_bitwidth // 8
        traffic.bytes_loaded += nbytes
        traffic.bytes_stored += nbytes
        return real["create_atomic_cas"](ptrs, compare, value, *args)

    wrappers = dict(set_grid_dim=set_grid_dim, set_grid_idx=set_grid_idx, create_masked_load=load,
                    create_masked_store=store, create_atomic_rmw=atomic, create_atomic_cas=compare_and_swap)
    for name, wrapper in wrappers.items():
        setattr(builder, name, wrapper)  # an instance attribute shadows the class's method
    try:
        yield traffic
    finally:
        for name in wrappers:
            delattr(builder, name)


# ------------------------------------------------------------------------------------------------ challenges


@dataclass
class Challenge:
    """One lesson's challenge. make(size, dtype, device, generator) -> list of input tuples (the first is the
    one timed / counted); reference(*inputs) -> the float64 output; rungs: name -> prepare(*inputs) -> a
    zero-argument launch (plans made in prepare, outside the timed call); cost(*inputs) -> (FLOPs, least
    bytes moved)."""
    lesson: str
    signature: str
    make: Callable
    reference: Callable
    rungs: Callable[[], dict]
    cost: Callable


def _randn(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _f64(*inputs):
    return [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]


def _softmax() -> Challenge:
    from dskernels import rowwise

    def make(size, dtype, device, g):
        shapes = [(37, 1000), (1, 5), (3, 4097)] if size == "small" else [(16384, 8192)]
        return [(_randn(g, r, c, dtype=dtype, device=device, scale=3),) for r, c in shapes]
    return Challenge(
        "13 (Triton basics)", "kernel(x: [rows, cols]) -> softmax over the last dimension, x's dtype", make,
        lambda x: x.double().softmax(dim=-1),
        lambda: {f"softmax {s}": (lambda x, s=s: lambda: rowwise.softmax(x, step=s)) for s in ("v1", "v2")},
        lambda x: (5 * x.numel(), 2 * x.numel() * x.element_size()))


def _matmul() -> Challenge:
    from dskernels import matmul as mm

    def make(size, dtype, device, g):
        shapes = [(100, 72, 130), (1, 16, 33)] if size == "small" else [(8192, 8192, 8192)]
        return [(_randn(g, m, k, dtype=dtype, device=device), _randn(g, k, n, dtype=dtype, device=device))
                for m, k, n in shapes]

    def cost(a, b):
        (m, k), n = a.shape, b.shape[1]
        return 2 * m * n * k, (m * k + k * n + m * n) * a.element_size()
    return Challenge(
        "14 (tiled matmul)", "kernel(a: [M, K], b: [K, N]) -> a @ b [M, N], a's dtype", make,
        lambda a, b: a.double() @ b.double(),
        lambda: {f"matmul {s}": (lambda a, b, s=s: lambda: mm.matmul(a, b, step=s)) for s in mm.STEPS}, cost)


def _flash_attention() -> Challenge:
    from dskernels import flash_attention as fa

    def make(size, dtype, device, g):
        shapes = [(1, 2, 100, 32), (2, 1, 17, 16)] if size == "small" else [(4, 32, 4096, 128)]
        return [tuple(_randn(g, *shape, dtype=dtype, device=device) for _ in range(3)) for shape in shapes]

    def cost(q, k, v):
        B, H, S, D = q.shape
        return 2 * B * H * S * S * D, 4 * q.numel() * q.element_size()  # causal: half of 4 B H S^2 D
    return Challenge(
        "15 (flash attention)", "kernel(q, k, v: [B, H, S, D]) -> causal softmax(q k^T / sqrt(D)) v, q's dtype",
        make, lambda q, k, v: fa.reference(*_f64(q, k, v), causal=True),
        lambda: {f"flash attention {s}": (lambda q, k, v, s=s: lambda: fa.flash_attention(q, k, v, causal=True,
                                                                                           step=s))
                 for s in fa.STEPS}, cost)


def _mla_decode() -> Challenge:
    from dskernels import mla_decode as md
    from dskernels import mla_decode_flash as mf

    def make(size, dtype, device, g):
        if size == "small":
            shapes = [(4, 20, 64, 16, 150, [1, 0, 65, 150])]
        else:
            shapes = [(64, 128, 512, 64, 4096, [4096] * 64)]
        out = []
        for B, H, C, R, L, lens in shapes:
            q_latent, q_pe = (_randn(g, B, H, d, dtype=dtype, device=device) for d in (C, R))
            c_kv, k_pe = (_randn(g, B, L, d, dtype=dtype, device=device) for d in (C, R))
            out.append((q_latent, q_pe, c_kv, k_pe, torch.tensor(lens, dtype=torch.int32, device=device),
                        (C // 4 + R) ** -0.5))
        return out

    def contiguous(step):
        def prepare(q, p, c, k, lens, scale):
            plan = md.plan_decode(q, p, c, k, lens, step=step)
            return lambda: md.launch_decode(plan, q, p, c, k, lens, scale)
        return prepare

    def paged(flash):
        def prepare(q, p, c, k, lens, scale):
            pages = md.paginate(c, k, lens, generator=torch.Generator().manual_seed(0))
            if flash:
                plan = mf.plan_flash_decode(q, p, *pages, lens)
                return lambda: mf.launch_flash_decode(plan, q, p, *pages, lens, scale)
            plan = md.plan_decode(q, p, pages[0], pages[1], lens, step="v3", block_table=pages[2])
            return lambda: md.launch_decode(plan, q, p, pages[0], pages[1], lens, scale, pages[2])
        return prepare

    def cost(q, p, c, k, lens, scale):
        B, H, C = q.shape
        tokens = int(lens.sum())
        return (2 * H * tokens * (2 * C + p.shape[2]),
                (tokens * (C + k.shape[2]) + 2 * q.numel() + p.numel()) * q.element_size())
    return Challenge(
        "16 (MLA decode)", "kernel(q_latent [B, heads, C], q_pe [B, heads, R], c_kv [B, L, C], k_pe [B, L, R], "
        "seq_lens int32 [B], scale) -> [B, heads, C] (softmax over each sequence's seq_lens[b] cached rows; a "
        "length-0 sequence: a zero row)", make,
        lambda q, p, c, k, lens, scale: md.reference(*_f64(q, p, c, k), lens, scale),
        lambda: {"MLA decode v1": contiguous("v1"), "MLA decode v2": contiguous("v2"),
                 "MLA decode v3 (paged)": paged(False), "MLA decode v4 (FlashMLA design)": paged(True)}, cost)


def _moe() -> Challenge:
    from dskernels import moe

    def make(size, dtype, device, g):
        shapes = [(37, 48, 40, 8, 3, 5), (1, 32, 16, 4, 2, 4)] if size == "small" else [(8192, 2048, 1408, 64, 6, 64)]
        out = []
        for T, H, I, E, K, used in shapes:  # experts >= used are never chosen: empty experts
            topk_idx = torch.stack([torch.randperm(used, generator=g, device=device)[:K] for _ in range(T)])
            topk_weight = torch.rand(T, K, generator=g, device=device)
            out.append((_randn(g, T, H, dtype=dtype, device=device), topk_idx.reshape(T, K), topk_weight,
                        _randn(g, E, I, H, dtype=dtype, device=device, scale=H ** -0.5),
                        _randn(g, E, I, H, dtype=dtype, device=device, scale=H ** -0.5),
                        _randn(g, E, H, I, dtype=dtype, device=device, scale=I ** -0.5)))
        return out

    def rung(step):
        def prepare(*inputs):
            plan = moe.plan_experts(*inputs, step=step)
            return lambda: moe.launch_experts(plan, *inputs)
        return prepare

    def cost(x, topk_idx, topk_weight, w_gate, w_up, w_down):
        (T, H), (K, I) = x.shape, (topk_idx.shape[1], w_gate.shape[1])
        used = int(torch.unique(topk_idx).numel())
        return 2 * T * K * 3 * H * I, moe.decode_bytes(T, H, I, used, x.element_size())
    return Challenge(
        "17 (MoE kernels)", "kernel(x [T, H], topk_idx int64 [T, k], topk_weight float32 [T, k], w_gate, w_up "
        "[E, I, H], w_down [E, H, I]) -> [T, H]: sum_j g_tj down_e(silu(gate_e x) * up_e x), e = topk_idx[t, j]",
        make, lambda *a: moe.reference(*_f64(*a)),
        lambda: {f"MoE {s}": rung(s) for s in moe.STEPS}, cost)


CHALLENGES = {"softmax": _softmax, "matmul": _matmul, "flash_attention": _flash_attention,
              "mla_decode": _mla_decode, "moe": _moe}


# ------------------------------------------------------------------------------------------------ running


class ChallengeError(Exception):
    """A learner's mistake the challenge reports in one line: a kernel file that does not load, a function
    that does not take the challenge's arguments or raises, a size or dtype this machine cannot run."""


def load_kernel(path: str | Path, function: str = "kernel") -> Callable:
    """The function named `function` in the Python file at `path` (which may import the files beside it).
    ChallengeError naming the file and what is wrong: no such file, a syntax error (with its line), an
    exception while importing it, no callable named `function`, a name not ending in .py."""
    path = Path(path)
    if not path.is_file():
        raise ChallengeError(f"--kernel: expected a Python file, {path} is not one")
    if path.suffix != ".py":
        raise ChallengeError(f"--kernel: expected a Python file ending in .py, got {path.name} (in a notebook, "
                             f"call run_challenge(NAME, your_function) instead)")
    spec = importlib.util.spec_from_file_location(f"learner_kernel_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # as `python FILE` does: its neighbours import
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ChallengeError(f"{path.name} line {error.lineno}: SyntaxError: {error.msg}") from error
    except Exception as error:  # the learner's file raised while importing: name it, not our traceback
        raise ChallengeError(f"importing {path.name} raised {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not callable(getattr(module, function, None)):
        raise ChallengeError(f"{path.name}: expected a function named {function!r} (--function to name "
                             f"another)")
    return getattr(module, function)


def _call(kernel: Callable, inputs: tuple, signature: str):
    """kernel(*inputs); ChallengeError when it cannot take the inputs or raises (chained to the error, so a
    notebook still shows the learner's traceback)."""
    try:
        inspect.signature(kernel).bind(*inputs)
    except TypeError as error:
        raise ChallengeError(f"your kernel cannot be called with the challenge's {len(inputs)} argument(s) "
                             f"({error}); expected {signature}") from error
    except ValueError:  # no signature to read (a builtin): just call it
        pass
    try:
        return kernel(*inputs)
    except Exception as error:
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]  # a compile error: many
        raise ChallengeError(f"your kernel raised {type(error).__name__}: {lines[-1].strip()}"
                             f"{_where(error, kernel)}") from error


def _where(error: Exception, kernel: Callable) -> str:
    """' (file.py line N)': the innermost frame of the traceback in the kernel's own file (else outside this
    module)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]
    code = getattr(kernel, "__code__", None)
    own = [f for f in frames if code is not None and f.filename == code.co_filename]
    frames = own or frames
    return f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""


def _verdict(out, inputs: tuple, before: list, ref: torch.Tensor, dtype: torch.dtype):
    """The check of one input set: -> (ok, message). A non-tensor, a dtype other than the inputs', an input
    the kernel overwrote, or an output `compare` refuses is WRONG."""
    if not torch.is_tensor(out):
        return False, f"WRONG: your kernel returned {type(out).__name__}, expected a tensor"
    if out.dtype != dtype:
        return False, f"WRONG: dtype {out.dtype}, expected {dtype} (the inputs' dtype)"
    changed = [i for i, (t, b) in enumerate(zip(inputs, before)) if torch.is_tensor(t) and not torch.equal(t, b)]
    if changed:
        return False, f"WRONG: your kernel overwrote its input argument(s) {changed} (0-based); leave them as given"
    result = compare(out, ref, dtype=dtype)
    return result.ok, result.message


def run_challenge(name: str, kernel: Callable, size: str | None = None, dtype: torch.dtype | None = None,
                  reps: int = 30) -> dict:
    """Check `kernel` on every input set of challenge `name`, then measure it next to the lesson's rungs:
    timed on a GPU (default size "full", bfloat16), counted under the interpreter (default "small", float32).
    -> dict(ok, checks: the comparisons' messages, rows: [dict(impl, ms or launches/programs/bytes)],
    floor: dict). Prints a table. Refused (ok False, nothing measured): an output that is not a tensor, not in
    the inputs' dtype, not the reference's (`compare`), or a kernel that overwrote an input. ValueError for
    an unknown name; ChallengeError for a kernel that cannot take the inputs or raises, a size other than
    "small" / "full", and "full" or bfloat16 under the interpreter."""
    if name not in CHALLENGES:
        raise ValueError(f"challenge: expected one of {sorted(CHALLENGES)}, got {name!r}")
    challenge = CHALLENGES[name]()
    gpu = not interpreting()
    device = "cuda" if gpu else "cpu"
    size = size or ("full" if gpu else "small")
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    if size not in ("small", "full"):
        raise ChallengeError(f"size: expected 'small' or 'full', got {size!r}")
    if not gpu and (size == "full" or dtype == torch.bfloat16):
        raise ChallengeError(f"size {size!r}, {dtype}: the benchmark's shape and bfloat16 need a GPU; Triton's "
                             f"interpreter runs the small size in float32 or float16")
    input_sets = challenge.make(size, dtype, device, torch.Generator(device=device).manual_seed(0))
    print(f"challenge {name} (lesson {challenge.lesson}): {challenge.signature}")
    checks = []
    for inputs in input_sets:
        ref = challenge.reference(*inputs)
        before = [t.clone() if torch.is_tensor(t) else t for t in inputs]
        ok, message = _verdict(_call(kernel, inputs, challenge.signature), inputs, before, ref, dtype)
        checks.append(message)
        print(f"  check {_shape(inputs)}: {message}")
        if not ok:
            print("REFUSED: the output is not the reference's; nothing is measured")
            return dict(ok=False, checks=checks, rows=[], floor=None)
    inputs = input_sets[0]
    flops, least_bytes = challenge.cost(*inputs)
    runs = {impl: prepare(*inputs) for impl, prepare in challenge.rungs().items()}
    runs["your kernel"] = lambda: kernel(*inputs)
    rows = [_measure(impl, run, gpu, reps) for impl, run in runs.items()]
    floor = _floor(flops, least_bytes, gpu)
    _print(rows, floor, gpu, _shape(inputs))
    return dict(ok=True, checks=checks, rows=rows, floor=floor)


def _shape(inputs) -> str:
    return " ".join("x".join(map(str, t.shape)) for t in inputs if torch.is_tensor(t))


def _measure(impl: str, run: Callable, gpu: bool, reps: int) -> dict:
    if gpu:
        from dskernels.bench import _time_ms
        return dict(impl=impl, ms=_time_ms(lambda: run(), [()], "cuda", 3, reps))
    with count_traffic() as traffic:
        run()
    return dict(impl=impl, launches=traffic.launches, programs=traffic.programs,
                bytes_loaded=traffic.bytes_loaded, bytes_stored=traffic.bytes_stored)


def _floor(flops: float, least_bytes: float, gpu: bool) -> dict:
    if not gpu:
        return dict(bytes=least_bytes, flops=flops)
    from dskernels.bench import _floor_ms, datasheet_peaks
    peaks = datasheet_peaks(torch.cuda.get_device_name())
    return dict(bytes=least_bytes, flops=flops, ms=_floor_ms(flops, least_bytes, peaks.flops, peaks.bytes_per_s),
                gpu=peaks.label)


def _print(rows: list[dict], floor: dict, gpu: bool, shape: str) -> None:
    if gpu:
        print(f"\n{'implementation':36s} {'time (ms)':>10s}   floor / time   ({shape}, {floor['gpu']})")
        for row in rows:
            ratio = "-" if floor["ms"] is None else f"{floor['ms'] / row['ms']:.0%}"
            print(f"{row['impl']:36s} {row['ms']:10.4f}   {ratio:>12s}")
        print(f"{'floor (datasheet)':36s} {'-' if floor['ms'] is None else format(floor['ms'], '10.4f')}")
        return
    print(f"\n{'implementation':36s} {'launches':>8s} {'programs':>9s} {'MB loaded':>10s} {'MB stored':>10s}  "
          f"moved / least  ({shape}; Triton's loads and stores, interpreter)")
    for row in rows:
        moved = row["bytes_loaded"] + row["bytes_stored"]
        ratio = f"{moved / floor['bytes']:12.2f}x" if row["launches"] else f"{'-':>12s} "
        print(f"{row['impl']:36s} {row['launches']:8d} {row['programs']:9d} {row['bytes_loaded'] / 1e6:10.3f} "
              f"{row['bytes_stored'] / 1e6:10.3f}  {ratio}")
    print(f"{'least bytes the op must move':36s} {'':8s} {'':9s} {floor['bytes'] / 1e6:21.3f}")
    if rows[-1]["launches"] == 0:
        print("your kernel launched no Triton kernel: PyTorch operations are not counted, so its 0 bytes "
              "mean nothing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dskernels.challenge", description=__doc__.split("\n")[0],
        epilog="example: python -m dskernels.challenge softmax --kernel my_softmax.py. Exit status: 0 checked "
               "and measured, 1 refused (the output is wrong), 2 a usage error or a file or kernel that "
               "cannot run (one line says which).")
    parser.add_argument("name", nargs="?", choices=sorted(CHALLENGES), help="the challenge")
    parser.add_argument("--kernel", type=Path, metavar="FILE", help="a Python file defining your kernel function")
    parser.add_argument("--function", default="kernel", help="the function's name in that file (default: kernel)")
    parser.add_argument("--size", choices=("small", "full"),
                        help="default: full (the benchmark's shape, bfloat16) on a GPU; small, the only one a "
                             "CPU runs")
    parser.add_argument("--list", action="store_true", help="list the challenges and their signatures")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, make in CHALLENGES.items():
            challenge = make()
            print(f"{name:16s} lesson {challenge.lesson}: {challenge.signature}")
        return 0
    if args.kernel is None:
        parser.error("--kernel FILE is required")
    try:
        result = run_challenge(args.name, load_kernel(args.kernel, args.function), args.size)
    except ChallengeError as error:  # the learner's mistake: one line, no traceback
        print(f"challenge: error: {error}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
