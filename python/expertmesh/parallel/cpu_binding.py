"""Which cores, and how many compute threads, each CPU rank of one host gets.

Left alone, every rank starts as many torch threads as the machine has cores: two ranks on two
cores run four compute threads, and the shared-memory waits compete with them (measured on the
430M checkpoint: EP=2 at 0.38x of one rank's tokens/s, 0.91x once each rank has one thread).
So ranks on one host split the cores: rank i of L gets the i-th of L even, contiguous shares
of the cores this process may run on, one thread per core, pinned there. With more ranks than
cores, rank i gets core i mod cores alone (ranks sharing a core take turns: the shared-memory
waits yield). A rank is pinned from setup until it closes; the calling process's affinity and
thread count are restored then (rank 0 may be the user's own process).

The spec is vLLM's CPU-backend spelling (VLLM_CPU_OMP_THREADS_BIND): "auto" as above,
"nobind" to leave threads and affinity alone, or one core list per local rank separated by
"|", each a comma list of cores and ranges ("0-3|4-7", "0,2|1,3").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from expertmesh.errors import InvalidRequestError

AUTO, NOBIND = "auto", "nobind"


def _cores(text: str, spec: str) -> list[int]:
    """"0-3,6" -> [0, 1, 2, 3, 6]."""
    cores: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            first = last = -1
        if first < 0 or last < first:
            raise InvalidRequestError(
                f"cpu_bind must be 'auto', 'nobind' or core lists per rank like '0-3|4-7', got {spec!r} "
                f"(bad part {part.strip()!r})", param="cpu_bind", value=spec)
        cores.extend(range(first, last + 1))
    return cores


def parse_cpu_bind(spec: str) -> list[list[int]] | None:
    """The explicit core list of every local rank, None for "auto" / "nobind"; raises
    InvalidRequestError naming the bad part."""
    if spec in (AUTO, NOBIND):
        return None
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError(f"cpu_bind must be 'auto', 'nobind' or core lists like '0-3|4-7', got {spec!r}",
                                  param="cpu_bind", value=spec)
    return [_cores(group, spec) for group in spec.split("|")]


def rank_cores(spec: str, local_rank: int, local_world: int, available: list[int]) -> list[int] | None:
    """The cores local rank `local_rank` of `local_world` runs on; None: leave it unbound."""
    if spec == NOBIND or local_world == 1 and spec == AUTO:
        return None
    explicit = parse_cpu_bind(spec)
    if explicit is not None:
        if len(explicit) != local_world:
            raise InvalidRequestError(
                f"cpu_bind {spec!r} lists cores for {len(explicit)} ranks, but {local_world} ranks run on this host",
                param="cpu_bind", value=spec)
        outside = sorted(set(explicit[local_rank]) - set(available))
        if outside:
            raise InvalidRequestError(
                f"cpu_bind {spec!r} names cores {outside} this process may not run on (allowed: {available})",
                param="cpu_bind", value=spec)
        return explicit[local_rank]
    cores = sorted(available)
    if local_world >= len(cores):
        return [cores[local_rank % len(cores)]]
    lo, hi = local_rank * len(cores) // local_world, (local_rank + 1) * len(cores) // local_world
    return cores[lo:hi]


@dataclass
class CpuBinding:
    """What binding a rank changed, so close() can put it back."""

    cores: list[int]  # the cores this rank runs on, one compute thread each
    saved_affinity: set[int]  # the process's affinity before binding
    saved_threads: int  # torch's intra-op thread count before binding

    def restore(self) -> None:
        _set_affinity(self.saved_affinity)
        torch.set_num_threads(self.saved_threads)


def _set_affinity(cores: set[int] | list[int]) -> None:
    """Every thread of this process onto `cores` (Linux binds one thread per call; compute
    threads made before binding would otherwise stay free)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


def bind_rank(spec: str, local_rank: int, local_world: int) -> CpuBinding | None:
    """Pin this process to its cores and give torch one thread per core; None when unbound."""
    available = sorted(os.sched_getaffinity(0))
    cores = rank_cores(spec, local_rank, local_world, available)
    if cores is None:
        return None
    binding = CpuBinding(cores, set(available), torch.get_num_threads())
    _set_affinity(cores)
    torch.set_num_threads(len(cores))
    return binding
