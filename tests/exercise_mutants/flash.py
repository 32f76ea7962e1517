"""Wrong answers to 13_flash_kernel: a Triton flash-attention kernel with a MUTANT constexpr choosing the bug
(0: right), launched as the grader's harness launches it (exercises.contracts), and a plain online-softmax step
that subtracts the block's own max. Run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import torch
import triton
import triton.language as tl

from exercises.contracts import FLASH_BLOCK_M, FLASH_BLOCK_N

RIGHT, NO_SCALE, TOP_LEFT, NO_TAIL_MASK, NO_ACC_RESCALE, NO_L_RESCALE, LSE_NO_MAX, NO_MAX = range(8)


@triton.jit
def flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seq_q, seq_k, scale, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     MUTANT: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    in_q = rows < seq_q
    q = tl.load(q_ptr + (bh * seq_q + rows[:, None]) * HEAD_DIM + d[None, :], mask=in_q[:, None], other=0.0)
    if MUTANT == 2:  # query i at position i: the first query sees the first key only
        position = rows
    else:
        position = seq_k - seq_q + rows
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if MUTANT == 7:  # no running max: exp of the raw scores
        m = tl.zeros([BLOCK_M], dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_k = cols < seq_k
        offsets = (bh * seq_k + cols[:, None]) * HEAD_DIM + d[None, :]
        k = tl.load(k_ptr + offsets, mask=in_k[:, None], other=0.0)
        v = tl.load(v_ptr + offsets, mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        if MUTANT != 1:
            s = s * scale
        if MUTANT == 3:  # the padded keys score 0 (loaded as 0.0) and count
            visible = cols[None, :] >= 0
        else:
            visible = in_k[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        if MUTANT == 7:
            m_new = m
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        if MUTANT == 5:
            l = l + tl.sum(p, axis=1)
        else:
            l = alpha * l + tl.sum(p, axis=1)
        if MUTANT == 4:
            acc = acc + tl.dot(p.to(v.dtype), v)
        else:
            acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = (acc / l[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + (bh * seq_q + rows[:, None]) * HEAD_DIM + d[None, :], o, mask=in_q[:, None])
    if MUTANT == 6:
        tl.store(lse_ptr + bh * seq_q + rows, tl.log(l), mask=in_q)
    else:
        tl.store(lse_ptr + bh * seq_q + rows, m + tl.log(l), mask=in_q)


def flash_attention_fwd(mutant: int):
    def launch(q, k, v, is_causal):
        batch, heads, seq_q, head_dim = q.shape
        q, k, v = (t.reshape(batch * heads, -1, head_dim).contiguous() for t in (q, k, v))
        o, lse = torch.empty_like(q), torch.empty(batch * heads, seq_q, dtype=torch.float32)
        flash_fwd_kernel[(triton.cdiv(seq_q, FLASH_BLOCK_M), batch * heads)](
            q, k, v, o, lse, seq_q, k.shape[1], head_dim ** -0.5, BLOCK_M=FLASH_BLOCK_M, BLOCK_N=FLASH_BLOCK_N,
            HEAD_DIM=head_dim, IS_CAUSAL=bool(is_causal), MUTANT=mutant)
        return o.view(batch, heads, seq_q, head_dim), lse.view(batch, heads, seq_q)
    return launch


def online_softmax_step_block_max(m, l, acc, scores, v):
    """Each block's exponentials taken relative to its own max, then added to the running sums unscaled."""
    block_max = scores.max(dim=-1).values
    p = torch.exp(scores - block_max[:, None])
    return torch.maximum(m, block_max), l + p.sum(-1), acc + p @ v


RIGHT_ANSWERS = [("flash_attention_fwd", flash_attention_fwd(RIGHT))]
MUTANTS = [
    ("flash_attention_fwd", "no scale", flash_attention_fwd(NO_SCALE)),
    ("flash_attention_fwd", "top-left causal mask", flash_attention_fwd(TOP_LEFT)),
    ("flash_attention_fwd", "no tail mask on the keys", flash_attention_fwd(NO_TAIL_MASK)),
    ("flash_attention_fwd", "acc not rescaled", flash_attention_fwd(NO_ACC_RESCALE)),
    ("flash_attention_fwd", "l not rescaled", flash_attention_fwd(NO_L_RESCALE)),
    ("flash_attention_fwd", "log(l) stored as the lse", flash_attention_fwd(LSE_NO_MAX)),
    ("flash_attention_fwd", "no running max", flash_attention_fwd(NO_MAX)),
    ("online_softmax_step", "exponentials relative to the block's own max", online_softmax_step_block_max),
]
HINTS = {("flash_attention_fwd", "no scale"): "left out the softmax scale",
         ("flash_attention_fwd", "top-left causal mask"): "used a top-left causal mask",
         ("flash_attention_fwd", "no tail mask on the keys"): "did not mask the keys past seq_k",
         ("flash_attention_fwd", "log(l) stored as the lse"): "stored log(l) as the log-sum-exp",
         ("flash_attention_fwd", "acc not rescaled"): "did not rescale acc",
         ("flash_attention_fwd", "l not rescaled"): "did not rescale l",
         ("flash_attention_fwd", "no running max"): "kept no running max"}


def flash_lse_base_2(q, k, v, is_causal):
    """The right kernel's output, its log-sum-exp in base 2 (an exp2 kernel that never converts back)."""
    o, lse = flash_attention_fwd(RIGHT)(q, k, v, is_causal)
    return o, lse * 1.4426950408889634


MUTANTS.append(("flash_attention_fwd", "lse in base 2", flash_lse_base_2))
HINTS[("flash_attention_fwd", "lse in base 2")] = "stored the log-sum-exp in base 2"
