"""Paged decode attention (one query token per request) as Triton kernels, split over context.

Reference: attention.paged_attention_ref restricted to q_len == 1 (T == N: token n is
request n's only new token, at position seq_lens[n] - 1).

Algorithm: each program takes one request, one KV head (all G = NH / NKV query heads that
share it, so each K/V row is loaded once for the group) and one split of the context; it
gathers K/V through the block table BLOCK_N tokens at a time, runs an online softmax in
fp32 and writes a partial output and its log-sum-exp. A second kernel merges the splits
exactly: O = sum_s O_s exp(lse_s - lse_max) / sum_s exp(lse_s - lse_max). The split count is
chosen from the block-table capacity (MB * B, known on the host), so no device sync happens.
Assumes unit stride on D; any block size B (token addresses are gathered per row).
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: N requests (= T tokens), NH/NKV heads, G = NH // NKV, D head dim, NB blocks,
B block size, MB block-table columns, S splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels._triton_common import dot_config
from expertmesh_kernels.attention import paged_attention_ref
from expertmesh_kernels.paged_kv_tile import load_kv_tile

__all__ = ["paged_decode_attention", "paged_attention_ref"]


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qn, stride_qh,  # q [N, NH, D]
    stride_kb, stride_ks, stride_kh,  # k_cache [NB, B, NKV, D]
    stride_vb, stride_vs, stride_vh,  # v_cache [NB, B, NKV, D]
    stride_bt,  # block_tables [N, MB]
    stride_pn, stride_ph, stride_ps,  # part_out [N, NH, S, D] fp32
    stride_ln, stride_lh,  # part_lse [N, NH, S] fp32
    scale, window, split_len,  # window 0 = no sliding window
    GROUP, HEAD_DIM, BLOCK_SIZE,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + n)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    if window > 0:
        lo = tl.maximum(lo, seq_len - window)  # the query at seq_len-1 sees j > seq_len-1-window
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + offs_g  # [G]
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [G, D]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        k, v, nmask = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, n, stride_bt, kvh,
                                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                   offs_n, hi, offs_d, dmask, BLOCK_SIZE)  # [BN, D] x2, [BN]
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [G, BN]
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds a visible key
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_cache_ptr.dtype.element_ty)  # P rounded like the V it multiplies
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(part_out_ptr + n * stride_pn + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :],
             out, mask=gmask[:, None] & dmask[None, :])
    tl.store(part_lse_ptr + n * stride_ln + heads * stride_lh + s, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_pn, stride_ph, stride_ps,  # part_out [N, NH, S, D] fp32
    stride_ln, stride_lh,  # part_lse [N, NH, S] fp32
    stride_on, stride_oh,  # out [N, NH, D]
    stride_lo,  # lse [N, NH] fp32 (unit stride on NH)
    NUM_SPLITS, HEAD_DIM,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    smask = offs_s < NUM_SPLITS
    dmask = offs_d < HEAD_DIM
    lse_s = tl.load(part_lse_ptr + n * stride_ln + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    o_s = tl.load(part_out_ptr + n * stride_pn + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)  # [S, D]
    m = tl.max(lse_s, 0)  # finite: split 0 always holds the query's own key
    w = tl.exp(lse_s - m)  # [S], 0 for empty splits
    total = tl.sum(w, 0)
    out = tl.sum(o_s * w[:, None], 0) / total  # [D]
    tl.store(out_ptr + n * stride_on + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + n * stride_lo + h, m + tl.log(total))


def _num_splits(num_reqs: int, num_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give the GPU ~2 waves of programs, each split at least 4 tiles long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(1, num_reqs * num_kv_heads))
    most = max(1, capacity // (4 * block_n))
    return max(1, min(want, most, 64))


def paged_decode_attention(
    q: torch.Tensor,  # [N, NH, D], one new token per request
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    block_tables: torch.Tensor,  # [N, MB] int32
    seq_lens: torch.Tensor,  # [N] int32, >= 1, including the new token
    scale: float,
    sliding_window: int | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention; out [N, NH, D] in q's dtype (and lse [N, NH] fp32 with return_lse)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q must be [N, NH, D] and k_cache/v_cache [NB, B, NKV, D={q.shape[-1]}], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"NH={num_heads} query heads must be a multiple of NKV={num_kv_heads} kv heads")
    if seq_lens.shape != (num_reqs,) or block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"decode needs one token per request: seq_lens [N={num_reqs}] and block_tables "
                         f"[N, MB], got {tuple(seq_lens.shape)} and {tuple(block_tables.shape)}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must have unit stride on the head dim")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    out = torch.empty_like(q)
    lse = torch.empty(num_reqs, num_heads, dtype=torch.float32, device=q.device)
    if num_reqs == 0:
        return (out, lse) if return_lse else out
    capacity = block_tables.shape[1] * k_cache.shape[1]
    splits = num_splits or _num_splits(num_reqs, num_kv_heads, capacity, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = triton.cdiv(capacity, split_len)
    group = num_heads // num_kv_heads
    part_out = torch.empty(num_reqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_reqs, num_heads, splits, dtype=torch.float32, device=q.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(num_reqs, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        scale, sliding_window or 0, split_len,
        group, head_dim, k_cache.shape[1],
        G_PAD=max(16, triton.next_power_of_2(group)), D_PAD=d_pad, BLOCK_N=block_n, **dot_config(q.dtype),
    )
    _decode_merge_kernel[(num_reqs, num_heads)](
        part_out, part_lse, out, lse,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        splits, head_dim,
        S_PAD=triton.next_power_of_2(splits), D_PAD=d_pad,
    )
    return (out, lse) if return_lse else out
