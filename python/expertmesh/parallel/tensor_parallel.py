"""One rank's tensor-parallel group: its place, its collectives, and the one module TP swaps in.

`TensorParallel` carries the group's allreduce (DDA over shared memory, or torch.distributed;
allreduce.py) and all-gather. `GatheredNorm` replaces a full-width RMSNorm over split heads
(OLMoE's q/k norms take their statistics over all heads): it gathers the heads, normalises
the full vector with the full weight and keeps this rank's columns.

Legend: T tokens, W full width (NH*D or NKV*D), Wl this rank's columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.layers.norm import RMSNorm
from expertmesh.parallel.allreduce import ShmAllReduce, TorchAllReduce
from expertmesh.parallel.layout import split
from expertmesh_kernels import ops


@dataclass
class TensorParallel:
    rank: int  # in the group (0 = the replica's leader)
    world_size: int
    allreduce: ShmAllReduce | TorchAllReduce

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place on a contiguous tensor (returned)."""
        return self.allreduce(x if x.is_contiguous() else x.contiguous())

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int) -> torch.Tensor:
        return self.allreduce.all_gather(x.contiguous(), sizes, dim)

    def split(self, total: int) -> tuple[int, int]:
        """This rank's [lo, hi) of `total` items cut into near-equal runs."""
        return split(total, self.world_size, self.rank)

    def sizes(self, total: int) -> list[int]:
        return [hi - lo for lo, hi in (split(total, self.world_size, r) for r in range(self.world_size))]

    def close(self) -> None:
        self.allreduce.close()


class GatheredNorm(nn.Module):
    """A full-width RMSNorm applied to column-split input: x [T, Wl] -> [T, Wl].

    `take` [W] picks the full vector's columns out of the gathered [T, sum of all ranks' Wl]
    (columns of heads several ranks replicate appear once); `keep` is this rank's [lo, hi) of W.
    """

    def __init__(self, norm: RMSNorm, tp: TensorParallel, local_width: int, take: list[int],
                 keep: tuple[int, int]) -> None:
        super().__init__()
        self.weight = norm.weight  # the full weight [W]: every rank loads all of it
        self.eps, self.tp, self.local_width, self.keep = norm.eps, tp, local_width, keep
        self.register_buffer("take", torch.tensor(take, dtype=torch.long, device=norm.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = self.tp.all_gather(x, [self.local_width] * self.tp.world_size, dim=1)  # [T, R*Wl]
        full = gathered.index_select(1, self.take)  # [T, W]
        normed = ops.rms_norm(full, self.weight, self.eps)  # [T, W], as RMSNorm computes it
        return normed[:, self.keep[0]: self.keep[1]].contiguous()  # [T, Wl]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, keep={self.keep}"
