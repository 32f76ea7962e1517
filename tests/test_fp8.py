"""refimpl.fp8: V3's fine-grained FP8 quantization, the block-scaled GEMM, the limited accumulator, FP8Linear."""

import json

import pytest
import torch
from torch import nn

from refimpl import fp8
from refimpl.model import DeepSeekForCausalLM
from refimpl.train import tiny_config

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def outlier_activations(m=64, k=512, seed=0, factor=100.0):
    """Activations with two outlier channels (`factor` x the others), as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, [3, 77]] *= factor
    return x


@pytest.mark.parametrize("block, scale_shape", [((1, 128), (10, 3)), ((128, 128), (1, 3)), ((128, 1), (1, 300)),
                                                ((10, 300), (1, 1)), ((1, 300), (10, 1))])
def test_quantize_blocks_shapes_and_error_bound(block, scale_shape):
    x = torch.randn(10, 300) * torch.logspace(-3, 3, 300)  # columns over six orders of magnitude
    q, scale = fp8.quantize_blocks(x, block)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == scale_shape and scale.dtype == torch.float32
    deq = fp8.dequantize_blocks(q, scale, block)
    # E4M3: 3 mantissa bits, so normal values round within 2^-4 relative; subnormals (below 2^-6 of the
    # scale's unit) within half the smallest subnormal step 2^-9
    s = scale.repeat_interleave(block[0], 0)[:10].repeat_interleave(block[1], 1)[:, :300]
    assert ((deq - x).abs() <= torch.maximum(x.abs() * 2**-4, s * 2**-10) * 1.0001).all()
    # each block's largest magnitude lands on 448, E4M3's largest value
    assert q.float().abs().max() == 448


def test_quantize_zero_block_and_bfloat16():
    q, scale = fp8.quantize_blocks(torch.zeros(2, 128), (1, 128))
    assert torch.equal(scale, torch.ones(2, 1)) and torch.equal(q.float(), torch.zeros(2, 128))
    x = torch.randn(3, 256)
    q, scale = fp8.quantize_blocks(x, (1, 128), torch.bfloat16)
    assert torch.equal(q, x.bfloat16()) and torch.equal(scale, torch.ones(3, 2))


def test_fine_grained_scaling_contains_outliers():
    """Outlier channels 1e5 x the rest push the others below E4M3's range under one scale per tensor (or per
    row: every row holds the outliers); with 1x128 tiles only the outliers' own tiles suffer."""
    x, w = outlier_activations(factor=1e5), torch.randn(256, 512) * 0.05
    w[:, [3, 77]] /= 1e5  # every channel adds alike to the output: the error is the small channels' error
    want = x.double() @ w.double().t()
    errors = {}
    for name, block in [("tensor", x.shape), ("row", (1, 512)), ("tile", (1, 128))]:
        xd = fp8.dequantize_blocks(*fp8.quantize_blocks(x, block), block)
        errors[name] = fp8.relative_error(xd @ w.t(), want)
    assert errors["tile"] < 0.1 < 0.2 < errors["tensor"], errors
    assert errors["tile"] < errors["row"] / 1.5 < errors["tensor"] / 1.5, errors


def test_block_scaled_matmul_is_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(70, 384, generator=g), torch.randn(200, 384, generator=g)
    (a_q, sa), (b_q, sb) = fp8.quantize_activation(a), fp8.quantize_weight(b)
    assert sb.shape == (2, 3)  # N = 200: a partial second block
    ad = fp8.dequantize_blocks(a_q, sa, (1, 128)).double()
    want = ad @ fp8.dequantize_blocks(b_q, sb, (128, 128)).double().t()
    got = fp8.block_scaled_matmul(a_q, sa, b_q, sb)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # b in 1x128 tiles (the weight-gradient GEMM's case) reads its scales per row
    b_q, sb = fp8.quantize_blocks(b, (1, 128))
    want = ad @ fp8.dequantize_blocks(b_q, sb, (1, 128)).double().t()
    torch.testing.assert_close(fp8.block_scaled_matmul(a_q, sa, b_q, sb).double(), want, rtol=1e-5, atol=1e-4)
    # and the whole recipe is close to the exact product (E4M3: a few percent)
    assert 0.005 < fp8.relative_error(fp8.fp8_matmul(a, b), a.double() @ b.double().t()) < 0.06


def test_bad_input_is_named():
    a_q, sa = fp8.quantize_activation(torch.randn(4, 256))
    b_q, sb = fp8.quantize_weight(torch.randn(8, 256))
    with pytest.raises(ValueError, match="x: expected K .* multiple of 128.* got K=100"):
        fp8.quantize_activation(torch.randn(4, 100))
    with pytest.raises(ValueError, match="w: expected K .* multiple of 128.* got K=200"):
        fp8.quantize_weight(torch.randn(4, 200))
    with pytest.raises(ValueError, match=r"a_scale: expected shape \(4, 2\) \(1x128 tiles\) or \(1, 2\)"):
        fp8.block_scaled_matmul(a_q, sa[:, :1], b_q, sb)
    with pytest.raises(ValueError, match=r"b_scale: expected shape \(8, 2\) .* got \(2, 2\)"):
        fp8.block_scaled_matmul(a_q, sa, b_q, torch.ones(2, 2))
    with pytest.raises(TypeError, match="a_scale: expected dtype torch.float32, got torch.float16"):
        fp8.block_scaled_matmul(a_q, sa.half(), b_q, sb)
    with pytest.raises(TypeError, match="a_q: expected a quantized operand of dtype"):
        fp8.block_scaled_matmul(a_q.float(), sa, b_q, sb)
    with pytest.raises(ValueError, match=r"b_q: expected K = 256 columns"):
        fp8.block_scaled_matmul(a_q, sa, b_q[:, :128], sb)
    with pytest.raises(ValueError, match=r"scale: expected shape \(4, 2\) \(one per 1x128 block"):
        fp8.dequantize_blocks(a_q, sa[:, :1], (1, 128))
    with pytest.raises(TypeError, match="dtype: expected one of"):
        fp8.quantize_blocks(torch.randn(4, 128), (1, 128), torch.float16)
    with pytest.raises(ValueError, match=r"block: expected a pair \(rows, columns\)"):
        fp8.quantize_blocks(torch.randn(4, 128), (128,))
    with pytest.raises(ValueError, match="in_features: expected K .* multiple of 128.* got K=100"):
        fp8.FP8Linear(100, 128)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        fp8.FP8Linear(128, 8)(torch.randn(2, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected last dimension 128"):
        fp8.FP8Linear(128, 8)(torch.randn(2, 64))
    with pytest.raises(TypeError, match="backward: expected one of"):
        fp8.Recipe(E4M3, torch.float16)


@pytest.mark.parametrize("call, function, name", [
    (lambda x: fp8.quantize_blocks(x, (1, 128)), "quantize_blocks", "x"),
    (lambda x: fp8.quantize_blocks(x, (128, 128), E5M2), "quantize_blocks", "x"),
    (fp8.quantize_activation, "quantize_activation", "x"),
    (fp8.quantize_weight, "quantize_weight", "w"),
    (lambda w: fp8.fp8_matmul(torch.randn(2, 256), w), "quantize_weight", "w")],
    ids=["blocks_1x128", "blocks_128x128_e5m2", "activation", "weight", "fp8_matmul"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_nan_and_inf_by_name(call, function, name, bad):
    x = torch.randn(4, 256)
    x[1, 130] = x[3, 7] = bad
    message = (rf"{function}: expected {name} with finite values only, got 2 NaN or inf of 1024, the first "
               rf"{name}\[1, 130\] = {bad}")
    with pytest.raises(ValueError, match=message):
        call(x)
    call(x.nan_to_num(0.0, 0.0, 0.0))  # finite: accepted


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp8_linear_turns_a_non_finite_tile_or_block_nan(bad):
    """Not refused in training (a host sync per GEMM): documented in FP8Linear; its whole block turns NaN."""
    layer = fp8.FP8Linear(256, 200)
    x = torch.randn(5, 256)
    with torch.no_grad():
        layer.weight[5, 130] = bad  # output features 0..127 share its 128x128 block
    y = layer(x)
    assert y[:, :128].isnan().all() and y[:, 128:].isfinite().all()
    layer = fp8.FP8Linear(256, 200)
    x[2, 3] = bad  # token 2's first 1x128 tile
    y = layer(x)
    assert y[2].isnan().all() and y[[0, 1, 3, 4]].isfinite().all()
    q, scale = fp8._quantize_blocked(x, (1, 128), E4M3)
    assert scale[2, 0].isnan() or scale[2, 0].isinf()
    assert fp8._fake_quantize(x, (1, 128), E4M3)[2, :128].isnan().all()


def test_relative_error_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"relative_error: expected got and want of the same shape, got got "
                                         r"\(4, 1\) and want \(4, 3\)"):
        fp8.relative_error(torch.ones(4, 1), torch.ones(4, 3))
    assert fp8.relative_error(torch.full((4, 3), 1.1), torch.ones(4, 3)) == pytest.approx(0.1)


def test_cut_mantissa():
    x = torch.tensor([1 + 2**-10 + 2**-20, -(1 + 2**-10 + 2**-20), 3.0])
    assert fp8.cut_mantissa(x, 13).tolist() == [1 + 2**-10, -(1 + 2**-10), 3.0]  # toward zero, both signs
    assert torch.equal(fp8.cut_mantissa(x, 23), x)
    with pytest.raises(ValueError, match="bits: expected at most 23"):
        fp8.cut_mantissa(x, 24)


def test_promotion_fixes_the_limited_accumulator():
    """V3 section 3.3.2: a ~14-bit accumulator over K = 4096 errs far more than one promoted every 128."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 4096, generator=g).abs(), torch.randn(32, 4096, generator=g).abs()
    exact = a.double() @ b.double().t()
    without = fp8.relative_error(fp8.limited_accumulation_matmul(a, b, 13, None), exact)
    promoted = fp8.relative_error(fp8.limited_accumulation_matmul(a, b, 13, 128), exact)
    assert without > 1e-3 and promoted < without / 10, (without, promoted)
    full = fp8.limited_accumulation_matmul(a, b, 23, None)  # no cut: the float32 product
    assert fp8.relative_error(full, exact) < 1e-6
    with pytest.raises(ValueError, match="promote_every: expected a multiple of 32 that divides K"):
        fp8.limited_accumulation_matmul(a, b, 13, 96)


def _grad_errors(recipe, m=300, k=256, n=200):
    """Relative errors of y, dX, dW of an FP8Linear against float64 autograd (m tokens: a partial 128x1 tile)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = outlier_activations(m, k), torch.randn(n, k, generator=g) * 0.05, torch.randn(m, n, generator=g)
    layer = fp8.FP8Linear(k, n, recipe)
    layer.weight.data.copy_(w)
    x = x.requires_grad_()
    y = layer(x)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.double().requires_grad_()
    (x64 @ w64.t()).backward(dy.double())
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    return (fp8.relative_error(y, x64.detach() @ w64.detach().t()), fp8.relative_error(x.grad, x64.grad),
            fp8.relative_error(layer.weight.grad, w64.grad))


def test_fp8_linear_backward_is_quantized():
    """A 2-bit-mantissa format (E5M2) for the gradients raises the errors of dX and dW, not of y."""
    e4m3 = _grad_errors(fp8.V3_RECIPE)
    e5m2 = _grad_errors(fp8.Recipe(E4M3, E5M2))
    bf16 = _grad_errors(fp8.BF16_RECIPE)
    assert e5m2[0] == e4m3[0]  # the forward is the same
    assert e5m2[1] > 1.5 * e4m3[1] and e5m2[2] > 1.5 * e4m3[2], (e4m3, e5m2)
    assert all(0.005 < e < 0.08 for e in e4m3), e4m3  # E4M3: a few percent, not exact
    assert all(e < min(e4m3) / 4 for e in bf16), (bf16, e4m3)


def test_fp8_linear_forward_is_the_block_scaled_gemm_and_takes_no_tokens():
    layer = fp8.FP8Linear(256, 64)
    x = torch.randn(2, 3, 256)
    want = fp8.fp8_matmul(x.view(6, 256), layer.weight.detach())
    torch.testing.assert_close(layer(x).view(6, 64), want, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 256, requires_grad=True)
    layer(empty).sum().backward()  # an expert that got no token
    assert empty.grad.shape == (0, 256) and torch.equal(layer.weight.grad, torch.zeros(64, 256))


def test_convert_to_fp8_keeps_v3s_high_precision_parts():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(fp8.fp8_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    want = model(ids)
    q_a = model.model.layers[0].self_attn.q_a_proj.weight
    names = fp8.convert_to_fp8(model)
    assert "model.layers.0.self_attn.q_a_proj" in names and "model.layers.1.mlp.experts.3.down_proj" in names
    assert "model.layers.1.mlp.shared_experts.up_proj" in names
    assert not any("gate.weight" in n or "lm_head" in n or "norm" in n for n in names)
    assert model.model.layers[0].self_attn.q_a_proj.weight is q_a  # the same float32 master weight
    assert type(model.lm_head) is nn.Linear
    got = model(ids)
    assert 1e-3 < fp8.relative_error(got, want) < 0.15  # a few percent per GEMM, through two layers
    got.float().logsumexp(-1).mean().backward()
    assert q_a.grad is not None and q_a.grad.dtype == torch.float32


def test_convert_to_fp8_refuses_k_below_128_by_name():
    model = DeepSeekForCausalLM(tiny_config())  # hidden 64: lesson 11's model
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_a_proj: expected in_features .* got 64"):
        fp8.convert_to_fp8(model)
    assert type(model.model.layers[0].self_attn.q_a_proj) is nn.Linear  # nothing changed
    with pytest.raises(TypeError, match="expected float32 master weights"):
        fp8.convert_to_fp8(DeepSeekForCausalLM(fp8.fp8_config()).bfloat16())


def test_experiment_command_help_says_what_each_option_is(capsys):
    with pytest.raises(SystemExit):
        fp8.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train: the runs of EXPERIMENT_RUNS" in text
    assert "--steps STEPS optimizer steps of each run (batches of 8 sequences of 64 tokens); default 300" in text
    assert "--out OUT the JSON log to write; default lessons/logs/fp8_vs_bf16.json" in text
    assert "--threads THREADS torch threads; default 1" in text
    assert "/work/" not in text and "/root" not in text  # no machine path


def test_experiment_command_refuses_a_folder_as_out_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8.main(["train", "--steps", "2", "--out", str(tmp_path)])
    assert "out: expected a JSON file name, got the folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fp8.main(["train", "--steps", "2"])
    assert "would overwrite the committed log" in capsys.readouterr().err


def test_experiment_command_writes_its_log(tmp_path):
    out = tmp_path / "log.json"
    fp8.main(["train", "--steps", "2", "--out", str(out)])
    log = json.loads(out.read_text())
    assert log["steps"] == 2 and log["seed"] == 0
    assert set(log["runs"]) == {"fp8", "fp8_forward_only", "bf16", "fp32"}
    for run in log["runs"]:
        assert len(log["runs"][run]["train_loss"]) == 2 and log["runs"][run]["eval_step"] == [0, 2]
    assert log["runs"]["fp8"]["train_loss"][0] == pytest.approx(log["runs"]["bf16"]["train_loss"][0], rel=0.01)
    assert log["runs"]["fp8"]["train_loss"] != log["runs"]["bf16"]["train_loss"]
