"""Process groups for expert parallelism, from the standard env:// variables.

A rank learns its place from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (what torchrun
and our own launcher set), so single-host, torchrun and multi-host launches are one code path.
Backend: gloo on CPU; NCCL on CUDA for the data plus a gloo group for the control plane
(request hand-out and output gathering move Python objects, which need a CPU group).

The process-wide ExpertParallel state (set once per rank before the model is built) is how
FusedMoE learns which experts it owns without layers/ knowing about processes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits, from env:// variables."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def rank_info_from_env() -> RankInfo | None:
    """RankInfo if RANK and WORLD_SIZE are set (torchrun, our launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return RankInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "29500")),
    )


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for the rendezvous of single-host launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONTROL_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class Groups:
    """The groups one rank uses: `data` carries tensors, `control` carries Python objects."""

    rank: int
    world_size: int
    data: dist.ProcessGroup
    control: dist.ProcessGroup
    same_host: bool


def init_groups(info: RankInfo, device: torch.device, timeout_s: float) -> Groups:
    """Join the default group (gloo on CPU, NCCL on CUDA) and make the gloo control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    world = dist.group.WORLD
    assert world is not None
    # Workers wait on the control group for rank 0's next command however long the engine stays
    # idle, so it gets no practical timeout; a dead peer still fails it at once (its sockets close).
    # The data group keeps timeout_s, so a stuck all-to-all fails instead of hanging.
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    hosts: list[str | None] = [None] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=control)
    return Groups(info.rank, info.world_size, world, control, same_host=len(set(hosts)) == 1)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the process-wide expert-parallel state FusedMoE reads at construction ----------------

_EXPERT_PARALLEL = None  # ExpertParallel | None (all_to_all.py); None means EP=1


def set_expert_parallel(ep) -> None:
    global _EXPERT_PARALLEL
    _EXPERT_PARALLEL = ep


def get_expert_parallel():
    """The ExpertParallel of this process, or None when EP is off (world size 1)."""
    return _EXPERT_PARALLEL
