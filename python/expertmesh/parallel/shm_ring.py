"""Point-to-point messages between a CP ring's CPU processes on one host, through shared memory.

The same interface as ring_attention.TorchRing (`post` starts sends and receives, `wait`
finishes them), for CP ranks on one host. Each rank owns one segment (map_segments: a
/dev/shm file mapped by every peer, then unlinked). Layout of rank d's segment:

    pids  int64 [N]            process ids, so a waiting rank can tell a dead peer
    head  int64 [N]            head[s]: chunks source s has written to d so far
    tail  int64 [N]            tail[s]: chunks d has consumed from s so far
    data  uint8 [N, K, C]      per source, a ring of K slots of C bytes

Every ordered pair (s, d) is a byte stream cut into chunks of C bytes: chunk i goes to slot
i mod K of d's segment once d has consumed chunk i - K (i - tail[s] < K), and head[s] = i + 1
publishes it (x86 keeps stores in program order: the data is visible before the count). Both
ends know every message's size from the shared plan, so a stream carries only bytes and the
n-th message on a pair is what both sides call the n-th. `post` writes what fits at once and
leaves the rest queued; `wait` moves every queued send and receive along (not only its own) until
its messages are through -- so a message larger than K slots cannot deadlock a ring whose ranks
all send before they receive.

A peer that dies leaves its counts still: waits spin briefly, then nap, check the peers' pids
and raise CollectiveError within about a second, and give up after `timeout_s` in any case.

Legend: N ring ranks, K slots per source, C bytes per slot.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.errors import CollectiveError
from expertmesh.parallel.shm import alive, map_segments, unmap_segments

SLOTS_PER_SOURCE = 4
SLOT_BYTES = 1 << 20


class _Segment:
    """numpy / torch views over one rank's mapped segment."""

    def __init__(self, buf, size: int, slots: int, slot_bytes: int) -> None:
        ints = np.frombuffer(buf, dtype=np.int64, count=3 * size)
        self.pids, self.head, self.tail = ints[:size], ints[size:2 * size], ints[2 * size:]  # [N] each
        data = np.frombuffer(buf, dtype=np.uint8, offset=3 * size * 8)
        self.data = torch.from_numpy(data).view(size, slots, slot_bytes)  # [N, K, C]

    @staticmethod
    def nbytes(size: int, slots: int, slot_bytes: int) -> int:
        return 3 * size * 8 + size * slots * slot_bytes


@dataclass
class _Transfer:
    """One message on its pair's stream: `raw` [bytes] uint8, `done` bytes moved so far."""

    peer: int
    raw: torch.Tensor
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done == self.raw.numel()


class ShmRing:
    """Collective constructor: every rank of the CP ring builds one over the same group."""

    name = "shm"

    def __init__(self, group: dist.ProcessGroup, ranks: list[int], rank: int, timeout_s: float,
                 slots: int = SLOTS_PER_SOURCE, slot_bytes: int = SLOT_BYTES) -> None:
        self.ranks, self.rank, self.size = ranks, rank, len(ranks)
        self.timeout_s, self.slots, self.slot_bytes = timeout_s, slots, slot_bytes
        self._maps = map_segments(group, rank, self.size, _Segment.nbytes(self.size, slots, slot_bytes), "cp")
        self._segs = [_Segment(m, self.size, slots, slot_bytes) for m in self._maps]
        self._mine = self._segs[rank]
        self._sent = [0] * self.size  # chunks written to each peer
        self._received = [0] * self.size  # chunks consumed from each peer
        self._sends: list[deque[_Transfer]] = [deque() for _ in range(self.size)]  # queued, per destination
        self._recvs: list[deque[_Transfer]] = [deque() for _ in range(self.size)]  # queued, per source

    def post(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> list[_Transfer]:
        """Start sends/receives (CP rank -> tensor; receive tensors contiguous); returns handles
        for `wait`. A send tensor must stay unchanged, a receive tensor unread, until then."""
        handles = []
        for queues, peers, inbound in ((self._sends, sends, False), (self._recvs, recvs, True)):
            for peer, t in peers.items():
                if t.numel() == 0:  # both ends skip an empty message: its size is in the plan
                    continue
                assert not inbound or t.is_contiguous(), "a receive buffer is written in place"
                handles.append(_Transfer(peer, t.contiguous().view(-1).view(torch.uint8)))
                queues[peer].append(handles[-1])
        self._progress()
        return handles

    def wait(self, handles: list[_Transfer]) -> None:
        spins, start, checked = 0, time.monotonic(), time.monotonic()
        while not all(h.finished for h in handles):
            if self._progress():
                spins = 0
                continue
            spins += 1
            if spins > 200:
                time.sleep(0 if spins < 2000 else 1e-4)
                now = time.monotonic()
                if now - checked > 0.5:
                    checked = now
                    self._check_peers(now - start, {h.peer for h in handles if not h.finished})

    def _progress(self) -> bool:
        """Move every queued transfer as far as the slots allow; True if any byte moved."""
        moved = False
        for peer in range(self.size):
            moved |= self._push(peer)
            moved |= self._pull(peer)
        return moved

    def _push(self, dst: int) -> bool:
        queue, seg, moved = self._sends[dst], self._segs[dst], False
        while queue and self._sent[dst] - int(seg.tail[self.rank]) < self.slots:
            t = queue[0]
            n = min(self.slot_bytes, t.raw.numel() - t.done)
            seg.data[self.rank, self._sent[dst] % self.slots, :n].copy_(t.raw[t.done:t.done + n])
            self._sent[dst] += 1
            seg.head[self.rank] = self._sent[dst]  # after the data: publishes the chunk
            t.done += n
            moved = True
            if t.finished:
                queue.popleft()
        return moved

    def _pull(self, src: int) -> bool:
        queue, seg, moved = self._recvs[src], self._mine, False
        while queue and int(seg.head[src]) > self._received[src]:
            t = queue[0]
            n = min(self.slot_bytes, t.raw.numel() - t.done)
            t.raw[t.done:t.done + n].copy_(seg.data[src, self._received[src] % self.slots, :n])
            self._received[src] += 1
            seg.tail[src] = self._received[src]  # after the copy: frees the slot
            t.done += n
            moved = True
            if t.finished:
                queue.popleft()
        return moved

    def _check_peers(self, waited: float, waiting_on: set[int]) -> None:
        # A peer this wait needs is named first: others may have exited after finishing cleanly.
        peers = sorted(set(range(self.size)) - {self.rank}, key=lambda x: (x not in waiting_on, x))
        dead = [x for x in peers if not alive(int(self._mine.pids[x]))]
        if dead:
            raise CollectiveError(f"context-parallel ring: CP rank {self.rank} of {self.size} lost CP rank "
                                  f"{dead[0]} (process {int(self._mine.pids[dead[0]])} exited)")
        if waited > self.timeout_s:
            raise CollectiveError(f"context-parallel ring: CP rank {self.rank} of {self.size} waited "
                                  f"{waited:.0f} s for a peer (timeout {self.timeout_s:.0f} s)")

    def close(self) -> None:
        self._segs = []
        self._mine = None
        unmap_segments(self._maps)
