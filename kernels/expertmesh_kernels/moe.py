"""Mixture-of-experts gating and grouped expert MLPs (torch references).

Shapes: T tokens, E experts, k experts per token, H hidden size, I expert intermediate size,
P routed (token, expert) pairs, sorted by expert.

Assumptions (the Triton versions, added to this file later as ``topk_gating`` /
``expert_mlp``, must keep them):
- Gating is softmax over all E router logits in fp32, then top-k by probability (ties go to
  the lower expert id, as torch.topk does on CPU), optionally renormalised so the k weights
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
    formed in fp32 and rounded once. Experts with no rows are skipped.
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
        gate_up = F.linear(x_sorted[lo:hi], w_gate_up[e]).float()  # [n, 2I]
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x_sorted.dtype)  # [n, I]
        out[lo:hi] = F.linear(act, w_down[e])  # [n, H]
    return out
