"""Weight-only quantized linear layer as a Triton kernel: y = x @ dequant(w).T (+ bias).

Reference: quant.quant_linear_ref. w is a quant.QuantWeight [N, K]: int8 codes with one fp32
scale per row, or fp8 e4m3 codes with one fp32 scale per (row, K-block) (the checkpoint's
block scales repeated over the rows of each block). Each program computes a [BLOCK_M, BLOCK_N]
tile of y: codes are loaded as bytes and converted to x's dtype (exact for int8 and e4m3), the
dot accumulates in fp32, int8's row scales multiply the accumulator once at the end and fp8's
block scales each K-tile's partial product (BLOCK_K divides the scale block and the held
columns' offset in it; _triton_common.quant_args picks it). Weight bytes read per call are
half (int8, fp8) of bf16's, which is what decode, bound by weight reads, gains.
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens, K input features, N output features, KB K-blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels._triton_common import dot_config, quant_args, quant_dot, row_scale
from expertmesh_kernels.quant import QuantWeight, quant_linear_ref

__all__ = ["quant_linear", "quant_linear_ref"]


@triton.jit
def _kernel(
    x_ptr,  # [T, K]
    q_ptr,  # [N, K] int8 / fp8 codes
    s_ptr,  # QUANT 1: [N]; QUANT 2: [N, KB] fp32
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [T, N] in x's dtype
    T, N, K, col_offset,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < T
    nmask = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        if UPCAST:
            x = x.to(tl.float32)
        w = tl.load(q_ptr + cols[None, :] * stride_qn + offs_k[:, None] * stride_qk,
                    mask=nmask[None, :] & kmask[:, None], other=0.0)  # [BK, BN] codes
        acc = quant_dot(acc, x, w, s_ptr + cols * stride_sn, nmask, k0, col_offset, stride_sk,
                        QUANT, SCALE_BLOCK_K, DOT_PREC)
    acc = row_scale(acc, s_ptr + cols * stride_sn, nmask, QUANT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of quant_linear_ref: x [T, K] (fp32, fp16 or bf16) -> [T, N] in x's dtype."""
    if not isinstance(w, QuantWeight) or len(w.shape) != 2:
        raise ValueError(f"w must be a QuantWeight [N, K], got {type(w).__name__} of shape {tuple(w.shape)}")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [T, K={k}], got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    if x.device != w.q.device or x.device != w.scale.device:
        raise ValueError(f"x, codes and scales must be on one device, got {x.device}, {w.q.device}, {w.scale.device}")
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    codes, scale, (_, stride_sn, stride_sk), quant = quant_args(w, k)
    block_m = min(64, max(16, triton.next_power_of_2(num_tokens)))
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(n, block_n))
    _kernel[grid](
        x, codes, scale, bias if bias is not None else scale, out,
        num_tokens, n, k, quant["col_offset"],
        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1), stride_sn, stride_sk, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, QUANT=quant["mode"], SCALE_BLOCK_K=quant["scale_block_k"],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=quant["block_k"], **dot_config(x.dtype),
    )
    return out
