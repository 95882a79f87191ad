"""The torch reference kernels against naive dense computations.

Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size, E experts,
H hidden, I intermediate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from expertmesh_kernels import expert_mlp_ref, paged_attention_ref, topk_gating_ref, write_kv_cache_ref

BLOCK = 4
# (context already cached, new query tokens) per request: full prefill, chunked prefill /
# prefix hit, decodes of several lengths, a one-token prompt, a decode crossing a block edge.
MIXED_BATCH = [(0, 7), (5, 3), (9, 1), (0, 1), (12, 1), (3, 1), (6, 6)]


def _make_batch(reqs, num_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    """A filled paged cache with shuffled (non-contiguous) block tables, plus dense K/V per request."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + q for ctx, q in reqs]
    blocks_per_req = [math.ceil(s / BLOCK) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_req) + 1  # one padding column
    block_tables = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim, generator=gen).to(dtype)  # garbage
    v_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim, generator=gen).to(dtype)
    dense_k, dense_v = [], []
    for n, s in enumerate(seq_lens):
        owned = [perm.pop() for _ in range(blocks_per_req[n])]
        block_tables[n, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
        k = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)  # [L, NKV, D]
        v = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(s):
            k_cache[owned[pos // BLOCK], pos % BLOCK] = k[pos]
            v_cache[owned[pos // BLOCK], pos % BLOCK] = v[pos]
        dense_k.append(k)
        dense_v.append(v)
    q_lens = [q for _, q in reqs]
    query_start_loc = torch.tensor([0] + list(torch.cumsum(torch.tensor(q_lens), 0)), dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)  # [T, NH, D]
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, query_start_loc=query_start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), dense_k=dense_k, dense_v=dense_v,
    )


def _dense_attention(batch, scale, sliding_window=None, compute_dtype=torch.float64):
    """Per request, per head, masked softmax attention in compute_dtype: (out [T, NH, D], lse [T, NH])."""
    q = batch["q"]
    num_heads = q.shape[1]
    outs, lses = [], []
    starts = batch["query_start_loc"].tolist()
    for n, seq_len in enumerate(batch["seq_lens"].tolist()):
        qn = q[starts[n] : starts[n + 1]].to(compute_dtype)  # [Q, NH, D]
        q_len = qn.shape[0]
        group = num_heads // batch["dense_k"][n].shape[1]
        k = batch["dense_k"][n].to(compute_dtype).repeat_interleave(group, dim=1)  # [L, NH, D]
        v = batch["dense_v"][n].to(compute_dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", qn, k) * scale  # [NH, Q, L]
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        kv_pos = torch.arange(seq_len)[None, :]
        mask = kv_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - kv_pos < sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(scores, -1).transpose(0, 1))  # [Q, NH]
        probs = torch.softmax(scores.float() if compute_dtype == torch.bfloat16 else scores, -1).to(compute_dtype)
        outs.append(torch.einsum("hql,lhd->qhd", probs, v))
    return torch.cat(outs), torch.cat(lses)


def _run(batch, scale, **kwargs):
    return paged_attention_ref(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["query_start_loc"],
        batch["seq_lens"], scale, **kwargs,
    )


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 16), (4, 2, 32), (8, 2, 8)])
@pytest.mark.parametrize("sliding_window", [None, 1, 3, 100])
def test_paged_attention_matches_dense(num_heads, num_kv_heads, head_dim, sliding_window):
    batch = _make_batch(MIXED_BATCH, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    out, lse = _run(batch, scale, sliding_window=sliding_window, return_lse=True)
    ref_out, ref_lse = _dense_attention(batch, scale, sliding_window)
    assert out.dtype == torch.float32 and out.shape == batch["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == batch["q"].shape[:2]
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    # Without return_lse the same output comes back alone.
    torch.testing.assert_close(_run(batch, scale, sliding_window=sliding_window), out, atol=0, rtol=0)


def test_paged_attention_request_order_and_batching_do_not_matter():
    """Each request's rows equal the rows it gets when it runs alone."""
    batch = _make_batch(MIXED_BATCH, 4, 2, 16)
    out = _run(batch, 0.25)
    starts = batch["query_start_loc"].tolist()
    for n in range(len(MIXED_BATCH)):
        lo, hi = starts[n], starts[n + 1]
        alone = paged_attention_ref(
            batch["q"][lo:hi], batch["k_cache"], batch["v_cache"], batch["block_tables"][n : n + 1],
            torch.tensor([0, hi - lo], dtype=torch.int32), batch["seq_lens"][n : n + 1], 0.25,
        )
        torch.testing.assert_close(alone, out[lo:hi], atol=1e-6, rtol=1e-6)


def test_paged_attention_bf16_error_close_to_torch_bf16():
    batch32 = _make_batch(MIXED_BATCH, 4, 2, 32, seed=1)
    scale = 32**-0.5
    exact, _ = _dense_attention(batch32, scale)  # fp64 on fp32 inputs
    batch16 = {key: (val.to(torch.bfloat16) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
               for key, val in batch32.items()}
    batch16["dense_k"] = [k.to(torch.bfloat16) for k in batch32["dense_k"]]
    batch16["dense_v"] = [v.to(torch.bfloat16) for v in batch32["dense_v"]]
    out = _run(batch16, scale)
    assert out.dtype == torch.bfloat16
    torch_bf16, _ = _dense_attention(batch16, scale, compute_dtype=torch.bfloat16)
    ours_err = (out.double() - exact).abs().max().item()
    torch_err = (torch_bf16.double() - exact).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


def test_write_kv_cache_ref_writes_slots_and_skips_negative():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(5, BLOCK, 2, 8)
    v_cache = torch.zeros(5, BLOCK, 2, 8)
    slots = torch.tensor([17, 3, 8, -1, 0, 19], dtype=torch.int64)
    k = torch.randn(6, 2, 8, generator=gen)
    v = torch.randn(6, 2, 8, generator=gen)
    write_kv_cache_ref(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(20, 2, 8), v_cache.view(20, 2, 8)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot], k[t], atol=0, rtol=0)
            torch.testing.assert_close(flat_v[slot], v[t], atol=0, rtol=0)
    untouched = [s for s in range(20) if s not in slots.tolist()]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0
    with pytest.raises(ValueError, match="out of range"):
        write_kv_cache_ref(k[:1], v[:1], k_cache, v_cache, torch.tensor([20]))


def test_paged_attention_rejects_inconsistent_metadata():
    batch = _make_batch([(2, 3)], 4, 2, 8)
    with pytest.raises(ValueError, match="smaller than"):
        paged_attention_ref(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                            batch["query_start_loc"], torch.tensor([2], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="block table capacity"):
        paged_attention_ref(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"][:, :1],
                            batch["query_start_loc"], batch["seq_lens"], 1.0)
    with pytest.raises(ValueError, match="multiple of NKV"):
        paged_attention_ref(batch["q"][:, :3], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                            batch["query_start_loc"], batch["seq_lens"], 1.0)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gating_ref_matches_torch(renormalize, dtype):
    logits = torch.randn(11, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    weights, ids = topk_gating_ref(logits, 3, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (11, 3)
    probs = torch.softmax(logits.float(), -1)
    ref_w, ref_ids = torch.topk(probs, 3, -1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(11))
    torch.testing.assert_close(weights, ref_w, atol=0, rtol=0)
    assert torch.equal(ids.long(), ref_ids)
    with pytest.raises(ValueError, match="top-k"):
        topk_gating_ref(logits, 9, renormalize)


def _expert_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_experts, hidden, inter = 5, 16, 12
    counts = [3, 0, 1, 4, 0]  # empty experts, a single-token expert
    offsets = torch.tensor([0] + list(torch.cumsum(torch.tensor(counts), 0)))
    x = torch.randn(sum(counts), hidden, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) * 0.3
    return x, w_gate_up, w_down, offsets, counts


def _expert_mlp_naive(x, w_gate_up, w_down, counts, compute_dtype):
    rows, inter = [], w_down.shape[2]
    row = 0
    for e, c in enumerate(counts):
        for _ in range(c):
            xr = x[row].to(compute_dtype)
            gate = w_gate_up[e, :inter].to(compute_dtype) @ xr
            up = w_gate_up[e, inter:].to(compute_dtype) @ xr
            rows.append(w_down[e].to(compute_dtype) @ (F.silu(gate) * up))
            row += 1
    return torch.stack(rows)


def test_expert_mlp_ref_fp32_matches_naive():
    x, w_gate_up, w_down, offsets, counts = _expert_inputs(torch.float32)
    out = expert_mlp_ref(x, w_gate_up, w_down, offsets)
    ref = _expert_mlp_naive(x, w_gate_up, w_down, counts, torch.float64)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_expert_mlp_ref_bf16_error_close_to_torch_bf16():
    x, w_gate_up, w_down, offsets, counts = _expert_inputs(torch.float32, seed=1)
    exact = _expert_mlp_naive(x, w_gate_up, w_down, counts, torch.float64)
    x16, wgu16, wd16 = x.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16()
    out = expert_mlp_ref(x16, wgu16, wd16, offsets)
    assert out.dtype == torch.bfloat16
    torch_bf16 = _expert_mlp_naive(x16, wgu16, wd16, counts, torch.bfloat16)
    ours_err = (out.double() - exact).abs().max().item()
    torch_err = (torch_bf16.double() - exact).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


def test_expert_mlp_ref_rejects_bad_offsets():
    x, w_gate_up, w_down, offsets, _ = _expert_inputs(torch.float32)
    with pytest.raises(ValueError, match="expert_offsets"):
        expert_mlp_ref(x, w_gate_up, w_down, offsets[:-1])
    with pytest.raises(ValueError, match="expert_offsets"):
        expert_mlp_ref(x[:-1], w_gate_up, w_down, offsets)


def test_paged_attention_splits_long_prefills_without_changing_results(monkeypatch):
    import expertmesh_kernels.attention as attention

    batch = _make_batch(MIXED_BATCH, 4, 2, 16)
    whole = _run(batch, 0.25, sliding_window=3)
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 50)  # a few query rows per chunk
    torch.testing.assert_close(_run(batch, 0.25, sliding_window=3), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_references_run_on_cuda_like_on_cpu():
    batch = _make_batch(MIXED_BATCH, 8, 2, 32)
    cpu_out, cpu_lse = _run(batch, 0.2, sliding_window=5, return_lse=True)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out, lse = _run(cuda, 0.2, sliding_window=5, return_lse=True)
    torch.testing.assert_close(out.cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=1e-4, rtol=1e-4)
    x, w_gate_up, w_down, offsets, _ = _expert_inputs(torch.float32)
    torch.testing.assert_close(
        expert_mlp_ref(x.cuda(), w_gate_up.cuda(), w_down.cuda(), offsets.cuda()).cpu(),
        expert_mlp_ref(x, w_gate_up, w_down, offsets), atol=1e-4, rtol=1e-4,
    )
