"""Shared-memory all-to-all for CPU rank processes on one host.

Each rank owns one segment (a file in /dev/shm, mapped by every rank once, at setup, then
unlinked so nothing leaks even if a process is killed). Layout of rank d's segment:

    pids   int64 [R]              process ids, so a waiting rank can tell a dead peer
    flags  int64 [P, R]           flags[p, s] = seq + 1 once source s's call seq is in slot p
    counts int64 [P, R]           rows source s wrote into slot p
    data   uint8 [P, R, C, Wmax]  receive slots: phase p, source s, C rows of Wmax bytes

A call: take the next phase from the Rust PhaseRing, write rows straight into every
destination's slot [p, me] (the row writes, flags and waits run in Rust, _core.ShmRows,
rust/src/shm_rows/, with the GIL released; this file lays out and maps the segments) (my own segment's included; gathered there by index_select when the
caller passes a gather index: no staging copy on the sender) with their counts, and only then
publish the flags; wait until all R flags of my slot p read seq + 1, take the rows, release the
phase. Flags carry the sequence number, so a stale flag from two calls ago never matches. Two
phases are enough: a peer can only write call n+2 into my phase p after call n+1 completed
everywhere, which needs my call n+1 flags, which I publish only after writing all my call n+1
rows. So rows of call n that stay in my slots are intact until my call n+1 has read its inputs:
they may be call n+1's input (combine sending back what dispatch received), nothing later.
Stores become visible in program order on x86 (TSO); other CPUs would need fences here (not
done: x86 only).

Taking the rows, three ways:
  exchange       copies them into receive buffers this rank keeps per phase (reused: fresh
                 multi-MB tensors cost page faults on every call) and returns views of those,
                 valid through the next call (a buffer is rewritten two calls later).
  exchange_rows  copies nothing: returns typed views of the slots plus the slot row of each
                 received row (dispatch: the expert GEMMs gather their input from there).
  exchange_add   adds each source's rows from its slot into the caller's output (combine),
                 again without a copy out (f32 rows: in Rust).
And expert parallelism's own call, moe_exchange (all_to_all.py uses it when a transport has
`fused_moe`): dispatch and combine as one Rust call each (rust/src/moe_exchange.rs) around the
expert GEMMs, which read their input from the slots. Measured fixed cost on the 2-core VM:
bench/comm (one-token calls).

A peer that dies leaves its flag unset: the wait spins briefly, then yields (a rank sharing the
core gets it), then naps; it checks peers' pids and raises CollectiveError within about a
second, and gives up after `timeout_s` in any case, so nothing hangs.

Legend: R ranks, P phases (2), C slot rows (capacity per source), Wmax bytes per row.
"""

from __future__ import annotations

import mmap
import os
import uuid

import numpy as np
import torch
import torch.distributed as dist

from expertmesh._core import PhaseHandle, PhaseRing, ShmRows
from expertmesh.errors import CollectiveError
from expertmesh.parallel.transport import Received, Transport, as_bytes, from_bytes, row_bytes
from expertmesh.step_profile import StepProfile

_NUM_PHASES = 2


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as dead)."""
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
        self.tdata = torch.from_numpy(self.data)  # the same bytes as a torch view, for copy_/index_select

    @staticmethod
    def nbytes(world: int, slot_rows: int, max_row_bytes: int) -> int:
        return (world + 2 * _NUM_PHASES * world) * 8 + _NUM_PHASES * world * slot_rows * max_row_bytes


def _columns(slot: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """[n, Wmax] slot rows -> one [n, W_i] column view per tensor (tensors sit side by side)."""
    cols, col = [], 0
    for w in widths:
        cols.append(slot[:, col : col + w])
        col += w
    return cols


def _typed(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[n, W] uint8 rows (row stride Wmax) -> [n, *like.shape[1:]] in like's dtype: a view of the
    same bytes when the column is aligned for the dtype, else a copy."""
    try:
        return raw.view(like.dtype).view(raw.shape[0], *like.shape[1:])
    except RuntimeError:  # misaligned column or row stride for this dtype
        return from_bytes(raw, like)


def _packed(slot: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The first `rows` rows of `width` bytes, back to back, in a [C, Wmax] slot: contiguous
    rows, which index_add_ reads several times faster than rows Wmax apart (measured: 0.8 vs
    5.2 ms for 900 rows of 16 KB)."""
    return slot.view(-1)[: rows * width].view(rows, width)


def _put(dests: list[torch.Tensor], raws: list[torch.Tensor], index: list[torch.Tensor | None] | None,
         lo: int, hi: int) -> None:
    """dests[i] [hi - lo, W_i] <- sent rows lo:hi of tensor i, gathered through index[i] if given."""
    for i, (dst, raw) in enumerate(zip(dests, raws)):
        ix = index[i] if index is not None else None
        if ix is None:
            dst.copy_(raw[lo:hi])
        else:
            torch.index_select(raw, 0, ix[lo:hi], out=dst)  # writes into the (strided) view in place


def map_segments(group: dist.ProcessGroup, rank: int, world_size: int, size: int, kind: str) -> list[mmap.mmap]:
    """Every rank's /dev/shm segment of `size` bytes, mapped in this process: a collective over
    `group`. A segment starts with R int64 process ids, which this fills in (a waiting rank tells
    a dead peer by them); the files are unlinked once every rank mapped them, so nothing leaks
    even if a process is killed. New files are zero-filled: flags start at 0 (= no call yet)."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, group=group, group_src=0)  # group rank 0, whatever its global rank
    paths = [f"/dev/shm/expertmesh-{kind}-{token[0]}-{r}" for r in range(world_size)]
    with open(paths[rank], "wb") as f:
        f.truncate(size)
    dist.barrier(group=group)
    maps = []
    for path in paths:
        with open(path, "r+b") as f:
            maps.append(mmap.mmap(f.fileno(), size))
    for m in maps:
        np.frombuffer(m, dtype=np.int64, count=world_size)[rank] = os.getpid()
    dist.barrier(group=group)  # everyone mapped everything: the files can go
    os.unlink(paths[rank])
    return maps


def unmap_segments(maps: list[mmap.mmap]) -> None:
    """Close map_segments' mappings; one still viewed by a live array stays mapped until the
    process exits (mmap refuses to close it)."""
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass


class ShmTransport(Transport):
    """Collective constructor: every rank of `group` must build one with the same sizes."""

    name = "shm"
    fused_moe = True

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, slot_rows: int,
                 max_row_bytes: int, timeout_s: float = 60.0, profile: StepProfile | None = None) -> None:
        self.rank, self.world_size, self.slot_rows, self.max_row_bytes = rank, world_size, slot_rows, max_row_bytes
        self.timeout_s = timeout_s
        self.profile = profile or StepProfile()
        self._ring = PhaseRing(_NUM_PHASES)
        self._maps = map_segments(group, rank, world_size, _Segment.nbytes(world_size, slot_rows, max_row_bytes), "ep")
        self._segs = [_Segment(m, world_size, slot_rows, max_row_bytes) for m in self._maps]
        self._rows = ShmRows([np.frombuffer(m, dtype=np.uint8).ctypes.data for m in self._maps], rank, slot_rows,
                             max_row_bytes, self._segs[rank].pids.tolist(), timeout_s, _NUM_PHASES)
        self._recv: dict[tuple[int, int, int], torch.Tensor] = {}  # receive buffers, see _recv_buffer
        self._closed = False

    def moe_exchange(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                     expert_fn, out: torch.Tensor) -> None:
        """Dispatch, the local experts and combine for one chunk, the exchanges in Rust
        (_core.ShmRows.dispatch_moe / combine_moe, moe_exchange.rs): x [T, H], weights/ids
        [T, k]; adds every token's expert sum into out [T, H] fp32 (zeroed by the caller).
        The same arithmetic as all_to_all's dispatch / run_local_experts / combine."""
        x = x if x.is_contiguous() else x.contiguous()
        ids = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()  # [T, k]
        if weights.dtype != torch.float32 or not weights.is_contiguous():
            weights = weights.to(torch.float32).contiguous()  # [T, k]
        elem = x.element_size()
        handle = self._exchange_begin()
        try:
            d = self._rows.dispatch_moe(handle.phase, handle.seq,
                                        (x.data_ptr(), x.stride(0) * elem, x.shape[1] * elem, x.shape[0]),
                                        ids.numpy(), weights.numpy(), num_experts)
        except CollectiveError:
            self._exchange_end(handle, failed=True)
            raise
        self._exchange_end(handle)
        # The pairs' hidden states, gathered from where they landed (valid until the next call
        # has read its inputs: combine reads none of them).
        width = x.shape[1] * elem
        raw = self._recv_buffer(handle.phase, 0, width, d.num_pairs)  # [Q, H * elem] uint8, reused
        self._rows.gather_pairs(handle.phase, d, raw.numpy())
        x_sorted = raw.view(x.dtype)  # [Q, H]
        y = expert_fn(x_sorted, torch.from_numpy(d.expert_offsets)).to(torch.float32).contiguous()  # [Q, H]
        handle = self._exchange_begin()
        try:
            self._rows.combine_moe(handle.phase, handle.seq, d, y.numpy(), out.numpy())
        except CollectiveError:
            self._exchange_end(handle, failed=True)
            raise
        self._exchange_end(handle)

    def _exchange_begin(self) -> PhaseHandle:
        """One fused call starts: its time counts as all_to_all, less what Rust spent waiting."""
        if self._closed:
            raise CollectiveError("the shared-memory transport is closed")
        self._waited = self._rows.waited_s
        self.profile.push("all_to_all")
        return self._ring.acquire()

    def _exchange_end(self, handle: PhaseHandle, failed: bool = False) -> None:
        self._closed = self._closed or failed  # a peer died or timed out: nothing can follow
        self._ring.release(handle)
        self.profile.pop()
        self.profile.move("all_to_all", "wait", self._rows.waited_s - self._waited)

    def exchange_counts(self, values: list[int]) -> list[int]:
        handle, counts = self._send_and_wait([], [], list(values), packed=True)  # counts only, no rows
        self._ring.release(handle)
        return counts

    def exchange(self, tensors, send_counts, recv_counts=None, gather=None):
        raws, index, widths = self._prepare(tensors, send_counts, gather)
        handle, counts = self._send_and_wait(raws, index, send_counts, packed=True)
        slots = self._segs[self.rank].tdata[handle.phase]  # [R, C, Wmax]
        outs = [self._recv_buffer(handle.phase, i, w, sum(counts)) for i, w in enumerate(widths)]  # [S', W_i]
        row = 0
        for src, n in enumerate(counts):  # copy out before the phase is released (module comment)
            if n:
                received = _columns(_packed(slots[src], n, sum(widths)), widths)  # [n, W_i] each
                _put([o[row : row + n] for o in outs], received, None, 0, n)
            row += n
        self._ring.release(handle)
        return [from_bytes(o, t) for o, t in zip(outs, tensors)], counts

    def exchange_rows(self, tensors, send_counts, gather=None):
        raws, index, widths = self._prepare(tensors, send_counts, gather)
        handle, counts = self._send_and_wait(raws, index, send_counts, packed=False)
        world, cap = self.world_size, self.slot_rows
        slots = self._segs[self.rank].tdata[handle.phase].view(world * cap, self.max_row_bytes)  # [R*C, Wmax]
        rows = torch.cat([torch.arange(s * cap, s * cap + n) for s, n in enumerate(counts)])  # [S'] slot rows
        self._ring.release(handle)  # the rows stay valid by the protocol, not the ring (module comment)
        return [Received(_typed(col, t), rows) for col, t in zip(_columns(slots, widths), tensors)], counts

    def exchange_add(self, tensor, send_counts, recv_counts, out, index, gather=None):
        raws, index_in, widths = self._prepare([tensor], send_counts, None if gather is None else [gather])
        handle, counts = self._send_and_wait(raws, index_in, send_counts, packed=True)
        if counts != list(recv_counts):
            self._ring.release(handle)
            raise CollectiveError(f"rank {self.rank}: expected {list(recv_counts)} rows from each rank, got {counts}")
        try:
            fast = tensor.dtype == out.dtype == torch.float32 and out.is_contiguous() and index.is_contiguous()
            if fast:  # combine's case: the adds in Rust
                self._rows.add_rows_f32(handle.phase, counts, out.numpy(), index.numpy())
                return
            slots = self._segs[self.rank].tdata[handle.phase]  # [R, C, Wmax]
            row = 0
            for src, n in enumerate(counts):  # straight from the slot: no copy out (module comment)
                if n:
                    rows = _typed(_packed(slots[src], n, widths[0]), tensor)  # [n, H], contiguous
                    out.index_add_(0, index[row : row + n], rows.to(out.dtype))
                row += n
        finally:
            self._ring.release(handle)

    def _prepare(self, tensors, send_counts, gather):
        """Byte views, gather indices and row widths of the tensors to send; checks they fit."""
        raws = [as_bytes(t) for t in tensors]  # [S_i, W_i] uint8 views, no copy for contiguous input
        index = list(gather) if gather is not None else [None] * len(tensors)  # [S] int64 or None each
        total = sum(row_bytes(t) for t in tensors)
        if total > self.max_row_bytes:
            raise ValueError(f"rows of {total} bytes exceed the registered max_row_bytes={self.max_row_bytes}")
        if max(send_counts, default=0) > self.slot_rows:
            raise ValueError(
                f"rows sent to one rank must be <= slot_rows={self.slot_rows}, got {max(send_counts)}; "
                "the caller splits bigger steps into chunks"
            )
        return raws, index, [r.shape[1] for r in raws]

    def _send_and_wait(self, raws: list[torch.Tensor], index: list[torch.Tensor | None],
                       send_counts: list[int], packed: bool) -> tuple[PhaseHandle, list[int]]:
        """Write every destination's rows into its slot, then publish; wait for all sources.
        Returns the phase handle (the caller releases it) and the rows each source sent.
        Both halves run in Rust (_core.ShmRows) with the GIL released.

        packed: rows W bytes apart (contiguous) instead of Wmax apart; see _packed."""
        if self._closed:
            raise CollectiveError("the shared-memory transport is closed")
        handle = self._ring.acquire()
        sources = [(raw.data_ptr(), raw.stride(0), raw.shape[1], raw.shape[0], None if ix is None else ix.numpy())
                   for raw, ix in zip(raws, index)]
        self._rows.send(handle.phase, handle.seq, sources, send_counts, packed)
        try:
            with self.profile.section("wait"):
                counts = self._rows.wait(handle.phase, handle.seq)
        except CollectiveError:
            self._closed = True
            raise
        return handle, counts

    def _recv_buffer(self, phase: int, i: int, width: int, rows: int) -> torch.Tensor:
        """[rows, width] uint8 view of a buffer this rank keeps per (phase, tensor, width).

        Reused, not reallocated: a fresh multi-MB tensor per call costs more in page faults than
        the copy into it. Calls alternate phases, so the buffer a call returns views of is next
        written two calls later: the contract in Transport.exchange."""
        key = (phase, i, width)
        buf = self._recv.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self._recv[key] = torch.empty((rows, width), dtype=torch.uint8)
        return buf[:rows]

    def close(self) -> None:
        self._closed = True
        self._rows = None
        self._segs = []
        self._recv = {}
        unmap_segments(self._maps)
        self._maps = []
