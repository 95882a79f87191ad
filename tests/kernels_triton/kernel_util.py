"""Helpers for the Triton kernel tests: devices, dtypes and the error rule of DESIGN.md section 5.

Rule: a kernel's error against an exact (fp64) reference is at most ~2x the error of the
torch reference run in the same dtype, plus a small absolute slack.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for test_kernels_ref helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SLACK = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def to_device(batch: dict) -> dict:
    out = {}
    for key, val in batch.items():
        if isinstance(val, torch.Tensor):
            out[key] = val.to(DEVICE)
        elif isinstance(val, list):
            out[key] = [v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in val]
        else:
            out[key] = val
    return out


def assert_error_close_to_torch(ours: torch.Tensor, torch_same_dtype: torch.Tensor, exact: torch.Tensor,
                                dtype: torch.dtype, factor: float = 2.0) -> None:
    exact = exact.double().cpu()
    ours_err = (ours.double().cpu() - exact).abs().max().item()
    torch_err = (torch_same_dtype.double().cpu() - exact).abs().max().item()
    assert ours_err <= factor * torch_err + SLACK[dtype], (ours_err, torch_err)
