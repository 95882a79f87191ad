"""The router's Prometheus metrics: every request's outcome per backend, and each backend's
health, in-flight requests and published queue, read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from expertmesh.router.backends import BackendPool


class _PoolCollector:
    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self):
        families = {
            "healthy": GaugeMetricFamily("expertmesh_router:backend_healthy", "1 if the backend passes its checks.",
                                         labels=["backend"]),
            "in_flight": GaugeMetricFamily("expertmesh_router:backend_in_flight",
                                           "Requests this router has open on the backend.", labels=["backend"]),
            "queued": GaugeMetricFamily("expertmesh_router:backend_queued",
                                        "Running + waiting requests the backend itself reports.", labels=["backend"]),
        }
        for url, b in self.pool.backends.items():
            families["healthy"].add_metric([url], float(b.healthy))
            families["in_flight"].add_metric([url], b.in_flight)
            families["queued"].add_metric([url], b.queued)
        yield from families.values()


class RouterMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("expertmesh_router:requests", "Request attempts by backend and outcome: ok, "
                                "status_4xx/5xx (the backend's answer), retried (failed before the first byte, "
                                "moved on), stream_error (failed after it), client_gone, failed (no backend left).",
                                ["backend", "outcome"], registry=self.registry)
        self.registry.register(_PoolCollector(pool))
        self._children: dict[tuple[str, str], object] = {}  # labels() lookups cost more than inc()

    def outcome(self, backend: str, outcome: str) -> None:
        child = self._children.get((backend, outcome))
        if child is None:
            child = self._children[(backend, outcome)] = self.requests.labels(backend, outcome)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
