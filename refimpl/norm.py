"""RMSNorm (Zhang & Sennrich, 2019), the normalization every DeepSeek, Llama and Mistral layer uses.

    y = x / sqrt(mean(x^2) + eps) * weight

No mean subtraction and no bias, unlike LayerNorm. The statistics are computed in float32 (or float64 when the
input is float64) and the result is cast back, as the released DeepSeek code does.
"""

import torch
from torch import nn

from refimpl.checks import check_last_dim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim], weight: [dim] -> [..., dim]."""
    check_last_dim("x", x, weight.shape[0])
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(compute_dtype)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
