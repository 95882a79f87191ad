"""Serving metrics, defined exactly as vLLM's serving benchmark defines them, so numbers line up.

Per request (all client-side, measured from the moment the request is sent):
- TTFT: time to the first streamed chunk that carries a choice (its text may be empty).
- ITL: every gap between consecutive such chunks, pooled over all requests. A chunk may hold
  several tokens, so ITL measures what a user sees, not per-token compute.
- E2EL: time to the last chunk that carries a choice (the trailing usage chunk and [DONE] do
  not count).
- TPOT: (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token.
  output_tokens comes from the server's usage report; without one, the number of chunks.

Aggregates: mean, median, std and percentiles (numpy's linear interpolation) over successful
requests; durations are reported in milliseconds. Throughputs divide by the benchmark's wall
duration (first send to last completion). Goodput = successful requests meeting every SLO
given (ttft, tpot, e2el in ms; a request with one output token has TPOT 0 for this test)
per second. Failed requests count toward nothing but `failed` and `errors`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    """What the load generator saw of one request. Times in seconds; start_time is relative
    to the benchmark's start."""

    index: int
    prompt_len: int
    max_tokens: int
    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    usage_reported: bool = False
    error_kind: str | None = None  # http_429, timeout, connection, stream_error, no_token, ...
    error: str = ""
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds), validated."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        for item in spec.split():
            name, sep, value = item.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"--goodput takes NAME:MS with NAME one of {SLO_METRICS}, got {item!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput {name} must be a number of milliseconds, got {value!r}") from None
            if not ms > 0:
                raise ValueError(f"--goodput {name} must be > 0 ms, got {ms}")
            slos[name] = ms
    return slos


def _stats(values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """mean / median / std / pNN in milliseconds; zeros for an empty list (as vLLM reports)."""
    arr = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p))
    return out


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    slos: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
    num_requested: int | None = None,
) -> dict[str, Any]:
    """Aggregate per-request results into the benchmark's metrics (a flat, JSON-ready dict)."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    slos = slos or {}
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = duration_s if duration_s > 0 else math.nan
    ttfts = [r.ttft for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    good = sum(1 for r in ok if meets_slos(r, slos)) if slos else None
    requested = len(results) if num_requested is None else num_requested
    metrics: dict[str, Any] = {
        "num_requested": requested,
        "completed": len(ok),
        "failed": len(failed),
        "lost": requested - len(results),  # sent but never answered (must be 0)
        "errors": dict(sorted(Counter(r.error_kind or "unknown" for r in failed).items())),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": (good / dur) if good is not None else None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "goodput_slos_ms": dict(slos),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for stat, value in _stats(values, percentiles).items():
            metrics[f"{stat}_{name}_ms"] = value
    peak_tps, peak_conc = _peaks(ok)
    metrics["max_output_tokens_per_s"] = peak_tps
    metrics["max_concurrent_requests"] = peak_conc
    return metrics


def token_times(r: RequestResult) -> list[float]:
    """Arrival time of each content chunk, relative to the benchmark start."""
    t = r.start_time + r.ttft
    times = [t]
    for gap in r.itl:
        t += gap
        times.append(t)
    return times


def timeline(results: list[RequestResult], bucket_s: float = 1.0) -> dict[str, list[float]]:
    """Per bucket: output chunks/s (tokens/s when each chunk is one token, as on expertmesh),
    requests completed/s and requests in flight at the bucket's start; for the plots."""
    ok = [r for r in results if r.success]
    if not ok:
        return {"t": [], "output_chunks_per_s": [], "completed_per_s": [], "in_flight": []}
    end = max(r.start_time + r.latency for r in ok)
    n = int(math.ceil(end / bucket_s)) + 1
    chunks, done, flight = np.zeros(n), np.zeros(n), np.zeros(n)
    for r in ok:
        for t in token_times(r):
            chunks[min(n - 1, int(t / bucket_s))] += 1
        done[min(n - 1, int((r.start_time + r.latency) / bucket_s))] += 1
    starts = np.arange(n) * bucket_s
    for r in results:
        if r.success:
            flight += (starts >= r.start_time) & (starts < r.start_time + r.latency)
    return {"t": starts.tolist(), "output_chunks_per_s": (chunks / bucket_s).tolist(),
            "completed_per_s": (done / bucket_s).tolist(), "in_flight": flight.tolist()}


def _peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """vLLM's max output tokens/s (1 s buckets of chunk arrivals) and exact peak concurrency
    (sweep over half-open [start, end) intervals, departures before arrivals on ties)."""
    if not ok:
        return 0.0, 0
    peak_tps = max(timeline(ok, 1.0)["output_chunks_per_s"])
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return float(peak_tps), peak
