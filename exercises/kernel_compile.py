"""Compile a kernel exercise's `@triton.jit` function for a GPU target, with no GPU: the grader's own check.

`compile_kernels({question: source}, timeout)` runs `python -m exercises.kernel_compile` (a process of the
grader's, with a wall-clock limit: a kernel whose compile-time loops never end cannot stop the grader) that calls
`triton.compile` for `GPUTarget("cuda", 90, 32)` (an H100) down to a cubin (ptxas ships in the triton wheel).
Triton's front end refuses a kernel body that calls Python, or anything that is not Triton, so a kernel that
compiles computes its answer in Triton. The source given is `static_check.kernel_source`'s: one plain `def`
whose parameters and names (`tl`, its own, a few built-ins) have been checked; defining it runs none of its body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = ("cuda", 90, 32)  # backend, compute capability (sm_90, H100), warp size


def compile_kernels(sources: dict[str, str], timeout: float = 300.0) -> dict[str, str | None]:
    """{question: None when the kernel compiled, else the reason (the compiler's last line)}."""
    if not sources:
        return {}
    with tempfile.TemporaryDirectory(prefix="grade-compile-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
                   TRITON_DEFAULT_FP_FUSION="1")
        try:
            done = subprocess.run([sys.executable, "-m", "exercises.kernel_compile"], input=json.dumps(sources),
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {q: f"the GPU compile took longer than {timeout:.0f} s (stopped)" for q in sources}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {q: f"the GPU compile failed ({tail})" for q in sources}


def _compile_one(question: str, source: str) -> str | None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from exercises.contracts import CONTRACTS, define_kernel

    contract = CONTRACTS[question]
    try:
        kernel = triton.jit(define_kernel(source, contract.kernel, f"<kernel {contract.kernel}>"))
        signature = {**contract.signature, **{name: "constexpr" for name in contract.constexprs}}
        triton.compile(ASTSource(kernel, signature, dict(contract.constexprs)), target=GPUTarget(*TARGET))
    except Exception as error:  # the compiler's message names the line; no input values are involved
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"does not compile for a GPU: {type(error).__name__}: {(lines or [''])[-1][:300]}"
    return None


def main() -> None:
    sources = json.loads(sys.stdin.read())
    print(json.dumps({q: _compile_one(q, s) for q, s in sources.items()}))


if __name__ == "__main__":
    main()
