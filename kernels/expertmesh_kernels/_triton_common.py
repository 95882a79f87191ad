"""Small helpers shared by the Triton kernel modules (imports triton).

Dot-product settings per dtype: fp32 inputs use IEEE fp32 products (not TF32), so fp32
results match the fp32 references; fp16/bf16 use the tensor cores. Under TRITON_INTERPRET=1
(triton 3.9's interpreter multiplies bf16 tiles wrongly in tl.dot) the kernels upcast dot
operands to fp32 after rounding them to the storage dtype, so the CPU tests still see
bf16 rounding of inputs and of the probabilities.

Quantized weights (quant.QuantWeight): `quant_args` turns one into what a GEMM kernel reads --
the codes, the scales with their strides, and the tile width BLOCK_K that keeps every K-tile
inside one fp8 scale block; in the kernel, `quant_dot` adds one K-tile's product and
`row_scale` applies int8's per-row scale once at the end.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from expertmesh_kernels.quant import QuantWeight

_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCK_K, MAX_BLOCK_K = 16, 64  # tl.dot needs K tiles of at least 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def dot_config(dtype: torch.dtype) -> dict[str, object]:
    """constexpr kwargs DOT_PREC and UPCAST for a kernel whose dot operands have `dtype`."""
    if dtype not in _DOT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {_DOT_DTYPES}")
    return {
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": interpreting() and dtype != torch.float32,
    }


def quant_args(w, k: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], dict[str, int]]:
    """For a weight [N, K] or [E, N, K], plain or a QuantWeight: (codes or values, scales (the
    values themselves when plain: never read), the scales' strides (matrix, row, K-block; 0 where
    absent), the constexprs and offsets: mode (0 plain, 1 int8 per row, 2 fp8 per K-block),
    block_k (BLOCK_K), scale_block_k, col_offset)."""
    block_k = min(MAX_BLOCK_K, max(MIN_BLOCK_K, triton.next_power_of_2(k)))
    if not isinstance(w, QuantWeight):
        return w, w, (0, 0, 0), {"mode": 0, "block_k": block_k, "scale_block_k": 1, "col_offset": 0}
    scale = w.scale
    strides = list(scale.stride())
    if w.kind == "int8":  # [..., N]: one scale per row
        strides.append(0)
        mode, scale_block_k, col_offset = 1, 1, 0
    else:  # [..., N, KB]
        mode, scale_block_k, col_offset = 2, w.block_k, w.col_offset
        while block_k > MIN_BLOCK_K and (scale_block_k % block_k or col_offset % block_k):
            block_k //= 2
        if scale_block_k % block_k or col_offset % block_k:
            raise ValueError(f"fp8 scale blocks of {scale_block_k} columns starting at column offset {col_offset} "
                             f"need both to be multiples of {MIN_BLOCK_K} for the Triton kernels")
    if len(strides) == 2:  # one matrix
        strides.insert(0, 0)
    return w.q, scale, (strides[0], strides[1], strides[2]), {
        "mode": mode, "block_k": block_k, "scale_block_k": scale_block_k, "col_offset": col_offset}


@triton.jit
def quant_dot(acc, a, w, s_row_ptrs, nmask, k0, col_offset, stride_sk,
              QUANT: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc [BM, BN] + a [BM, BK] @ w [BK, BN] for the K-tile at k0, w (values or int8 / fp8
    codes) converted to a's dtype first (exact). QUANT 2: the partial product times the tile's
    fp8 block scale per column (s_row_ptrs [BN]: each column's scale row)."""
    w = w.to(a.dtype)
    if QUANT == 2:
        s = tl.load(s_row_ptrs + ((k0 + col_offset) // SCALE_BLOCK_K) * stride_sk, mask=nmask, other=0.0)  # [BN]
        acc += tl.dot(a, w, input_precision=DOT_PREC) * s[None, :]
    else:
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def row_scale(acc, s_row_ptrs, nmask, QUANT: tl.constexpr):
    """QUANT 1 (int8): acc [BM, BN] times each column's row scale; otherwise acc."""
    if QUANT == 1:
        acc = acc * tl.load(s_row_ptrs, mask=nmask, other=0.0)[None, :]
    return acc
