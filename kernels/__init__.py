"""Triton kernels for the course, each checked against `refimpl` (on a CPU under TRITON_INTERPRET=1).

Planned families, in teaching order (see the design): softmax / RMSNorm warm-ups, tiled matmul, causal flash
attention, MLA decode over the latent cache, MoE token permutation and grouped GEMM. None has landed yet.
"""

try:
    import triton  # noqa: F401
except ImportError as error:
    raise ImportError(
        "kernels needs Triton, which has wheels for Linux only (pip install triton); refimpl and the lessons "
        "before the kernel ones run without it"
    ) from error
