"""Flash attention v4 (dskernels.flash_attention_v4): the forward (with its log-sum-exp) and the gradients of
the FlashAttention-2 backward against a float64 refimpl.attention reference and torch.autograd, at awkward
sizes (lengths not block multiples, one token, GQA ratios, MLA's 192/128 head sizes); on the GPU when there is
one, else under TRITON_INTERPRET=1 on the CPU (float32, float16; bfloat16 only on a GPU). Every comparison goes
through `dskernels._checks`."""

import pytest
import torch

from dskernels import flash_attention as fa
from dskernels import flash_attention_v4 as fa4
from dskernels._checks import (INTERPRETER_SHARED_MEMORY, assert_close, bounds, compare, interpreting,
                               runnable_dtypes)

# (batch, heads, kv_heads, q_len, kv_len, d, d_v): one token; a length past one 128-row block and not a multiple
# of 64; fewer queries than keys (bottom-right causal); GQA 4:1 with heads not a power of two; MLA prefill heads
SHAPES = [(1, 2, 2, 1, 1, 16, 16), (1, 2, 1, 130, 130, 32, 32), (2, 4, 2, 5, 70, 24, 40),
          (1, 3, 1, 37, 37, 16, 16), (1, 2, 1, 20, 33, 192, 128)]
IDS = ["one-token", "130-gqa2", "5x70-gqa2-d24/40", "37-mqa3", "mla-192/128"]


def _qkv(shape, dtype, device, grad=False):
    batch, heads, kv_heads, q_len, kv_len, d, d_v = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, q_len, d, generator=g, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, d, generator=g, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, d_v, generator=g, device=device).to(dtype)
    do = torch.randn(batch, heads, q_len, d_v, generator=g, device=device).to(dtype)
    return [x.requires_grad_(grad) for x in (q, k, v)] + [do]


def _reference_grads(q, k, v, do, causal):
    """float64 refimpl attention (k, v repeated to the query heads) and its torch.autograd gradients."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = fa4.reference(q64, k64, v64, causal=causal)
    out.backward(do.double())
    return out, q64.grad, k64.grad, v64.grad


def _assert_grad_close(got, want, dtype, what):
    """The checker's `compare` on a gradient: its relative norm bound as it is, its per-row bound relative to
    the whole tensor's largest value instead of the row's. A query that sees few keys has an ill-conditioned
    gradient row: dP_ij - delta_i = dO_i . (V_j - O_i) cancels, and O is rounded before delta is formed (as in
    every FlashAttention backward), so the row's error is ~u of its terms, not of its (small) value; a query
    that sees one key (or a lone key) has an exact gradient of zero. An all-zero reference (one key in all):
    the largest error must be below the per-row bound in absolute terms (the inputs are unit normal)."""
    result = compare(got, want, dtype=dtype)
    if result.ok:
        return
    rel_bound, row_bound = bounds(dtype)
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs().max()
    largest = float(want.detach().abs().max())
    worst = float(err) / largest if largest else float(err)
    rel_ok = result.rel_err <= rel_bound or not largest
    assert rel_ok and worst <= row_bound, (f"{what}: WRONG: {result.message}; largest error {worst:.3g} of "
                                           f"the largest value (bound {row_bound:.3g})")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_forward_and_lse_match_refimpl(dtype, shape, causal, device):
    q, k, v, _ = _qkv(shape, dtype, device)
    out, lse = fa4.flash_attention_forward(q, k, v, causal=causal)
    assert_close(out, fa4.reference(q.double(), k.double(), v.double(), causal=causal), dtype=dtype)
    n_rep = q.shape[1] // k.shape[1]
    scores = q.double() @ k.double().repeat_interleave(n_rep, dim=1).transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        q_len, kv_len = scores.shape[-2:]
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(lse, scores.logsumexp(dim=-1), dtype=torch.float32, what="lse")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", runnable_dtypes())
def test_gradients_match_refimpl(dtype, shape, causal, device):
    q, k, v, do = _qkv(shape, dtype, device, grad=True)
    out = fa4.flash_attention(q, k, v, causal=causal)
    out.backward(do)
    want_out, dq, dk, dv = _reference_grads(q, k, v, do, causal)
    assert_close(out, want_out, dtype=dtype)
    for name, got, want in (("dq", q.grad, dq), ("dk", k.grad, dk), ("dv", v.grad, dv)):
        assert got.shape == want.shape and got.dtype == dtype, name
        _assert_grad_close(got, want, dtype, name)


def test_gradient_check_fails_on_a_wrong_gradient(device):
    # the comparison can fail: dK without the softmax scale, dV of a transposed P
    q, k, v, do = _qkv(SHAPES[2], torch.float32, device, grad=True)
    fa4.flash_attention(q, k, v, causal=True).backward(do)
    _, _, dk, dv = _reference_grads(q, k, v, do, True)
    with pytest.raises(AssertionError, match="dk: WRONG"):
        _assert_grad_close(k.grad * 24 ** 0.5, dk, torch.float32, "dk")
    with pytest.raises(AssertionError, match="dv: WRONG"):
        _assert_grad_close(v.grad.flip(2), dv, torch.float32, "dv")


class _Counting:
    """Stands in for a Triton kernel in the module: counts launches (kernel[grid](...)) and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_dq_dk_dv_come_from_the_triton_kernels(monkeypatch, device):
    names = ("flash_attention_v4_fwd_tuned", "flash_attention_v4_bwd_preprocess_kernel",
             "flash_attention_v4_bwd_dkdv_kernel", "flash_attention_v4_bwd_dq_kernel")
    counters = {name: _Counting(getattr(fa4, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(fa4, name, counter)
    q, k, v, do = _qkv(SHAPES[1], torch.float32, device, grad=True)
    out = fa4.flash_attention(q, k, v, causal=True)
    assert type(out.grad_fn).__name__ == "FlashAttentionBackward"  # the autograd.Function, not torch ops
    assert [c.launches for c in counters.values()] == [1, 0, 0, 0]
    out.backward(do)
    assert [c.launches for c in counters.values()] == [1, 1, 1, 1]
    # without the dQ launch there is no dQ: the gradient is whatever torch.empty held, not the reference's
    monkeypatch.setattr(fa4, "flash_attention_v4_bwd_dq_kernel", _Skipped())
    q.grad = None
    fa4.flash_attention(q, k, v, causal=True).backward(do)
    _, dq, _, _ = _reference_grads(q, k, v, do, True)
    assert not torch.allclose(q.grad.double(), dq, atol=1e-3)


class _Skipped:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_forward_saves_only_inputs_output_and_lse(device):
    # q_len x kv_len = 200 x 200 = 40,000 > every saved tensor (the largest: 2 heads x 200 x 16 = 6,400)
    q, k, v, _ = _qkv((1, 2, 2, 200, 200, 16, 16), torch.float32, device, grad=True)
    out = fa4.flash_attention(q, k, v, causal=True)
    saved = out.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(1, 2, 200, 16)] * 4 + [(1, 2, 200)]
    assert all(t.numel() < 200 * 200 for t in saved)
    assert saved[3].data_ptr() == out.data_ptr()  # O itself, and the float32 log-sum-exp
    assert saved[4].dtype == torch.float32


def test_causal_blocks_past_the_diagonal_are_skipped(device):
    # NaN in the values of keys 128...: the first 128-row query block never loads them (forward and dQ),
    # so its output and dQ stay finite; the second block sees them and is NaN
    q, k, v, do = _qkv((1, 1, 1, 256, 256, 32, 32), torch.float32, device, grad=True)
    poisoned = v.detach().clone()
    poisoned[:, :, 128:] = float("nan")
    poisoned.requires_grad_()
    out = fa4.flash_attention(q, k, poisoned, causal=True)
    assert bool(out[:, :, :128].isfinite().all()) and not bool(out[:, :, 128:].isfinite().any())
    out.backward(do)
    assert bool(q.grad[:, :, :128].isfinite().all())


def test_autotune_configs_fit_the_shared_memory(device):
    h100, a100 = 232448, 166912
    assert INTERPRETER_SHARED_MEMORY == h100
    for itemsize in (2, 4):
        for bd, bdv in ((64, 64), (128, 128), (256, 128)):
            for budget, arch in ((h100, 90), (a100, 80)):
                fitting = fa4.fitting_forward_configs(bd, bdv, itemsize, budget, arch)
                assert fitting, (itemsize, bd, bdv, budget)
                assert all(fa4.forward_shared_memory(m, n, bd, bdv, itemsize, s, arch) <= budget
                           for m, n, _, s in fitting)
    # 16-bit, heads up to 128 on an H100: every config, 128-row blocks first
    assert fa4.fitting_forward_configs(128, 128, 2, h100) == list(fa4.FORWARD_CONFIGS)
    assert fa4.FORWARD_CONFIGS[0][0] == 128
    # 16-bit with MLA's 192 (-> 256) head on an H100: 128-row blocks still first; 128 x 128 at 2 stages
    # does not fit (it compiles to 262,144 B for sm_90, tests/test_kernels_compile.py)
    assert fa4.fitting_forward_configs(256, 128, 2, h100)[0][0] == 128
    assert (128, 128, 8, 2) not in fa4.fitting_forward_configs(256, 128, 2, h100)
    # float32 with MLA's 192 (-> 256) head: no 128-row block fits
    assert all(c[0] == 64 for c in fa4.fitting_forward_configs(256, 128, 4, h100))
    if interpreting():
        assert len(fa4._prune_forward(fa4.flash_attention_v4_fwd_tuned.configs,
                                      {"q_ptr": torch.empty(1, dtype=torch.float16, device=device)},
                                      BLOCK_D=128, BLOCK_DV=128, D=128, DV=128)) == 1


def test_v4_is_a_step_of_the_ladder(device):
    q, k, v, _ = _qkv((1, 2, 2, 40, 40, 24, 40), torch.float16, device)
    assert fa.STEPS[-1] == "v4"
    got = fa.flash_attention(q, k, v, causal=True, step="v4")
    assert_close(got, fa.reference(q.double(), k.double(), v.double(), causal=True), dtype=torch.float16)


def test_bad_input_is_named(device):
    q = torch.randn(1, 4, 8, 16, device=device)
    kv = torch.randn(1, 3, 8, 16, device=device)
    with pytest.raises(ValueError, match="k: expected a number of key/value heads that divides the 4"):
        fa4.flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="v: expected shape"):
        fa4.flash_attention(q, q, torch.randn(1, 4, 9, 16, device=device))
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        fa4.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="causal: expected q_len <= kv_len"):
        fa4.flash_attention(q, q[:, :, :2].contiguous(), q[:, :, :2].contiguous(), causal=True)
    with pytest.raises(ValueError, match="scale: expected a positive number"):
        fa4.flash_attention(q, q, q, scale=-1.0)


def test_bench_rows_run_and_agree(device):
    from dskernels import bench

    cases = fa4.bench_cases(True, device.type, torch.float32)
    assert [c.op for c in cases] == ["flash attention (causal)", "flash attention backward (causal)"]
    for case in cases:
        bench._run_case(case, device.type, 0, 1, 2)
        assert [(r["impl"], r["ok"]) for r in case.results] == [("v4", True), ("SDPA", True)]
