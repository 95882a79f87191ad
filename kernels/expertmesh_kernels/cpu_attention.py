"""Paged attention on the CPU, in the Rust core: K and V read in place from the cache blocks.

Reference: attention.paged_attention_ref (same inputs, same result to fp32 rounding).

The kernel (expertmesh._core.paged_attention, rust/src/paged_attention/) splits the batch
into (request, KV head, 16 query rows) items, and decodes also into 512-key partitions, runs
them on torch's intra-op thread count, converts each 16-key tile of the cache to fp32 once
for all the query heads sharing it, and merges partitions exactly. No dense copy of the
context is made, so a cache in the model's dtype (bf16) costs no conversion pass.
Assumes: a CPU q and cache of one dtype, fp32 or bf16, unit stride on D in the cache and
contiguous blocks (the engine allocates them so); q may be strided (copied here, it is small).
Threads: torch's own OpenMP team where torch runs on libgomp (the PyPI builds), else a rayon pool.
Measured on the 2-core AMD EPYC VM: bench/attention/README.md.

Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size,
MB block-table columns.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@functools.cache
def _core():
    """The Rust module, or None where expertmesh is not installed beside the kernels. Its
    parallel loops are put on torch's OpenMP threads when torch runs on libgomp: a pool of its
    own would compete with torch's workers, which spin after each op (rust/src/cpu_pool.rs)."""
    try:
        from expertmesh import _core as core
    except ImportError:
        return None
    if not hasattr(core, "paged_attention"):
        return None
    if "OpenMP" in torch.__config__.parallel_info():
        for lib in sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*")):
            try:
                core.use_openmp(str(lib))
                break
            except ValueError:  # CoreError: not the runtime torch loaded
                continue
    return core


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the Rust kernel can take this call (else the torch reference does)."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype == k_cache.dtype
            and q.dtype in _DTYPES and _core() is not None)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(device="cpu", dtype=torch.int32).contiguous()


def paged_attention_cpu(
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
    """out [T, NH, D] in q's dtype (and lse [T, NH] fp32 with return_lse); see the module doc."""
    if not supports(q, k_cache):
        raise ValueError(f"paged_attention_cpu takes CPU q and caches of one dtype in {list(_DTYPES)}, "
                         f"got q {q.dtype} on {q.device}, cache {k_cache.dtype} on {k_cache.device}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, NH, D], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache and v_cache must both be [NB, B, NKV, D={head_dim}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (the kernel reads them in place)")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [N, MB], got {tuple(block_tables.shape)}")
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32) if return_lse else None
    _core().paged_attention(
        _DTYPES[q.dtype], out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        (num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size),
        _int32(block_tables).numpy(), _int32(query_start_loc).numpy(), _int32(seq_lens).numpy(),
        float(scale), sliding_window, None if lse is None else lse.data_ptr(), torch.get_num_threads(),
    )
    return (out, lse) if return_lse else out
