"""expertmesh-kernels: the arithmetic hot spots of expertmesh.

Each op has a torch reference named ``<op>_ref`` that runs anywhere (the CPU engine uses it
directly) and defines the op's semantics. Triton kernels go next to their reference in the
same file, named ``<op>`` without the suffix, and are tested against it.
This package imports nothing from the server, and nothing here imports triton: the kernel
modules (kv_cache, decode_attention, prefill_attention, moe_align, fused_moe, gating,
norm_rope) import it when first used. The engine calls the dispatchers in ``ops``, which
pick the Triton kernel or the reference by ``backend()`` (EXPERTMESH_KERNELS=torch|triton
overrides the default: triton on CUDA, torch otherwise).
"""

from expertmesh_kernels.attention import paged_attention_ref, write_kv_cache_ref
from expertmesh_kernels.moe import expert_mlp_ref, fused_moe_ref, moe_align_ref, topk_gating_ref
from expertmesh_kernels.norm_rope_ref import apply_rotary_ref, rms_norm_ref
from expertmesh_kernels.ops import backend

__all__ = [
    "apply_rotary_ref",
    "backend",
    "expert_mlp_ref",
    "fused_moe_ref",
    "moe_align_ref",
    "rms_norm_ref",
    "paged_attention_ref",
    "topk_gating_ref",
    "write_kv_cache_ref",
]
