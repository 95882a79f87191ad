"""How a replica's leader hands each step's batch to its tensor-parallel followers.

The leader schedules and samples; its followers only run the model on the same tokens. Every
step the leader broadcasts over the replica's gloo control group a fixed header (what kind of
step, the arrays' lengths) and then the arrays themselves packed into one int64 tensor: two
broadcasts of small CPU tensors, no pickling. Kinds: a batch, an idle step (expert
parallelism: the replica's ranks still join every MoE all-to-all) and stop.

Legend: T tokens, N requests, MB block-table columns, S sampled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

BATCH, IDLE, STOP = 0, 1, 2
_FLAT = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "logits_indices")
_HEADER = 3 + len(_FLAT)  # kind, N, MB, then the length of each flat array


@dataclass
class Batch:
    """The arrays ModelRunner.execute reads, as a follower receives them."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_start_loc: np.ndarray  # [N+1]
    seq_lens: np.ndarray  # [N]
    logits_indices: np.ndarray  # [S]
    block_tables: np.ndarray  # [N, MB]


class BatchChannel:
    def __init__(self, group: dist.ProcessGroup, leader: int) -> None:
        self.group, self.leader = group, leader  # leader: its global rank

    def send(self, kind: int, batch=None) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = kind
        if kind != BATCH:
            dist.broadcast(header, self.leader, group=self.group)
            return
        arrays = [np.asarray(getattr(batch, name)) for name in _FLAT]
        tables = np.asarray(batch.block_tables)  # [N, MB]
        header[1], header[2] = tables.shape
        header[3:] = torch.tensor([a.size for a in arrays])
        dist.broadcast(header, self.leader, group=self.group)
        body = torch.from_numpy(np.concatenate([a.astype(np.int64).ravel() for a in (*arrays, tables)]))
        dist.broadcast(body, self.leader, group=self.group)

    def receive(self) -> tuple[int, Batch | None]:
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, self.leader, group=self.group)
        kind, rows, cols, *lengths = header.tolist()
        if kind != BATCH:
            return kind, None
        body = torch.empty(sum(lengths) + rows * cols, dtype=torch.int64)
        dist.broadcast(body, self.leader, group=self.group)
        values = body.numpy()
        parts, at = {}, 0
        for name, n in zip(_FLAT, lengths):
            parts[name], at = values[at: at + n], at + n
        return kind, Batch(**parts, block_tables=values[at:].reshape(rows, cols))
