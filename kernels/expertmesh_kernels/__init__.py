"""expertmesh-kernels: the arithmetic hot spots of expertmesh.

Each op has a torch reference named ``<op>_ref`` that runs anywhere (the CPU engine uses it
directly) and defines the op's semantics. Triton kernels go next to their reference in the
same file, named ``<op>`` without the suffix, and are tested against it.
This package imports nothing from the server.
"""

from expertmesh_kernels.attention import paged_attention_ref, write_kv_cache_ref
from expertmesh_kernels.moe import expert_mlp_ref, topk_gating_ref

__all__ = [
    "expert_mlp_ref",
    "paged_attention_ref",
    "topk_gating_ref",
    "write_kv_cache_ref",
]
