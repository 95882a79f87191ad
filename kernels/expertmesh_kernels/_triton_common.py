"""Small helpers shared by the Triton kernel modules (imports triton).

Dot-product settings per dtype: fp32 inputs use IEEE fp32 products (not TF32), so fp32
results match the fp32 references; fp16/bf16 use the tensor cores. Under TRITON_INTERPRET=1
(triton 3.9's interpreter multiplies bf16 tiles wrongly in tl.dot) the kernels upcast dot
operands to fp32 after rounding them to the storage dtype, so the CPU tests still see
bf16 rounding of inputs and of the probabilities.
"""

from __future__ import annotations

import os

import torch

_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
