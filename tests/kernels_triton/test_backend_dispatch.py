"""The backend switch and the engine layers on the Triton path equal to the torch path."""

from __future__ import annotations

import pytest
import torch

from kernel_util import DEVICE
from expertmesh_kernels import backend, ops


def test_backend_default_and_override(monkeypatch):
    monkeypatch.delenv("EXPERTMESH_KERNELS", raising=False)
    assert backend() == ("triton" if torch.cuda.is_available() else "torch")
    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    assert backend() == "torch" and not ops.use_triton(torch.zeros(1, device=DEVICE))
    monkeypatch.setenv("EXPERTMESH_KERNELS", "triton")
    assert backend() == "triton" and ops.use_triton(torch.zeros(1, device=DEVICE))
    monkeypatch.setenv("EXPERTMESH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EXPERTMESH_KERNELS"):
        backend()


def _both(monkeypatch, fn):
    monkeypatch.setenv("EXPERTMESH_KERNELS", "torch")
    ref = fn()
    monkeypatch.setenv("EXPERTMESH_KERNELS", "triton")
    return fn(), ref


def test_moe_layer_same_on_both_backends(monkeypatch):
    from expertmesh.layers.moe import FusedMoE

    torch.manual_seed(0)
    layer = FusedMoE(8, 2, 32, 16, renormalize=True).to(DEVICE)
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(5, 32, device=DEVICE)
    out, ref = _both(monkeypatch, lambda: layer(x))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert layer.tokens_routed.sum() == 2 * 5 * 2  # both calls counted


def test_attention_layer_same_on_both_backends(monkeypatch):
    import test_kernels_ref as refs
    from expertmesh.layers.attention import Attention, AttentionMetadata

    batch = refs._make_batch([(3, 4), (6, 1)], 4, 2, 16)
    layer = Attention(4, 2, 16, 0.25)
    k = torch.randn(5, 2, 16)
    v = torch.randn(5, 2, 16)
    bs = refs.BLOCK
    slots = [int(batch["block_tables"][0, p // bs]) * bs + p % bs for p in range(3, 7)]
    slots.append(int(batch["block_tables"][1, 6 // bs]) * bs + 6 % bs)
    meta = AttentionMetadata(positions=torch.tensor([3, 4, 5, 6, 6]), slot_mapping=torch.tensor(slots),
                             query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"],
                             block_tables=batch["block_tables"])

    def run():
        caches = (batch["k_cache"].clone(), batch["v_cache"].clone())
        return layer(batch["q"], k, v, caches, meta), caches

    (out, caches), (ref, ref_caches) = _both(monkeypatch, run)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
