"""Triton attention kernels (KV write, paged decode, varlen prefill) against the torch references.

Small shapes run everywhere (through TRITON_INTERPRET=1 without CUDA); `gpu` tests run
Mixtral / Qwen3-MoE attention shapes on a GPU.
Legend: T tokens, N requests, NH/NKV heads, D head dim, B block size.
"""

from __future__ import annotations

import pytest
import torch

import test_kernels_ref as refs
from kernel_util import DEVICE, DTYPES, assert_error_close_to_torch, to_device
from expertmesh_kernels.attention import paged_attention_ref, write_kv_cache_ref
from expertmesh_kernels.decode_attention import paged_decode_attention
from expertmesh_kernels.kv_cache import write_kv_cache
from expertmesh_kernels.prefill_attention import varlen_prefill_attention

# (cached context, new tokens): ragged decodes incl. a one-token prompt and block-edge crossings.
DECODES = [(9, 1), (0, 1), (12, 1), (3, 1), (40, 1)]


def _batch(reqs, nh, nkv, d, dtype, block, monkeypatch, seed=0):
    monkeypatch.setattr(refs, "BLOCK", block)
    return to_device(refs._make_batch(reqs, nh, nkv, d, dtype=dtype, seed=seed))


def _check(out, lse, batch, dtype, scale, window):
    exact, exact_lse = refs._dense_attention(batch, scale, window)  # fp64
    same, _ = refs._dense_attention(batch, scale, window, compute_dtype=dtype)  # naive torch in dtype
    assert out.dtype == dtype and out.shape == batch["q"].shape
    assert_error_close_to_torch(out, same, exact, dtype)
    torch.testing.assert_close(lse.double().cpu(), exact_lse.cpu(), atol=1e-4, rtol=1e-4)
    ref = paged_attention_ref(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                              batch["query_start_loc"], batch["seq_lens"], scale, sliding_window=window)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d,block", [(4, 4, 16, 4), (8, 2, 32, 16), (6, 2, 24, 8)])
def test_write_kv_cache_equals_reference(dtype, nh, nkv, d, block):
    gen = torch.Generator().manual_seed(1)
    caches = [torch.randn(6, block, nkv, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    slots = torch.tensor([block * 6 - 1, 3, 0, -1, block + 1], dtype=torch.int64, device=DEVICE)
    k = torch.randn(5, nkv, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(5, nkv, d, generator=gen).to(dtype).to(DEVICE)
    write_kv_cache(k, v, *caches, slots)
    write_kv_cache_ref(k, v, *ref_caches, slots)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, *caches, slots[:2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(4, 4, 16), (8, 2, 32), (6, 2, 24)])  # MHA, GQA 4, GQA 3 + odd D
@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("splits,window", [(1, None), (3, None), (3, 5)])
def test_decode_attention_matches_reference(dtype, nh, nkv, d, block, splits, window, monkeypatch):
    batch = _batch(DECODES, nh, nkv, d, dtype, block, monkeypatch)
    scale = d**-0.5
    out, lse = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                      batch["seq_lens"], scale, sliding_window=window, return_lse=True,
                                      num_splits=splits, block_n=16)
    _check(out, lse, batch, dtype, scale, window)


def test_decode_attention_single_request_single_token(monkeypatch):
    batch = _batch([(0, 1)], 4, 2, 16, torch.float32, 4, monkeypatch)
    out = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                 batch["seq_lens"], 0.25)
    # One visible key: attention returns its value exactly.
    expect = batch["dense_v"][0][0].repeat_interleave(2, dim=0)  # [NH, D]
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(4, 4, 16), (8, 2, 32)])
@pytest.mark.parametrize("block,window", [(4, None), (16, None), (4, 3)])
def test_prefill_attention_matches_reference(dtype, nh, nkv, d, block, window, monkeypatch):
    # Full prefill, prefix hit / chunked prefill with cached context, decodes, a 1-token prompt,
    # and a request longer than one BLOCK_M tile (20 > 16).
    reqs = refs.MIXED_BATCH + [(5, 20)]
    batch = _batch(reqs, nh, nkv, d, dtype, block, monkeypatch, seed=2)
    scale = d**-0.5
    out, lse = varlen_prefill_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                        batch["query_start_loc"], batch["seq_lens"], scale,
                                        sliding_window=window, return_lse=True, block_m=16, block_n=16)
    _check(out, lse, batch, dtype, scale, window)


def test_attention_launchers_reject_bad_inputs(monkeypatch):
    batch = _batch([(2, 3)], 4, 2, 16, torch.float32, 4, monkeypatch)
    args = (batch["k_cache"], batch["v_cache"], batch["block_tables"])
    with pytest.raises(ValueError, match="multiple of NKV"):
        varlen_prefill_attention(batch["q"][:, :3], *args, batch["query_start_loc"], batch["seq_lens"], 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        varlen_prefill_attention(batch["q"].half(), *args, batch["query_start_loc"], batch["seq_lens"], 1.0)
    with pytest.raises(ValueError, match="one token per request"):
        paged_decode_attention(batch["q"], *args, batch["seq_lens"], 1.0)
    with pytest.raises(ValueError, match="block table capacity"):
        varlen_prefill_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"][:, :1],
                                 batch["query_start_loc"], batch["seq_lens"], 1.0, validate=True)


# ---- real sizes on a GPU ---------------------------------------------------------------

GPU_SHAPES = {"mixtral": (32, 8, 128), "qwen3_30b_a3b": (32, 4, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_real_sizes(model, dtype, monkeypatch):
    nh, nkv, d = GPU_SHAPES[model]
    gen = torch.Generator().manual_seed(0)
    reqs = [(int(c), 1) for c in torch.randint(0, 3000, (24,), generator=gen)] + [(4095, 1), (0, 1)]
    batch = _batch(reqs, nh, nkv, d, dtype, 16, monkeypatch)
    out, lse = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                      batch["seq_lens"], d**-0.5, return_lse=True)
    _check(out, lse, batch, dtype, d**-0.5, None)


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(GPU_SHAPES))
@pytest.mark.parametrize("window", [None, 256])
def test_prefill_attention_real_sizes(model, window, monkeypatch):
    nh, nkv, d = GPU_SHAPES[model]
    reqs = [(0, 1000), (512, 300), (100, 1), (0, 1), (1500, 64)]
    batch = _batch(reqs, nh, nkv, d, torch.bfloat16, 16, monkeypatch)
    out, lse = varlen_prefill_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                        batch["query_start_loc"], batch["seq_lens"], d**-0.5,
                                        sliding_window=window, return_lse=True)
    _check(out, lse, batch, torch.bfloat16, d**-0.5, window)
