"""The whole engine on the Triton kernels gives the torch references' greedy tokens: on the CPU
through the interpreter (a tiny checkpoint, a few steps), and on a GPU when there is one."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams

PROMPTS = [[5, 6, 7], list(range(10, 31)), [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def _greedy(path, device: str, backend: str, monkeypatch, quantization: str | None = None) -> list[list[int]]:
    monkeypatch.setenv("EXPERTMESH_KERNELS", backend)
    # block size 4 and a small token budget: prefills chunk, decodes cross block edges.
    llm = LLM(str(path), device=device, block_size=4, max_num_batched_tokens=16, kv_cache_blocks=64,
              max_model_len=128, show_progress=False, quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _count_kernel_calls(monkeypatch, kernels: list[tuple[str, str]]) -> dict[str, int]:
    """Wrap each (module, function) of expertmesh_kernels so that calls are counted."""
    import importlib

    calls: dict[str, int] = {}
    for module, name in kernels:
        mod = importlib.import_module(f"expertmesh_kernels.{module}")
        kernel = getattr(mod, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(mod, name, counted)
    return calls


def test_engine_on_triton_kernels_matches_torch_references_cpu_interpreter(mixtral_dir, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the GPU variant below covers CUDA")
    calls = _count_kernel_calls(monkeypatch, [
        ("fused_moe", "fused_moe"), ("prefill_attention", "varlen_prefill_attention"),
        ("decode_attention", "paged_decode_attention"), ("gating", "topk_gating")])
    triton_tokens = _greedy(mixtral_dir, "cpu", "triton", monkeypatch)
    # The Triton kernels really ran (ops.py imports them at call time, so the counters see it).
    assert set(calls) == {"fused_moe", "varlen_prefill_attention", "paged_decode_attention", "topk_gating"}, calls
    assert triton_tokens == _greedy(mixtral_dir, "cpu", "torch", monkeypatch)


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_engine_on_triton_kernels_matches_torch_cpu_interpreter(mixtral_dir, monkeypatch, quantization):
    # Experts through fused_moe and the attention projections through quant_gemm, both reading codes.
    if torch.cuda.is_available():
        pytest.skip("the GPU variant below covers CUDA")
    calls = _count_kernel_calls(monkeypatch, [("fused_moe", "fused_moe"), ("quant_gemm", "quant_linear")])
    triton_tokens = _greedy(mixtral_dir, "cpu", "triton", monkeypatch, quantization)
    assert set(calls) == {"fused_moe", "quant_linear"}, calls
    assert triton_tokens == _greedy(mixtral_dir, "cpu", "torch", monkeypatch, quantization)


@pytest.mark.gpu
def test_engine_on_triton_kernels_matches_torch_references_gpu(mixtral_dir, monkeypatch):
    for quantization in (None, "int8", "fp8"):
        triton_tokens = _greedy(mixtral_dir, "cuda", "triton", monkeypatch, quantization)
        assert triton_tokens == _greedy(mixtral_dir, "cuda", "torch", monkeypatch, quantization), quantization
