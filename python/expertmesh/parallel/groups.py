"""Process groups, from the standard env:// variables.

A rank learns its place from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (what torchrun
and our own launcher set), so single-host, torchrun and multi-host launches are one code path.
Backend: gloo on CPU; NCCL on CUDA for the data plus gloo groups for the control plane
(request hand-out, batches and output gathering move small CPU tensors and Python objects).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from expertmesh.errors import CollectiveError
from expertmesh.parallel.layout import ParallelConfig


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits, from env:// variables."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = -1  # place among the ranks on this host (LOCAL_RANK); -1: same as rank
    local_world_size: int = -1  # ranks on this host (LOCAL_WORLD_SIZE); -1: same as world_size

    def __post_init__(self) -> None:
        if self.local_rank < 0:
            object.__setattr__(self, "local_rank", self.rank)
        if self.local_world_size < 0:
            object.__setattr__(self, "local_world_size", self.world_size)


def rank_info_from_env() -> RankInfo | None:
    """RankInfo if RANK and WORLD_SIZE are set (torchrun, our launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return RankInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "29500")),
        local_rank=int(os.environ.get("LOCAL_RANK", "-1")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "-1")),
    )


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for the rendezvous of single-host launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONTROL_TIMEOUT_S = 7 * 24 * 3600
# Ranks must all join within this: a spawned rank imports torch and its model code first, which
# on a loaded host takes far longer than a collective's timeout allows.
STARTUP_TIMEOUT_S = 600.0


@dataclass
class Groups:
    """The groups one rank uses: `data` carries tensors, `control` carries Python objects (both
    all ranks); `tp_data` / `tp_control` this rank's tensor-parallel group, `cp_data` its
    context-parallel ring, `replica_control` its whole replica (the batch broadcast); `leaders`
    the replicas' leaders (the first rank of each), which step together under rank 0's commands."""

    rank: int
    world_size: int
    data: dist.ProcessGroup
    control: dist.ProcessGroup
    same_host: bool
    tp_data: dist.ProcessGroup | None = None
    tp_control: dist.ProcessGroup | None = None
    cp_data: dist.ProcessGroup | None = None
    replica_control: dist.ProcessGroup | None = None
    leaders: dist.ProcessGroup | None = None


def join_store(info: RankInfo, timeout_s: float, check_peers: Callable[[], None] | None = None,
               startup_timeout_s: float = STARTUP_TIMEOUT_S) -> dist.Store:
    """The rendezvous store, once all ranks have joined it (rank 0 hosts it unless torchrun's agent
    does). While it waits, rank 0 calls `check_peers` (which raises if a rank it spawned died), so a
    rank that fails at start-up fails the launch at once instead of after the timeout.

    The rendezvous happens here rather than inside init_process_group because a rendezvous that
    fails there still advances torch's group counter, and every later launch from the same process
    then names its groups differently from its fresh ranks and hangs."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=info.rank == 0 and not agent,
                         timeout=timedelta(seconds=startup_timeout_s), wait_for_workers=False)
    store = dist.PrefixStore(f"expertmesh/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    joined = store.add("joined", 1)
    deadline = time.monotonic() + startup_timeout_s
    while joined < info.world_size:
        if check_peers is not None:
            check_peers()
        if time.monotonic() > deadline:
            raise CollectiveError(f"{joined} of {info.world_size} ranks joined the rendezvous at "
                                  f"{info.master_addr}:{info.master_port} within {startup_timeout_s:g} s")
        time.sleep(0.02)
        joined = store.add("joined", 0)
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def init_groups(info: RankInfo, device: torch.device, timeout_s: float, layout: ParallelConfig | None = None,
                check_peers: Callable[[], None] | None = None) -> Groups:
    """Join the default group (gloo on CPU, NCCL on CUDA), make the gloo control group and, for
    a `layout` with several ranks per replica, every replica's TP groups, CP rings, batch groups
    and the leaders' group (all ranks make all of them, in the same order, as torch.distributed
    requires)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = join_store(info, timeout_s, check_peers)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s))
    world = dist.group.WORLD
    assert world is not None
    # Workers wait on the control group for rank 0's next command however long the engine stays
    # idle, so it gets no practical timeout; a dead peer still fails it at once (its sockets close).
    # The data group keeps timeout_s, so a stuck all-to-all fails instead of hanging.
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    hosts: list[str | None] = [None] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=control)
    groups = Groups(info.rank, info.world_size, world, control, same_host=len(set(hosts)) == 1, leaders=control)
    if layout is None:  # a bare group (tests, benches): no replicas
        return groups
    replicas = [layout.rank(r * layout.replica_size) for r in range(layout.data_parallel_size)]
    if layout.tensor_parallel_size > 1:
        for first in replicas:
            for c in range(layout.context_parallel_size):
                ranks = layout.rank(first.global_rank + c * layout.tensor_parallel_size).tp_ranks
                data = dist.new_group(ranks, backend=backend, timeout=timedelta(seconds=timeout_s))
                # The followers wait on it for their leader's next batch however long it idles.
                ctrl = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
                if info.rank in ranks:
                    groups.tp_data, groups.tp_control = data, ctrl
    if layout.context_parallel_size > 1:
        for first in replicas:
            for t in range(layout.tensor_parallel_size):
                ranks = layout.rank(first.global_rank + t).cp_ranks
                data = dist.new_group(ranks, backend=backend, timeout=timedelta(seconds=timeout_s))
                if info.rank in ranks:
                    groups.cp_data = data
            ranks = first.replica_ranks
            ctrl = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
            if info.rank in ranks:
                groups.replica_control = ctrl
    else:
        groups.replica_control = groups.tp_control
    if layout.replica_size > 1:
        groups.leaders = dist.new_group([r.global_rank for r in replicas], backend="gloo",
                                        timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    return groups


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
