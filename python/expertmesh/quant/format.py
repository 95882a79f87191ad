"""How a quantized layer stores one weight matrix, and how loading fills it.

A `WeightFormat` says what a layer holds instead of a full-precision weight (values and
scales; their layout in expertmesh_kernels.quant) and how to fill that from the checkpoint:
quantizing at load time from a bf16/fp32 tensor, or copying values and block scales an FP8
checkpoint already stores. Layers (layers/linear.py, layers/moe.py) call `store` and
`store_scale` with the part of the full matrix they hold -- rows [r0, r1), columns [c0, c1)
-- and a reader for the checkpoint tensor, so tensor parallelism needs nothing here.

Scales never depend on how a matrix is split: an int8 row's scale comes from the whole row
(a layer holding only some columns still reads the whole row to compute it), an fp8 block's
from the whole 128x128 block. So every split quantizes to the same numbers as one rank.

Legend: N, K the full matrix's rows and columns; n, k the held ones; KB K-blocks held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from expertmesh_kernels.quant import FP8_DTYPE, QuantWeight, num_blocks, quantize_fp8_blocks, quantize_int8

# Reads rows x cols of one full checkpoint matrix (a safetensors slice or a tensor).
ReadRC = Callable[[slice, slice], torch.Tensor]
Span = tuple[int, int]


@dataclass(frozen=True)
class WeightFormat:
    kind: str  # "int8" (per output channel) or "fp8" (e4m3, block scales)
    block: tuple[int, int] = (128, 128)  # fp8: rows x columns sharing one scale
    prequantized: bool = False  # fp8 values and scales come from the checkpoint

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.kind == "int8" else FP8_DTYPE

    def col_offset(self, cols: Span) -> int:
        return 0 if self.kind == "int8" else cols[0] % self.block[1]

    def scale_shape(self, rows: Span, cols: Span) -> tuple[int, ...]:
        """Scales stored for held rows x cols: [n] (int8) or [n, KB] (fp8)."""
        n = rows[1] - rows[0]
        if self.kind == "int8":
            return (n,)
        return (n, num_blocks(cols[1] - cols[0], self.block[1], self.col_offset(cols)))

    def checkpoint_scale_shape(self, full: tuple[int, int]) -> tuple[int, int]:
        """Shape of a prequantized matrix's weight_scale_inv: [ceil(N/bn), ceil(K/bk)]."""
        (n, k), (bn, bk) = full, self.block
        return (-(-n // bn), -(-k // bk))

    def weight(self, q: torch.Tensor, scale: torch.Tensor, cols: Span) -> QuantWeight:
        """What the matmul takes: q [..., n, k] and scale as stored."""
        return QuantWeight(self.kind, q, scale, self.block[1] if self.kind == "fp8" else 0, self.col_offset(cols))

    @torch.no_grad()
    def store(self, q: torch.Tensor, scale: torch.Tensor, read_rc: ReadRC, full: tuple[int, int],
              rows: Span, cols: Span, what: str) -> None:
        """Fill q [n, k] (and, unless the checkpoint supplies them, scale) from the matrix."""
        (r0, r1), (c0, c1) = rows, cols
        if self.prequantized:
            values = read_rc(slice(r0, r1), slice(c0, c1))
            if values.dtype != FP8_DTYPE:
                raise ValueError(f"checkpoint weight {what!r} is {values.dtype}, but the checkpoint's "
                                 f"quantization_config says fp8 (float8_e4m3fn) weights with scales")
            q.copy_(values)
        elif self.kind == "int8":
            values, row_scale = quantize_int8(read_rc(slice(r0, r1), slice(0, full[1])))  # whole rows
            q.copy_(values[:, c0:c1])
            scale.copy_(row_scale)
        else:
            (bn, bk), (n_full, k_full) = self.block, full
            br, bc = r0 // bn * bn, c0 // bk * bk  # the covering blocks' first row and column
            cover = read_rc(slice(br, min(-(-r1 // bn) * bn, n_full)), slice(bc, min(-(-c1 // bk) * bk, k_full)))
            values, block_scale = quantize_fp8_blocks(cover, self.block)
            q.copy_(values[r0 - br: r1 - br, c0 - bc: c1 - bc])
            scale.copy_(block_scale.repeat_interleave(bn, dim=0)[r0 - br: r1 - br])

    @torch.no_grad()
    def store_scale(self, scale: torch.Tensor, source: torch.Tensor, full: tuple[int, int],
                    rows: Span, cols: Span, what: str) -> None:
        """Fill scale [n, KB] from a prequantized matrix's weight_scale_inv (all of it read: it
        is 1/16384 of the matrix)."""
        want = self.checkpoint_scale_shape(full)
        if tuple(source.shape) != want:
            raise ValueError(f"checkpoint weight {what!r} has shape {tuple(source.shape)}, expected {want} "
                             f"(one scale per {self.block[0]}x{self.block[1]} block of a {full[0]}x{full[1]} weight)")
        (bn, bk), (r0, r1), (c0, c1) = self.block, rows, cols
        blocks = source.float()[:, c0 // bk: -(-c1 // bk)]  # [NB, KB]
        scale.copy_(blocks.repeat_interleave(bn, dim=0)[r0:r1])
