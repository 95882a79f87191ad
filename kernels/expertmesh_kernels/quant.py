"""Weight-only quantized matmuls: int8 per output channel (W8A16) and fp8 e4m3 with block scales.

A `QuantWeight` is what a quantized layer hands the matmul: the stored values `q` and their
scales, for one matrix [N, K] or a stack of them (experts: [E, N, K]); `w[e]` is one matrix.
y = x @ dequant(q).T, where

  int8  dequant(q)[n, k] = q[n, k] * scale[n]                       scale [..., N] fp32
  fp8   dequant(q)[n, k] = q[n, k] * scale[n, (k + col_offset) // block_k]
                                                                    scale [..., N, KB] fp32

fp8 scales are the checkpoint's 128x128 block scales (`weight_scale_inv`) repeated over the
rows of each block, so a layer holding any row range of a matrix (tensor parallelism) keeps
exactly the scales its rows use (3% of the fp8 bytes at K-blocks of 128); `col_offset` places
a held column range that does not start on a block boundary.

Activations stay in the model's dtype. On the CPU both kinds run in the Rust core
(expertmesh._core.quant_linear, rust/src/quant_linear/: weight rows decoded 4 at a time into
L1, then bf16 dot products (AVX-512 BF16) or fp32 FMAs (AVX2), fp32 accumulation), because
torch converts fp8 one element at a time on the CPU and its int8-weight kernel
(`_weight_int8pack_mm`) falls behind from about 8 rows; up to INT8_TORCH_MAX_ROWS rows of bf16/fp16 activations int8 takes torch's kernel,
which is faster there. On the Triton backend both take quant_gemm.py's kernel (dense layers)
and fused_moe.py's (experts), which read the codes and apply the scales in the kernel.

Legend: T tokens, K input features, N output features, KB K-blocks, E stacked matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("int8", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127
# Rows up to which torch's int8 kernel beats the core's for bf16/fp16 x (2-core AVX-512 BF16 VM,
# 4096x1024 weight: torch 0.14 vs 0.18 ms at 1 row, 0.24 vs 0.26 at 4, 0.59 vs 0.58 at 16).
INT8_TORCH_MAX_ROWS = 4


@dataclass(frozen=True)
class QuantWeight:
    kind: str  # "int8" or "fp8"
    q: torch.Tensor  # [..., N, K] int8 or float8_e4m3fn
    scale: torch.Tensor  # int8: [..., N]; fp8: [..., N, KB]; fp32
    block_k: int = 0  # fp8: input features per scale block
    col_offset: int = 0  # fp8: position of column 0 inside its first block

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantized weight kind must be one of {KINDS}, got {self.kind!r}")
        want = self.q.shape[:-1] if self.kind == "int8" else \
            (*self.q.shape[:-1], num_blocks(self.q.shape[-1], self.block_k, self.col_offset))
        if tuple(self.scale.shape) != tuple(want):
            raise ValueError(f"{self.kind} scale must be {tuple(want)} for values {tuple(self.q.shape)}, "
                             f"got {tuple(self.scale.shape)}")

    def __getitem__(self, e: int) -> QuantWeight:
        return QuantWeight(self.kind, self.q[e], self.scale[e], self.block_k, self.col_offset)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [..., N, K]
        return dequantize_ref(self).to(dtype)


def num_blocks(k: int, block_k: int, col_offset: int) -> int:
    """K-blocks that columns [col_offset, col_offset + k) of a blocked matrix touch."""
    if block_k < 1 or not 0 <= col_offset < block_k:
        raise ValueError(f"fp8 block_k must be >= 1 with 0 <= col_offset < block_k, got {block_k}, {col_offset}")
    return (col_offset + k + block_k - 1) // block_k


def dequantize_ref(w: QuantWeight) -> torch.Tensor:  # [..., N, K] fp32
    values = w.q.to(torch.float32)
    if w.kind == "int8":
        return values * w.scale.unsqueeze(-1)
    k = w.q.shape[-1]
    per_col = w.scale.repeat_interleave(w.block_k, dim=-1)[..., w.col_offset: w.col_offset + k]  # [..., N, K]
    return values * per_col


def quant_linear_ref(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequant(w).T (+ bias) in fp32, returned in x's dtype: the semantics."""
    y = F.linear(x.float(), dequantize_ref(w), None if bias is None else bias.float())
    return y.to(x.dtype)


def int8_linear_cpu(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's CPU int8-weight kernel for bf16/fp16 x [T, K] -> [T, N]; fp32 takes the reference.
    The scale is applied in the activation dtype; quantize_int8 picks bf16-exact scales."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return quant_linear_ref(x, w, bias)
    y = torch._weight_int8pack_mm(x.contiguous(), w.q, w.scale.to(x.dtype))  # [T, N]
    return y if bias is None else y + bias.to(y.dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N]).

    Each scale is the row's absmax / 127 rounded up to a bf16 value, so the 16-bit kernels
    apply it exactly and no |q| exceeds 127; an all-zero row gets scale 1."""
    absmax = w.float().abs().amax(dim=-1)  # [..., N]
    scale = _round_up_bf16(torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax)))
    q = torch.round(w.float() / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one scale per block of w [..., N, K] (edge blocks may be partial), the
    DeepSeek-V3 layout: (q fp8 [..., N, K], scale_inv fp32 [..., ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block
    n, k = w.shape[-2:]
    nb, kb = -(-n // bn), -(-k // bk)
    padded = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))  # [..., nb*bn, kb*bk]
    tiles = padded.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # [..., nb, bn, kb, bk]
    absmax = tiles.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    expanded = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)[..., :n, :k]  # [..., N, K]
    q = (w.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x (x > 0), as fp32."""
    down = x.to(torch.bfloat16).float()
    bits = down.view(torch.int32)
    return torch.where(down >= x, down, (bits + (1 << 16)).view(torch.float32))


_CORE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def quant_linear_cpu(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Rust core's kernel for fp32 and bf16 x [T, K] -> [T, N] (other dtypes, or without
    the core: the reference). int8 is its one-block-per-row case."""
    from expertmesh_kernels.cpu_attention import _core

    core = _core()
    if core is None or x.dtype not in _CORE_DTYPES or x.device.type != "cpu":
        return quant_linear_ref(x, w, bias)
    if x.dim() != 2 or w.q.dim() != 2 or x.shape[1] != w.q.shape[1]:
        raise ValueError(f"quantized linear takes x [T, K] and a weight [N, K]; got {tuple(x.shape)} and "
                         f"{tuple(w.q.shape)}")
    if not (w.q.is_contiguous() and w.scale.is_contiguous() and w.scale.dtype == torch.float32):
        raise ValueError("quantized weight values and fp32 scales must be contiguous (the kernel reads them in place)")
    x = x.contiguous()
    (m, k), n = x.shape, w.q.shape[0]
    block_k, col_offset = (w.block_k, w.col_offset) if w.kind == "fp8" else (max(k, 1), 0)
    out = torch.empty(m, n, dtype=x.dtype)
    core.quant_linear(w.kind, _CORE_DTYPES[x.dtype], out.data_ptr(), x.data_ptr(), w.q.data_ptr(),
                      w.scale.data_ptr(), (m, n, k, block_k, col_offset), torch.get_num_threads())
    return out if bias is None else out + bias.to(out.dtype)
