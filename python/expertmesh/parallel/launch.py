"""Starting ranks: rank processes on one host, and one rank's setup.

`spawn_workers` starts ranks 1..R-1 as `python -m <module>` (engine/rank_worker.py) with the env://
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the engine config as JSON; the
calling process is rank 0. Under torchrun (or any launcher that sets those variables) nothing
is spawned: every process is already a rank. `setup_rank` joins the groups and builds what the
rank's model needs -- its cores and threads (cpu_binding.py), its place in the layout, the TP
allreduce, the EP transport, the CP ring, the batch channel of its replica, the DP control channel -- as
one `RankSetup`, which apply.py and the model runner read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from expertmesh.config import EngineConfig
from expertmesh.errors import CollectiveError
from expertmesh.models.loader import read_hf_config, resolve_dtype
from expertmesh.models.registry import get_model_class
from expertmesh.parallel.all_to_all import ExpertParallel
from expertmesh.parallel.allreduce import ShmAllReduce, TorchAllReduce
from expertmesh.parallel.batch_channel import BatchChannel
from expertmesh.parallel.context_parallel import ContextParallel
from expertmesh.parallel.control_channel import ShmControlChannel, TorchControlChannel
from expertmesh.parallel.cpu_binding import CpuBinding, bind_rank
from expertmesh.parallel.groups import Groups, RankInfo, destroy_groups, init_groups
from expertmesh.parallel.layout import RankLayout
from expertmesh.parallel.ring_attention import TorchRing
from expertmesh.parallel.shm import ShmTransport
from expertmesh.parallel.shm_ring import ShmRing
from expertmesh.parallel.tensor_parallel import TensorParallel
from expertmesh.step_profile import StepProfile
from expertmesh.parallel.transport import TorchTransport, Transport

CONFIG_ENV = "EXPERTMESH_RANK_CONFIG"


def config_to_json(config: EngineConfig) -> str:
    return json.dumps({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})


def spawn_workers(config: EngineConfig, info: RankInfo, module: str) -> list[subprocess.Popen]:
    """Start ranks 1..R-1 of a single-host group whose rank 0 is this process, each running
    `python -m module`."""
    procs = []
    for rank in range(1, info.world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(info.world_size), MASTER_ADDR=info.master_addr,
                   MASTER_PORT=str(info.master_port), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(info.world_size), **{CONFIG_ENV: config_to_json(config)})
        procs.append(subprocess.Popen([sys.executable, "-m", module], env=env))
    return procs


def check_procs(procs: list[subprocess.Popen]) -> None:
    """CollectiveError if one of the ranks this process spawned (ranks 1.., in order) has exited."""
    for rank, proc in enumerate(procs, start=1):
        code = proc.poll()
        if code is not None:
            raise CollectiveError(f"rank {rank} (pid {proc.pid}) exited with code {code}")


@dataclass
class RankSetup:
    """Everything one rank's model and engine need to run in parallel."""

    layout: RankLayout
    groups: Groups
    tp: TensorParallel | None  # None with one TP rank
    ep: ExpertParallel | None  # None with expert parallelism off
    channel: BatchChannel | None  # the replica's batch broadcast; None with one rank per replica
    cp: ContextParallel | None = None  # this rank's place in its replica's CP ring; None with one CP rank
    control: ShmControlChannel | TorchControlChannel | None = None  # rank 0 <-> leaders; None: 1 replica, follower
    binding: CpuBinding | None = None  # this rank's cores and threads (cpu_binding.py); None: unbound
    profile: StepProfile = field(default_factory=StepProfile)  # this rank's step breakdown (off unless asked)
    procs: list[subprocess.Popen] = field(default_factory=list)  # ranks this process spawned

    def check_procs(self) -> None:
        """CollectiveError if a rank this process spawned has exited."""
        check_procs(self.procs)

    def close(self, graceful: bool = True) -> None:
        """Wait for (then kill) the spawned ranks, free the buffers, leave the groups."""
        for proc in self.procs:
            try:
                proc.wait(timeout=10 if graceful else 0.5)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.tp is not None:
            self.tp.close()
        if self.ep is not None:
            self.ep.transport.close()
        if self.control is not None:
            self.control.close()
        if self.cp is not None:
            self.cp.ring.close()
        destroy_groups()
        if self.binding is not None:
            self.binding.restore()
            self.binding = None


def _row_bytes(config: EngineConfig, device: torch.device) -> tuple[int, int]:
    """(bytes per dispatched row, bytes per hidden state in fp32) of the model."""
    hf = read_hf_config(config.model_path)
    cfg = get_model_class(hf).config_from_hf(hf)
    elem = torch.empty((), dtype=resolve_dtype(config.dtype, hf, device)).element_size()
    # Dispatch rows: hidden + k int64 expert ids + k fp32 weights; combine rows: fp32 hidden.
    return max(cfg.hidden_size * elem + 12 * cfg.top_k, 4 * cfg.hidden_size), 4 * cfg.hidden_size


def make_transport(config: EngineConfig, groups: Groups, device: torch.device, profile: StepProfile) -> Transport:
    """Shared memory for CPU ranks on one host (unless told otherwise), else torch.distributed."""
    kind = config.ep_transport
    if kind == "auto":
        kind = "shm" if device.type == "cpu" and groups.same_host else "torch"
    if kind == "torch":
        return TorchTransport(groups.data, groups.rank, groups.world_size, device)
    if device.type != "cpu" or not groups.same_host:
        raise ValueError("ep_transport 'shm' needs CPU ranks on one host; use 'torch' (or 'auto')")
    return ShmTransport(groups.control, groups.rank, groups.world_size, max_tokens_per_rank(config),
                        _row_bytes(config, device)[0], timeout_s=config.ep_timeout_s, profile=profile)


def make_allreduce(config: EngineConfig, groups: Groups, layout: RankLayout, device: torch.device):
    kind = config.allreduce
    if kind == "auto":
        kind = "shm" if device.type == "cpu" and groups.same_host else "torch"
    if kind == "torch":
        return TorchAllReduce(groups.tp_data)
    if device.type != "cpu" or not groups.same_host:
        raise ValueError("allreduce 'shm' needs CPU ranks on one host; use 'torch' (or 'auto')")
    # Buffers for the largest message: a step's hidden states in fp32 (logits gather in chunks).
    max_bytes = config.max_num_batched_tokens * _row_bytes(config, device)[1]
    return ShmAllReduce(groups.tp_control, layout.tp_rank, layout.config.tensor_parallel_size, max_bytes,
                        timeout_s=config.ep_timeout_s)


def make_ring(config: EngineConfig, groups: Groups, layout: RankLayout, device: torch.device):
    """The CP ring's transport: shared memory for CPU ranks on one host, else torch.distributed."""
    kind = config.cp_transport
    if kind == "auto":
        kind = "shm" if device.type == "cpu" and groups.same_host else "torch"
    if kind == "torch":
        return TorchRing(groups.cp_data, layout.cp_ranks, layout.cp_rank, config.ep_timeout_s)
    if device.type != "cpu" or not groups.same_host:
        raise ValueError("cp_transport 'shm' needs CPU ranks on one host; use 'torch' (or 'auto')")
    return ShmRing(groups.cp_data, layout.cp_ranks, layout.cp_rank, config.ep_timeout_s)


def max_tokens_per_rank(config: EngineConfig) -> int:
    return config.ep_max_tokens_per_rank or config.max_num_batched_tokens


def setup_rank(config: EngineConfig, info: RankInfo, procs: list[subprocess.Popen] | None = None) -> RankSetup:
    """Join the groups and build this rank's parallel parts; `procs`: the ranks this process spawned."""
    procs = procs or []
    device = torch.device(config.device)
    layout = config.parallel.rank(info.rank)
    config.parallel.check_world(info.world_size)
    try:
        groups = init_groups(info, device, config.ep_timeout_s, config.parallel,
                             check_peers=lambda: check_procs(procs))
        return _build(config, info, device, layout, groups, procs)
    except BaseException:
        destroy_groups()  # or the next launch from this process finds a group already made
        raise


def _build(config: EngineConfig, info: RankInfo, device: torch.device, layout: RankLayout, groups: Groups,
           procs: list[subprocess.Popen]) -> RankSetup:
    tp_size, cp_size = config.parallel.tensor_parallel_size, config.parallel.context_parallel_size
    tp = channel = ep = cp = None
    profile = StepProfile(enabled=config.step_breakdown)
    if tp_size > 1:
        tp = TensorParallel(layout.tp_rank, tp_size, make_allreduce(config, groups, layout, device))
    if cp_size > 1:
        cp = ContextParallel(make_ring(config, groups, layout, device), config.cp_min_tokens, config.block_size,
                             config.cp_variant)
    if config.parallel.replica_size > 1:
        channel = BatchChannel(groups.replica_control, leader=layout.replica_ranks[0])
    if config.parallel.enable_expert_parallel:
        ep = ExpertParallel(info.rank, info.world_size, make_transport(config, groups, device, profile),
                            max_tokens_per_rank(config), profile)
    control = None
    if config.parallel.data_parallel_size > 1 and layout.is_replica_leader:
        # Shared memory between CPU leaders on one host (whatever the device of the model: it moves Python data).
        make = ShmControlChannel if groups.same_host else TorchControlChannel
        control = make(groups.leaders, layout.dp_rank, config.parallel.data_parallel_size)
    binding = bind_rank(config.cpu_bind, info.local_rank, info.local_world_size) if device.type == "cpu" else None
    return RankSetup(layout, groups, tp, ep, channel, cp, control, binding, profile, procs)
