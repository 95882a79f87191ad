"""Mixture-of-experts gating and grouped expert MLPs (torch references).

Shapes: T tokens, E experts, k experts per token, H hidden size, I expert intermediate size,
P routed (token, expert) pairs, sorted by expert.

Assumptions (the Triton versions in gating.py and fused_moe.py keep them):
- Gating is softmax over all E router logits in fp32, then top-k by probability (the order of
  exact ties is torch.topk's and not specified; the Triton kernel picks the lower id),
  optionally renormalised so the k weights
  sum to 1. This is the Mixtral / Qwen-MoE / OLMoE rule; other routers (grouped top-k,
  sigmoid scores, correction bias) get their own ops.
- Expert weights are fused per layer: w_gate_up [E, 2I, H] holds the gate projection in rows
  0..I-1 and the up projection in rows I..2I-1; w_down is [E, H, I]. Both are in the layout
  of nn.Linear.weight (out_features first), so y = x @ W.T.
- The expert MLP is down(silu(gate(x)) * up(x)), no biases.
- Pairs are sorted by expert: rows expert_offsets[e] .. expert_offsets[e+1]-1 of x_sorted go
  to expert e; expert_offsets has E+1 non-decreasing entries from 0 to P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Legend: T tokens, E experts, k top-k, H hidden, I intermediate, P routed pairs.


def topk_gating_ref(
    router_logits: torch.Tensor,  # [T, E]
    k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, then top-k. Returns (weights [T, k] fp32, expert ids [T, k] int32)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be in [1, E={num_experts}], got {k}")
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def expert_mlp_ref(
    x_sorted: torch.Tensor,  # [P, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
    expert_offsets: torch.Tensor,  # [E+1]
) -> torch.Tensor:  # [P, H]
    """Run each expert's SwiGLU MLP on its slice of the expert-sorted rows.

    Matmuls run in the input dtype (torch accumulates in fp32); the activation product is
    formed in fp32 and rounded once. Experts with no rows are skipped. The weights may be
    QuantWeights (quant.py): each expert's matmul then takes the quantized one.
    """
    num_experts, two_i, hidden = w_gate_up.shape
    inter = two_i // 2
    if two_i % 2 != 0 or w_down.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"w_gate_up must be [E, 2I, H] and w_down [E, H, I]; got {tuple(w_gate_up.shape)} "
            f"and {tuple(w_down.shape)}"
        )
    if x_sorted.dim() != 2 or x_sorted.shape[1] != hidden:
        raise ValueError(f"x_sorted must be [P, H={hidden}], got {tuple(x_sorted.shape)}")
    if expert_offsets.shape != (num_experts + 1,):
        raise ValueError(f"expert_offsets must be [E+1={num_experts + 1}], got {tuple(expert_offsets.shape)}")
    offsets = expert_offsets.to(torch.int64).tolist()
    if offsets[0] != 0 or offsets[-1] != x_sorted.shape[0] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"expert_offsets must rise from 0 to P={x_sorted.shape[0]} without decreasing, got {offsets}"
        )

    out = torch.empty_like(x_sorted)  # [P, H]
    for e in range(num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        gate_up = _linear(x_sorted[lo:hi], w_gate_up[e]).float()  # [n, 2I]
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x_sorted.dtype)  # [n, I]
        out[lo:hi] = _linear(act, w_down[e])  # [n, H]
    return out


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    from expertmesh_kernels import ops

    return ops.quant_linear(x, w)


def moe_align_ref(
    topk_ids: torch.Tensor,  # [T, k] int
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,  # [E] int32: global expert -> local id, -1 = not local
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-aligned block sorting of the P = T*k (token, slot) pairs for the grouped GEMMs.

    Each local expert's pairs (stable, by pair id p = token * k + slot) fill a segment padded
    to a multiple of block_m with the sentinel P; pairs of non-local experts get no segment.
    Returns sorted_ids [Pmax] int32 (segments first, then sentinels up to the bound
    Pmax = P + min(E, P) * (block_m - 1)), block_expert [Pmax // block_m] int32 (local expert
    of each block, -1 past the end), num_padded [1] int32 (used length of sorted_ids) and
    counts [E] int32 (pairs per global expert, local or not).
    """
    ids = topk_ids.reshape(-1).to(torch.int64)  # [P]
    num_pairs = ids.numel()
    device = topk_ids.device
    counts = torch.bincount(ids, minlength=num_experts)[:num_experts]  # [E]
    local = torch.arange(num_experts, device=device) if expert_map is None else expert_map.to(torch.int64)
    padded = torch.where(local >= 0, (counts + block_m - 1) // block_m * block_m, 0)  # [E]
    starts = torch.cumsum(padded, 0) - padded  # [E]
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    block_expert = torch.full((max_padded // block_m,), -1, dtype=torch.int32, device=device)
    order = torch.sort(ids, stable=True).indices  # [P]
    sorted_experts = ids[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    keep = local[sorted_experts] >= 0
    sorted_ids[(starts[sorted_experts] + rank)[keep]] = order[keep].to(torch.int32)
    for e in torch.nonzero(padded).flatten().tolist():
        lo = int(starts[e]) // block_m
        block_expert[lo : lo + int(padded[e]) // block_m] = int(local[e])
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_expert, num_padded, counts.to(torch.int32)


def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [EL, 2I, H] local experts
    w_down: torch.Tensor,  # [EL, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k] int, global expert ids
    expert_map: torch.Tensor | None = None,  # [E] int32: global -> local id or -1 (EP)
) -> torch.Tensor:  # [T, H]
    """sum_j w[t, j] * expert_{id[t, j]}(x[t]) over the k choices whose expert is local.

    Without expert_map all experts are local (EL = E). Choices of non-local experts add
    nothing (another rank computes them). The sum runs in fp32 and is rounded once.
    """
    num_tokens, k = topk_ids.shape
    ids = topk_ids.reshape(-1).to(torch.int64)  # [P]
    if expert_map is not None:
        ids = expert_map.to(torch.int64)[ids]  # local ids, -1 = skip
    num_local = w_gate_up.shape[0]
    keep = torch.nonzero(ids >= 0).flatten()  # [P'] pair ids
    order = keep[torch.sort(ids[keep], stable=True).indices]  # [P'] pairs sorted by local expert
    counts = torch.bincount(ids[order], minlength=num_local)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # [EL+1]
    y_sorted = expert_mlp_ref(x[order // k], w_gate_up, w_down, offsets)  # [P', H]
    y = torch.zeros(num_tokens * k, x.shape[1], dtype=torch.float32, device=x.device)  # [P, H]
    y[order] = y_sorted.float() * topk_weights.reshape(-1, 1)[order].float()
    return y.view(num_tokens, k, -1).sum(dim=1).to(x.dtype)
