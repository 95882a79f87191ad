"""Sampler: greedy, the truncation masks, the distribution it draws from, per-request seeds that
do not depend on the batch, and logprobs. Statistical checks use many identical rows in one
call (vectorised, fast) and tolerances several standard deviations wide.

Legend: S rows, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from expertmesh.engine.sampler import Sampler, _mask_min_p, _mask_top_k_top_p
from expertmesh.sampling_params import SamplingParams

sampler = Sampler()


def draw(logits_row: torch.Tensor, params: SamplingParams, rows: int = 20000) -> torch.Tensor:
    """`rows` independent draws from one row of logits, as frequencies over V."""
    logits = logits_row.unsqueeze(0).expand(rows, -1).contiguous()  # [S, V]
    out = sampler(logits, [params] * rows, [None] * rows)
    return torch.bincount(out.token_ids, minlength=logits_row.numel()).float() / rows  # [V]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# A distribution with known probabilities: 0.5, 0.3, 0.15, 0.05.
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def test_greedy_is_argmax_and_ignores_generators():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)  # [S, V]
    g = gen(1)
    state = g.get_state()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)] * 3
    out = sampler(logits, params, [g, None] * 3)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(g.get_state(), state)  # greedy rows draw nothing
    assert out.logprobs is None


def test_mixed_batch_greedy_rows_exact_and_caller_logits_untouched():
    torch.manual_seed(1)
    logits = torch.randn(8, 64)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.3, top_p=0.9) for i in range(8)]
    out = sampler(logits, params, [None] * 8)
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))
    assert ((out.token_ids >= 0) & (out.token_ids < 64)).all()
    assert torch.equal(logits, before)


def test_top_k_one_mask_keeps_only_the_max():
    torch.manual_seed(2)
    logits = torch.randn(4, 50)
    masked = _mask_top_k_top_p(logits, torch.ones(4, dtype=torch.int64), torch.ones(4))
    assert torch.equal(masked.isfinite().sum(-1), torch.ones(4, dtype=torch.int64))
    assert torch.equal(masked.argmax(-1), logits.argmax(-1))


def test_top_k_keeps_the_k_best():
    torch.manual_seed(3)
    row = torch.randn(40)
    freq = draw(row, SamplingParams(temperature=1.0, top_k=3), rows=5000)
    allowed = set(row.topk(3).indices.tolist())
    assert set(freq.nonzero().flatten().tolist()) <= allowed
    expected = torch.zeros(40)
    expected[list(allowed)] = torch.softmax(row[list(allowed)], -1)
    assert (freq - expected).abs().max() < 0.04


def test_tiny_top_p_keeps_only_the_max():
    torch.manual_seed(4)
    logits = torch.randn(2000, 30)
    out = sampler(logits, [SamplingParams(temperature=1.5, top_p=1e-6)] * 2000, [None] * 2000)
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, 1), (0.7, 2), (0.85, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    freq = draw(LOGITS, SamplingParams(top_p=top_p))
    assert freq[kept:].sum() == 0
    expected = PROBS[:kept] / PROBS[:kept].sum()
    assert (freq[:kept] - expected).abs().max() < 0.02


def test_min_p_drops_tokens_below_a_share_of_the_best():
    # min_p 0.4 -> threshold 0.4 * 0.5 = 0.2: keeps 0.5 and 0.3.
    masked = _mask_min_p(LOGITS.unsqueeze(0), torch.tensor([0.4]))
    assert masked.isfinite().squeeze(0).tolist() == [True, True, False, False]
    freq = draw(LOGITS, SamplingParams(min_p=0.4))
    assert freq[2:].sum() == 0
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.02
    # min_p 0 keeps everything.
    assert _mask_min_p(LOGITS.unsqueeze(0), torch.tensor([0.0])).isfinite().all()


def test_masks_compose_top_k_then_top_p():
    # top_k 3 renormalises to 0.526, 0.316, 0.158; top_p 0.8 then keeps the first two.
    freq = draw(LOGITS, SamplingParams(top_k=3, top_p=0.8))
    assert freq[2:].sum() == 0 and freq[:2].sum() == 1


def test_draws_follow_the_softmax():
    freq = draw(LOGITS, SamplingParams(temperature=1.0), rows=40000)
    assert (freq - PROBS).abs().max() < 0.015  # ~6 standard deviations at 40k draws


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_and_flattens(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0])
    freq = draw(logits, SamplingParams(temperature=temperature), rows=40000)
    expected = torch.softmax(logits / temperature, -1)
    assert (freq - expected).abs().max() < 0.015
    base = torch.softmax(logits, -1)[0]
    assert (freq[0] > base + 0.1) if temperature < 1 else (freq[0] < base - 0.1)


def _seeded_run(seed: int, position: int, batch: int, steps: int, neighbour_seed: int) -> list[int]:
    """Tokens the seeded request draws over `steps` steps when it sits at `position` of a
    batch whose other rows are random logits with assorted params and generators."""
    target = torch.randn(steps, 200, generator=gen(123))  # the request's own logits per step
    noise = gen(neighbour_seed)
    mine = gen(seed)
    neighbour_params = [SamplingParams(temperature=0), SamplingParams(top_k=5), SamplingParams(top_p=0.5, min_p=0.1)]
    tokens = []
    for step in range(steps):
        logits = torch.randn(batch, 200, generator=noise)  # [S, V]
        logits[position] = target[step]
        params = [neighbour_params[i % 3] for i in range(batch)]
        params[position] = SamplingParams(temperature=1.0, top_p=0.95)
        gens = [gen(neighbour_seed + i) if i % 2 else None for i in range(batch)]
        gens[position] = mine
        tokens.append(int(sampler(logits, params, gens).token_ids[position]))
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    alone = _seeded_run(seed=7, position=0, batch=1, steps=30, neighbour_seed=0)
    assert _seeded_run(seed=7, position=3, batch=6, steps=30, neighbour_seed=1) == alone
    assert _seeded_run(seed=7, position=1, batch=9, steps=30, neighbour_seed=2) == alone
    # Unseeded neighbours drawing from the default generator do not disturb it either.
    torch.manual_seed(99)
    assert _seeded_run(seed=7, position=4, batch=5, steps=30, neighbour_seed=3) == alone


def test_different_seeds_differ():
    runs = {tuple(_seeded_run(seed=s, position=0, batch=2, steps=30, neighbour_seed=0)) for s in range(4)}
    assert len(runs) == 4


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(5)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(temperature=0.5, logprobs=3),
        SamplingParams(temperature=0.0),  # no logprobs
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=2.0, top_k=4, logprobs=5),
    ]
    out = sampler(logits, params, [gen(1), None, None, gen(2)])
    assert out.logprobs is not None
    reference = torch.log_softmax(logits, -1)  # raw: before temperature and masks
    assert not out.logprobs.has_row(1)
    with pytest.raises(KeyError):
        out.logprobs.row(1)
    for row, n in [(0, 3), (2, 0), (3, 5)]:
        token = int(out.token_ids[row])
        sampled_lp, top_ids, top_lps, rank = out.logprobs.row(row)
        assert sampled_lp == pytest.approx(reference[row, token].item(), abs=1e-6)
        assert rank == int((reference[row] > reference[row, token]).sum()) + 1
        assert len(top_ids) == len(top_lps) == n
        values, ids = reference[row].topk(5)
        assert top_ids == ids[:n].tolist()
        assert top_lps == pytest.approx(values[:n].tolist(), abs=1e-6)
        entry = out.logprobs.to_logprob_dict(row, token, decode=lambda t: f"<{t}>")
        assert next(iter(entry)) == token and entry[token].rank == rank
        assert entry[token].decoded_token == f"<{token}>"
        for r, tid in enumerate(top_ids, start=1):
            assert entry[tid].rank == r
    # The greedy row's sampled token is the best one.
    assert out.logprobs.row(2)[3] == 1


def test_logprob_ranks_share_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    out = sampler(logits, [SamplingParams(temperature=0, logprobs=3)], [None])
    assert out.logprobs is not None
    assert out.logprobs.top_ranks.tolist() == [[1, 1, 3]]
    assert out.logprobs.row(0)[3] == 1


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        sampler(torch.zeros(5), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="2 rows, 1 params, 2 generators"):
        sampler(torch.zeros(2, 5), [SamplingParams()], [None, None])
