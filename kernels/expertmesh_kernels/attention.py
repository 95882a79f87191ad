"""Paged KV cache writes and paged attention (torch references).

Shapes: T query tokens in the batch, N requests, NH query heads, NKV key/value heads
(NH % NKV == 0, grouped-query attention), D head dim, NB blocks in the cache, B tokens per
block, MB block-table columns, L context length of one request.

Assumptions shared by every op here (the Triton versions, added to this file later as
``write_kv_cache`` / ``paged_attention``, must keep them):
- The KV cache of one layer is a pair of tensors [NB, B, NKV, D]; token slot s of the cache
  is block s // B, offset s % B.
- The batch is flat: the new tokens of request n are q[query_start_loc[n]:query_start_loc[n+1]]
  and its KV, already written for this step, covers positions 0 .. seq_lens[n]-1, listed by
  block_tables[n] (columns past the last used block are padding and never read).
- Query i of request n sits at position seq_lens[n] - q_len_n + i. It sees key positions j
  with j <= its position and, with a sliding window W, position - j < W (the Hugging Face
  rule). Prefill, chunked prefill / prefix-cache hits (context before the new tokens) and
  decode (q_len 1) mix freely in one call.
- Softmax runs in fp32; the output has the query's dtype; lse is the natural-log
  log-sum-exp of the scaled scores, fp32 (what ring attention needs to merge partials).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size,
# MB block-table columns, L context length, Q padded query length, G = NH // NKV.

_MAX_SCORE_ELEMENTS = 1 << 25  # fp32 scores per prefill chunk (128 MiB)


def write_kv_cache_ref(
    k: torch.Tensor,  # [T, NKV, D]
    v: torch.Tensor,  # [T, NKV, D]
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * B + offset; < 0 means skip
) -> None:
    """Write each token's K and V into its cache slot, in place.

    A negative slot skips the token (padding tokens of a fixed-size batch).
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, NKV, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"k_cache/v_cache must be [NB, B, NKV={k.shape[1]}, D={k.shape[2]}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if slots.numel() > 0 and int(slots.max()) >= num_slots:
        raise ValueError(f"slot_mapping value {int(slots.max())} is out of range: the cache has {num_slots} slots")
    # view(), not reshape(): the write must land in the caller's storage.
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [T, NH, D]
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    block_tables: torch.Tensor,  # [N, MB] int32
    query_start_loc: torch.Tensor,  # [N+1] int32
    seq_lens: torch.Tensor,  # [N] int32
    scale: float,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a flat batch of query tokens over their requests' paged KV.

    Returns out [T, NH, D] in q's dtype, and with return_lse also lse [T, NH] fp32.
    Decodes (q_len 1) are computed together in one batched product; each request with
    more than one new token is computed on its own (prefill work dominates there anyway).
    """
    num_tokens, num_heads, head_dim = _check_inputs(
        q, k_cache, block_tables, query_start_loc, seq_lens, sliding_window
    )
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    # Small metadata: read it once on the host.
    starts = query_start_loc.to(torch.int64).cpu()
    lens_cpu = seq_lens.to(torch.int64).cpu()
    q_lens = starts[1:] - starts[:-1]  # [N]

    decode_reqs = torch.nonzero(q_lens == 1).flatten()
    if decode_reqs.numel() > 0:
        dev_reqs = decode_reqs.to(q.device)
        rows = starts[decode_reqs].to(q.device)  # [Nd] token index of each decode
        ctx = lens_cpu[decode_reqs]
        o, s = _attend(
            q[rows].unsqueeze(1),  # [Nd, 1, NH, D]
            k_cache,
            v_cache,
            block_tables[dev_reqs],
            seq_lens.to(torch.int64)[dev_reqs],
            first_pos=(seq_lens.to(torch.int64)[dev_reqs] - 1).unsqueeze(1),  # [Nd, 1]
            max_len=int(ctx.max()),
            scale=scale,
            sliding_window=sliding_window,
            need_lse=return_lse,
        )
        out[rows] = o[:, 0]
        if return_lse:
            lse[rows] = s[:, 0]

    for n in torch.nonzero(q_lens > 1).flatten().tolist():
        lo, hi, ctx_len = int(starts[n]), int(starts[n + 1]), int(lens_cpu[n])
        # Bound the [NH, Q, L] score tensor of long prompts by splitting their query rows.
        rows_per_chunk = max(1, _MAX_SCORE_ELEMENTS // (num_heads * ctx_len))
        for c_lo in range(lo, hi, rows_per_chunk):
            c_hi = min(hi, c_lo + rows_per_chunk)
            first = ctx_len - (hi - lo) + (c_lo - lo)  # position of row c_lo
            o, s = _attend(
                q[c_lo:c_hi].unsqueeze(0),  # [1, Q, NH, D]
                k_cache,
                v_cache,
                block_tables[n : n + 1],
                seq_lens.to(torch.int64)[n : n + 1],
                first_pos=torch.full((1, 1), first, dtype=torch.int64, device=q.device),
                max_len=first + (c_hi - c_lo),  # later keys are masked for every row anyway
                scale=scale,
                sliding_window=sliding_window,
                need_lse=return_lse,
            )
            out[c_lo:c_hi] = o[0]
            if return_lse:
                lse[c_lo:c_hi] = s[0]

    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _attend(
    q: torch.Tensor,  # [M, Q, NH, D] query rows of M requests, Q per request
    k_cache: torch.Tensor,  # [NB, B, NKV, D]
    v_cache: torch.Tensor,  # [NB, B, NKV, D]
    block_tables: torch.Tensor,  # [M, MB]
    kv_lens: torch.Tensor,  # [M] int64
    first_pos: torch.Tensor,  # [M, 1] int64 position of each request's first query row
    max_len: int,
    scale: float,
    sliding_window: int | None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention of M requests' queries over their gathered KV; fp32 out and lse.

    Prefill rows (Q > 1) and fp32 decodes use torch's fused scaled_dot_product_attention
    (same math, fp32 softmax accumulation, inputs kept in their dtype, no [Q, L] probability
    tensor); the lse (for ring attention) is computed beside it only when asked for, so out
    is the same tensor with or without it. Half-precision decodes (Q == 1) use explicit fp32
    products, which are faster there on the CPU.
    """
    m, q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    device = q.device

    kv_pos = torch.arange(max_len, device=device)  # [L]
    num_blocks = -(-max_len // block_size)
    q_pos = first_pos + torch.arange(q_len, device=device)  # [M, Q]
    visible = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (
        kv_pos[None, None, :] < kv_lens[:, None, None]
    )  # [M, Q, L]
    if sliding_window is not None:
        visible &= q_pos[:, :, None] - kv_pos[None, None, :] < sliding_window
    # Gather whole blocks (one contiguous [B, NKV, D] copy each), then trim to L: far cheaper
    # on the CPU than indexing token by token.
    ids = block_tables[:, :num_blocks].to(torch.int64).clamp(min=0).reshape(-1)  # [M * MBL], padding is masked
    k = k_cache.index_select(0, ids).view(m, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_len]
    v = v_cache.index_select(0, ids).view(m, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_len]
    fused = q_len > 1 or q.dtype == torch.float32 or k.dtype == torch.float32
    if fused:
        # torch's fused attention, in q's dtype for prefill and in fp32 for decodes over an
        # fp32 cache (a half-precision q is exact in fp32). Every query sees at least its own
        # key, so no row of the mask is empty.
        dtype = q.dtype if q_len > 1 else torch.promote_types(q.dtype, k.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype),
            attn_mask=visible[:, None], scale=scale, enable_gqa=group > 1,
        ).transpose(1, 2).float()  # [M, Q, NH, D]
        if not need_lse:
            return out, None
    qg = q.float().view(m, q_len, num_kv_heads, group, head_dim)  # [M, Q, NKV, G, D]
    scores = torch.einsum("mqhgd,mlhd->mhgql", qg, k.float()) * scale  # [M, NKV, G, Q, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [M, NKV, G, Q]
    if not fused:
        # Half-precision decode: explicit fp32 products. CPU fused attention is slow for one
        # query row in bf16 (about 6x slower than this at 64 x 8 heads x 256 keys x D 128).
        probs = torch.exp(scores - lse.unsqueeze(-1))  # [M, NKV, G, Q, L]
        out = torch.einsum("mhgql,mlhd->mqhgd", probs, v.float()).reshape(m, q_len, num_heads, head_dim)
    lse = lse.permute(0, 3, 1, 2).reshape(m, q_len, num_heads)  # [M, Q, NH]
    return out, (lse if need_lse else None)


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> tuple[int, int, int]:
    """Validate shapes and the lengths every request implies; return (T, NH, D)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, NH, D], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [NB, B, NKV, D={head_dim}], got {tuple(k_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"NH={num_heads} query heads must be a multiple of NKV={num_kv_heads} kv heads")
    num_reqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"block_tables must be [N={num_reqs}, MB], got {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_reqs + 1,):
        raise ValueError(f"query_start_loc must be [N+1={num_reqs + 1}], got {tuple(query_start_loc.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    starts = query_start_loc.to(torch.int64).cpu()
    lens = seq_lens.to(torch.int64).cpu()
    if num_reqs == 0:
        return num_tokens, num_heads, head_dim
    q_lens = starts[1:] - starts[:-1]
    if int(starts[0]) != 0 or int(starts[-1]) != num_tokens or bool((q_lens < 1).any()):
        raise ValueError(
            f"query_start_loc must rise strictly from 0 to T={num_tokens}, got {starts.tolist()}"
        )
    if bool((lens < q_lens).any()):
        n = int(torch.nonzero(lens < q_lens)[0])
        raise ValueError(f"seq_lens[{n}]={int(lens[n])} is smaller than its {int(q_lens[n])} query tokens")
    capacity = block_tables.shape[1] * k_cache.shape[1]
    if int(lens.max()) > capacity:
        raise ValueError(
            f"seq_lens max {int(lens.max())} exceeds the block table capacity "
            f"MB={block_tables.shape[1]} x B={k_cache.shape[1]} = {capacity}"
        )
    return num_tokens, num_heads, head_dim
