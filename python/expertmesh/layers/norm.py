"""RMSNorm as Llama, Mixtral, Qwen and OLMoE define it.

Legend: T tokens, H normalised size.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh_kernels import ops


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32.

    The normalised value is rounded to the input dtype before the weight multiply, exactly
    as Hugging Face does, so bf16 results match bit for bit in the common case.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        # Loaded from the checkpoint; ones so a freshly built layer is the identity scale.
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return ops.rms_norm(x, self.weight, self.eps)  # Triton on CUDA, else norm_rope_ref.rms_norm_ref

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
