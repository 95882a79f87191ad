"""How rows move between ranks in one all-to-all call: the Transport interface and the
transport that always works, torch.distributed all_to_all_single.

A call moves several row-aligned tensors at once (dispatch sends hidden states, local expert
ids and routing weights for the same rows). Rows are grouped by destination rank:
send_counts[r] rows go to rank r, and what arrives is grouped by source rank. Transports:
  TorchTransport  all_to_all_single over the data group (gloo, NCCL); across hosts too.
  ShmTransport    (shm.py) CPU processes on one host writing straight into peers' slots.
  (seam)          a CUDA IPC / symmetric-memory transport implements the same two methods.

Legend: R ranks, S rows sent, S' rows received, W_i bytes (or elements) per row of tensor i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from expertmesh.parallel.groups import CollectiveError


class Transport(ABC):
    """One rank's end of an all-to-all; every rank must make the same calls in the same order."""

    rank: int
    world_size: int
    name: str

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

    def all_max(self, value: int) -> int:
        """The largest `value` over all ranks (the chunk count every rank must agree on)."""
        return max(self.exchange_counts([value] * self.world_size))

    def close(self) -> None:
        """Release buffers; the transport must not be used after."""


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[S, ...] -> [S, W] uint8 view of a contiguous copy (gloo and shm move bytes)."""
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
        packed = torch.cat([as_bytes(t) for t in tensors], dim=1) if len(tensors) > 1 else as_bytes(tensors[0])
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
