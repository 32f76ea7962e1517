"""refimpl.rope: the two layouts, the relative-position property, norms, YaRN against independent formulas and
transformers, DeepSeek's softmax scale, and bad input."""

import math

import pytest
import torch

from refimpl.config import RopeScaling, load_known
from refimpl.rope import (RotaryEmbedding, apply_rope, interleaved_to_half_perm, rope_attention_factor,
                          rope_inv_freq, softmax_scale)

YARN = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                   mscale=1.0, mscale_all_dim=1.0)
YARN_UNEQUAL_MSCALE = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                                  mscale_all_dim=0.707)


def rotate(x: torch.Tensor, positions, dim: int, scaling=None, interleaved=False, base=10000.0) -> torch.Tensor:
    cos, sin = RotaryEmbedding(dim, base, scaling)(torch.as_tensor(positions), dtype=x.dtype)
    return apply_rope(x, cos, sin, interleaved=interleaved)


# ---------------------------------------------------------------------------- plain RoPE
def test_inv_freq_is_base_to_the_minus_2i_over_d():
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0), expected, atol=0, rtol=1e-14)


def test_interleaved_is_complex_multiplication():
    # DeepSeek's code: view pairs (x[2i], x[2i+1]) as complex numbers and multiply by e^{i * position * theta_i}
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.arange(5) * 7
    theta = torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(5, 4, dtype=torch.float64), positions[:, None] * theta)  # [seq, dim/2]
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2))) * rotation).flatten(-2)
    torch.testing.assert_close(rotate(x, positions, 8, interleaved=True), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("scaling", [None, YARN_UNEQUAL_MSCALE])
def test_layouts_agree_after_permutation(scaling):
    x = torch.randn(2, 3, 6, 16, dtype=torch.float64)
    positions = torch.arange(6) * 1000
    perm = interleaved_to_half_perm(16)
    assert perm.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    interleaved = rotate(x, positions, 16, scaling, interleaved=True)
    half = rotate(x[..., perm], positions, 16, scaling, interleaved=False)
    torch.testing.assert_close(interleaved[..., perm], half, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(interleaved, rotate(x, positions, 16, scaling, interleaved=False))  # they do differ


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", [None, YARN])
def test_dot_product_depends_only_on_relative_position(interleaved, scaling):
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m, n):
        return (rotate(q, [m], 32, scaling, interleaved) * rotate(k, [n], 32, scaling, interleaved)).sum().item()

    for distance in (0, 3, 50):
        scores = [score(n + distance, n) for n in (0, 17, 1000, 70000)]
        assert scores == pytest.approx([scores[0]] * 4, rel=1e-9, abs=1e-9)
    assert score(3, 0) != pytest.approx(score(50, 0), rel=1e-3)  # while the distance itself matters


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", [None, YARN])
def test_rotation_preserves_norms(interleaved, scaling):
    assert rope_attention_factor(scaling) == 1.0
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    rotated = rotate(x, torch.arange(7) * 9999, 16, scaling, interleaved)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)


def test_attention_factor_scales_norms():
    factor = (0.1 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1)  # mscale 1.0 over mscale_all_dim 0.707
    assert rope_attention_factor(YARN_UNEQUAL_MSCALE) == pytest.approx(factor)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    rotated = rotate(x, torch.arange(4), 8, YARN_UNEQUAL_MSCALE)
    torch.testing.assert_close(rotated.norm(dim=-1), factor * x.norm(dim=-1), atol=1e-12, rtol=1e-12)


def test_float32_cos_sin_are_accurate_at_large_positions():
    # angles are formed in float64: a float32 product position * inv_freq would be off by ~1e-2 rad at 160k
    cos, sin = RotaryEmbedding(64, 10000.0)(torch.tensor([163839]), dtype=torch.float32)
    angles = 163839 * torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(cos.double(), angles.cos()[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin()[None], atol=1e-6, rtol=0)


def test_positions_per_batch_row():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    out = rotate(x, positions, 8)
    torch.testing.assert_close(out[1:], rotate(x[1:], torch.arange(10, 14), 8), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[:1], rotate(x[:1], torch.arange(4), 8), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------- YaRN
def yarn_inv_freq_reference(dim, base, factor, original_max_pos, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023, section 3.2, "NTK-by-parts") as in its reference code, in plain Python.

    Pair i has wavelength lambda_i = 2 pi base^(2i/dim), so it turns r_i = L / lambda_i times over the original
    context L. Pairs turning more than beta_fast times keep theta_i, pairs turning less than beta_slow times get
    theta_i / factor; in between a linear ramp, which the reference code (and DeepSeek's) lays over the pair
    *index* between the (floored/ceiled) indices where r_i equals beta_fast and beta_slow.
    """
    def index_where_rotations_equal(n):  # solve L / (2 pi base^(2i/dim)) = n for i
        return dim / 2 * math.log(original_max_pos / (2 * math.pi * n)) / math.log(base)

    low = max(math.floor(index_where_rotations_equal(beta_fast)), 0)
    high = min(math.ceil(index_where_rotations_equal(beta_slow)), dim - 1)
    result = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        gamma = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
        result.append((1 - gamma) * theta + gamma * theta / factor)
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("dim, base, factor, orig", [(64, 10000.0, 40.0, 4096), (128, 500000.0, 8.0, 8192),
                                                     (32, 10000.0, 4.0, 2048)])
def test_yarn_inv_freq_matches_reference_formulas(dim, base, factor, orig):
    scaling = RopeScaling(type="yarn", factor=factor, original_max_position_embeddings=orig)
    expected = yarn_inv_freq_reference(dim, base, factor, orig, 32.0, 1.0)
    torch.testing.assert_close(rope_inv_freq(dim, base, scaling), expected, atol=0, rtol=1e-12)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_pairs():
    # the paper's rule, checked on the pairs outside the ramp: r_i > beta_fast keeps theta_i, r_i < beta_slow
    # divides it by the factor
    dim, base = 64, 10000.0
    theta = rope_inv_freq(dim, base)
    yarn = rope_inv_freq(dim, base, YARN)
    rotations = 4096 * theta / (2 * math.pi)  # r_i = L / lambda_i
    fast, slow = rotations > 32, rotations < 1
    assert fast.any() and slow.any()
    torch.testing.assert_close(yarn[fast], theta[fast], atol=0, rtol=1e-14)
    torch.testing.assert_close(yarn[slow], theta[slow] / 40, atol=0, rtol=1e-14)


@pytest.mark.parametrize("scaling", [YARN, YARN_UNEQUAL_MSCALE])
def test_yarn_matches_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": scaling.factor,
                       "original_max_position_embeddings": scaling.original_max_position_embeddings,
                       "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow, "mscale": scaling.mscale,
                       "mscale_all_dim": scaling.mscale_all_dim}
    hf_config = transformers.DeepseekV3Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=64, v_head_dim=8,
        max_position_embeddings=163840, rope_parameters=rope_parameters)
    inv_freq, attention_factor = _compute_yarn_parameters(hf_config)  # float32
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, scaling).float(), inv_freq, atol=0, rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(attention_factor, rel=1e-12)


def test_softmax_scale_for_deepseek_v3():
    config = load_known("DeepSeek-V3")
    assert config.qk_head_dim == 192
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert softmax_scale(config.qk_head_dim, config.rope_scaling) == pytest.approx(expected, rel=1e-12)


def test_softmax_scale_for_v2_lite_and_plain_rope():
    config = load_known("DeepSeek-V2-Lite")  # mscale_all_dim 0.707
    expected = 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
    assert softmax_scale(config.qk_head_dim, config.rope_scaling) == pytest.approx(expected, rel=1e-12)
    assert softmax_scale(128, None) == 128 ** -0.5
    no_mscale = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096)  # mscale_all_dim 0
    assert softmax_scale(128, no_mscale) == 128 ** -0.5


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("dim", [7, 0, -4])
def test_odd_or_non_positive_dim_raises(dim):
    with pytest.raises(ValueError, match=rf"rope dim: expected a positive even number, got {dim}"):
        rope_inv_freq(dim, 10000.0)
    with pytest.raises(ValueError, match=r"rope dim: expected a positive even number"):
        RotaryEmbedding(dim)


def test_bad_positions_raise():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"positions: expected an integer tensor of shape \[seq\]"):
        rope(torch.arange(4.0))
    with pytest.raises(ValueError, match=r"positions: expected an integer tensor.*got shape \(1, 1, 4\)"):
        rope(torch.arange(4)[None, None])
    with pytest.raises(TypeError, match=r"positions: expected a torch.Tensor, got list"):
        rope([0, 1, 2])


def test_apply_rope_bad_shapes_raise():
    cos, sin = RotaryEmbedding(8)(torch.arange(5))  # [5, 4]
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"x: expected a 4-d tensor"):
        apply_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match=r"cos, sin: expected equal shapes"):
        apply_rope(x, cos, sin[:4])
    with pytest.raises(ValueError, match=r"cos, sin: expected equal shapes"):
        apply_rope(x, cos[0], sin[0])
    with pytest.raises(ValueError, match=r"x: expected shape \[batch, heads, 5, 8\] to match cos, got \(2, 3, 5, 6\)"):
        apply_rope(x[..., :6], cos, sin)
    with pytest.raises(ValueError, match=r"x: expected shape \[batch, heads, 5, 8\] to match cos, got \(2, 3, 4, 8\)"):
        apply_rope(x[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match=r"cos: expected batch size 1 or 2, got shape \(3, 5, 4\)"):
        apply_rope(x, cos.expand(3, 5, 4), sin.expand(3, 5, 4))


def test_bad_rope_scaling_raises():
    with pytest.raises(ValueError, match=r"rope_scaling.type: expected one of \('yarn', 'llama3'\), got 'linear'"):
        RopeScaling(type="linear", factor=4.0, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match=r"rope_scaling.type: expected one of.*got 'dynamic'"):
        RopeScaling.from_dict({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 4096})
    with pytest.raises(ValueError, match=r"rope_scaling.factor: expected a positive number, got 0"):
        RopeScaling(type="yarn", factor=0.0, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match=r"rope_scaling: expected beta_fast > beta_slow > 0"):
        RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=4096, beta_fast=1.0, beta_slow=32.0)
    with pytest.raises(ValueError, match=r"rope_scaling: unknown fields \['low_freq_factor'\] for type 'yarn'"):
        RopeScaling.from_dict({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                               "low_freq_factor": 1.0})


LLAMA_31 = RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
                       high_freq_factor=4.0)  # meta-llama/Llama-3.1-8B config.json


@pytest.mark.parametrize("scaling", [LLAMA_31, RopeScaling(type="llama3", factor=32.0, original_max_position_embeddings=
                                                           8192, low_freq_factor=1.0, high_freq_factor=4.0)])
def test_llama3_inv_freq_matches_transformers(scaling):
    """Llama 3.1's scaling against transformers' `_compute_llama3_parameters` (float32 there)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    hf_config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, **{k: v for k, v in scaling.to_dict().items() if k != "type"}})
    expected, attention_factor = _compute_llama3_parameters(hf_config, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, expected.double(), rtol=1e-6, atol=0)
    assert attention_factor == rope_attention_factor(scaling) == 1.0
    assert softmax_scale(128, scaling) == 128 ** -0.5


def test_llama3_keeps_fast_pairs_and_divides_slow_pairs_by_factor():
    plain, scaled = rope_inv_freq(128, 500000.0), rope_inv_freq(128, 500000.0, LLAMA_31)
    wavelength = 2 * math.pi / plain
    fast, slow = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert fast.any() and slow.any() and not (fast | slow).all()  # some pairs in between
    torch.testing.assert_close(scaled[fast], plain[fast], rtol=0, atol=0)
    torch.testing.assert_close(scaled[slow], plain[slow] / 8, rtol=1e-15, atol=0)
    between = ~(fast | slow)
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all()


def test_bad_llama3_scaling_raises():
    with pytest.raises(ValueError, match=r"expected high_freq_factor > low_freq_factor > 0, got high_freq_factor=1"):
        RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
                    high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"rope_scaling: unknown fields \['beta_fast'\] for type 'llama3'"):
        RopeScaling.from_dict({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                               "beta_fast": 32})
    with pytest.raises(TypeError, match=r"original_max_position_embeddings: expected an int >= 1, got 8192.5"):
        RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=8192.5)


def test_casting_the_module_keeps_the_frequencies_in_float64():
    rope = RotaryEmbedding(64, 10000.0).to(torch.bfloat16)
    positions = torch.tensor([163_839])
    cos, _ = rope(positions, torch.float64)
    expected = torch.cos(positions.double()[:, None] * rope_inv_freq(64, 10000.0))
    torch.testing.assert_close(cos, expected, atol=1e-12, rtol=0)
