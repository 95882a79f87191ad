"""Tensor parallelism on CPU rank processes.

The DDA allreduce (one-shot, two-shot) and torch.distributed agree with the exact sum on sizes
that do not divide by the world size, fp32 and bf16, empty tensors and messages bigger than
the registered buffer; every rank's result is bit-identical; a dead rank fails the others
within seconds. Whole engines at TP=2/4 (and TP=2 x DP=2 with expert parallelism) give one
rank's greedy tokens and logprobs on Mixtral, Qwen2-MoE and OLMoE checkpoints, whatever the
scheduling; bad layouts are refused naming the sizes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ep_util import run_ranks
from expertmesh import LLM, InvalidRequestError, SamplingParams
from expertmesh.errors import CollectiveError
from model_factory import add_default_tokenizer, make_checkpoint
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


# ---- whole engines: TP (and TP x DP with EP) give one rank's tokens and logprobs ----------------

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
SHARED = list(range(100, 116))  # one full KV block two prompts share (a prefix-cache hit)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 33)), [40] * 9, SHARED + [7, 8], SHARED + [9]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Mixtral (GQA 2), Qwen2-MoE (1 KV head, qkv bias, shared expert, a dense layer) and OLMoE
    (full-width q/k norms, 2 KV heads) with the default tokenizer."""
    root = tmp_path_factory.mktemp("tp")
    made = {
        "mixtral": make_checkpoint(root, "mixtral", vocab_size=652, initializer_range=0.1),
        "qwen2_moe": make_checkpoint(root, "qwen2_moe", vocab_size=652, initializer_range=0.1, mlp_only_layers=[1]),
        "olmoe": make_checkpoint(root, "olmoe", vocab_size=652, initializer_range=0.1, num_key_value_heads=2),
    }
    return {name: str(add_default_tokenizer(path)) for name, path in made.items()}


def _run(llm: LLM, prompts=PROMPTS):
    """Greedy tokens and, per step, the logprobs of the sampled and the 5 most likely tokens:
    the logits where they matter, compared across layouts."""
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in step.items()) for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture(scope="module")
def reference(checkpoints):
    return {name: _run(LLM(path, show_progress=False)) for name, path in checkpoints.items()}


def _assert_same(got, want):
    for (tokens, steps), (want_tokens, want_steps) in zip(got, want, strict=True):
        assert tokens == want_tokens
        for step, want_step in zip(steps, want_steps, strict=True):
            assert [t for t, _ in step] == [t for t, _ in want_step]  # the same top-5 tokens
            # fp32, sums in another order: a few ulps of the logits, never more
            np.testing.assert_allclose([v for _, v in step], [v for _, v in want_step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, tp", [("mixtral", 2), ("mixtral", 4), ("qwen2_moe", 2), ("qwen2_moe", 4), ("olmoe", 2),
                                      ("olmoe", 4)])
def test_tensor_parallel_equals_single_rank(checkpoints, reference, arch, tp):
    # TP 4 over 2 KV heads (Mixtral, OLMoE) and TP 2 over 1 (Qwen2-MoE): KV heads replicated.
    with LLM(checkpoints[arch], show_progress=False, tensor_parallel_size=tp) as llm:
        _assert_same(_run(llm), reference[arch])
        stats = llm.stats()
        assert stats["layout"] == {"tensor_parallel": tp, "context_parallel": 1, "data_parallel": 1, "expert_parallel": 1}
        assert stats["allreduce"]["transport"] == "shm" and stats["allreduce"]["calls"]["one_shot"] > 0


def test_scheduling_changes_nothing_under_tensor_parallelism(checkpoints, reference):
    """Chunked prefill (8-token budget), preemption (12 blocks for 5 requests), prefix-cache hits
    (a second pass) and batch composition (one request alone) give the same tokens."""
    with LLM(checkpoints["qwen2_moe"], show_progress=False, tensor_parallel_size=2, max_num_batched_tokens=8,
             kv_cache_blocks=12, block_size=4, max_model_len=48) as llm:
        _assert_same(_run(llm), reference["qwen2_moe"])
        _assert_same(_run(llm), reference["qwen2_moe"])  # now with prefix-cache hits
        assert llm.stats()["prefix_cache_hits"] > 0 and llm.stats()["num_preemptions"] > 0
        _assert_same(_run(llm, PROMPTS[1:2]), reference["qwen2_moe"][1:2])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_tp2_dp2_expert_parallel_equals_single_rank(checkpoints, reference, arch):
    with LLM(checkpoints[arch], show_progress=False, tensor_parallel_size=2, data_parallel_size=2,
             enable_expert_parallel=True) as llm:
        _assert_same(_run(llm), reference[arch])
        _assert_same(_run(llm, PROMPTS[:1]), reference[arch][:1])  # one replica idles
        load = llm.expert_load()
        assert all(len(layer) == 4 and sum(layer) > 0 for layer in load["rank_tokens"])


def test_gloo_allreduce_gives_the_same_tokens(checkpoints, reference):
    with LLM(checkpoints["mixtral"], show_progress=False, tensor_parallel_size=2, allreduce="torch") as llm:
        _assert_same(_run(llm), reference["mixtral"])
        assert llm.stats()["allreduce"]["transport"] == "torch"


@pytest.mark.parametrize("kwargs, param, fragment", [
    ({"tensor_parallel_size": 3}, "tensor_parallel_size", "num_attention_heads 4 must be divisible by tensor_parallel_size 3"),
    ({"tensor_parallel_size": 8}, "tensor_parallel_size", "num_attention_heads 4 must be divisible"),
    ({"data_parallel_size": 2}, "data_parallel_size", "needs --enable-expert-parallel"),
    ({"tensor_parallel_size": 2, "data_parallel_size": 3, "enable_expert_parallel": True}, "enable_expert_parallel",
     "num_experts 8 must be divisible by the expert-parallel size 6"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size", "must be an integer >= 1, got 0"),
    ({"expert_parallel_size": 2, "tensor_parallel_size": 2}, "expert_parallel_size", "cannot be combined"),
])
def test_bad_layouts_are_refused_naming_the_sizes(checkpoints, kwargs, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        LLM(checkpoints["mixtral"], show_progress=False, **kwargs)
    assert info.value.param == param and fragment in str(info.value), str(info.value)


def test_world_size_that_does_not_fit_the_layout_is_refused(checkpoints, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InvalidRequestError, match="2 x 1 x 1 = 2 ranks, but WORLD_SIZE is 3"):
        LLM(checkpoints["mixtral"], show_progress=False, tensor_parallel_size=2)


def test_a_dead_follower_fails_the_leader_within_seconds(checkpoints):
    llm = LLM(checkpoints["mixtral"], show_progress=False, tensor_parallel_size=2, ep_timeout_s=30)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        follower = llm.engine.runner.rank.procs[0]
        follower.kill()
        follower.wait()
        start = time.monotonic()
        with pytest.raises(CollectiveError, match="rank 1"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.close()


class _CountingSlice:
    """A safetensors slice that records how many elements each read asked for."""

    def __init__(self, inner, name: str, reads: dict) -> None:
        self.inner, self.name, self.reads = inner, name, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.reads[self.name] = self.reads.get(self.name, 0) + out.numel()
        return out


def test_each_rank_reads_only_the_part_it_holds(checkpoints, monkeypatch):
    from expertmesh.models import loader
    from expertmesh.parallel.apply import apply_parallelism
    from expertmesh.parallel.layout import ParallelConfig
    from expertmesh.parallel.tensor_parallel import TensorParallel

    reads: dict[str, int] = {}
    real = loader.iterate_weights
    monkeypatch.setattr(loader, "iterate_weights", lambda *a, **k: (
        (name, _CountingSlice(s, name, reads)) for name, s in real(*a, **k)))
    tp = TensorParallel(rank=1, world_size=2, allreduce=None)  # sharding only: nothing runs
    shard = lambda m: apply_parallelism(m, ParallelConfig(2).rank(1), tp, None)  # noqa: E731
    model, _ = loader.load_model(checkpoints["qwen2_moe"], show_progress=False, shard=shard)
    sizes = {}
    from safetensors import safe_open
    for file in loader.weight_files(checkpoints["qwen2_moe"]):
        with safe_open(str(file), framework="pt") as f:
            sizes.update({name: int(np.prod(f.get_slice(name).get_shape())) for name in f.keys()})
    half = [n for n in sizes if any(p in n for p in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                                       "embed_tokens", "lm_head"))]
    assert half and all(reads[n] * 2 == sizes[n] for n in half), {n: (reads[n], sizes[n]) for n in half}
    # KV heads (1 of them) are replicated and norms, router and shared-expert gate are whole.
    assert all(reads[n] == sizes[n] for n in sizes if n not in half)
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] == 2 * 16  # 2 of 4 heads of 16
