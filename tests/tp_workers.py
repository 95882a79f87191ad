"""Functions the tensor-parallel tests run inside rank processes (see ep_util.run_ranks)."""

from __future__ import annotations

import time

import torch

from expertmesh.errors import CollectiveError
from expertmesh.parallel.allreduce import ShmAllReduce, TorchAllReduce

SIZES = [0, 1, 7, 1000, 100_003]  # elements; most do not divide by the world size


def _input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + numel)
    return torch.randn(numel, generator=g).to(dtype)


def fixed_order_sum(world: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Every rank's input summed in rank order in fp32, rounded once to `dtype`: what DDA
    computes, bit for bit."""
    acc = _input(0, numel, dtype).float()
    for r in range(1, world):
        acc += _input(r, numel, dtype).float()
    return acc.to(dtype)


def allreduce_all(rank, world, groups, max_bytes):
    """Every algorithm on every size and dtype; returns {(algo, numel, dtype): result}."""
    shm = ShmAllReduce(groups.control, rank, world, max_bytes=max_bytes, timeout_s=30)
    torch_ar = TorchAllReduce(groups.data)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for numel in SIZES:
            for name, call in (("one_shot", lambda x: shm(x, "one_shot")), ("two_shot", lambda x: shm(x, "two_shot")),
                               ("picked", shm), ("torch", torch_ar)):
                x = _input(rank, numel, dtype)
                result = call(x)
                assert result.data_ptr() == x.data_ptr() or numel == 0  # in place
                out[(name, numel, str(dtype))] = result.clone()
    sizes = [3 + r for r in range(world)]  # uneven columns, as a vocabulary split can be
    part = torch.full((5, sizes[rank]), float(rank))
    out["all_gather"] = (shm.all_gather(part, sizes), torch_ar.all_gather(part, sizes))
    out["stats"] = dict(shm.stats.calls)
    shm.close()
    return out


def allreduce_with_a_dead_rank(rank, world, groups):
    shm = ShmAllReduce(groups.control, rank, world, max_bytes=1 << 12, timeout_s=60)
    shm(torch.ones(10))  # one good call first
    if rank == world - 1:
        return "left", 0.0  # its process ends here, never joining the next call
    start = time.monotonic()
    try:
        shm(torch.ones(10))
    except CollectiveError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start
