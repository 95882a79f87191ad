"""The backend switch and one dispatch function per op: what the engine's layers call.

``backend()`` is "triton" when CUDA is available and "torch" otherwise; the environment
variable EXPERTMESH_KERNELS=torch|triton forces either. Tensors that are not on a CUDA
device always take the torch reference unless TRITON_INTERPRET=1 is set (tests), because
compiled Triton kernels only run on a GPU.

Nothing here imports triton at module level: the kernel modules (which import triton) are
imported on first use of the triton backend, so CPU users without a working triton never
touch it. For that reason the torch references live in triton-free modules (attention.py,
moe.py, norm_rope_ref.py) and each kernel module re-exports the reference it is tested
against.

Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size, E experts,
k top-k, H hidden.
"""

from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("torch", "triton")


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """"triton" or "torch": EXPERTMESH_KERNELS if set, else "triton" exactly when CUDA is available."""
    forced = os.environ.get("EXPERTMESH_KERNELS", "").strip().lower()
    if forced:
        if forced not in _CHOICES:
            raise ValueError(f"EXPERTMESH_KERNELS must be one of {_CHOICES}, got {forced!r}")
        return forced
    return "triton" if _cuda_available() else "torch"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor t runs the Triton kernel (backend triton and t can run it)."""
    if backend() != "triton":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "") == "1"


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [T, NKV, D] into 2 x [NB, B, NKV, D] at slot_mapping [T] (negative: skip)."""
    if use_triton(k):
        from expertmesh_kernels.kv_cache import write_kv_cache as op
    else:
        from expertmesh_kernels.attention import write_kv_cache_ref as op
    op(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                    sliding_window=None, return_lse=False, max_query_len=None):
    """Causal attention of q [T, NH, D] over paged KV; see attention.paged_attention_ref.

    On Triton, an all-decode batch (T == N) takes the split-context decode kernel, anything
    else the varlen prefill kernel (which also serves the decodes mixed into it). On the CPU,
    fp32 and bf16 take the Rust core's kernel (cpu_attention.py), other dtypes the reference.
    """
    from expertmesh_kernels.attention import paged_attention_ref

    if not use_triton(q):
        from expertmesh_kernels import cpu_attention

        if cpu_attention.supports(q, k_cache):
            return cpu_attention.paged_attention_cpu(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                                     scale, sliding_window=sliding_window, return_lse=return_lse)
        return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                   sliding_window=sliding_window, return_lse=return_lse)
    if q.shape[0] == seq_lens.shape[0]:
        from expertmesh_kernels.decode_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                      sliding_window=sliding_window, return_lse=return_lse)
    from expertmesh_kernels.prefill_attention import varlen_prefill_attention

    return varlen_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                    sliding_window=sliding_window, return_lse=return_lse,
                                    max_query_len=max_query_len)


def topk_gating(router_logits, k, renormalize):
    """Softmax + top-k of router_logits [T, E] -> (weights [T, k] fp32, ids [T, k] int32)."""
    if use_triton(router_logits):
        from expertmesh_kernels.gating import topk_gating as op
    else:
        from expertmesh_kernels.moe import topk_gating_ref as op
    return op(router_logits, k, renormalize)


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, expert_map=None):
    """Routed SwiGLU experts of x [T, H], weighted and summed over the k choices -> [T, H]."""
    if use_triton(x):
        from expertmesh_kernels.fused_moe import fused_moe as op
    else:
        from expertmesh_kernels.moe import fused_moe_ref as op
    return op(x, w_gate_up, w_down, topk_weights, topk_ids, expert_map=expert_map)


def rms_norm(x, weight, eps):
    """HF RMSNorm of x [..., H] with weight [H]."""
    if use_triton(x):
        from expertmesh_kernels.norm_rope import rms_norm as op
    else:
        from expertmesh_kernels.norm_rope_ref import rms_norm_ref as op
    return op(x, weight, eps)


def apply_rotary(x, cos, sin):
    """Neox RoPE of x [T, NH, D] by cos, sin [T, D/2]."""
    if use_triton(x):
        from expertmesh_kernels.norm_rope import apply_rotary as op
    else:
        from expertmesh_kernels.norm_rope_ref import apply_rotary_ref as op
    return op(x, cos, sin)


def quant_linear(x, w, bias=None):
    """x [T, K] @ dequant(w).T (+ bias) for a QuantWeight w [N, K] -> [T, N] in x's dtype.

    Triton backend: the Triton kernel (quant_gemm.py); CPU: int8 takes torch's int8-weight
    kernel for a few rows, otherwise the Rust core's kernel."""
    from expertmesh_kernels import quant

    if use_triton(x):
        from expertmesh_kernels.quant_gemm import quant_linear as op

        return op(x, w, bias)
    if x.is_cuda:
        return quant.quant_linear_ref(x, w, bias)
    if w.kind == "int8" and x.shape[0] <= quant.INT8_TORCH_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16):
        return quant.int8_linear_cpu(x, w, bias)
    return quant.quant_linear_cpu(x, w, bias)
