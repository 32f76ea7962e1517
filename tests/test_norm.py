"""refimpl.norm: RMSNorm against torch's rms_norm and the formula, its gradients, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from refimpl.norm import RMSNorm, rms_norm


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_rmsnorm_matches_torch(dtype, tol):
    norm = RMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 16, dtype=dtype) * 3 + 1
    expected = F.rms_norm(x, (16,), norm.weight, eps=1e-5)
    torch.testing.assert_close(norm(x), expected, atol=tol, rtol=tol)


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    weight = torch.randn(8, dtype=torch.float64)
    expected = x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), expected, atol=1e-13, rtol=1e-13)


def test_rmsnorm_eps_keeps_zero_input_finite():
    out = rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-6)
    assert torch.equal(out, torch.zeros(2, 4))


def test_rmsnorm_bfloat16_statistics_in_float32():
    # DeepSeek's order: normalize in float32, cast to the input dtype, then multiply by the weight
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 10
    weight = torch.randn(64, dtype=torch.bfloat16)
    x32 = x.float()
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_rmsnorm_module_has_checkpoint_parameter_name():
    norm = RMSNorm(12, eps=1e-5)
    assert list(norm.state_dict()) == ["weight"]
    assert torch.equal(norm.weight, torch.ones(12))
    assert "12, eps=1e-05" in repr(norm)


def test_rmsnorm_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, weight))


def test_rmsnorm_bad_input_raises():
    norm = RMSNorm(8)
    with pytest.raises(ValueError, match=r"x: expected last dimension 8, got shape \(2, 7\)"):
        norm(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"x: expected last dimension 8, got shape \(\)"):
        norm(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got list"):
        norm([1.0] * 8)
