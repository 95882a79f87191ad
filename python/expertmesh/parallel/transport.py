"""How rows move between ranks in one all-to-all call: the Transport interface and the
transport that always works, torch.distributed all_to_all_single.

A call moves several row-aligned tensors at once (dispatch sends hidden states, local expert
ids and routing weights for the same rows). Rows are grouped by destination rank:
send_counts[r] rows go to rank r, and what arrives is grouped by source rank. Transports:
  TorchTransport  all_to_all_single over the data group (gloo, NCCL); across hosts too.
  ShmTransport    (shm.py) CPU processes on one host writing straight into peers' slots.
  (seam)          a CUDA IPC / symmetric-memory transport implements exchange_counts and
                  exchange, and overrides exchange_rows / exchange_add where it can leave rows
                  where they landed.

Two calls carry expert parallelism's big rows without extra copies where the transport allows:
exchange_rows (dispatch) may return received rows in place, as a `Received` (a base tensor and
a row index), and exchange_add (combine) adds returned rows into the caller's output as they
arrive. The defaults build both on exchange.

Legend: R ranks, S rows sent, S' rows received, W_i bytes (or elements) per row of tensor i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.errors import CollectiveError


@dataclass
class Received:
    """Received rows, possibly left where they landed: row j is base[rows[j]] (rows None: base[j])."""

    base: torch.Tensor  # [N, ...] compact rows, or a transport buffer holding them
    rows: torch.Tensor | None  # [S'] int64 row of base for each received row; None when base is [S', ...]

    def __len__(self) -> int:
        return self.base.shape[0] if self.rows is None else self.rows.shape[0]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Received rows `index` [Q] as a new [Q, ...] tensor (one gather)."""
        return self.base.index_select(0, index if self.rows is None else self.rows[index])

    def compact(self) -> torch.Tensor:
        """All received rows as a [S', ...] tensor (the base itself when already compact)."""
        return self.base if self.rows is None else self.base.index_select(0, self.rows)


class Transport(ABC):
    """One rank's end of an all-to-all; every rank must make the same calls in the same order."""

    rank: int
    world_size: int
    name: str
    fused_moe = False  # True: moe_exchange() runs dispatch + experts + combine itself (ShmTransport)

    @abstractmethod
    def exchange_counts(self, values: list[int]) -> list[int]:
        """Send values[r] to rank r; returns what each rank sent to this one ([R] ints)."""

    @abstractmethod
    def exchange(
        self, tensors: list[torch.Tensor], send_counts: list[int], recv_counts: list[int] | None = None,
        gather: list[torch.Tensor | None] | None = None,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Move row-aligned tensors [S, ...] (rows grouped by destination per send_counts).
        Returns the received tensors [S', ...] grouped by source, and recv_counts [R]. Pass
        recv_counts when already known (combine) to skip the count exchange.

        gather[i], when given, is an int64 index [S]: sent row j of tensor i is tensors[i][gather[i][j]]
        (tensors[i] may then have any number of rows). The transport gathers straight into its send
        path, so dispatch needs no gathered copy of the hidden states.

        The received tensors may be views of transport-owned buffers (ShmTransport): they stay
        valid until two calls later on the same transport; clone them to keep them longer."""

    def exchange_rows(
        self, tensors: list[torch.Tensor], send_counts: list[int], gather: list[torch.Tensor | None] | None = None,
    ) -> tuple[list[Received], list[int]]:
        """exchange(), except that received rows may stay where they landed (no copy out).

        Rows left in place are valid until this rank's next call on the transport returns:
        they may be that call's input (combine sending received rows back), nothing later."""
        received, counts = self.exchange(tensors, send_counts, gather=gather)
        return [Received(t, None) for t in received], counts

    def exchange_add(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                     out: torch.Tensor, index: torch.Tensor, gather: torch.Tensor | None = None) -> None:
        """Send rows of `tensor` [S, H] (through `gather` [S] if given) and add received row j
        into out[index[j]]; rows are added in source-rank order, each source's in sent order."""
        (back,), _ = self.exchange([tensor], send_counts, recv_counts, gather=None if gather is None else [gather])
        out.index_add_(0, index, back.to(out.dtype))

    def all_max(self, value: int) -> int:
        """The largest `value` over all ranks (the chunk count every rank must agree on)."""
        return max(self.exchange_counts([value] * self.world_size))

    def close(self) -> None:
        """Release buffers; the transport must not be used after."""


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[S, ...] -> [S, W] uint8 (gloo and shm move bytes): a view when each row is contiguous
    (rows may be spaced apart, as in a transport's slots), else a view of a contiguous copy."""
    if t.dim() == 2 and t.stride(1) == 1 and t.shape[0] > 0:
        try:
            return t.view(torch.uint8)
        except RuntimeError:  # row stride not a whole number of bytes apart for the view
            pass
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], row_bytes(t))


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row of t [S, ...]."""
    width = 1
    for d in t.shape[1:]:
        width *= d
    return width * t.element_size()


def gathered(tensors: list[torch.Tensor], gather: list[torch.Tensor | None] | None) -> list[torch.Tensor]:
    """The rows to send, with the gathers applied (for transports that need them materialised)."""
    if gather is None:
        return tensors
    return [t if g is None else t.index_select(0, g) for t, g in zip(tensors, gather)]


def from_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[S', W] uint8 -> [S', *like.shape[1:]] in like's dtype."""
    if raw.shape[0] == 0:  # a 0-row byte view may carry strides view() refuses
        return torch.empty((0, *like.shape[1:]), dtype=like.dtype, device=raw.device)
    return raw.contiguous().view(like.dtype).reshape(raw.shape[0], *like.shape[1:])


class TorchTransport(Transport):
    """all_to_all_single on a torch.distributed group: one call for counts, one for the rows
    (all tensors packed side by side as bytes, so a dispatch is two collectives, not four)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device) -> None:
        self.group, self.rank, self.world_size, self.device = group, rank, world_size, device

    def _guard(self, fn, what: str):
        try:
            return fn()
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with transport detail
            raise CollectiveError(
                f"rank {self.rank}: {what} failed over torch.distributed ({type(exc).__name__}: {exc}); "
                "a peer rank probably died"
            ) from exc

    def exchange_counts(self, values: list[int]) -> list[int]:
        send = torch.tensor(values, dtype=torch.int64, device=self.device)  # [R]
        recv = torch.empty_like(send)
        self._guard(lambda: dist.all_to_all_single(recv, send, group=self.group), "count exchange")
        return recv.tolist()

    def exchange(self, tensors, send_counts, recv_counts=None, gather=None):
        tensors = gathered(tensors, gather)
        if recv_counts is None:
            recv_counts = self.exchange_counts(list(send_counts))
        raws = [as_bytes(t) for t in tensors]
        packed = torch.cat(raws, dim=1) if len(raws) > 1 else raws[0].contiguous()  # [S, W]
        out = packed.new_empty((sum(recv_counts), packed.shape[1]))  # [S', W]
        self._guard(
            lambda: dist.all_to_all_single(out, packed, list(recv_counts), list(send_counts), group=self.group),
            "all_to_all_single",
        )
        result, col = [], 0
        for t in tensors:
            width = row_bytes(t)
            result.append(from_bytes(out[:, col : col + width], t))
            col += width
        return result, list(recv_counts)
