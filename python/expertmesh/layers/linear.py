"""Linear and embedding layers whose parameters start uninitialised.

torch.nn.Linear spends seconds per billion parameters on a random init that the checkpoint
overwrites immediately; these layers allocate with torch.empty instead (pages a shard never
keeps are never touched).

Either can keep only a slice of its full weight (`own`): the rows or columns it computes when
the work is split across ranks. The layer then computes its share -- partial output features,
or a partial sum over input features, or embedding rows for the ids it holds (zeros for the
rest) -- and whoever split it combines the shares. The layers themselves never communicate.

A Linear may also hold its weight quantized (`quantize`, called by quant/apply.py after any
split): `weight` then holds int8 or fp8 values and `weight_scale` their scales (formats in
quant/format.py), filled at load time by quantizing the checkpoint's tensor or, for an FP8
checkpoint, from its values and `weight_scale_inv`.

Legend: T tokens, IN input features, OUT output features, V vocabulary, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.layers.weights import empty_parameter, hold, read
from expertmesh.quant.format import WeightFormat
from expertmesh_kernels import ops


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.add_bias = bias  # False on all but one holder of a column slice (the bias is added once)
        self.format: WeightFormat | None = None  # set by quantize
        self.weight_scale: nn.Parameter | None = None  # the quantized weight's scales
        self._cols = (0, in_features)  # the full weight's input features held (where fp8 blocks start)

    def own(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
            add_bias: bool = True) -> None:
        """Keep output features [rows) and/or input features [cols) of the full weight. With a
        column slice the output is a partial sum; `add_bias` says whether this share adds the bias."""
        (r0, r1), (c0, c1) = rows or (0, self.out_features), cols or (0, self.in_features)
        full = (self.out_features, self.in_features)
        self.weight = hold(empty_parameter((r1 - r0, c1 - c0), self.weight), full, (slice(r0, r1), slice(c0, c1)))
        if self.bias is not None:
            self.bias = hold(empty_parameter((r1 - r0,), self.bias), (self.out_features,), (slice(r0, r1),))
            self.add_bias = add_bias
        self.out_features, self.in_features = r1 - r0, c1 - c0

    def quantize(self, fmt: WeightFormat) -> None:
        """Hold the weight (or the part `own` kept) in `fmt`; loading then fills values and scales."""
        index = getattr(self.weight, "held_index", (slice(0, self.out_features), slice(0, self.in_features)))
        full = tuple(getattr(self.weight, "held_full_shape", (self.out_features, self.in_features)))
        rows, cols = (index[0].start, index[0].stop), (index[1].start, index[1].stop)
        device = self.weight.device
        self.format, self._cols = fmt, cols
        self.weight = hold(nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=fmt.dtype,
                                                    device=device), requires_grad=False), full, index)
        self.weight_scale = nn.Parameter(torch.empty(fmt.scale_shape(rows, cols), device=device), requires_grad=False)
        self.weight.weight_loader = lambda source, what: fmt.store(  # type: ignore[attr-defined]
            self.weight, self.weight_scale, lambda r, c: read(source, (r, c)), full, rows, cols, what)
        self.weight_scale.from_checkpoint = fmt.prequantized  # type: ignore[attr-defined]
        if fmt.prequantized:
            self.weight_scale.held_full_shape = fmt.checkpoint_scale_shape(full)  # type: ignore[attr-defined]
            self.weight_scale.weight_loader = lambda source, what: fmt.store_scale(  # type: ignore[attr-defined]
                self.weight_scale, read(source), full, rows, cols, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, IN] -> [T, OUT]
        bias = self.bias if self.add_bias else None
        if self.format is None:
            return F.linear(x, self.weight, bias)
        return ops.quant_linear(x, self.format.weight(self.weight, self.weight_scale, self._cols), bias)

    def extra_repr(self) -> str:
        quant = "" if self.format is None else f", quantized={self.format.kind}"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{quant}"


class Embedding(nn.Module):
    """Token embedding table [V, H], uninitialised like Linear."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False)
        self.vocab_start = 0  # first id of the rows this layer holds (see own)
        self.partial = False

    def own(self, rows: tuple[int, int]) -> None:
        """Keep only the rows of ids [rows): other ids embed as zeros (a partial lookup)."""
        lo, hi = rows
        full = tuple(self.weight.shape)
        self.weight = hold(empty_parameter((hi - lo, full[1]), self.weight), full, (slice(lo, hi), slice(None)))
        self.vocab_start, self.partial = lo, True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if not self.partial:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start  # [T]
        held = (local >= 0) & (local < self.weight.shape[0])  # [T]
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [T, H]
        return out * held.unsqueeze(-1).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, vocab_start={self.vocab_start}"
