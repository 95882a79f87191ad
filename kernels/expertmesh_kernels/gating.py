"""Top-k gating (softmax over E router logits, top-k, optional renormalise) as a Triton kernel.

Reference: moe.topk_gating_ref. Each program takes BLOCK_T tokens with all E logits in
registers (E <= 1024), does the softmax in fp32 and then k rounds of arg-max, ties going to
the lower expert id (torch.topk's order on CPU), so the ids match the reference exactly
unless two probabilities are equal to the last bit.
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens, E experts, k top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels.moe import topk_gating_ref

__all__ = ["topk_gating", "topk_gating_ref"]


@triton.jit
def _topk_gating_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    stride_lt, stride_le,  # router_logits [T, E]
    stride_wt, stride_it,  # weights [T, k] fp32, ids [T, k] int32 (unit stride on k)
    num_tokens, num_experts,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_e = tl.arange(0, E_PAD)  # [E]
    tmask = offs_t < num_tokens
    emask = offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_lt + offs_e[None, :] * stride_le,
                     mask=tmask[:, None] & emask[None, :], other=float("-inf")).to(tl.float32)  # [BT, E]
    row_max = tl.max(logits, 1)
    row_max = tl.where(tmask, row_max, 0.0)
    e = tl.exp(logits - row_max[:, None])
    probs = e / tl.where(tmask, tl.sum(e, 1), 1.0)[:, None]  # [BT, E]
    probs = tl.where(emask[None, :], probs, -1.0)  # padding never wins
    offs_k = tl.arange(0, K_PAD)
    top_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    top_i = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, 1)  # [BT]
        best_id = tl.min(tl.where(probs == best[:, None], offs_e[None, :], E_PAD), 1)  # lowest id on ties
        top_w = tl.where(offs_k[None, :] == j, best[:, None], top_w)
        top_i = tl.where(offs_k[None, :] == j, best_id[:, None], top_i)
        probs = tl.where(offs_e[None, :] == best_id[:, None], -2.0, probs)
    if RENORMALIZE:
        total = tl.sum(top_w, 1)  # padded columns hold 0
        top_w = top_w / tl.where(total > 0, total, 1.0)[:, None]
    kmask = tmask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + offs_t[:, None] * stride_wt + offs_k[None, :], top_w, mask=kmask)
    tl.store(ids_ptr + offs_t[:, None] * stride_it + offs_k[None, :], top_i, mask=kmask)


def topk_gating(
    router_logits: torch.Tensor,  # [T, E]
    k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of topk_gating_ref: (weights [T, k] fp32, expert ids [T, k] int32)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be in [1, E={num_experts}], got {k}")
    if num_experts > 1024:
        raise ValueError(f"topk_gating keeps all E logits of a token in registers: E={num_experts} > 1024")
    if router_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"router_logits must be fp32, fp16 or bf16, got {router_logits.dtype}")
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // e_pad))
    _topk_gating_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids,
        router_logits.stride(0), router_logits.stride(1), weights.stride(0), ids.stride(0),
        num_tokens, num_experts,
        TOP_K=k, K_PAD=triton.next_power_of_2(k), E_PAD=e_pad, BLOCK_T=block_t, RENORMALIZE=renormalize,
    )
    return weights, ids
