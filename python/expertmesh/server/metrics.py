"""Prometheus metrics, named as vLLM names them (with the `expertmesh:` prefix) so operators'
dashboards and alerts carry over: `expertmesh:num_requests_running` is `vllm:num_requests_running`.

Two sources. What the frontend sees itself (token counts, latencies) goes into ordinary
prometheus-client metrics. What only the engine knows (queue lengths, KV-cache use, prefix-cache
and preemption counters, tokens routed to each expert) arrives in the engine's stats frames and
is exported by a collector that reads the latest frame at scrape time, so a scrape never waits
on the engine and cumulative engine counters stay counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Exports the latest engine stats frame (a dict; empty until the engine's first frame)."""

    def __init__(self, stats: Any, model: str) -> None:
        self._stats = stats  # a callable returning the latest frame
        self._model = model

    def collect(self):
        s = self._stats() or {}
        labels = ["model_name"]
        value = [self._model]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"expertmesh:{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"expertmesh:{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        blocks = s.get("num_blocks") or 0
        used = blocks - s.get("num_free_blocks", blocks)
        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used / blocks if blocks else 0.0)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_cache_hits", 0))
        yield counter("num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.",
                      s.get("num_preemptions", 0))
        if "weight_bytes" in s:  # this rank's weights, quantized values and scales included
            weights = GaugeMetricFamily("expertmesh:model_weight_bytes", "Bytes of model weights on rank 0, by "
                                        "quantization (none = full precision).",
                                        labels=["model_name", "quantization"])
            weights.add_metric([self._model, s.get("quantization") or "none"], s["weight_bytes"])
            yield weights
            yield gauge("kv_cache_blocks", "KV-cache blocks the engine holds.", blocks)
        layout = s.get("layout")
        if layout:
            sizes = GaugeMetricFamily("expertmesh:parallel_size", "Ranks of each parallel dimension.",
                                      labels=["model_name", "dim"])
            for dim, n in layout.items():
                sizes.add_metric([self._model, dim], n)
            yield sizes
        allreduce = s.get("allreduce")
        if allreduce:
            for what, doc in (("calls", "Tensor-parallel allreduce calls on rank 0, by algorithm."),
                              ("bytes", "Bytes rank 0 reduced with the tensor-parallel allreduce, by algorithm.")):
                family = CounterMetricFamily(f"expertmesh:allreduce_{what}", doc,
                                             labels=["model_name", "transport", "algorithm"])
                for algorithm, n in allreduce[what].items():
                    family.add_metric([self._model, allreduce["transport"], algorithm], n)
                yield family
        yield from _context_parallel_metrics(s.get("context_parallel"), self._model)
        yield from _kv_transfer_metrics(s.get("kv_transfer"), gauge, counter)
        experts = CounterMetricFamily("expertmesh:expert_tokens", "Tokens routed to each expert (MoE load).",
                                      labels=["model_name", "layer", "expert"])
        for layer, counts in enumerate(s.get("expert_tokens", [])):
            for expert, n in enumerate(counts):
                experts.add_metric([self._model, str(layer), str(expert)], n)
        yield experts
        if "rank_tokens" not in s:  # expert parallelism is off
            return
        ranks = CounterMetricFamily("expertmesh:rank_tokens",
                                    "Expert-parallel: (token, expert) pairs routed to each rank's experts.",
                                    labels=["model_name", "layer", "rank"])
        for layer, counts in enumerate(s.get("rank_tokens", [])):
            for rank, n in enumerate(counts):
                ranks.add_metric([self._model, str(layer), str(rank)], n)
        yield ranks


class ServerMetrics:
    def __init__(self, model: str, engine_stats: Any, admission: Any = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("expertmesh:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("expertmesh:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter("expertmesh:request_success", "Requests finished, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.request_errors = Counter("expertmesh:request_errors", "Requests answered with an error, by HTTP status "
                                      "and error code (errors inside a started stream included).",
                                      ["model_name", "status", "code"], registry=r)
        self.ttft = Histogram("expertmesh:time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("expertmesh:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("expertmesh:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("expertmesh:request_queue_time_seconds",
                                    "Engine arrival to the step that produced the first token.", labels,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.model = model
        r.register(_EngineCollector(engine_stats, model))
        if admission is not None:  # what the frontend holds: back to 0 whenever it is idle
            Gauge("expertmesh:frontend_waiting_seqs", "Sequences admitted that have no token yet.", labels,
                  registry=r).labels(model).set_function(lambda: admission.waiting_seqs)
            Gauge("expertmesh:frontend_waiting_tokens", "Prompt tokens (x n) admitted that have no token yet.", labels,
                  registry=r).labels(model).set_function(lambda: admission.waiting_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- what the request handlers report ----------------------------------------------

    def first_token(self, seconds: float, queue_time: float | None) -> None:
        self.ttft.labels(self.model).observe(seconds)
        if queue_time is not None:
            self.queue_time.labels(self.model).observe(queue_time)

    def tokens(self, n: int, gap_seconds: float | None) -> None:
        """n new tokens arrived; gap_seconds since the previous ones (None for the first)."""
        self.generation_tokens.labels(self.model).inc(n)
        if gap_seconds is not None and n:
            # A frame can carry several tokens of one sequence; spread the gap over them.
            for _ in range(n):
                self.itl.labels(self.model).observe(gap_seconds / n)

    def error(self, status: int, code: str | None) -> None:
        self.request_errors.labels(self.model, str(status), code or "none").inc()

    def finished(self, prompt_tokens: int, seconds: float, reason: str) -> None:
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.e2e.labels(self.model).observe(seconds)
        self.request_success.labels(self.model, reason).inc()


_KV_COUNTERS = {  # engine_kv.py stats -> (metric, doc)
    "exports": ("kv_transfer_exports", "Prefill: finished prompts whose KV blocks were pinned for a decode server."),
    "pulls": ("kv_transfer_pulls", "Prefill: pulls served to decode servers."),
    "pull_failures": ("kv_transfer_pull_failures", "Prefill: pulls that failed midway."),
    "expired": ("kv_transfer_expired", "Prefill: pinned KV let go because nobody pulled it in time."),
    "imports": ("kv_transfer_imports", "Decode: pulled KV installed into the prefix cache."),
    "failures": ("kv_transfer_failures", "Decode: pulls that failed (the request computed its prompt itself)."),
    "bytes": ("kv_transfer_bytes", "KV bytes moved (served on a prefill server, received on a decode server)."),
    "blocks": ("kv_transfer_blocks", "KV blocks moved."),
    "blocks_already_cached": ("kv_transfer_blocks_skipped", "Decode: prompt blocks already cached, not pulled."),
    "seconds": ("kv_transfer_seconds", "Decode: time spent pulling KV."),
}


def _context_parallel_metrics(cp, model: str):
    if not cp:
        return
    for key, name, doc in (("requests", "cp_requests", "Requests served context-parallel, by variant (a request "
                                                        "counts once in each variant its steps used)."),
                           ("request_steps", "cp_request_steps", "Context-parallel request-steps, by variant.")):
        family = CounterMetricFamily(f"expertmesh:{name}", doc, labels=["model_name", "variant"])
        for variant, n in cp[key].items():
            family.add_metric([model, variant], n)
        yield family
    ring = CounterMetricFamily("expertmesh:cp_ring_bytes", "Bytes CP rank 0 of each replica sent over the "
                               "context-parallel ring (pass-Q returns included).", labels=["model_name", "transport"])
    ring.add_metric([model, cp["transport"]], cp["ring_bytes"])
    yield ring


def _kv_transfer_metrics(kv, gauge, counter):
    if not kv:
        return
    if "pinned" in kv:
        yield gauge("kv_transfer_pinned", "Prefill: finished prompts whose KV waits for its pull.", kv["pinned"])
    if "waiting" in kv:
        yield gauge("kv_transfer_waiting", "Decode: requests waiting for their KV.", kv["waiting"])
    for key, (name, doc) in _KV_COUNTERS.items():
        if key in kv:
            yield counter(name, doc, kv[key])
