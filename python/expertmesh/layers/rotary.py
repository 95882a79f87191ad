"""Rotary position embedding (RoPE), "neox" style as in HF Llama / Mixtral / Qwen / OLMoE.

The head dim is split in two halves (x1, x2) that rotate together:
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin],   angle = position * theta^(-2i/D).
Only plain RoPE is supported; scaled variants (linear, dynamic, yarn, llama3, ...) raise.

Legend: T tokens, NH heads, D head dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from expertmesh_kernels import ops

SUPPORTED_ROPE_TYPES = ("default",)


def rope_theta_from_hf_config(config: dict[str, Any], default_theta: float = 10000.0) -> float:
    """Read rope_theta from an HF config dict, rejecting RoPE scaling we do not implement.

    Accepts both layouts: transformers >= 5 writes ``rope_parameters = {rope_type, rope_theta}``;
    older configs (and most Hub checkpoints) write ``rope_theta`` and ``rope_scaling``.
    """
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source in (params, scaling):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope type {rope_type!r} (rope_scaling/rope_parameters in config.json) is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise NotImplementedError(f"partial_rotary_factor={factor} is not supported; only 1.0 is")
    return float(params.get("rope_theta", config.get("rope_theta", default_theta)))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_theta: float) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq: torch.Tensor  # [D/2]; a buffer so it follows the module's device
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] for the given positions, computed in fp32 and cast to dtype.

        Computed once per forward pass and shared by every layer.
        """
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, NH, D] by the per-token angles (cos, sin [T, D/2]).

    Triton on CUDA, else expertmesh_kernels.norm_rope_ref.apply_rotary_ref (same arithmetic).
    """
    return ops.apply_rotary(x, cos, sin)
