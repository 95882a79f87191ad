"""RMSNorm and rotary embedding (torch references, triton-free).

The same arithmetic as expertmesh.layers.norm.RMSNorm and layers.rotary.apply_rotary (HF
rounding: the normalised value is rounded to x's dtype before the weight multiply; RoPE is
the "neox" half-split rotation). The Triton versions live in norm_rope.py.

Legend: T tokens, NH heads, D head dim, H normalised size.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., H]
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, NH, D] by the per-token angles (cos, sin [T, D/2])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
