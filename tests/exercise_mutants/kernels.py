"""Triton wrong answers to 06_kernels, one kernel per exercise with a MUTANT constexpr choosing the bug
(0: right). Launched under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import torch
import triton
import triton.language as tl

RIGHT, NO_MAX, ZERO_LANES, STRIDE_BLOCK, NO_COLUMN_MASK = 0, 1, 2, 3, 4
NO_TAIL_MASK, NO_SCALE, NO_RESCALE = 1, 2, 3


@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, MUTANT: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if MUTANT == 3:  # rows BLOCK apart: right only when n_cols is a power of two
        start = row * BLOCK
    else:
        start = row * n_cols
    if MUTANT == 2:
        x = tl.load(x_ptr + start + cols, mask=mask, other=0.0)
    elif MUTANT == 4:  # no column mask: the lanes past n_cols read the next row (or past the end)
        x = tl.load(x_ptr + start + cols)
    else:
        x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf"))
    if MUTANT != 1:
        x = x - tl.max(x, axis=0)
    numerator = tl.exp(x)
    tl.store(out_ptr + row * n_cols + cols, numerator / tl.sum(numerator, axis=0), mask=mask)


def softmax_rows(mutant: int):
    def launch(x):
        x = x.contiguous()
        out = torch.empty_like(x)
        softmax_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]), MUTANT=mutant)
        return out
    return launch


@triton.jit
def mla_decode_kernel(q_latent_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, out_ptr, kv_len, heads, scale,
                      R: tl.constexpr, DR: tl.constexpr, BLOCK_T: tl.constexpr, MUTANT: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // heads
    r = tl.arange(0, R)
    dr = tl.arange(0, DR)
    q_latent = tl.load(q_latent_ptr + pid * R + r)
    q_pe = tl.load(q_pe_ptr + pid * DR + dr)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([R], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        valid = t < kv_len
        rows = b * kv_len + t
        c = tl.load(c_kv_ptr + rows[:, None] * R + r[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_pe_ptr + rows[:, None] * DR + dr[None, :], mask=valid[:, None], other=0.0)
        s = tl.sum(c * q_latent[None, :], axis=1) + tl.sum(k * q_pe[None, :], axis=1)
        if MUTANT != 2:
            s = s * scale
        if MUTANT != 1:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        rescale = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        total = total * rescale + tl.sum(p, axis=0)
        if MUTANT == 3:  # the running sum of values not rescaled to the new max
            acc = acc + tl.sum(p[:, None] * c, axis=0)
        else:
            acc = acc * rescale + tl.sum(p[:, None] * c, axis=0)
        m = m_new
    tl.store(out_ptr + pid * R + r, acc / total)


def mla_decode_block(mutant: int):
    def launch(q_latent, q_pe, c_kv, k_pe, scale):
        batch, heads, rank = q_latent.shape
        out = torch.empty_like(q_latent)
        mla_decode_kernel[(batch * heads,)](q_latent, q_pe, c_kv, k_pe, out, c_kv.shape[1], heads, scale, R=rank,
                                            DR=q_pe.shape[-1], BLOCK_T=8, MUTANT=mutant)
        return out
    return launch


RIGHT_ANSWERS = [("softmax_rows", softmax_rows(RIGHT)), ("mla_decode_block", mla_decode_block(RIGHT))]
MUTANTS = [
    ("softmax_rows", "no max subtracted", softmax_rows(NO_MAX)),
    ("softmax_rows", "masked lanes loaded as 0.0", softmax_rows(ZERO_LANES)),
    ("softmax_rows", "row stride BLOCK", softmax_rows(STRIDE_BLOCK)),
    ("softmax_rows", "no column mask on the load", softmax_rows(NO_COLUMN_MASK)),
    ("mla_decode_block", "no tail mask on the scores", mla_decode_block(NO_TAIL_MASK)),
    ("mla_decode_block", "no scale", mla_decode_block(NO_SCALE)),
    ("mla_decode_block", "running sum not rescaled", mla_decode_block(NO_RESCALE)),
]
