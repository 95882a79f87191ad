"""KV-cache write (slot mapping) as a Triton kernel; reference: attention.write_kv_cache_ref.

Assumes the layout of attention.py: caches [NB, B, NKV, D] with unit stride on D, slot
s = block * B + offset, negative slots skipped. One program per (token, kv-head block).
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens, NKV kv heads, D head dim, NB blocks, B block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels.attention import write_kv_cache_ref

__all__ = ["write_kv_cache", "write_kv_cache_ref"]


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh,  # k [T, NKV, D]
    stride_vt, stride_vh,  # v [T, NKV, D]
    stride_kcb, stride_kcs, stride_kch,  # k_cache [NB, B, NKV, D]
    stride_vcb, stride_vcs, stride_vch,  # v_cache [NB, B, NKV, D]
    NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, NKV, D]
    v: torch.Tensor,  # [T, NKV, D]
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64
) -> None:
    """Triton version of write_kv_cache_ref (slots are not range-checked: that would sync)."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, NKV, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache/v_cache must be [NB, B, NKV={k.shape[1]}, D={k.shape[2]}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim, got strides {t.stride()}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d,
    )
