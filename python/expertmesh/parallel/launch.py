"""Starting expert-parallel ranks: rank processes on one host, and one rank's setup.

`spawn_workers` starts ranks 1..R-1 as `python -m expertmesh.parallel.worker` with the env://
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the engine config as JSON; the
calling process is rank 0. Under torchrun (or any launcher that sets those variables) nothing
is spawned: every process is already a rank. `setup_rank` joins the groups, builds the
transport and the ExpertParallel state the MoE layers read while the model is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

from expertmesh.config import EngineConfig
from expertmesh.models.loader import read_hf_config, resolve_dtype
from expertmesh.models.registry import get_model_class
from expertmesh.parallel.all_to_all import ExpertParallel
from expertmesh.parallel.groups import Groups, RankInfo, init_groups
from expertmesh.parallel.shm import ShmTransport
from expertmesh.parallel.transport import TorchTransport, Transport

CONFIG_ENV = "EXPERTMESH_EP_CONFIG"


def config_to_json(config: EngineConfig) -> str:
    return json.dumps({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})


def spawn_workers(config: EngineConfig, info: RankInfo) -> list[subprocess.Popen]:
    """Start ranks 1..R-1 of a single-host group whose rank 0 is this process."""
    procs = []
    for rank in range(1, info.world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(info.world_size), MASTER_ADDR=info.master_addr,
                   MASTER_PORT=str(info.master_port), LOCAL_RANK=str(rank), **{CONFIG_ENV: config_to_json(config)})
        procs.append(subprocess.Popen([sys.executable, "-m", "expertmesh.parallel.worker"], env=env))
    return procs


def make_transport(config: EngineConfig, groups: Groups, device: torch.device) -> Transport:
    """Shared memory for CPU ranks on one host (unless told otherwise), else torch.distributed."""
    hf = read_hf_config(config.model_path)
    cfg = get_model_class(hf).config_from_hf(hf)
    kind = config.ep_transport
    if kind == "auto":
        kind = "shm" if device.type == "cpu" and groups.same_host else "torch"
    if kind == "torch":
        return TorchTransport(groups.data, groups.rank, groups.world_size, device)
    if device.type != "cpu" or not groups.same_host:
        raise ValueError("ep_transport 'shm' needs CPU ranks on one host; use 'torch' (or 'auto')")
    elem = torch.empty((), dtype=resolve_dtype(config.dtype, hf, device)).element_size()
    # Dispatch rows: hidden + k int64 expert ids + k fp32 weights; combine rows: fp32 hidden.
    row_bytes = max(cfg.hidden_size * elem + 12 * cfg.top_k, 4 * cfg.hidden_size)
    return ShmTransport(groups.control, groups.rank, groups.world_size, max_tokens_per_rank(config), row_bytes,
                        timeout_s=config.ep_timeout_s)


def max_tokens_per_rank(config: EngineConfig) -> int:
    return config.ep_max_tokens_per_rank or config.max_num_batched_tokens


def setup_rank(config: EngineConfig, info: RankInfo) -> tuple[Groups, ExpertParallel]:
    device = torch.device(config.device)
    groups = init_groups(info, device, config.ep_timeout_s)
    transport = make_transport(config, groups, device)
    return groups, ExpertParallel(info.rank, info.world_size, transport, max_tokens_per_rank(config))
