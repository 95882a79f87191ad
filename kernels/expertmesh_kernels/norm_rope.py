"""RMSNorm and neox rotary embedding as Triton kernels (memory-bound elementwise/row ops).

References: norm_rope_ref.rms_norm_ref and apply_rotary_ref. They pay off by doing one
read and one write instead of torch's chain of fp32 temporaries. rms_norm rounds exactly like
the reference (normalised value rounded to x's dtype, then the weight multiply rounded);
apply_rotary computes in fp32 and rounds once (the reference rounds after each product in
bf16/fp16, so the two differ by at most a couple of ulps there).
Assumes unit stride on the last dim.
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens (rows), H normalised size, NH heads, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels.norm_rope_ref import apply_rotary_ref, rms_norm_ref

__all__ = ["apply_rotary", "apply_rotary_ref", "rms_norm", "rms_norm_ref"]


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, size, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < size
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)  # [H]
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / size + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., H]
    """Triton version of rms_norm_ref (output dtype: the promotion of x and weight)."""
    size = x.shape[-1]
    if weight.shape != (size,):
        raise ValueError(f"weight must be [H={size}], got {tuple(weight.shape)}")
    if size > 65536:
        raise ValueError(f"rms_norm keeps a row in registers: H={size} > 65536")
    x2 = x.reshape(-1, size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, x2.stride(0), out.stride(0), size, eps,
                                         BLOCK_H=triton.next_power_of_2(size))
    return out.view(*x.shape[:-1], size)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,  # x, out [T, NH, D]; cos, sin [T, D/2]
    num_heads, HALF,
    BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF_PAD)
    dmask = offs_d < HALF
    mask = (offs_h[:, None] < num_heads) & dmask[None, :]
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)  # [BH, D/2]
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    obase = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(obase, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [T, NH, D]
    """Triton version of apply_rotary_ref (output dtype: the promotion of x and cos)."""
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, NH, D] with even D, got {tuple(x.shape)}")
    num_tokens, num_heads, head_dim = x.shape
    if cos.shape != (num_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [T={num_tokens}, D/2={head_dim // 2}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("x, cos and sin must have unit stride on their last dim")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if num_tokens == 0:
        return out
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // half_pad))
    _rotary_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        x, cos, sin, out,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        num_heads, head_dim // 2, BLOCK_H=block_h, HALF_PAD=half_pad,
    )
    return out
