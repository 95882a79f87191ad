"""Choosing the next token of every sampling request in a batch: `Sampler`.

Per row, in vLLM's order: greedy rows take the argmax of the raw logits; the others divide by
temperature, keep the top_k best, keep the smallest set whose mass reaches top_p, drop tokens
under min_p times the best token's probability, and draw from what remains.

Drawing uses the exponential race: token = argmax(p_i / q_i) with q_i ~ Exp(1) i.i.d., which
picks token i with probability p_i exactly (the first arrival of independent Poisson clocks of
rates p_i). Its only randomness is one Exp(1) per vocabulary entry, so a row with its own
torch.Generator fills its noise from that generator alone: a seeded request gets the same
tokens whatever its batch position or neighbours. Rows without one share the default generator.

Logprobs are those of the raw model distribution (log_softmax before temperature and masks),
as vLLM reports by default.

Legend: S sampled requests (rows), V vocabulary, L rows asking for logprobs, K most top
logprobs asked for by any row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from expertmesh.outputs import Logprob
from expertmesh.sampling_params import SamplingParams


@dataclass
class BatchLogprobs:
    """Logprobs of the rows that asked for them, kept as tensors until someone reads a row."""

    rows: list[int]  # [L] batch rows that asked, ascending
    num_top: list[int]  # [L] top-n each asked for (<= K)
    sampled_logprobs: torch.Tensor  # [L] fp32, logprob of the sampled token
    sampled_ranks: torch.Tensor  # [L] int64, 1-based rank of the sampled token in the vocab
    top_ids: torch.Tensor  # [L, K] int64, best first
    top_logprobs: torch.Tensor  # [L, K] fp32
    top_ranks: torch.Tensor  # [L, K] int64, 1-based; ties share the better rank

    def __post_init__(self) -> None:
        self._index = {row: i for i, row in enumerate(self.rows)}
        # One device->host copy for the whole batch instead of one per row.
        self._host = (
            self.sampled_logprobs.tolist(),
            self.sampled_ranks.tolist(),
            self.top_ids.tolist(),
            self.top_logprobs.tolist(),
            self.top_ranks.tolist(),
        )

    def has_row(self, row: int) -> bool:
        return row in self._index

    def row(self, row: int) -> tuple[float, list[int], list[float], int]:
        """(sampled logprob, top-n ids, top-n logprobs, sampled rank) of batch row `row`."""
        i = self._index.get(row)
        if i is None:
            raise KeyError(f"batch row {row} did not ask for logprobs (rows that did: {self.rows})")
        sampled_lp, sampled_rank, top_ids, top_lps, _ = (h[i] for h in self._host)
        n = self.num_top[i]
        return sampled_lp, top_ids[:n], top_lps[:n], sampled_rank

    def to_logprob_dict(
        self, row: int, sampled_token_id: int, decode: Callable[[int], str] | None = None
    ) -> dict[int, Logprob]:
        """Row `row` as the outputs' per-token dict: the sampled token first, then the top-n
        best first (a top-n token that was also sampled appears once), ranks 1-based."""
        i = self._index.get(row)
        if i is None:
            raise KeyError(f"batch row {row} did not ask for logprobs (rows that did: {self.rows})")
        sampled_lp, sampled_rank, top_ids, top_lps, top_ranks = (h[i] for h in self._host)
        def text(token_id: int) -> str | None:
            return None if decode is None else decode(token_id)

        entry = {sampled_token_id: Logprob(sampled_lp, sampled_rank, text(sampled_token_id))}
        for tid, lp, rank in list(zip(top_ids, top_lps, top_ranks))[: self.num_top[i]]:
            if tid not in entry:
                entry[tid] = Logprob(lp, rank, text(tid))
        return entry


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: BatchLogprobs | None  # None when no row asked for logprobs


class Sampler:
    """Stateless; call it with a step's logits, each row's params and each row's generator.

    A generator must live on the logits' device (torch.Generator(device=logits.device)).
    """

    def __call__(
        self,
        logits: torch.Tensor,  # [S, V]
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [S, V], got shape {tuple(logits.shape)}")
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"need one SamplingParams and one generator per logits row: {num_rows} rows, "
                f"{len(params)} params, {len(generators)} generators"
            )
        logits = logits.float()
        device = logits.device

        token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)  # [S]
        greedy = [p.greedy for p in params]
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if len(greedy_rows) == num_rows:
            token_ids = logits.argmax(dim=-1)
        else:
            if greedy_rows:
                idx = torch.tensor(greedy_rows, device=device)
                token_ids[idx] = logits[idx].argmax(dim=-1)
            if len(random_rows) == num_rows:
                token_ids = self._sample(logits, params, generators)
            else:
                idx = torch.tensor(random_rows, device=device)
                token_ids[idx] = self._sample(
                    logits[idx], [params[i] for i in random_rows], [generators[i] for i in random_rows]
                )

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = None
        if logprob_rows:
            logprobs = self._logprobs(logits, token_ids, logprob_rows, [params[i].logprobs or 0 for i in logprob_rows])
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    # ---- random rows -------------------------------------------------------------------

    def _sample(
        self,
        logits: torch.Tensor,  # [S, V], rows that are not greedy
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:  # [S] int64
        device = logits.device
        vocab = logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits = logits / temperature.unsqueeze(1)  # [S, V], a new tensor: the caller's stays intact

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _mask_top_k_top_p(
                logits,
                torch.tensor(top_k, dtype=torch.int64, device=device),
                torch.tensor(top_p, dtype=torch.float32, device=device),
            )
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            logits = _mask_min_p(logits, min_p)

        probs = torch.softmax(logits, dim=-1)  # [S, V], masked tokens have probability 0
        noise = _exponential_noise(probs.shape, generators, device)  # [S, V] ~ Exp(1)
        return (probs / noise).argmax(dim=-1)

    # ---- logprobs ----------------------------------------------------------------------

    def _logprobs(
        self,
        logits: torch.Tensor,  # [S, V] raw
        token_ids: torch.Tensor,  # [S]
        rows: list[int],
        num_top: list[int],
    ) -> BatchLogprobs:
        idx = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits[idx], dim=-1)  # [L, V]
        sampled = logprobs.gather(1, token_ids[idx].unsqueeze(1))  # [L, 1]
        # Rank = 1 + tokens strictly more likely, so a tie never ranks the sampled token worse.
        sampled_ranks = (logprobs > sampled).sum(dim=-1) + 1  # [L]
        k = max(num_top)
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [L, K]
        # Anything strictly more likely than a top-K entry is itself in the top K, so counting
        # inside the top K gives the same competition rank as counting over the vocabulary.
        top_ranks = (top_logprobs.unsqueeze(1) > top_logprobs.unsqueeze(2)).sum(dim=-1) + 1  # [L, K]
        return BatchLogprobs(
            rows=rows,
            num_top=num_top,
            sampled_logprobs=sampled.squeeze(1),
            sampled_ranks=sampled_ranks,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            top_ranks=top_ranks,
        )


def _mask_top_k_top_p(
    logits: torch.Tensor,  # [S, V]
    top_k: torch.Tensor,  # [S] int64 in [1, V]; V = off
    top_p: torch.Tensor,  # [S] fp32 in (0, 1]; 1 = off
) -> torch.Tensor:  # [S, V] with dropped tokens at -inf
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # [S, V] ascending
    # top-k: drop everything below the k-th best value (ties with it stay, as in vLLM).
    kth_best = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))  # [S, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_best, float("-inf"))
    # top-p: walking up from the least likely token, drop tokens while the mass dropped so far
    # stays <= 1 - p; what survives is the smallest best-first set with mass >= p.
    sorted_probs = sorted_logits.softmax(dim=-1)  # [S, V]
    dropped_mass = sorted_probs.cumsum(dim=-1)  # [S, V]
    drop = dropped_mass <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _mask_min_p(
    logits: torch.Tensor,  # [S, V]
    min_p: torch.Tensor,  # [S] in [0, 1]
) -> torch.Tensor:  # [S, V]
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed, and the
    # softmax normaliser cancels, so earlier masks (which renormalise) do not change the test.
    best = logits.max(dim=-1, keepdim=True).values  # [S, 1]
    threshold = best + min_p.log().unsqueeze(1)  # log(0) = -inf keeps everything
    return logits.masked_fill(logits < threshold, float("-inf"))


def _exponential_noise(
    shape: torch.Size,  # (S, V)
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:  # [S, V] ~ Exp(1), strictly positive
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        noise.exponential_()
    else:
        for i in seeded:  # each seeded row draws V numbers from its own generator, nothing else
            noise[i].exponential_(generator=generators[i])
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=device)
            noise[idx] = torch.empty((len(unseeded), shape[1]), dtype=torch.float32, device=device).exponential_()
    # A zero draw would make p/q = 0/0 = NaN for a masked token, and argmax picks NaN.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)
