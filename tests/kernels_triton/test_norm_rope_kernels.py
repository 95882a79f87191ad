"""Triton RMSNorm and rotary kernels against the references (and the engine's layers)."""

from __future__ import annotations

import pytest
import torch

from kernel_util import DEVICE, DTYPES
from expertmesh_kernels.norm_rope import apply_rotary, apply_rotary_ref, rms_norm, rms_norm_ref

ULP = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 40), (3, 2, 48)])
def test_rms_norm_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)
    w = torch.randn(shape[-1], generator=gen).to(dtype).to(DEVICE)
    out, ref = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2 * ULP[dtype] * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,head_dim", [(1, 1, 8), (5, 3, 32), (4, 8, 24)])
def test_rotary_matches_reference(dtype, num_tokens, num_heads, head_dim):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    angles = torch.randn(num_tokens, head_dim // 2, generator=gen) * 10
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    exact = apply_rotary_ref(x.double(), cos.double(), sin.double())
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact, atol=2 * ULP[dtype] * 4, rtol=0)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary(x, cos[:, :-1], sin)


@pytest.mark.gpu
def test_norm_rope_real_sizes():
    x = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, w, 1e-5).float(), rms_norm_ref(x, w, 1e-5).float(), atol=0.1, rtol=0.02)
    q = torch.randn(4096, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    ang = torch.rand(4096, 64, device=DEVICE) * 4096
    out = apply_rotary(q, ang.cos().bfloat16(), ang.sin().bfloat16())
    ref = apply_rotary_ref(q.float(), ang.cos().bfloat16().float(), ang.sin().bfloat16().float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
