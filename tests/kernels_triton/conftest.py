"""Triton kernel tests: on CUDA they run compiled; without CUDA through TRITON_INTERPRET=1.

triton reads TRITON_INTERPRET when a kernel is decorated (module import), so it is set here,
at conftest import, before any test module imports a kernel module. The torch-backend engine
path never imports the kernel modules, so running these in the same pytest process as the
rest of the suite is safe; `pytest tests/kernels_triton` runs them alone.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    _already = [m for m in sys.modules if m.startswith("expertmesh_kernels.") and m.split(".")[1] in (
        "kv_cache", "decode_attention", "prefill_attention", "paged_kv_tile", "moe_align", "fused_moe", "gating",
        "norm_rope", "quant_gemm", "_triton_common")]
    if _already and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernel modules {_already} were imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
