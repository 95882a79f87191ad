"""Fused MoE: grouped gate/up GEMM with SiLU-and-mul, grouped down GEMM with the routing
weights applied in the kernel, over expert-aligned blocks (moe_align.py), as Triton kernels.

Reference: moe.fused_moe_ref. Weights as in moe.py: w_gate_up [EL, 2I, H] (gate rows 0..I-1,
up rows I..2I-1), w_down [EL, H, I], nn.Linear layout. Each program takes BLOCK_M pairs of one
expert (rows gathered from x by token = pair // k, so x is never permuted in memory) and
BLOCK_N output columns. Kernel 1 accumulates gate and up tiles in fp32 and writes
act = silu(gate) * up [P, I] in x's dtype; kernel 2 multiplies act by w_down, scales each
row by its routing weight in fp32 and writes y [P, H]; the k rows of a token are then summed
in fp32. With expert_map (EP) blocks exist only for local experts; the rows of non-local
choices stay zero. Programs past the padded length exit at once (grid size is a host bound,
no device sync).

Quantized experts (quant.py's QuantWeight, weight-only): tiles of int8 / fp8 codes are
converted to x's dtype (exact for both) before the dot; int8's per-row scale multiplies the
fp32 accumulator once at the end, fp8's block scale each K-tile's partial product, so BLOCK_K
must divide the scale block and the held columns' offset in it (_triton_common.quant_args
picks it).
Measured: not yet measured on a GPU (correctness proved on CPU via TRITON_INTERPRET=1).

Legend: T tokens, k top-k, P = T * k pairs, E experts (EL local), H hidden, I intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh_kernels._triton_common import dot_config, quant_args, quant_dot, row_scale
from expertmesh_kernels.moe import fused_moe_ref
from expertmesh_kernels.moe_align import moe_align
from expertmesh_kernels.quant import QuantWeight

__all__ = ["fused_moe", "fused_moe_ref"]


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # GATE_UP: x [T, H]; else act [P, I]
    w_ptr,  # GATE_UP: w_gate_up [EL, 2I, H]; else w_down [EL, H, I] (QUANT: int8 / fp8 codes)
    s_ptr,  # QUANT 1: scales [EL, 2I or H]; QUANT 2: [EL, 2I or H, KB]; else unused
    out_ptr,  # GATE_UP: act [P, I]; else y [P, H]
    weights_ptr,  # [P] fp32 routing weights (used when not GATE_UP)
    sorted_ptr, block_expert_ptr, num_padded_ptr,  # from moe_align
    num_pairs, N, K, TOP_K,  # N output columns (I or H), K reduction size (H or I)
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    stride_se, stride_sn, stride_sk, col_offset,  # scales' strides; held columns' offset in their first block
    GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    QUANT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,  # QUANT 0 none, 1 per row, 2 per K-block
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM], P = padding
    valid = pairs < num_pairs
    if GATE_UP:
        a_rows = (pairs // TOP_K).to(tl.int64)  # token of each pair
    else:
        a_rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=nmask[None, :] & kmask[:, None], other=0.0)  # [BK, BN]
        acc = quant_dot(acc, a, w, s_base + offs_n * stride_sn, nmask, k0, col_offset, stride_sk,
                        QUANT, SCALE_BLOCK_K, DOT_PREC)
        if GATE_UP:
            wu = tl.load(w_base + (offs_n[None, :] + N) * stride_wn + offs_k[:, None] * stride_wk,
                         mask=nmask[None, :] & kmask[:, None], other=0.0)  # [BK, BN] up rows
            acc_up = quant_dot(acc_up, a, wu, s_base + (offs_n + N) * stride_sn, nmask, k0, col_offset, stride_sk,
                               QUANT, SCALE_BLOCK_K, DOT_PREC)
    acc = row_scale(acc, s_base + offs_n * stride_sn, nmask, QUANT)
    if GATE_UP:
        acc_up = row_scale(acc_up, s_base + (offs_n + N) * stride_sn, nmask, QUANT)
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, fp32
    else:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    out_rows = pairs.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def _launch(a, w, out, weights, align, num_pairs, n, k, top_k, gate_up, block_m):
    sorted_ids, block_expert, num_padded, _ = align
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    values, scale, scale_strides, quant = quant_args(w, k)
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, values, scale, out, weights, sorted_ids, block_expert, num_padded,
        num_pairs, n, k, top_k,
        a.stride(0), a.stride(1), values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
        *scale_strides, quant["col_offset"],
        GATE_UP=gate_up, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=quant["block_k"], **dot_config(a.dtype),
        QUANT=quant["mode"], SCALE_BLOCK_K=quant["scale_block_k"],
    )


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor | QuantWeight,  # [EL, 2I, H]
    w_down: torch.Tensor | QuantWeight,  # [EL, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k] int32 global expert ids
    expert_map: torch.Tensor | None = None,  # [E] int32 global -> local id, -1 = not local
    num_experts: int | None = None,  # E; defaults to len(expert_map) or EL
    block_m: int | None = None,
) -> torch.Tensor:  # [T, H]
    """Triton version of fused_moe_ref; the expert weights may be quantized (both or neither)."""
    if x.dim() != 2 or len(w_gate_up.shape) != 3 or len(w_down.shape) != 3:
        raise ValueError(f"x must be [T, H], w_gate_up [EL, 2I, H], w_down [EL, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    num_tokens, hidden = x.shape
    num_local, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    if two_i % 2 or w_gate_up.shape[2] != hidden or w_down.shape != (num_local, hidden, inter):
        raise ValueError(f"w_gate_up must be [EL, 2I, H={hidden}] and w_down [EL, H, I]; got "
                         f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [T={num_tokens}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if isinstance(w_gate_up, QuantWeight) != isinstance(w_down, QuantWeight):
        raise ValueError("w_gate_up and w_down must both be quantized or both not")
    if not isinstance(w_gate_up, QuantWeight) and not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"x and expert weights must share a dtype, got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}")
    num_experts = num_experts or (expert_map.shape[0] if expert_map is not None else num_local)
    if expert_map is None and num_experts != num_local:
        raise ValueError(f"without expert_map all E={num_experts} experts must be local, got EL={num_local}")
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    if block_m is None:
        block_m = 16 if num_pairs <= 4 * num_experts * 16 else 64  # small batches: less padding
    align = moe_align(topk_ids, num_experts, block_m, expert_map)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I]
    alloc = torch.zeros if expert_map is not None else torch.empty  # non-local rows stay 0
    y = alloc(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, H]
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [P]
    _launch(x, w_gate_up, act, weights, align, num_pairs, inter, hidden, top_k, True, block_m)
    _launch(act, w_down, y, weights, align, num_pairs, hidden, inter, top_k, False, block_m)
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
