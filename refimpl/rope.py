"""Rotary position embeddings (RoPE, Su et al. 2021) with the YaRN context extension DeepSeek-V2/V3 use
(and Llama 3.1's, for the dense baselines).

RoPE rotates each pair of coordinates of a query or key by an angle `position * inv_freq[i]`, so that the dot
product of a query at position m and a key at position n depends only on m - n. Two layouts of the pairs exist:

* half-split (Llama, GPT-NeoX): pair i is (x[i], x[i + d/2]);
* interleaved (the original RoPE paper, DeepSeek checkpoints): pair i is (x[2i], x[2i + 1]).

They are the same rotation on permuted coordinates: `apply_rope(x, interleaved=True)[..., perm]` equals
`apply_rope(x[..., perm], interleaved=False)` with `perm = interleaved_to_half_perm(d)`.

YaRN (Peng et al. 2023) stretches the low frequencies by `factor` (interpolation), keeps the high frequencies
(extrapolation), ramps linearly between them, and corrects the attention temperature. DeepSeek's code applies
that correction in two places, both reproduced here:
  * cos and sin are multiplied by `yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)`
    (1.0 in every released DeepSeek config, where mscale == mscale_all_dim);
  * the softmax scale is multiplied by `yarn_get_mscale(factor, mscale_all_dim) ** 2` (see `softmax_scale`).

Llama 3.1's extension (`rope_type: llama3`, `llama3_inv_freq`) is a simpler ramp: it divides by `factor` the
frequencies whose wavelength exceeds `original_max_position_embeddings / low_freq_factor`, keeps those shorter
than `original_max_position_embeddings / high_freq_factor`, and interpolates between them; no temperature.
"""

import math

import torch
from torch import nn

from refimpl.checks import check_tensor
from refimpl.config import RopeScaling


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The pair index whose wavelength fits `num_rotations` times into `max_pos` tokens."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(dim: int, base: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies of the dim/2 rotated pairs, float64: [dim // 2]; YaRN or Llama 3.1 scaled when
    `scaling` says so."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope dim: expected a positive even number, got {dim}")
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # plain RoPE
    if scaling is None:
        return freq_extra
    if scaling.type == "llama3":
        return llama3_inv_freq(freq_extra, scaling)
    freq_inter = freq_extra / scaling.factor  # positions squeezed by `factor`
    orig = scaling.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(scaling.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(scaling.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as DeepSeek's code does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency (fast pairs), 0: interpolate (slow pairs)
    return freq_inter * (1 - extrapolate) + freq_extra * extrapolate


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta's `apply_scaling` in llama-models; transformers'
    `_compute_llama3_parameters`): inv_freq [dim // 2] -> [dim // 2], same dtype.

    With wavelength w = 2 pi / inv_freq and L = original_max_position_embeddings:
      w < L / high_freq_factor (fast pairs): kept;   w > L / low_freq_factor (slow pairs): inv_freq / factor;
      in between: (1 - s) inv_freq / factor + s inv_freq,  s = (L / w - low_freq_factor) / (high - low).
    """
    L = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    smooth = (L / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    between = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    slow = wavelength > L / scaling.low_freq_factor
    fast = wavelength < L / scaling.high_freq_factor
    return torch.where(slow, inv_freq / scaling.factor, torch.where(fast, inv_freq, between))


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor DeepSeek multiplies cos and sin by (YaRN only; 1 for no scaling and for Llama 3.1's)."""
    if scaling is None or scaling.type != "yarn":
        return 1.0
    return yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)


def softmax_scale(qk_head_dim: int, scaling: RopeScaling | None = None) -> float:
    """1/sqrt(d), times YaRN's mscale squared when `mscale_all_dim` is set (DeepSeek-V2/V3 attention)."""
    scale = qk_head_dim ** -0.5
    if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
        scale *= yarn_get_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Computes cos and sin for given positions; `apply_rope` uses them."""

    def __init__(self, dim: int, base: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        self.dim = dim
        self.attention_factor = rope_attention_factor(scaling)
        # A plain float64 tensor, not a buffer: `model.to(torch.bfloat16)` would cast a buffer, and bf16 angles
        # at position 100k are off by whole radians. It is moved to the positions' device on each call.
        self.inv_freq = rope_inv_freq(dim, base, scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """positions: [seq] or [batch, seq] integers -> cos, sin: [..., seq, dim // 2] in `dtype`."""
        check_tensor("positions", positions)
        if positions.dim() not in (1, 2) or positions.is_floating_point():
            raise ValueError(
                f"positions: expected an integer tensor of shape [seq] or [batch, seq], "
                f"got shape {tuple(positions.shape)} dtype {positions.dtype}"
            )
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device)  # [..., seq, dim/2]
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x: [batch, heads, seq, dim] by cos, sin: [seq, dim/2] or [batch, seq, dim/2]. Same layout out as in."""
    check_tensor("x", x, ndim=4)
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(f"cos, sin: expected equal shapes [seq, d/2] or [batch, seq, d/2], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.shape[-1] != 2 * cos.shape[-1] or x.shape[-2] != cos.shape[-2]:
        raise ValueError(f"x: expected shape [batch, heads, {cos.shape[-2]}, {2 * cos.shape[-1]}] to match cos, "
                         f"got {tuple(x.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"cos: expected batch size 1 or {x.shape[0]}, got shape {tuple(cos.shape)}")
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # add the heads axis: [..., 1, seq, dim/2]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def interleaved_to_half_perm(dim: int) -> torch.Tensor:
    """Indices that reorder an interleaved vector (x0, x1, x2, x3, ...) to half-split (x0, x2, ..., x1, x3, ...)."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))
