"""Varlen causal prefill attention over the paged cache (flash-style) as a Triton kernel.

Reference: attention.paged_attention_ref (any mix of prefills, chunked prefills / prefix
hits and decodes). Requests are packed flat (query_start_loc); every key, the cached context
and this step's tokens alike, is read from the paged cache (the KV write runs first), so
chunked prefill and prefix-cache hits need nothing extra.

Algorithm: one program per (request, BLOCK_M query rows, query head): online softmax in fp32
over BLOCK_N-key tiles gathered through the block table, only up to the last row's position
(causal) and from the first row's window start (sliding window). GQA maps query head h to
kv head h // G. The grid needs the longest query length: pass max_query_len to avoid the
device sync that computing it costs.
Assumes unit stride on D; any block size B.
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens, N requests, NH/NKV heads, G = NH // NKV, D head dim, NB blocks,
B block size, MB block-table columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels._triton_common import dot_config
from expertmesh_kernels.attention import _check_inputs, paged_attention_ref
from expertmesh_kernels.paged_kv_tile import load_kv_tile

__all__ = ["varlen_prefill_attention", "paged_attention_ref"]


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh,  # q [T, NH, D]
    stride_kb, stride_ks, stride_kh,  # k_cache [NB, B, NKV, D]
    stride_vb, stride_vs, stride_vh,  # v_cache [NB, B, NKV, D]
    stride_bt,  # block_tables [N, MB]
    stride_ot, stride_oh,  # out [T, NH, D]
    stride_lt,  # lse [T, NH] fp32 (unit stride on NH)
    scale, window,  # window 0 = no sliding window
    GROUP, HEAD_DIM, BLOCK_SIZE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    n = tl.program_id(0)
    mt = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + n)
    q_len = tl.load(query_start_ptr + n + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + n)
    ctx = seq_len - q_len  # position of the first new token
    kvh = h // GROUP
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the request
    offs_d = tl.arange(0, D_PAD)
    mmask = offs_m < q_len
    dmask = offs_d < HEAD_DIM
    pos_m = ctx + offs_m  # [BM] query positions
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)  # [BM, D]
    if UPCAST:
        q = q.to(tl.float32)
    hi = tl.minimum(ctx + (mt + 1) * BLOCK_M, seq_len)  # keys past the last row are masked anyway
    lo = 0
    if window > 0:
        lo = tl.maximum(ctx + mt * BLOCK_M - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        k, v, nmask = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, n, stride_bt, kvh,
                                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                   offs_n, hi, offs_d, dmask, BLOCK_SIZE)  # [BN, D] x2, [BN]
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [BM, BN]
        visible = nmask[None, :] & (offs_n[None, :] <= pos_m[:, None])
        if window > 0:
            visible = visible & (pos_m[:, None] - offs_n[None, :] < window)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_cache_ptr.dtype.element_ty)  # P rounded like the V it multiplies
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + rows * stride_lt + h, m_i + tl.log(l_safe), mask=mmask)


def varlen_prefill_attention(
    q: torch.Tensor,  # [T, NH, D]
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    block_tables: torch.Tensor,  # [N, MB] int32
    query_start_loc: torch.Tensor,  # [N+1] int32
    seq_lens: torch.Tensor,  # [N] int32
    scale: float,
    sliding_window: int | None = None,
    return_lse: bool = False,
    max_query_len: int | None = None,
    block_m: int = 64,
    block_n: int = 32,
    validate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a flat batch over paged KV; out [T, NH, D] (q's dtype), lse [T, NH] fp32.

    validate=True runs the reference's full metadata checks (they sync with the device).
    """
    if validate:
        _check_inputs(q, k_cache, block_tables, query_start_loc, seq_lens, sliding_window)
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q must be [T, NH, D] and k_cache/v_cache [NB, B, NKV, D={q.shape[-1]}], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"NH={num_heads} query heads must be a multiple of NKV={num_kv_heads} kv heads")
    if query_start_loc.shape != (num_reqs + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"query_start_loc must be [N+1={num_reqs + 1}] and block_tables [N={num_reqs}, MB], "
                         f"got {tuple(query_start_loc.shape)} and {tuple(block_tables.shape)}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must have unit stride on the head dim")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    out = torch.empty_like(q)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if num_tokens == 0 or num_reqs == 0:
        return (out, lse) if return_lse else out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())  # device sync
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    grid = (num_reqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        scale, sliding_window or 0,
        num_heads // num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        **dot_config(q.dtype),
    )
    return (out, lse) if return_lse else out
