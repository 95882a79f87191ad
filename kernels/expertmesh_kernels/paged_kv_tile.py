"""One BN-key tile of a request's K and V from the paged cache: the load both attention
kernels (decode_attention.py, prefill_attention.py) run in their key loop (imports triton).

Keys offs_n [BN] of request n are found through its block table row (block offs_n // B,
slot offs_n % B); keys at or past `hi` and padded head-dim lanes read as 0. Assumes unit
stride on D. Legend: BN keys per tile, D head dim, B block size.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, n, stride_bt, kvh,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 offs_n, hi, offs_d, dmask, BLOCK_SIZE: tl.constexpr):
    """(k [BN, D], v [BN, D], nmask [BN]) for kv head kvh of request n."""
    nmask = offs_n < hi
    blk = tl.load(block_tables_ptr + n * stride_bt + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    slot = offs_n % BLOCK_SIZE
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
                + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, nmask
