"""64-bit offsets at the sizes where a 32-bit product passes 2^31, run on the CPU without allocating them.

The tensors are allocated but never touched except for the few rows a test fills (the kernel reads and writes
only those), so the operating system maps pages for those alone (a 4 GiB tensor costs a few MB of memory).
Under Triton's interpreter `last_programs_only` runs, of each grid axis longer than 64 programs, only the last
program: the one whose offsets are the largest. With 32-bit offsets those wrap around to negative addresses
(a crash or garbage); with 64-bit offsets the last rows come out right. Interpreter only (on a GPU the full
launch would need the memory): skipped there."""
# cpu-only file: interpreter only (skipped on a GPU device): huge grids of which one program runs


import builtins
import contextlib
import sys

import pytest
import torch

from dskernels import flash_attention as fa
from dskernels import matmul
from dskernels import mla_decode as md
from dskernels import rowwise
from dskernels._checks import assert_close, interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs one program of a huge grid: interpreter only")


@contextlib.contextmanager
def last_programs_only(limit: int = 64):
    """Within the block, Triton's interpreter runs only the last index of a grid axis longer than `limit`."""
    import triton.runtime.interpreter as interpreter

    grid_loop = interpreter.GridExecutor.__call__.__code__

    def grid_range(*args):
        indices = builtins.range(*args)
        if sys._getframe(1).f_code is grid_loop and len(indices) > limit:
            return indices[-1:]
        return indices
    interpreter.range = grid_range  # a module global shadows the builtin, for the grid loop alone
    try:
        yield
    finally:
        del interpreter.range


def test_the_grid_helper_runs_only_the_last_program():
    x = torch.zeros(100, 8)
    with last_programs_only():
        y = rowwise.softmax(x)
    assert torch.equal(y[-1], torch.full((8,), 1 / 8))  # the last program wrote its row
    z = rowwise.softmax(torch.zeros(3, 8))  # outside the block: every program
    assert torch.equal(z, torch.full((3, 8), 1 / 8))


@pytest.mark.parametrize("kernel", ["softmax v1", "softmax v2", "rmsnorm"])
def test_rowwise_last_row_past_2_to_the_31(kernel):
    # 32,769 rows of 65,536: the last row starts at 2^31 (a softmax over DeepSeek-V3's 129,280-token
    # vocabulary passes it from 16,612 rows)
    x = torch.empty(32769, 65536, dtype=torch.float16)
    assert (x.shape[0] - 1) * x.shape[1] == 2**31
    x[-1] = torch.randn(65536, generator=torch.Generator().manual_seed(0)).half()
    with last_programs_only():
        if kernel == "rmsnorm":
            weight = torch.ones(65536, dtype=torch.float16)
            got, want = rowwise.rmsnorm(x, weight, 1e-6)[-1], x[-1].double() * x[-1].double().square().mean().rsqrt()
        else:
            got, want = rowwise.softmax(x, step=kernel[-2:])[-1], x[-1].double().softmax(-1)
    assert_close(got, want, dtype=torch.float16)


def test_flash_attention_batch_17_heads_32_seq_32k():
    # B17 H32 S32768 D128: the last batch x head starts at 543 * 32768 * 128 > 2^31; 278,528 programs on one
    # grid axis (axis 1 would be capped at 65,535)
    B, H, S, D = 17, 32, 32768, 128
    q, k, v = (torch.empty(B, H, S, D, dtype=torch.float16) for _ in range(3))
    assert (B * H - 1) * S * D > 2**31
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v):
        t[-1, -1] = (torch.randn(S, D, generator=g) * 0.5).half()
    with last_programs_only(limit=2**16):
        out = fa.flash_attention(q, k, v, causal=True, step="v3", block_m=64, block_n=64)
    last_q = q[-1, -1, -64:].double()  # the last program: the last 64 queries (positions S - 64 ...)
    scores = (last_q @ k[-1, -1].double().T) * D ** -0.5  # [64, S]
    hidden = torch.arange(S)[None, :] > torch.arange(S - 64, S)[:, None]  # causal: keys after the query
    want = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v[-1, -1].double()
    assert_close(out[-1, -1, -64:], want, dtype=torch.float16)


@pytest.mark.parametrize("step", ["v1", "v2"])
def test_mla_decode_batch_256_cache_32k(step):
    # B256 x 32K x 512: sequence 255's cache starts at 255 * 32768 * 512 > 2^31
    B, L, C, R, heads = 256, 32768, 512, 64, 16
    c_kv, k_pe = torch.empty(B, L, C, dtype=torch.float16), torch.empty(B, L, R, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    q_latent, q_pe = (torch.randn(B, heads, d, generator=g).half() for d in (C, R))
    n = 100
    c_kv[-1, :n] = torch.randn(n, C, generator=g).half()
    k_pe[-1, :n] = torch.randn(n, R, generator=g).half()
    seq_lens = torch.full((B,), n, dtype=torch.int32)
    with last_programs_only():
        out = md.mla_decode(q_latent, q_pe, c_kv, k_pe, seq_lens, 0.05, step=step, num_splits=2)
    want = md.reference(q_latent[-1:].double(), q_pe[-1:].double(), c_kv[-1:, :n].double(), k_pe[-1:, :n].double(),
                        seq_lens[-1:], 0.05)
    # v2's merge runs only its last program too (sequence 255, head 15)
    rows = slice(None) if step == "v1" else slice(-1, None)
    assert_close(out[-1, rows], want[0, rows], dtype=torch.float16)


def test_matmul_rows_past_2_to_the_31():
    # A [32769, 65536]: the last row starts at 2^31
    a = torch.empty(32769, 65536, dtype=torch.float16)
    a[-1] = torch.randn(65536, generator=torch.Generator().manual_seed(0)).half()
    b = (torch.randn(65536, 16, generator=torch.Generator().manual_seed(1)) * 65536 ** -0.5).half()
    with last_programs_only():
        c = matmul.matmul(a, b, step="v2", block_m=64, block_n=16, block_k=1024)
    assert_close(c[-1], a[-1].double() @ b.double(), dtype=torch.float16)
