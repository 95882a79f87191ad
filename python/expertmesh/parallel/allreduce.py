"""Tensor parallelism's allreduce: direct data access (DDA) over shared memory, and
torch.distributed as the fallback that always works.

DDA: every rank maps every peer's buffers once (/dev/shm segments, as the expert-parallel
transport does in shm.py), so a reduction is plain loads and adds, no messages:

  one-shot (flat)   each rank copies its input into its segment and publishes a flag; once
                    all flags are up, each rank reads all R inputs and sums them itself.
                    One synchronisation, R x the bytes read per rank: best for small
                    (decode-sized) messages.
  two-shot (tree)   reduce-scatter: rank r sums slice r of every peer's input into its output
                    area and publishes a second flag; all-gather: every rank copies slice s
                    from rank s's output area. Two synchronisations, each rank reads about
                    2 x the message: best for larger messages.

Sums run in a fixed peer order (rank 0, 1, ..., R-1) and in fp32 for half-precision inputs, so
every rank's result is bit-identical (two-shot: each slice is summed once, by one rank, then
copied). Flags carry the call's sequence number; two phases (the Rust PhaseRing) make reuse
safe: a rank writes phase p again only two calls later, after every peer's flags of the call in
between -- which peers publish only once they finished reading phase p. A message bigger than
the registered buffer is reduced in chunks. A waiting rank checks its peers' pids and raises
CollectiveError within about a second when one died, and after `timeout_s` in any case.

`pick(nbytes)` chooses the algorithm per call from a table of (bytes up to, algorithm) rows,
measured by bench/comm/bench_allreduce.py (the default is recorded there).

Legend: R ranks, P phases (2), N elements of one message, W buffer bytes per phase.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from expertmesh._core import PhaseRing
from expertmesh.errors import CollectiveError
from expertmesh.parallel.shm import alive, map_segments, unmap_segments

_NUM_PHASES = 2
# Per world size: (message bytes up to, algorithm) rows. Measured on the 2-core CPU VM
# (bench/comm/README.md): two-shot overtakes one-shot between 512 KB and 1 MB at R=2, and near
# 128-256 KB at R=4 (4 ranks on 2 cores); other sizes use the R=4 row.
DEFAULT_TABLE: dict[int, tuple[tuple[int, str], ...]] = {
    2: ((512 << 10, "one_shot"), (1 << 62, "two_shot")),
    4: ((256 << 10, "one_shot"), (1 << 62, "two_shot")),
}


@dataclass
class AllReduceStats:
    """Calls and bytes per algorithm (what /metrics and LLM.stats() show)."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, algorithm: str, nbytes: int) -> None:
        self.calls[algorithm] = self.calls.get(algorithm, 0) + 1
        self.bytes[algorithm] = self.bytes.get(algorithm, 0) + nbytes


def torch_all_gather(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """2-D x with sizes[rank] along `dim` -> every rank's x concatenated along `dim` in rank
    order, with torch.distributed (which needs equal shapes: padded to the largest)."""
    width = max(sizes)
    pad = [0, 0, 0, 0]
    pad[2 * (1 - dim) + 1] = width - x.shape[dim]  # F.pad lists the last dim first
    padded = torch.nn.functional.pad(x, pad).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, s) for part, s in zip(parts, sizes)], dim=dim)


class TorchAllReduce:
    """torch.distributed all_reduce (gloo on CPU, NCCL on GPU): works anywhere, across hosts."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.stats = AllReduceStats()

    def __call__(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        self.stats.add("torch", x.numel() * x.element_size())
        if x.numel():
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int = 1) -> torch.Tensor:
        return torch_all_gather(x, sizes, self.group, dim)

    def close(self) -> None:
        pass


class _Segment:
    """numpy/torch views over one rank's mapped segment: pids [R], flags [2, P, R] (stage 0:
    input ready, stage 1: reduced slice ready), then the input and output areas [P, W] each."""

    def __init__(self, buf: mmap.mmap, world: int, nbytes: int) -> None:
        header = world + 2 * _NUM_PHASES * world
        ints = np.frombuffer(buf, dtype=np.int64, count=header)
        self.pids = ints[:world]  # [R]
        self.flags = ints[world:].reshape(2, _NUM_PHASES, world)  # [stage, P, R]
        data = torch.frombuffer(buf, dtype=torch.uint8, offset=header * 8, count=2 * _NUM_PHASES * nbytes)
        self.inputs, self.outputs = data.view(2, _NUM_PHASES, nbytes).unbind(0)  # [P, W] each

    @staticmethod
    def size(world: int, nbytes: int) -> int:
        return (world + 2 * _NUM_PHASES * world) * 8 + 2 * _NUM_PHASES * nbytes


class ShmAllReduce:
    """DDA allreduce for CPU rank processes on one host. Collective constructor: every rank of
    `group` builds one with the same `max_bytes` (buffer bytes per phase)."""

    name = "shm"

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, max_bytes: int,
                 timeout_s: float = 60.0, table: tuple[tuple[int, str], ...] | None = None) -> None:
        self.rank, self.world_size, self.max_bytes = rank, world_size, max_bytes - max_bytes % 8
        self.timeout_s, self._group = timeout_s, group
        self.table = table if table is not None else DEFAULT_TABLE.get(world_size, DEFAULT_TABLE[4])
        self.stats = AllReduceStats()
        self._ring = PhaseRing(_NUM_PHASES)
        self._maps = map_segments(group, rank, world_size, _Segment.size(world_size, self.max_bytes), "tp")
        self._segs = [_Segment(m, world_size, self.max_bytes) for m in self._maps]
        self._pids = self._segs[rank].pids.copy()
        self._closed = False

    def pick(self, nbytes: int) -> str:
        return next(algo for limit, algo in self.table if nbytes <= limit)

    def __call__(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        """Sum `x` over the ranks, in place (x must be contiguous); returns x."""
        if self._closed:
            raise CollectiveError("the shared-memory allreduce is closed")
        if not x.is_contiguous():
            raise ValueError("allreduce input must be contiguous")
        nbytes = x.numel() * x.element_size()
        algorithm = algorithm or self.pick(nbytes)
        self.stats.add(algorithm, nbytes)
        flat = x.view(-1)  # [N]
        per_chunk = max(1, self.max_bytes // x.element_size())
        for lo in range(0, flat.numel(), per_chunk):
            chunk = flat[lo: lo + per_chunk]
            (self._one_shot if algorithm == "one_shot" else self._two_shot)(chunk)
        return x

    def _one_shot(self, x: torch.Tensor) -> None:
        handle = self._ring.acquire()
        p, flag, nbytes = handle.phase, handle.seq + 1, x.numel() * x.element_size()
        me = self._segs[self.rank]
        me.inputs[p, :nbytes].view(x.dtype).copy_(x)
        self._publish(0, p, flag)
        self._wait(0, p, flag, handle.seq)
        self._sum_into(x, [seg.inputs[p, :nbytes].view(x.dtype) for seg in self._segs])
        self._ring.release(handle)

    def _two_shot(self, x: torch.Tensor) -> None:
        handle = self._ring.acquire()
        p, flag, elem = handle.phase, handle.seq + 1, x.element_size()
        me = self._segs[self.rank]
        me.inputs[p, : x.numel() * elem].view(x.dtype).copy_(x)
        self._publish(0, p, flag)
        self._wait(0, p, flag, handle.seq)
        bounds = np.linspace(0, x.numel(), self.world_size + 1).astype(int)  # [R+1] slice r = bounds[r:r+2]
        lo, hi = int(bounds[self.rank]), int(bounds[self.rank + 1])
        if hi > lo:  # reduce-scatter: my slice of every peer's input, into my output area
            mine = me.outputs[p, lo * elem: hi * elem].view(x.dtype)
            self._sum_into(mine, [seg.inputs[p, lo * elem: hi * elem].view(x.dtype) for seg in self._segs])
        self._publish(1, p, flag)
        self._wait(1, p, flag, handle.seq)
        for r, seg in enumerate(self._segs):  # all-gather by direct copy
            a, b = int(bounds[r]), int(bounds[r + 1])
            if b > a:
                x[a:b].copy_(seg.outputs[p, a * elem: b * elem].view(x.dtype))
        self._ring.release(handle)

    @staticmethod
    def _sum_into(out: torch.Tensor, parts: list[torch.Tensor]) -> None:
        """out <- parts[0] + parts[1] + ... in rank order; fp32 accumulation for half types."""
        if out.dtype in (torch.float16, torch.bfloat16):
            acc = parts[0].float()
            for part in parts[1:]:
                acc.add_(part.float())
            out.copy_(acc)
            return
        if len(parts) == 1:
            out.copy_(parts[0])
            return
        torch.add(parts[0], parts[1], out=out)  # one pass for the first pair (read 2, write 1)
        for part in parts[2:]:
            out.add_(part)

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int = 1) -> torch.Tensor:
        """2-D x with sizes[rank] along `dim` (0: rows, 1: columns) -> every rank's x
        concatenated along `dim` in rank order, through the input areas (torch.distributed
        when it does not fit the buffer)."""
        other, elem = x.shape[1 - dim], x.element_size()
        if other * max(sizes) * elem > self.max_bytes:
            return torch_all_gather(x, sizes, self._group, dim)
        handle = self._ring.acquire()
        p, flag = handle.phase, handle.seq + 1
        self._segs[self.rank].inputs[p, : x.numel() * elem].view(x.dtype).view(x.shape).copy_(x)
        self._publish(0, p, flag)
        self._wait(0, p, flag, handle.seq)
        shape = (lambda s: (s, other)) if dim == 0 else (lambda s: (other, s))
        out = torch.cat([seg.inputs[p, : other * s * elem].view(x.dtype).view(shape(s))
                         for seg, s in zip(self._segs, sizes)], dim=dim)
        self._ring.release(handle)
        return out

    def _publish(self, stage: int, phase: int, flag: int) -> None:
        for seg in self._segs:
            seg.flags[stage, phase, self.rank] = flag

    def _wait(self, stage: int, phase: int, flag: int, seq: int) -> None:
        flags = self._segs[self.rank].flags[stage, phase]  # [R]
        if (flags == flag).all():
            return
        start = last_check = time.monotonic()
        spins = 0
        while not (flags == flag).all():
            spins += 1
            if spins > 16:  # then yield: with more ranks than cores the rank we wait for needs the core
                os.sched_yield() if spins < 4096 else time.sleep(50e-6)
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                missing = [s for s in range(self.world_size) if flags[s] != flag]
                dead = [s for s in missing if not alive(int(self._pids[s]))]
                if dead or now - start > self.timeout_s:
                    self._closed = True
                    why = f"rank(s) {dead} died" if dead else f"no flag from rank(s) {missing} for {self.timeout_s:g} s"
                    raise CollectiveError(f"rank {self.rank}: {why} during shared-memory allreduce call {seq}")

    def close(self) -> None:
        self._closed = True
        self._segs = []
        unmap_segments(self._maps)
        self._maps = []
