"""Compile every Triton kernel for a real GPU target (sm_90, Hopper) on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics but not the compiler,
so it cannot catch what only the compiler rejects: a tl.dot on a tile under 16, a dtype the
NVIDIA backend cannot lower, a constexpr that reaches an op as a tensor, too much shared
memory. This script calls each launcher exactly as the engine does, with CPU tensors, and
replaces the launch with triton.compile(..., target=GPUTarget("cuda", 90, 32)), which runs
the whole pipeline down to ptxas and a cubin. Nothing is executed.

It uses triton's own argument binder (triton.runtime.jit internals as of triton 3.9), so the
signature, constexprs and alignment specialisation are the ones a real launch would compile.
Run it with TRITON_INTERPRET unset:

    python tests/kernels_triton/compile_for_gpu.py      # prints one JSON line per compiled kernel

Shapes: the tiny default model's, and Mixtral-8x7B's and Qwen3-30B-A3B's layers (the weight
tensors are torch.empty, so the OS never backs their pages: nothing is written to them).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_for_gpu.py must run with TRITON_INTERPRET unset")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

if not (hasattr(triton_jit, "create_function_from_signature") and hasattr(triton_jit.JITFunction, "_pack_args")):
    print("this triton lacks the binder internals compile_for_gpu.py uses", file=sys.stderr)
    sys.exit(3)  # the test skips on this exit code

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
COMPILED: list[dict] = []


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    """JITFunction.run replacement: bind like a launch would, compile for TARGET, launch nothing."""
    binder = triton_jit.create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound_args, specialization, options)
    kernel = triton_compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    record = {"kernel": self.__name__, "num_warps": options.num_warps, "shared_bytes": kernel.metadata.shared,
              "cubin_bytes": len(kernel.asm["cubin"]),
              "dtypes": sorted({v for v in signature.values() if v.startswith("*")})}
    COMPILED.append(record)
    print(json.dumps(record), flush=True)
    return kernel


triton_jit.JITFunction.run = _compile_instead_of_launch

from expertmesh_kernels.decode_attention import paged_decode_attention  # noqa: E402
from expertmesh_kernels.fused_moe import fused_moe  # noqa: E402
from expertmesh_kernels.gating import topk_gating  # noqa: E402
from expertmesh_kernels.kv_cache import write_kv_cache  # noqa: E402
from expertmesh_kernels.norm_rope import apply_rotary, rms_norm  # noqa: E402
from expertmesh_kernels.prefill_attention import varlen_prefill_attention  # noqa: E402
from expertmesh_kernels.quant import FP8_DTYPE, QuantWeight  # noqa: E402
from expertmesh_kernels.quant_gemm import quant_linear  # noqa: E402

# name: (hidden, heads, kv heads, head dim, experts, top-k, expert intermediate)
SHAPES = {
    "tiny-default": (128, 4, 2, 32, 8, 2, 256),
    "mixtral-8x7b": (4096, 32, 8, 128, 8, 2, 14336),
    "qwen3-30b-a3b": (2048, 32, 4, 128, 128, 8, 768),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 16


def _layer(shape: str, dtype: torch.dtype, num_tokens: int) -> None:
    """Every kernel one decoder layer launches, for a batch of num_tokens (decode: one per request)."""
    hidden, nh, nkv, d, experts, k, inter = SHAPES[shape]
    num_reqs = 4
    x = torch.empty(num_tokens, hidden, dtype=dtype)
    rms_norm(x, torch.empty(hidden, dtype=dtype), 1e-5)
    q = torch.empty(num_tokens, nh, d, dtype=dtype)
    cos = torch.empty(num_tokens, d // 2, dtype=torch.float32)
    apply_rotary(q, cos, cos)
    caches = [torch.empty(64, BLOCK, nkv, d, dtype=dtype) for _ in range(2)]
    kv = torch.empty(num_tokens, nkv, d, dtype=dtype)
    write_kv_cache(kv, kv, *caches, torch.zeros(num_tokens, dtype=torch.int64))
    block_tables = torch.zeros(num_reqs, 16, dtype=torch.int32)
    if num_tokens == num_reqs:
        seq_lens = torch.full((num_reqs,), 100, dtype=torch.int32)
        paged_decode_attention(q, *caches, block_tables, seq_lens, d**-0.5, return_lse=True)
    else:
        per_req = num_tokens // num_reqs
        qsl = torch.arange(0, num_tokens + 1, per_req, dtype=torch.int32)
        seq_lens = torch.full((num_reqs,), per_req + 20, dtype=torch.int32)
        varlen_prefill_attention(q, *caches, block_tables, qsl, seq_lens, d**-0.5, return_lse=True,
                                 max_query_len=per_req)
    logits = torch.empty(num_tokens, experts, dtype=dtype)
    weights, ids = topk_gating(logits, k, renormalize=True)
    ids.zero_()
    fused_moe(x, torch.empty(experts, 2 * inter, hidden, dtype=dtype), torch.empty(experts, hidden, inter, dtype=dtype),
              weights, ids)
    if shape == "tiny-default" or dtype == torch.bfloat16:  # the quantized kernels, weight-only
        for kind in ("int8", "fp8"):
            quant_linear(x, _quantized(kind, nh * d, hidden))
            fused_moe(x, _quantized(kind, 2 * inter, hidden, experts), _quantized(kind, hidden, inter, experts),
                      weights, ids)


def _quantized(kind: str, n: int, k: int, experts: int | None = None) -> QuantWeight:
    """An empty QuantWeight [(E,) N, K] of `kind` with fp8's 128-column blocks."""
    lead = () if experts is None else (experts,)
    if kind == "int8":
        return QuantWeight(kind, torch.empty(*lead, n, k, dtype=torch.int8), torch.empty(*lead, n))
    return QuantWeight(kind, torch.empty(*lead, n, k, dtype=FP8_DTYPE), torch.empty(*lead, n, -(-k // 128)), 128)


def main() -> int:
    failures = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for num_tokens in (4, 256):  # 4 decodes; a 256-token prefill (large-batch MoE blocks)
                try:
                    _layer(shape, dtype, num_tokens)
                except Exception:  # report every failing case, not just the first
                    failures.append(f"{shape} {dtype} T={num_tokens}:\n{traceback.format_exc()}")
    names = sorted({r["kernel"] for r in COMPILED})
    print(json.dumps({"compiled": len(COMPILED), "kernels": names, "failures": len(failures)}), flush=True)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
