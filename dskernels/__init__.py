"""Triton kernels for the course, each checked against `refimpl` (on a CPU under TRITON_INTERPRET=1).

One module per family, in teaching order, each a ladder of kernels (v1, v2, ...: one optimization per step,
every step kept), a validating entry point and a `reference` that calls refimpl:

    dskernels.rowwise          softmax (one block per row; blocked online softmax) and RMSNorm
    dskernels.matmul           tiled tl.dot matmul: naive tiles, grouped ordering, autotuned
    dskernels.flash_attention  flash attention forward, causal or not; causal block skipping
    dskernels.flash_attention_v4  its step v4: autotuned for Hopper, exp2, GQA, MLA heads; FA-2 backward
    dskernels.mla_decode       absorbed MLA decode over the latent cache: per head block, split-KV, paged
    dskernels.mla_decode_flash MLA decode step v4, FlashMLA's design: 64 heads per program, a split plan
    dskernels.moe              routed experts: loop over experts, aligned grouped GEMM with fused SwiGLU;
                               v3: the combine fused into the down launch, decode-sized blocks
    dskernels.model            use_kernels(model): the kernels inside a refimpl model
    dskernels.bench            python -m dskernels.bench: the GPU benchmark (--tiny runs under the interpreter)
    dskernels.gpu_run          python -m dskernels.gpu_run: tests, correctness sweep, lessons, benchmark on a GPU
    dskernels.compile_check    every kernel and configuration compiled for sm_90 and sm_80, on any machine
    dskernels.challenge        python -m dskernels.challenge NAME --kernel FILE: a learner's kernel checked, next to the rungs
    dskernels._checks          input checks, the shared-memory budget, and the output checker (compare)

Without a CUDA GPU, importing `dskernels` sets TRITON_INTERPRET=1 (unless it is set already): Triton's
interpreter is the only way kernels run there, and Triton reads the variable when `triton` is first imported
and when each kernel is defined, so it must be set before both. The interpreter computes garbage in
bfloat16, so the entry points refuse it there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError as error:
    raise ImportError(
        "dskernels needs Triton, which has wheels for Linux only (pip install triton); refimpl and the lessons "
        "before the kernel ones run without it"
    ) from error
