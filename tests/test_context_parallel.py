"""Context parallelism on CPU rank processes: CP=2 (every variant) gives one rank's greedy
tokens and logprobs for prompts whose lengths do not divide by the ring, mixed with short
(plain) requests, through prefill and decode; ring partials merged by LSE equal full attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.parallel.context_parallel import block_owner
from expertmesh.parallel.ring_attention import merge, partial_attention
from model_factory import add_default_tokenizer, make_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
_RNG = np.random.default_rng(0)
PROMPTS = [_RNG.integers(5, 600, size=n).tolist() for n in (70, 5, 133, 41)]


def test_zigzag_placement_balances_blocks_and_pins_the_first_ones_to_rank_0():
    owners = block_owner(np.arange(3 + 16), cp_size=4, first_blocks=3)
    assert owners[:3].tolist() == [0, 0, 0]
    assert owners[3:11].tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert np.bincount(owners[3:], minlength=4).tolist() == [4, 4, 4, 4]


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    return str(add_default_tokenizer(make_checkpoint(root, "mixtral", vocab_size=652, initializer_range=0.1)))


def _run(llm: LLM):
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in s.items()) for s in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, show_progress=False, block_size=4) as llm:
        return _run(llm)


@pytest.mark.parametrize("variant", ["auto", "pass-kv", "pass-q"])
def test_context_parallel_equals_single_rank(checkpoint, reference, variant):
    with LLM(checkpoint, show_progress=False, block_size=4, context_parallel_size=2, cp_min_tokens=16,
             cp_variant=variant) as llm:
        got = _run(llm)
        stats = llm.stats()
    for (tokens, steps), (want_tokens, want_steps) in zip(got, reference, strict=True):
        assert tokens == want_tokens
        for step, want in zip(steps, want_steps, strict=True):
            assert [t for t, _ in step] == [t for t, _ in want]
            np.testing.assert_allclose([v for _, v in step], [v for _, v in want], rtol=1e-5, atol=1e-5)
    cp = stats["context_parallel"]
    assert stats["layout"]["context_parallel"] == 2 and cp["ring_bytes"] > 0
    if variant == "auto":  # prefills pass KV, decodes pass queries
        assert cp["request_steps"]["pass-kv"] > 0 and cp["request_steps"]["pass-q"] > 0
    else:
        assert cp["request_steps"][variant] > 0 and sum(cp["request_steps"].values()) == cp["request_steps"][variant]
