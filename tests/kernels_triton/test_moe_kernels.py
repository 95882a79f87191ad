"""Triton MoE kernels (top-k gating, expert-aligned sorting, fused grouped GEMMs) against the refs.

Small shapes run everywhere (TRITON_INTERPRET=1 without CUDA); `gpu` tests use Mixtral-8x7B
(E 8, k 2, H 4096, I 14336) and Qwen3-30B-A3B (E 128, k 8, H 2048, I 768) layer shapes.
Legend: T tokens, E experts (EL local), k top-k, H hidden, I intermediate.
"""

from __future__ import annotations

import pytest
import torch

from kernel_util import DEVICE, DTYPES, assert_error_close_to_torch
from expertmesh_kernels.fused_moe import fused_moe, fused_moe_ref
from expertmesh_kernels.gating import topk_gating, topk_gating_ref
from expertmesh_kernels.moe_align import moe_align, moe_align_ref


def _ids(num_tokens, num_experts, k, seed=0, empty=()):
    """[T, k] distinct experts per token; experts in `empty` receive no token."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in empty])
    rows = [allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(num_tokens)]
    return torch.stack(rows).to(torch.int32).to(DEVICE)


def _ep_map(num_experts, rank, ranks):
    """Experts rank, rank+ranks, ... are local (ids 0, 1, ...); the rest -1."""
    emap = torch.full((num_experts,), -1, dtype=torch.int32)
    local = torch.arange(rank, num_experts, ranks)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    return emap.to(DEVICE), local.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", [(1, 8, 2), (19, 8, 2), (6, 60, 4), (3, 128, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_gating_matches_reference(dtype, num_tokens, num_experts, k, renormalize):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    w, ids = topk_gating(logits, k, renormalize)
    rw, rids = topk_gating_ref(logits, k, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (num_tokens, k)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
    if dtype == torch.float32:
        assert torch.equal(ids, rids)
    else:  # fp16/bf16 logits tie often; torch.topk orders ties arbitrarily, ours by lower id
        chosen = torch.softmax(logits.float(), -1).gather(1, ids.long())  # [T, k]
        if renormalize:
            chosen = chosen / chosen.sum(-1, keepdim=True)
        torch.testing.assert_close(chosen, w, atol=1e-6, rtol=1e-5)
        assert all(len(set(row)) == k for row in ids.tolist())


def test_topk_gating_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE)
    _, ids = topk_gating(logits, 2, False)
    assert ids.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="top-k"):
        topk_gating(logits, 6, False)


@pytest.mark.parametrize("num_tokens,num_experts,k,empty", [(1, 8, 2, ()), (13, 8, 2, (3, 7)), (40, 16, 4, (0,)),
                                                            (5, 64, 8, ())])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("ep", [False, True])
def test_moe_align_equals_reference(num_tokens, num_experts, k, empty, block_m, ep):
    ids = _ids(num_tokens, num_experts, k, empty=empty)
    emap = _ep_map(num_experts, 1, 2)[0] if ep else None
    got = moe_align(ids, num_experts, block_m, emap)
    ref = moe_align_ref(ids, num_experts, block_m, emap)
    for name, a, b in zip(("sorted_ids", "block_expert", "num_padded", "counts"), got, ref):
        assert torch.equal(a, b), name
    sorted_ids, block_expert, num_padded, counts = ref
    assert all(counts[e] == 0 for e in empty)
    # Every local pair appears exactly once inside the padded length, in its expert's blocks.
    used = sorted_ids[: int(num_padded)]
    pairs = used[used < ids.numel()].long()
    local = torch.ones(num_experts, dtype=torch.bool, device=DEVICE) if emap is None else emap >= 0
    assert sorted(pairs.tolist()) == [p for p in range(ids.numel()) if local[ids.flatten()[p]]]


def _moe_inputs(num_tokens, num_experts, k, hidden, inter, dtype, seed=0, empty=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype).to(DEVICE)
    w_down = (torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype).to(DEVICE)
    ids = _ids(num_tokens, num_experts, k, seed, empty)
    weights = torch.rand(num_tokens, k, generator=gen).to(DEVICE)
    return x, w_gate_up, w_down, weights, ids


def _check_moe(x, w_gate_up, w_down, weights, ids, dtype, block_m=None):
    out = fused_moe(x, w_gate_up, w_down, weights, ids, block_m=block_m)
    exact = fused_moe_ref(x.double(), w_gate_up.double(), w_down.double(), weights, ids)
    same = fused_moe_ref(x, w_gate_up, w_down, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert_error_close_to_torch(out, same, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k,hidden,inter,empty", [
    (1, 4, 2, 32, 16, ()),  # a single token
    (11, 8, 2, 48, 40, (2, 5)),  # ragged H, I; experts with no token
    (6, 16, 4, 32, 24, ()),
])
@pytest.mark.parametrize("block_m", [16, 32])
def test_fused_moe_matches_reference(dtype, num_tokens, num_experts, k, hidden, inter, empty, block_m):
    inputs = _moe_inputs(num_tokens, num_experts, k, hidden, inter, dtype, empty=empty)
    _check_moe(*inputs, dtype, block_m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_expert_map_sums_to_full_layer(dtype):
    """EP: each of 2 ranks runs only its local experts; the ranks' partial sums add up to the layer."""
    x, w_gate_up, w_down, weights, ids = _moe_inputs(9, 8, 2, 32, 16, dtype, seed=4, empty=(6,))
    parts = []
    for rank in range(2):
        emap, local = _ep_map(8, rank, 2)
        part = fused_moe(x, w_gate_up[local].contiguous(), w_down[local].contiguous(), weights, ids, expert_map=emap)
        ref = fused_moe_ref(x, w_gate_up[local], w_down[local], weights, ids, expert_map=emap)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(part.float(), ref.float(), atol=tol, rtol=tol)
        parts.append(part.float())
    full = fused_moe_ref(x.double(), w_gate_up.double(), w_down.double(), weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close((parts[0] + parts[1]).double(), full, atol=tol, rtol=tol)


def test_fused_moe_rejects_bad_shapes():
    x, w_gate_up, w_down, weights, ids = _moe_inputs(3, 4, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(x, w_gate_up, w_down[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w_gate_up, w_down, weights[:2], ids)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(x.half(), w_gate_up, w_down, weights, ids)


# ---- real sizes on a GPU ---------------------------------------------------------------

GPU_MOE = {"mixtral": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(GPU_MOE))
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_fused_moe_real_sizes(model, num_tokens):
    num_experts, k, hidden, inter = GPU_MOE[model]
    x, w_gate_up, w_down, weights, ids = _moe_inputs(num_tokens, num_experts, k, hidden, inter, torch.bfloat16)
    out = fused_moe(x, w_gate_up, w_down, weights, ids)
    exact = fused_moe_ref(x.float(), w_gate_up.float(), w_down.float(), weights, ids)
    same = fused_moe_ref(x, w_gate_up, w_down, weights, ids)
    assert_error_close_to_torch(out, same, exact, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(GPU_MOE))
def test_gating_and_align_real_sizes(model):
    num_experts, k, _, _ = GPU_MOE[model]
    logits = torch.randn(4096, num_experts, device=DEVICE, dtype=torch.bfloat16)
    w, ids = topk_gating(logits, k, True)
    rw, rids = topk_gating_ref(logits, k, True)
    assert (ids != rids).float().mean() < 1e-3  # ties in bf16 logits may order differently
    for a, b in zip(moe_align(rids, num_experts, 64), moe_align_ref(rids, num_experts, 64)):
        assert torch.equal(a, b)
