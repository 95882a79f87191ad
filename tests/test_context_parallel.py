"""Context parallelism on CPU rank processes gives one rank's greedy tokens and logprobs: CP=2
in every variant, CP=4 over prompts of thousands of tokens with chunked prefill and prefix-cache
hits, CP x TP over sliding-window layers, CP x DP with expert parallelism; prompt lengths do not
divide by the ring and short (plain) requests ride along, through prefill and decode. Ring
partials merged by LSE equal full attention; a dead CP rank fails its peers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cp_workers import SIZES, message, ring_round_trips, ring_with_a_dead_rank
from ep_util import run_ranks
from expertmesh import LLM, SamplingParams
from expertmesh.errors import CollectiveError, InvalidRequestError
from expertmesh.parallel.ring_attention import _attend_tile, merge, partial_attention
from model_factory import add_default_tokenizer, make_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
_RNG = np.random.default_rng(0)
PROMPTS = [_RNG.integers(5, 600, size=n).tolist() for n in (70, 5, 133, 41)]


@pytest.mark.parametrize("world", [2, 3])
def test_ring_transports_deliver_every_message_in_order(world):
    """Shared memory (2 slots of 4 KB: the big messages go in many chunks while every rank is
    still sending) and torch.distributed deliver the same bytes."""
    results = run_ranks(ring_round_trips, world)
    for rank, got in enumerate(results):
        for transport in ("shm", "torch"):
            for step, numel in enumerate(SIZES):
                want = message((rank - 1) % world, rank, step, numel)
                assert torch.equal(got[transport][("ring", step)], want), (transport, step)
            for x in range(world):
                if x != rank:
                    assert torch.equal(got[transport][("all", x)], message(x, rank, 99, 500 * (x + 1) + rank))


def test_a_dead_peer_fails_the_shm_ring_within_seconds():
    """Rank 2 leaves after one step: rank 0, waiting on its message, fails naming it; rank 1
    still gets rank 0's."""
    (text, waited), (other, _), _ = run_ranks(ring_with_a_dead_rank, 3)
    assert "lost CP rank 2" in text and waited < 5, (text, waited)
    assert other == "no error"


@pytest.mark.parametrize("window", [None, 5])
def test_partials_over_split_keys_merge_into_full_attention(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    q_pos, k_pos = np.arange(11, 20), np.arange(20)
    full, full_lse = partial_attention(q, q_pos, k, v, k_pos, [(0, 9, 0, 20)], 0.3, window)
    out = torch.zeros(9, 4, 8)
    lse = torch.full((9, 4), float("-inf"))
    for keys in (np.arange(0, 20, 3), np.setdiff1d(np.arange(20), np.arange(0, 20, 3))):  # two "ranks"
        o, s = partial_attention(q, q_pos, k[keys], v[keys], k_pos[keys], [(0, 9, 0, len(keys))], 0.3, window)
        merge(out, lse, o, s)
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-6)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    mask = torch.from_numpy(k_pos[None] <= q_pos[:, None])
    if window is not None:
        mask &= torch.from_numpy(q_pos[:, None] - k_pos[None] < window)
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1),
                        v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 100])
def test_cpu_flash_tiles_equal_the_einsum_tiles(window):
    """The CPU path (flash attention by row tiles: unmasked keys, then the masked band) against
    one masked einsum tile, on positions interleaved like two CP ranks' blocks, three row tiles,
    GQA, and rows that see no key at all."""
    rng = np.random.default_rng(1)
    q_pos = np.sort(rng.choice(np.arange(200, 4000), 1100, replace=False))
    k_pos = np.sort(rng.choice(np.arange(300, 4000), 1500, replace=False))  # the first rows see nothing
    q, k, v = torch.randn(1100, 4, 16), torch.randn(1500, 2, 16), torch.randn(1500, 2, 16)
    got, got_lse = partial_attention(q, q_pos, k, v, k_pos, [(0, 1100, 0, 1500)], 0.25, window)
    want, want_lse = _attend_tile(q, torch.from_numpy(q_pos), k, v, torch.from_numpy(k_pos), 0.25, window)
    blind = q_pos < 300
    assert blind.any() and torch.isinf(got_lse[torch.from_numpy(blind)]).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    return str(add_default_tokenizer(make_checkpoint(root, "mixtral", vocab_size=652, initializer_range=0.1)))


def _run(llm: LLM, prompts=PROMPTS):
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in s.items()) for s in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, show_progress=False, block_size=4) as llm:
        return _run(llm)


def _assert_same(got, want):
    for (tokens, steps), (want_tokens, want_steps) in zip(got, want, strict=True):
        assert tokens == want_tokens
        for step, want_step in zip(steps, want_steps, strict=True):
            assert [t for t, _ in step] == [t for t, _ in want_step]
            np.testing.assert_allclose([v for _, v in step], [v for _, v in want_step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, transport", [("auto", "shm"), ("auto", "torch"), ("pass-kv", "shm"),
                                                ("pass-q", "shm")])
def test_context_parallel_equals_single_rank(checkpoint, reference, variant, transport):
    with LLM(checkpoint, show_progress=False, block_size=4, context_parallel_size=2, cp_min_tokens=16,
             cp_variant=variant, cp_transport=transport) as llm:
        got = _run(llm)
        stats = llm.stats()
    _assert_same(got, reference)
    cp = stats["context_parallel"]
    assert stats["layout"]["context_parallel"] == 2 and cp["ring_bytes"] > 0 and cp["transport"] == transport
    # three prompts are longer than cp_min_tokens; 5 + 4 tokens never are
    if variant == "auto":  # prefills pass KV, decodes pass queries
        assert cp["request_steps"]["pass-kv"] > 0 and cp["request_steps"]["pass-q"] > 0
        assert cp["requests"] == {"pass-kv": 3, "pass-q": 3}
    else:
        assert cp["request_steps"][variant] > 0 and sum(cp["request_steps"].values()) == cp["request_steps"][variant]
        assert cp["requests"][variant] == 3 and sum(cp["requests"].values()) == 3


def test_each_cp_rank_holds_its_share_of_the_kv_cache(checkpoint, reference):
    """24 blocks per rank cannot hold one 160-token sequence (40 blocks of 4); split over CP=2
    (rank 0: the 4 first blocks and half the rest, 22) they can, and the prompts run with their
    KV spread over both ranks' caches."""
    small = dict(show_progress=False, block_size=4, kv_cache_blocks=24, max_model_len=160, cp_min_tokens=16)
    with pytest.raises(InvalidRequestError, match=r"kv_cache_blocks 24 cannot hold one sequence of max_model_len 160 "
                                                  r"\(40 blocks of 4 tokens\)"):
        LLM(checkpoint, **small)
    with LLM(checkpoint, context_parallel_size=2, **small) as llm:
        assert llm.engine.runner.kv_caches[0][0].shape[0] == 24 and llm.engine.scheduler.num_blocks == 48
        _assert_same(_run(llm), reference)
    with pytest.raises(InvalidRequestError, match="22 blocks of 4 tokens on one of 2 context-parallel ranks"):
        LLM(checkpoint, context_parallel_size=2, **{**small, "kv_cache_blocks": 21})


LONG_PROMPTS = [_RNG.integers(5, 600, size=n).tolist() for n in (2900, 9, 1201, 333)]


def test_cp4_long_prompts_chunked_prefill_and_prefix_hits(tmp_path):
    """CP=4 over prompts of up to 2,900 tokens, prefilled in 512-token chunks; a second pass
    hits the prefix cache, so its short appends to a long cached context take pass-Q."""
    path = str(add_default_tokenizer(make_checkpoint(tmp_path, "mixtral", vocab_size=652, initializer_range=0.1,
                                                     max_position_embeddings=4096)))
    with LLM(path, show_progress=False, block_size=16) as llm:
        want = _run(llm, LONG_PROMPTS)
    with LLM(path, show_progress=False, block_size=16, context_parallel_size=4, cp_min_tokens=64,
             max_num_batched_tokens=512) as llm:
        _assert_same(_run(llm, LONG_PROMPTS), want)
        first = llm.stats()["context_parallel"]["request_steps"]
        _assert_same(_run(llm, LONG_PROMPTS), want)
        stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    second = stats["context_parallel"]["request_steps"]
    assert first["pass-kv"] > 0  # chunked prefills pass KV
    # the second pass prefills nothing long, only appends to cached blocks: pass-Q throughout
    assert second["pass-kv"] == first["pass-kv"] and second["pass-q"] > first["pass-q"]


def test_cp2_tp2_over_sliding_window_layers(tmp_path):
    """Qwen2-MoE with a 24-token window on layer 0 (full attention on 1 and 2), one KV head
    replicated over TP=2, and CP=2 on top: four ranks, one replica."""
    path = str(add_default_tokenizer(make_checkpoint(
        tmp_path, "qwen2_moe", vocab_size=652, initializer_range=0.1, num_hidden_layers=3, mlp_only_layers=[1],
        use_sliding_window=True, sliding_window=24, max_window_layers=1)))
    with LLM(path, show_progress=False, block_size=4) as llm:
        want = _run(llm)
    with LLM(path, show_progress=False, block_size=4, tensor_parallel_size=2, context_parallel_size=2,
             cp_min_tokens=16) as llm:
        assert llm.engine.runner.model.config.sliding_windows == [24, None, None]
        _assert_same(_run(llm), want)
        assert llm.stats()["layout"] == {"tensor_parallel": 2, "context_parallel": 2, "data_parallel": 1,
                                         "expert_parallel": 1}


def test_cp2_dp2_expert_parallel_equals_single_rank(checkpoint, reference):
    """Two replicas of two CP ranks each, the experts split over all four ranks."""
    with LLM(checkpoint, show_progress=False, block_size=4, context_parallel_size=2, data_parallel_size=2,
             enable_expert_parallel=True, cp_min_tokens=16) as llm:
        _assert_same(_run(llm), reference)
        stats = llm.stats()
        per_replica = [r["context_parallel"]["requests"]["pass-kv"] for r in llm.engine.stats()["ranks"]]
    assert stats["layout"] == {"tensor_parallel": 1, "context_parallel": 2, "data_parallel": 2, "expert_parallel": 4}
    assert stats["context_parallel"]["requests"] == {"pass-kv": 3, "pass-q": 3} and sorted(per_replica) == [1, 2]


def test_a_dead_cp_rank_fails_the_others_within_seconds(checkpoint):
    llm = LLM(checkpoint, show_progress=False, block_size=4, context_parallel_size=2, cp_min_tokens=16,
              ep_timeout_s=30)
    try:
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)
        peer = llm.engine.runner.rank.procs[0]
        peer.kill()
        peer.wait()
        start = time.monotonic()
        with pytest.raises(CollectiveError, match="rank 1"):
            llm.generate([PROMPTS[2]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.close()
