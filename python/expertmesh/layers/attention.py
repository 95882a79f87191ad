"""Paged attention layer and the per-step metadata every attention layer reads.

The engine builds one AttentionMetadata per step from the scheduler's arrays; each layer
writes its new K/V into its own paged cache and attends over the cached context.

Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size,
MB block-table columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh_kernels import ops


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64, position of each token in its request
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot (block * B + offset) of each token
    query_start_loc: torch.Tensor  # [N+1] int32, prefix sums of new tokens per request
    seq_lens: torch.Tensor  # [N] int32, tokens in KV after this step (context + new)
    block_tables: torch.Tensor  # [N, MB] int32, cache blocks of each request, padded

    def __post_init__(self) -> None:
        # Shape checks only: value checks would force a device sync every step.
        num_tokens = self.positions.shape[0]
        num_reqs = self.seq_lens.shape[0]
        expected = {
            "positions": (self.positions, (num_tokens,)),
            "slot_mapping": (self.slot_mapping, (num_tokens,)),
            "query_start_loc": (self.query_start_loc, (num_reqs + 1,)),
        }
        for field, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"AttentionMetadata.{field} must have shape {shape}, got {tuple(tensor.shape)}")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_reqs:
            raise ValueError(
                f"AttentionMetadata.block_tables must be [N={num_reqs}, MB], got {tuple(self.block_tables.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair of [NB, B, NKV, D] zeros per layer."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


class Attention(nn.Module):
    """Write this step's K/V into the layer's paged cache, then attend causally over it.

    Holds no weights: projections, norms and RoPE belong to the model's attention block.
    When a sequence's KV is split over ranks, whoever split it installs a `context` that
    takes over forward (parallel/context_parallel.py); the layer itself reads the same.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.context = None  # set when sequences are split over context-parallel ranks

    def forward(
        self,
        q: torch.Tensor,  # [T, NH, D]
        k: torch.Tensor,  # [T, NKV, D]
        v: torch.Tensor,  # [T, NKV, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [NB, B, NKV, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, NH, D]
        if self.context is not None:
            return self.context(self, q, k, v, kv_cache, meta)
        k_cache, v_cache = kv_cache
        ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)  # Triton on CUDA, else the ref
        out = ops.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            scale=self.scale, sliding_window=self.sliding_window,
        )
        assert isinstance(out, torch.Tensor)
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}")
