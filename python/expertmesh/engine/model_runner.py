"""Turns a scheduler step into tensors, runs the model over the paged KV cache, returns logits.

With a RankSetup the model is built for one rank of a parallel layout (parallel/apply.py
shards it before its weights load). A replica leader with followers (its other TP and CP
ranks) hands every batch (and every idle step) to them first through the replica's batch
channel; TP ranks run the same tokens, CP ranks each the tokens they hold. Followers run
`follow()` until the leader stops them.

Legend: T tokens this step, N requests this step, S requests that sample, MB blocks per
request in the batch table, NB KV blocks, B block size, NKV KV heads held, D head dim, V vocab.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import numpy as np
import torch

from expertmesh.config import EngineConfig
from expertmesh.layers.attention import AttentionMetadata, allocate_kv_caches
from expertmesh.layers.moe import FusedMoE
from expertmesh.models.loader import load_model
from expertmesh.parallel.apply import apply_parallelism
from expertmesh.parallel.batch_channel import BATCH, IDLE, STOP
from expertmesh.models.decoder import SelfAttentionBlock
from expertmesh.parallel.launch import RankSetup
from expertmesh.quant.apply import weight_bytes
from expertmesh.step_profile import StepProfile

logger = logging.getLogger(__name__)


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's on CUDA, the host's RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelRunner:
    """Holds the model and its KV cache on one device; `execute()` runs one step."""

    def __init__(self, config: EngineConfig, rank: RankSetup | None = None) -> None:
        self.device = torch.device(config.device)
        self.rank = rank
        shard = None if rank is None else partial(apply_parallelism, layout=rank.layout, tp=rank.tp, ep=rank.ep,
                                                  cp=rank.cp)
        self.model, self.hf_config = load_model(
            config.model_path, dtype=config.dtype, device=self.device, show_progress=config.show_progress,
            shard=shard, quantization=config.quantization,
        )
        self.dtype = self.model.dtype
        self.vocab_size = int(self.hf_config["vocab_size"])
        self.max_model_len = config.resolve_max_model_len(int(self.hf_config.get("max_position_embeddings", 4096)))
        self.kv_cache_dtype = self.dtype  # read in place by every attention backend, CPU included
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        bytes_per_block = 2 * self.model.num_layers * elem * config.block_size * self.model.num_kv_heads \
            * self.model.head_dim
        self.weight_bytes = weight_bytes(self.model)  # this rank's share, quantized values and scales included
        self.num_kv_blocks = config.resolve_kv_cache_blocks(self.max_model_len, bytes_per_block, self.weight_bytes,
                                                            device_memory(self.device))
        logger.info("model weights: %.1f MiB (%s), KV cache: %d blocks of %d bytes", self.weight_bytes / 2**20,
                    self.model.quant_config.method if self.model.quant_config else self.dtype, self.num_kv_blocks,
                    bytes_per_block)
        self.kv_caches = allocate_kv_caches(self.model.num_layers, self.num_kv_blocks, config.block_size,
                                            self.model.num_kv_heads, self.model.head_dim, self.kv_cache_dtype,
                                            self.device)
        self.profile = rank.profile if rank is not None else StepProfile(enabled=config.step_breakdown)
        if self.profile.enabled:
            self._time_sections()
        self._exchanges = [m for m in self.model.modules() if isinstance(m, FusedMoE) and m.exchange is not None]
        # The leader of a replica with TP / CP followers hands them every step.
        self._channel = rank.channel if rank is not None and rank.layout.is_replica_leader else None
        self._cp = rank.cp if rank is not None else None

    def _time_sections(self) -> None:
        """Hooks that open the profile's attention and experts sections around those blocks."""
        for module in self.model.modules():
            name = "attention" if isinstance(module, SelfAttentionBlock) else \
                "experts" if isinstance(module, FusedMoE) else None
            if name is not None:
                module.register_forward_pre_hook(lambda _m, _args, name=name: self.profile.push(name))
                module.register_forward_hook(lambda _m, _args, _out: self.profile.pop())

    @property
    def parallel(self) -> bool:
        """True when steps are collective: a peer rank waits on every one of this rank's steps."""
        return self.rank is not None and self.rank.layout.config.world_size > 1

    @property
    def expert_parallel(self) -> bool:
        """True when MoE layers exchange tokens with other ranks (every step must join)."""
        return bool(self._exchanges)

    @torch.inference_mode()
    def idle_step(self) -> None:
        """A step with no tokens: under expert parallelism this rank (and its TP followers)
        still join every MoE layer's all-to-all with zero rows, so ranks with work never wait."""
        if self._channel is not None:
            self._channel.send(IDLE)
        self._begin_step()
        hidden = self.model.config.hidden_size
        for moe in self._exchanges:
            x = torch.empty((0, hidden), dtype=self.dtype, device=self.device)  # [0, H]
            ids = torch.empty((0, moe.top_k), dtype=torch.long, device=self.device)  # [0, k]
            moe.experts(x, torch.empty((0, moe.top_k), dtype=torch.float32, device=self.device), ids)

    def _begin_step(self) -> None:
        if self.rank is not None and self.rank.ep is not None:
            self.rank.ep.begin_step()

    def _tensor(self, array, dtype: torch.dtype) -> torch.Tensor:
        # torch.from_numpy shares the scheduler's buffer; .to() copies only when it must.
        return torch.from_numpy(array).to(device=self.device, dtype=dtype)

    @torch.inference_mode()
    def execute(self, batch) -> torch.Tensor:
        """Compute one step; returns fp32 logits [S, V] for the requests that sample."""
        if self._channel is not None:
            self._channel.send(BATCH, batch)
        self._begin_step()
        if self._cp is not None:
            return self._execute_cp(batch)
        input_ids = self._tensor(batch.input_ids, torch.long)  # [T]
        meta = AttentionMetadata(
            positions=self._tensor(batch.positions, torch.long),  # [T]
            slot_mapping=self._tensor(batch.slot_mapping, torch.long),  # [T]
            query_start_loc=self._tensor(batch.query_start_loc, torch.int32),  # [N+1]
            seq_lens=self._tensor(batch.seq_lens, torch.int32),  # [N]
            block_tables=self._tensor(batch.block_tables, torch.int32),  # [N, MB]
        )
        hidden = self.model(input_ids, meta.positions, self.kv_caches, meta)  # [T, H]
        if len(batch.logits_indices) == 0:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        last = hidden[self._tensor(batch.logits_indices, torch.long)]  # [S, H]
        return self.model.compute_logits(last)  # [S, V]

    def _execute_cp(self, batch) -> torch.Tensor:
        """A step on a CP rank: the model runs on the tokens this rank holds (context_parallel.py);
        CP rank 0 computes the logits, the others return none."""
        cfg = self.model.config
        step = self._cp.begin(batch, cfg.num_heads, cfg.num_kv_heads, self.num_kv_blocks, self.device)
        local, plain = step.local, step.plain_reqs
        qsl = batch.query_start_loc
        lens = qsl[plain + 1] - qsl[plain]  # [Np] new tokens of each plain request
        first_slot = self._cp.rank * self.num_kv_blocks * self._cp.block_size  # start of this rank's block ids
        meta = AttentionMetadata(
            positions=self._tensor(batch.positions[local], torch.long),  # [Tl]
            slot_mapping=self._tensor(batch.slot_mapping[local] - first_slot, torch.long),  # [Tl] in this cache
            query_start_loc=self._tensor(np.concatenate([[0], np.cumsum(lens)]), torch.int32),  # [Np+1]
            seq_lens=self._tensor(batch.seq_lens[plain], torch.int32),  # [Np]
            block_tables=self._tensor(batch.block_tables[plain], torch.int32),  # [Np, MB]
        )
        hidden = self.model(self._tensor(batch.input_ids[local], torch.long), meta.positions, self.kv_caches,
                            meta)  # [Tl, H]
        last = self._cp.gather_samples(hidden)  # [S, H] on CP rank 0
        if last is None or last.shape[0] == 0:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        return self.model.compute_logits(last)  # [S, V]

    def follow(self) -> None:
        """A TP follower's life: run the leader's steps until it says stop."""
        assert self.rank is not None and self.rank.channel is not None
        while True:
            kind, batch = self.rank.channel.receive()
            if kind == STOP:
                return
            if kind == IDLE:
                self.idle_step()
            else:
                self.execute(batch)

    def close(self, graceful: bool = True) -> None:
        """Stop the followers (leader), then the ranks this process spawned and the groups."""
        if self.rank is None:
            return
        if self._channel is not None and graceful:
            try:
                self._channel.send(STOP)
            except Exception:  # noqa: BLE001 - a dead follower cannot be told; close() goes on
                graceful = False
        self.rank.close(graceful)
        self.rank = None
