"""The Rust core's CPU paged attention (expertmesh_kernels.cpu_attention) against naive dense
attention, through the op the layers call: mixed prefill/decode batches, GQA, sliding windows,
long contexts over many blocks and decode partitions, bf16 caches read in place, lse.

Legend: T tokens, N requests, NH/NKV heads, D head dim, NB blocks, B block size.
"""

from __future__ import annotations

import pytest
import torch

from expertmesh.errors import CoreError
from expertmesh_kernels import ops
from expertmesh_kernels.cpu_attention import paged_attention_cpu, supports
from test_kernels_ref import MIXED_BATCH, _dense_attention, _make_batch

# Long requests: a 1,300-token decode (three 512-key partitions), a chunked prefill of 40 rows
# after 1,000 cached tokens (three 16-row items), and a short decode beside them.
LONG_BATCH = [(1299, 1), (1000, 40), (17, 1)]


def _call(batch, scale, **kwargs):
    return paged_attention_cpu(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                               batch["query_start_loc"], batch["seq_lens"], scale, **kwargs)


@pytest.mark.parametrize("reqs", [MIXED_BATCH, LONG_BATCH], ids=["mixed", "long"])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 32), ((8, 8), 64), ((6, 2), 20)],
                         ids=["gqa-d32", "mha-d64", "d20"])
@pytest.mark.parametrize("window", [None, 5, 700])
def test_fp32_equals_dense_attention(reqs, heads, head_dim, window):
    batch = _make_batch(reqs, *heads, head_dim, seed=3)
    scale = head_dim**-0.5
    out, lse = _call(batch, scale, sliding_window=window, return_lse=True)
    want, want_lse = _dense_attention(batch, scale, sliding_window=window)
    assert out.dtype == torch.float32 and out.shape == batch["q"].shape
    # fp32 sums of at most a few thousand terms against fp64.
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("reqs", [MIXED_BATCH, LONG_BATCH], ids=["mixed", "long"])
def test_bf16_cache_is_read_in_place(reqs):
    batch = _make_batch(reqs, 8, 2, 32, dtype=torch.bfloat16, seed=4)
    scale = 32**-0.5
    out = _call(batch, scale)
    assert out.dtype == torch.bfloat16
    exact, _ = _dense_attention(batch, scale)  # fp64 on the same bf16 values
    # fp32 arithmetic, one bf16 rounding of the output: within one bf16 ulp of the exact value.
    torch.testing.assert_close(out.double(), exact, atol=1e-3, rtol=2**-8)


def test_the_op_the_layers_call_takes_the_rust_kernel_on_the_cpu(monkeypatch):
    batch = _make_batch(MIXED_BATCH, 4, 2, 32, dtype=torch.bfloat16, seed=5)
    assert supports(batch["q"], batch["k_cache"])
    assert not supports(batch["q"].half(), batch["k_cache"].half())  # fp16: the torch reference
    calls = []
    import expertmesh_kernels.cpu_attention as cpu

    real = cpu.paged_attention_cpu
    monkeypatch.setattr(cpu, "paged_attention_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    ops.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                        batch["query_start_loc"], batch["seq_lens"], 32**-0.5)
    assert calls == [1]


def test_thread_count_does_not_change_the_bits():
    batch = _make_batch(LONG_BATCH, 4, 2, 32, seed=6)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _call(batch, 0.2)
        torch.set_num_threads(2)
        two = _call(batch, 0.2)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


def test_bad_values_are_errors_not_crashes():
    batch = _make_batch(MIXED_BATCH, 4, 2, 32, seed=7)
    tables = batch["block_tables"].clone()
    tables[0, 0] = 10_000
    with pytest.raises(CoreError, match=r"block_tables\[0, 0\] must be a block id below \d+, got 10000"):
        _call(dict(batch, block_tables=tables), 0.2)
    lens = batch["seq_lens"].clone()
    lens[2] = 10_000
    with pytest.raises(CoreError, match=r"seq_lens\[2\] must be between its 1 new tokens and MB \* B = \d+, got 10000"):
        _call(dict(batch, seq_lens=lens), 0.2)
    with pytest.raises(ValueError, match="q must be"):
        _call(dict(batch, q=batch["q"][0]), 0.2)
    with pytest.raises(ValueError, match="contiguous"):
        _call(dict(batch, k_cache=batch["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)), 0.2)
