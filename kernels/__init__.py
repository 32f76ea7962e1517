"""Triton kernels for the course, each checked against `refimpl` (on a CPU under TRITON_INTERPRET=1).

One module per family, in teaching order, each a ladder of kernels (v1, v2, ...: one optimization per step,
every step kept), a validating entry point and a `reference` that calls refimpl:

    kernels.rowwise          softmax (one block per row; blocked online softmax) and RMSNorm
    kernels.matmul           tiled tl.dot matmul: naive tiles, grouped ordering, autotuned
    kernels.flash_attention  flash attention forward, causal or not; causal block skipping
    kernels.mla_decode       absorbed MLA decode over the latent cache: per head block, split-KV, paged
    kernels.moe              routed experts: loop over experts, aligned grouped GEMM with fused SwiGLU
    kernels.model            use_kernels(model): the kernels inside a refimpl model
    kernels.bench            python -m kernels.bench: the GPU benchmark (--tiny runs under the interpreter)

Set TRITON_INTERPRET=1 before importing a kernel module to run on a CPU (Triton decides when a kernel is
defined); the interpreter computes garbage in bfloat16, so the entry points refuse it there.
"""

try:
    import triton  # noqa: F401
except ImportError as error:
    raise ImportError(
        "kernels needs Triton, which has wheels for Linux only (pip install triton); refimpl and the lessons "
        "before the kernel ones run without it"
    ) from error
