"""Rank 0's command to the replica leaders each step, and their replies, as byte frames.

The data-parallel engine (engine/dp_engine.py) sends one command per step (new requests,
aborts) and every leader answers once (its outputs); what the frames hold is dp_frames.py's
business, this file only moves bytes. Two ways:
  ShmControlChannel    leaders on one host: each rank owns a mailbox in shared memory (rank 0's
                       holds the command, leader i's its reply). A frame is written, then its
                       sequence number is published; the reader spins briefly, then yields,
                       then naps, so an idle leader costs nothing and a waiting one never keeps
                       a core from a rank that computes. A frame larger than the mailbox goes
                       over gloo instead, flagged in the mailbox (rare: a burst of long prompts).
  TorchControlChannel  anywhere: gloo broadcast/gather of the lengths, then the bytes.
Command and reply alternate strictly (rank 0 sends the next command only after it has read
every reply, a leader replies only after reading the command), so one mailbox per rank suffices.

Replaces torch.distributed's broadcast_object_list / gather_object, which pickle and move
their objects in four to five gloo collectives a step.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.errors import CollectiveError
from expertmesh.parallel.shm import alive, map_segments, unmap_segments

MAILBOX_BYTES = 1 << 20  # per rank; a step's outputs for 256 sequences are ~20 KB


class TorchControlChannel:
    """Frames over a gloo group: the lengths first, then the bytes."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size

    def broadcast(self, frame: bytes | None) -> bytes:
        """Rank 0 passes the frame, the others get it."""
        size = torch.tensor([len(frame) if frame is not None else 0], dtype=torch.int64)
        dist.broadcast(size, group=self.group, group_src=0)
        data = _tensor(frame) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            dist.broadcast(data, group=self.group, group_src=0)
        return frame if self.rank == 0 else data.numpy().tobytes()

    def gather(self, frame: bytes) -> list[bytes] | None:
        """Every rank's frame on rank 0 (in rank order); None elsewhere."""
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(frame)], dtype=torch.int64), group=self.group)
        longest = max(int(s) for s in sizes)
        if longest == 0:
            return [b""] * self.world_size if self.rank == 0 else None
        data = torch.zeros(longest, dtype=torch.uint8)
        data[: len(frame)] = _tensor(frame)
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(data, out, group=self.group, group_dst=0)
        return None if out is None else [o[: int(s)].numpy().tobytes() for o, s in zip(out, sizes)]

    def close(self) -> None:
        """Nothing to free: the group goes with destroy_groups."""


def _tensor(frame: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.empty(0, dtype=torch.uint8)


class ShmControlChannel:
    """Collective constructor over the leaders' group (all on one host)."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, capacity: int = MAILBOX_BYTES) -> None:
        self.group, self.rank, self.world_size, self.capacity = group, rank, world_size, capacity
        self._header = world_size + 2  # pids [R], seq, length
        self._maps = map_segments(group, rank, world_size, self._header * 8 + capacity, "control")
        self._ints = [np.frombuffer(m, dtype=np.int64, count=self._header) for m in self._maps]
        self._data = [np.frombuffer(m, dtype=np.uint8, offset=self._header * 8) for m in self._maps]
        self._pids = self._ints[rank][:world_size].copy()
        self._seq = 0  # frames this rank has sent (and, in lockstep, read from each peer)
        self._read = [0] * world_size  # frames read from each rank's mailbox

    def _post(self, frame: bytes, dst: int | None) -> None:
        """Write my next frame into my mailbox; oversized ones also go over gloo (to dst, or to
        everyone for a broadcast)."""
        ints, data = self._ints[self.rank], self._data[self.rank]
        oversized = len(frame) > self.capacity
        if not oversized:
            data[: len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        ints[self.world_size + 1] = -len(frame) if oversized else len(frame)
        self._seq += 1
        ints[self.world_size] = self._seq  # published last: the reader trusts what it sees after this
        if oversized:
            tensor = _tensor(frame)
            if dst is None:
                dist.broadcast(tensor, group=self.group, group_src=self.rank)
            else:
                dist.send(tensor, group=self.group, group_dst=dst)

    def _take(self, src: int, broadcast: bool) -> bytes:
        """The next frame from rank src's mailbox (waits for it)."""
        ints = self._ints[src]
        want = self._read[src] + 1
        self._wait(ints, want, src)
        self._read[src] = want
        length = int(ints[self.world_size + 1])
        if length >= 0:
            return self._data[src][:length].tobytes()
        tensor = torch.empty(-length, dtype=torch.uint8)
        if broadcast:
            dist.broadcast(tensor, group=self.group, group_src=src)
        else:
            dist.recv(tensor, group=self.group, group_src=src)
        return bytes(tensor.numpy())

    def _wait(self, ints: np.ndarray, want: int, src: int) -> None:
        seq = ints[self.world_size:self.world_size + 1]  # a view: re-read on every test
        spins, start = 0, time.monotonic()
        last_check = start
        while seq[0] != want:
            spins += 1
            if spins > 64:  # peers compute on other cores; past a short spin give the core away
                os.sched_yield() if spins < 4096 else time.sleep(50e-6 if time.monotonic() - start < 1 else 1e-3)
                now = time.monotonic()
                if now - last_check > 0.5:
                    last_check = now
                    if not alive(int(self._pids[src])):
                        raise CollectiveError(f"rank {self.rank}: leader rank {src} of the control channel died")

    def broadcast(self, frame: bytes | None) -> bytes:
        if self.rank == 0:
            assert frame is not None
            self._post(frame, None)
            return frame
        return self._take(0, broadcast=True)

    def gather(self, frame: bytes) -> list[bytes] | None:
        if self.rank != 0:
            self._post(frame, 0)
            return None
        return [frame] + [self._take(src, broadcast=False) for src in range(1, self.world_size)]

    def close(self) -> None:
        self._ints, self._data = [], []
        unmap_segments(self._maps)
        self._maps = []
