"""Tensor parallelism on CPU rank processes: the DDA allreduce (one-shot, two-shot) and
torch.distributed agree with the exact sum on sizes that do not divide by the world size, fp32
and bf16, empty tensors and messages bigger than the registered buffer; every rank's result is
bit-identical; a dead rank fails the others within seconds."""

from __future__ import annotations

import pytest
import torch

from ep_util import run_ranks
from tp_workers import SIZES, allreduce_all, allreduce_with_a_dead_rank, fixed_order_sum

ALGORITHMS = ("one_shot", "two_shot", "picked", "torch")


@pytest.mark.parametrize("world", [2, 4])
def test_allreduce_algorithms_agree_and_every_rank_gets_the_same_bits(world):
    results = run_ranks(allreduce_all, world, 4096)  # 4 KB buffers: the big sizes run in chunks
    for dtype in (torch.float32, torch.bfloat16):
        for numel in SIZES:
            want = fixed_order_sum(world, numel, dtype)
            for algo in ALGORITHMS:
                got = [r[(algo, numel, str(dtype))] for r in results]
                for other in got[1:]:
                    assert torch.equal(got[0], other), (algo, numel, dtype)  # bit-identical on every rank
                if algo == "torch":  # gloo sums in its own order (and in bf16 for bf16): close, not equal
                    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
                    assert torch.allclose(got[0].float(), want.float(), **tol), (algo, numel, dtype)
                else:  # DDA: rank order, fp32 accumulation, one rounding: exactly the reference
                    assert torch.equal(got[0], want), (algo, numel, dtype)
    for shm_gather, torch_gather in (r["all_gather"] for r in results):
        assert torch.equal(shm_gather, torch_gather)
        assert torch.equal(shm_gather[0], torch.cat([torch.full((3 + r,), float(r)) for r in range(world)]))
    assert results[0]["stats"]["one_shot"] > 0 and results[0]["stats"]["two_shot"] > 0


def test_a_dead_rank_fails_the_allreduce_within_seconds():
    results = run_ranks(allreduce_with_a_dead_rank, 3)
    for message, waited in results[:-1]:
        assert "died" in message and waited < 5, (message, waited)
