"""Functions the context-parallel tests run inside rank processes (see ep_util.run_ranks)."""

from __future__ import annotations

import time

import torch

from expertmesh.errors import CollectiveError
from expertmesh.parallel.ring_attention import TorchRing
from expertmesh.parallel.shm_ring import ShmRing

# Elements per message: empty, tiny, and several times a 4 KB slot ring of 2 slots.
SIZES = [0, 3, 1000, 25_000]


def message(src: int, dst: int, step: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * src + 100 * dst + step)
    return torch.randn(numel, generator=g)


def ring_round_trips(rank: int, world: int, groups) -> dict:
    """Every transport: N-1 ring steps where all ranks send before anyone receives (messages
    bigger than the shared-memory slots must not deadlock), then an all-to-all of differently
    sized messages; returns what arrived, by transport."""
    ranks = list(range(world))
    rings = {"shm": ShmRing(groups.data, ranks, rank, timeout_s=30, slots=2, slot_bytes=4096),
             "torch": TorchRing(groups.data, ranks, rank, timeout_s=30)}
    out = {}
    for name, ring in rings.items():
        got = {}
        for step, numel in enumerate(SIZES):
            src, dst = (rank - 1) % world, (rank + 1) % world
            incoming = torch.empty(numel)
            ring.wait(ring.post({dst: message(rank, dst, step, numel)}, {src: incoming}))
            got[("ring", step)] = incoming
        sends = {x: message(rank, x, 99, 500 * (rank + 1) + x) for x in ranks if x != rank}
        recvs = {x: torch.empty(500 * (x + 1) + rank) for x in ranks if x != rank}
        ring.wait(ring.post(sends, recvs))
        got.update({("all", x): t for x, t in recvs.items()})
        out[name] = got
        ring.close()
    return out


def ring_with_a_dead_rank(rank: int, world: int, groups) -> tuple[str, float]:
    ring = ShmRing(groups.data, list(range(world)), rank, timeout_s=60)
    src, dst = (rank - 1) % world, (rank + 1) % world
    ring.wait(ring.post({dst: torch.ones(10)}, {src: torch.empty(10)}))  # one good step first
    if rank == world - 1:
        return "left", 0.0  # its process ends here, never sending the next message
    start = time.monotonic()
    try:
        ring.wait(ring.post({dst: torch.ones(10)}, {src: torch.empty(10)}))
    except CollectiveError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start
