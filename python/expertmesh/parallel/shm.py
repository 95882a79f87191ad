"""Shared-memory all-to-all for CPU rank processes on one host.

Each rank owns one segment (a file in /dev/shm, mapped by every rank once, at setup, then
unlinked so nothing leaks even if a process is killed). Layout of rank d's segment:

    pids   int64 [R]              process ids, so a waiting rank can tell a dead peer
    flags  int64 [P, R]           flags[p, s] = seq + 1 once source s's call seq is in slot p
    counts int64 [P, R]           rows source s wrote into slot p
    data   uint8 [P, R, C, Wmax]  receive slots: phase p, source s, C rows of Wmax bytes

A call: take the next phase from the Rust PhaseRing, write rows straight into every peer's
slot [p, me] (no staging copy on the sender), store the count, then the flag; wait until all
R flags of my slot p read seq + 1, copy the rows out, release the phase. Flags carry the
sequence number, so a stale flag from two calls ago never matches. Two phases are enough: a
peer can only write call n+2 into my phase p after call n+1 completed everywhere, which needs
my call n+1 write, which I make only after I copied call n out. Stores become visible in
program order on x86 (TSO); other CPUs would need fences here (not done: x86 only).

A peer that dies leaves its flag unset: the wait checks peers' pids and raises CollectiveError
within about a second, and gives up after `timeout_s` in any case, so nothing hangs.

Legend: R ranks, P phases (2), C slot rows (capacity per source), Wmax bytes per row.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from expertmesh._core import PhaseRing
from expertmesh.parallel.groups import CollectiveError
from expertmesh.parallel.transport import Transport, as_bytes, from_bytes, row_bytes

_NUM_PHASES = 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead too
    except (FileNotFoundError, IndexError):
        return False


class _Segment:
    """numpy views over one rank's mapped segment."""

    def __init__(self, buf: mmap.mmap, world: int, slot_rows: int, max_row_bytes: int) -> None:
        header = world + 2 * _NUM_PHASES * world
        ints = np.frombuffer(buf, dtype=np.int64, count=header)
        self.pids = ints[:world]  # [R]
        self.flags = ints[world : world + _NUM_PHASES * world].reshape(_NUM_PHASES, world)  # [P, R]
        self.counts = ints[world + _NUM_PHASES * world :].reshape(_NUM_PHASES, world)  # [P, R]
        self.data = np.frombuffer(buf, dtype=np.uint8, offset=header * 8).reshape(
            _NUM_PHASES, world, slot_rows, max_row_bytes
        )  # [P, R, C, Wmax]

    @staticmethod
    def nbytes(world: int, slot_rows: int, max_row_bytes: int) -> int:
        return (world + 2 * _NUM_PHASES * world) * 8 + _NUM_PHASES * world * slot_rows * max_row_bytes


class ShmTransport(Transport):
    """Collective constructor: every rank of `group` must build one with the same sizes."""

    name = "shm"

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, slot_rows: int,
                 max_row_bytes: int, timeout_s: float = 60.0) -> None:
        self.rank, self.world_size, self.slot_rows, self.max_row_bytes = rank, world_size, slot_rows, max_row_bytes
        self.timeout_s = timeout_s
        self._ring = PhaseRing(_NUM_PHASES)
        token = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=group)
        paths = [f"/dev/shm/expertmesh-ep-{token[0]}-{r}" for r in range(world_size)]
        size = _Segment.nbytes(world_size, slot_rows, max_row_bytes)
        with open(paths[rank], "wb") as f:  # zero-filled: flags start at 0 (= no call yet)
            f.truncate(size)
        dist.barrier(group=group)
        self._maps = []
        for path in paths:
            with open(path, "r+b") as f:
                self._maps.append(mmap.mmap(f.fileno(), size))
        self._segs = [_Segment(m, world_size, slot_rows, max_row_bytes) for m in self._maps]
        for seg in self._segs:
            seg.pids[rank] = os.getpid()
        dist.barrier(group=group)  # everyone mapped everything: the files can go
        os.unlink(paths[rank])
        self._pids = self._segs[rank].pids.copy()
        self._closed = False

    def exchange_counts(self, values: list[int]) -> list[int]:
        _, counts = self._call([], list(values))
        return counts

    def exchange(self, tensors, send_counts, recv_counts=None):
        raws = [as_bytes(t) for t in tensors]  # [S, W_i] uint8 views, no copy for contiguous input
        total = sum(row_bytes(t) for t in tensors)
        if total > self.max_row_bytes:
            raise ValueError(f"rows of {total} bytes exceed the registered max_row_bytes={self.max_row_bytes}")
        if max(send_counts, default=0) > self.slot_rows:
            raise ValueError(
                f"rows sent to one rank must be <= slot_rows={self.slot_rows}, got {max(send_counts)}; "
                "the caller splits bigger steps into chunks"
            )
        received, counts = self._call(raws, list(send_counts))
        return [from_bytes(r, t) for r, t in zip(received, tensors)], counts

    def _call(self, raws: list[torch.Tensor], send_counts: list[int]) -> tuple[list[torch.Tensor], list[int]]:
        if self._closed:
            raise CollectiveError("the shared-memory transport is closed")
        handle = self._ring.acquire()
        p, flag = handle.phase, handle.seq + 1
        me, world = self.rank, self.world_size
        widths = [r.shape[1] for r in raws]
        offsets = np.cumsum([0, *send_counts])
        for step in range(world):  # start with the next rank so writers spread over receivers
            dest = (me + 1 + step) % world
            lo, hi = int(offsets[dest]), int(offsets[dest + 1])
            seg = self._segs[dest]
            if hi > lo:
                slot = seg.data[p, me, : hi - lo]  # [n, Wmax] in the peer's memory
                col = 0
                for raw, w in zip(raws, widths):
                    slot[:, col : col + w] = raw[lo:hi].numpy()
                    col += w
            seg.counts[p, me] = send_counts[dest]
            seg.flags[p, me] = flag  # after the rows and the count: publishes them
        mine = self._segs[me]
        self._wait(mine.flags[p], flag, handle.seq)
        counts = mine.counts[p].tolist()
        out = []
        col = 0
        for w in widths:  # copy out before the phase is released (see the module comment)
            rows = [mine.data[p, s, :n, col : col + w] for s, n in enumerate(counts) if n]
            merged = np.concatenate(rows) if rows else np.empty((0, w), dtype=np.uint8)
            out.append(torch.from_numpy(merged))
            col += w
        self._ring.release(handle)
        return out, counts

    def _wait(self, flags: np.ndarray, want: int, seq: int) -> None:
        if (flags == want).all():
            return
        start = time.monotonic()
        last_check = start
        spins = 0
        while not (flags == want).all():
            spins += 1
            if spins > 64:
                os.sched_yield() if spins < 4096 else time.sleep(50e-6)  # spin, then yield, then nap
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                missing = [s for s in range(self.world_size) if flags[s] != want]
                dead = [s for s in missing if not _alive(int(self._pids[s]))]
                if dead:
                    self._closed = True
                    raise CollectiveError(
                        f"rank {self.rank}: rank(s) {dead} died during shared-memory all-to-all call {seq}"
                    )
                if now - start > self.timeout_s:
                    self._closed = True
                    raise CollectiveError(
                        f"rank {self.rank}: no data from rank(s) {missing} for {self.timeout_s:.0f} s in "
                        f"shared-memory all-to-all call {seq}; ranks are out of lockstep or a peer hangs"
                    )

    def close(self) -> None:
        self._closed = True
        self._segs = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a numpy view still exported; the mapping goes with the process
                pass
        self._maps = []
