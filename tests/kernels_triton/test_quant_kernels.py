"""Triton kernels reading quantized weights (quant_gemm.quant_linear, fused_moe with QuantWeight
experts) against the references on the same codes and scales: int8 per row, fp8 per 128-column
block, column ranges that start inside a block (a TP rank's share of K), odd shapes.

The exact reference dequantizes in fp64; the same-dtype reference is the torch path the
engine takes without Triton. Legend: T tokens, N out, K in, E experts, k top-k, H, I.
"""

from __future__ import annotations

import pytest
import torch

from kernel_util import DEVICE, DTYPES, assert_error_close_to_torch
from expertmesh_kernels.fused_moe import fused_moe, fused_moe_ref
from expertmesh_kernels.quant import QuantWeight, dequantize_ref, quant_linear_ref, quantize_fp8_blocks, quantize_int8
from expertmesh_kernels.quant_gemm import quant_linear

BLOCK = 128


def _quantize(w: torch.Tensor, kind: str, col_offset: int = 0) -> QuantWeight:
    """w [..., N, K] quantized; with col_offset, w is the columns [col_offset, col_offset + K) of a
    wider matrix whose fp8 blocks start at column 0."""
    if kind == "int8":
        q, scale = quantize_int8(w)
        return QuantWeight("int8", q.to(DEVICE), scale.to(DEVICE))
    wide = torch.nn.functional.pad(w, (col_offset, 0))  # [..., N, off + K]
    q, blocks = quantize_fp8_blocks(wide, (BLOCK, BLOCK))
    scale = blocks.repeat_interleave(BLOCK, dim=-2)[..., : w.shape[-2], :]  # [..., N, KB] row-expanded
    return QuantWeight("fp8", q[..., col_offset:].contiguous().to(DEVICE), scale.contiguous().to(DEVICE),
                       BLOCK, col_offset)


def _exact(w: QuantWeight) -> torch.Tensor:
    return dequantize_ref(QuantWeight(w.kind, w.q.cpu(), w.scale.cpu(), w.block_k, w.col_offset)).double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,col_offset", [("int8", 0), ("fp8", 0), ("fp8", 64), ("fp8", 96)])
@pytest.mark.parametrize("t,n,k", [(1, 40, 200), (19, 128, 384), (70, 24, 136)])
def test_quant_linear_matches_reference(dtype, kind, col_offset, t, n, k):
    gen = torch.Generator().manual_seed(t + n + k)
    x = torch.randn(t, k, generator=gen).to(dtype).to(DEVICE)
    w = _quantize(torch.randn(n, k, generator=gen) * k**-0.5, kind, col_offset)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    out = quant_linear(x, w, bias)
    exact = x.double().cpu() @ _exact(w).T + bias.double().cpu()
    assert out.dtype == dtype and out.shape == (t, n)
    assert_error_close_to_torch(out, quant_linear_ref(x, w, bias), exact, dtype)


def test_quant_linear_uses_the_scales():
    # The test above is not vacuous: dropping or misplacing the scales is far outside it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen).to(DEVICE)
    w = _quantize(torch.randn(32, 256, generator=gen), "fp8")
    got = quant_linear(x, w)
    swapped = QuantWeight("fp8", w.q, w.scale.flip(-1).contiguous(), BLOCK)
    assert (quant_linear(x, swapped) - got).abs().max() > 100 * (got - quant_linear_ref(x, w)).abs().max()


def test_quant_linear_rejects_bad_inputs():
    w = _quantize(torch.randn(16, 64), "int8")
    with pytest.raises(ValueError, match=r"x must be \[T, K=64\], got \(3, 32\)"):
        quant_linear(torch.randn(3, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"bias must be \[N=16\]"):
        quant_linear(torch.randn(3, 64, device=DEVICE), w, torch.zeros(8, device=DEVICE))
    odd = QuantWeight("fp8", torch.zeros(16, 64, dtype=torch.float8_e4m3fn, device=DEVICE),
                      torch.ones(16, 2, device=DEVICE), 40, 8)
    with pytest.raises(ValueError, match="scale blocks of 40 columns starting at column offset 8"):
        quant_linear(torch.randn(3, 64, device=DEVICE), odd)


def _ids(num_tokens, num_experts, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)]).to(
        torch.int32).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,down_offset", [("int8", 0), ("fp8", 0), ("fp8", 64)])
@pytest.mark.parametrize("num_tokens,num_experts,k,hidden,inter", [(1, 4, 2, 160, 96), (13, 8, 2, 256, 192)])
def test_fused_moe_with_quantized_experts_matches_reference(dtype, kind, down_offset, num_tokens, num_experts, k,
                                                             hidden, inter):
    # down_offset: the experts hold intermediate columns starting inside an fp8 block (a TP rank).
    gen = torch.Generator().manual_seed(num_tokens + hidden)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    w_gate_up = _quantize(torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5, kind)
    w_down = _quantize(torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5, kind, down_offset)
    weights = torch.rand(num_tokens, k, generator=gen).to(DEVICE)
    ids = _ids(num_tokens, num_experts, k, num_tokens)
    out = fused_moe(x, w_gate_up, w_down, weights, ids, block_m=16)
    exact = fused_moe_ref(x.double().cpu(), _exact(w_gate_up), _exact(w_down), weights.cpu(), ids.cpu())
    same = fused_moe_ref(x, w_gate_up, w_down, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert_error_close_to_torch(out, same, exact, dtype)


def test_fused_moe_refuses_half_quantized_experts():
    w_gate_up = _quantize(torch.randn(4, 64, 32), "int8")
    with pytest.raises(ValueError, match="both be quantized or both not"):
        fused_moe(torch.randn(2, 32, device=DEVICE), w_gate_up, torch.randn(4, 32, 32, device=DEVICE),
                  torch.rand(2, 2, device=DEVICE), _ids(2, 4, 2, 0))
