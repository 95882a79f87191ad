"""The replicas behind the router, their health and their load.

A health task checks every backend every `interval_s` (GET /health, falling back to
/v1/models for servers without /health), takes a failing one out and puts it back once it
answers again; on each check it also reads the backend's own queue gauges from /metrics when it
publishes them (expertmesh:num_requests_waiting/running, vllm:..., sglang:...), which the
least-loaded policy adds to the router's own in-flight count.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

import aiohttp

from expertmesh.router.upstream import UpstreamPool

logger = logging.getLogger(__name__)
_QUEUE_GAUGE = re.compile(r"^(?:expertmesh|vllm|sglang):num_requests_(?:waiting|running)(?:\{[^}]*\})? (\S+)$", re.M)


@dataclass
class Backend:
    url: str  # base URL, no trailing slash
    api_key: str | None = None  # the key this router sends to it
    role: str = "both"  # disaggregated serving: "prefill" or "decode" (router --prefill / --decode)
    healthy: bool = True  # until a check says otherwise
    in_flight: int = 0  # requests this router has open on it
    queued: int = 0  # running + waiting, as its own /metrics last said (0 if it publishes none)
    last_error: str | None = None
    last_check: float = field(default_factory=time.monotonic)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def load(self) -> int:
        """Requests on it: the backend's own count when it publishes one (which includes this
        router's and other clients' requests, as of the last check), else this router's."""
        return max(self.in_flight, self.queued)


class BackendPool:
    def __init__(self, backends: list[Backend], interval_s: float = 2.0, timeout_s: float = 2.0) -> None:
        if not backends:
            raise ValueError("the router needs at least one backend")
        names = [b.url for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend URLs must be distinct, got {names}")
        self.upstream = UpstreamPool()  # requests go over these connections (upstream.py)
        for url in names:
            self.upstream.target(url)  # a URL it cannot speak to fails here, not on the first request
        self.backends = {b.url: b for b in backends}
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None  # health checks and /v1/models: off the hot path

    def healthy(self) -> set[str]:
        return {url for url, b in self.backends.items() if b.healthy}

    def mark_down(self, url: str, reason: str) -> None:
        backend = self.backends[url]
        if backend.healthy:
            logger.warning("backend %s is down: %s", url, reason)
        backend.healthy, backend.last_error = False, reason

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await asyncio.gather(*(self.check(b) for b in self.backends.values()))
        self._task = asyncio.create_task(self._loop(), name="router-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self.upstream.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.gather(*(self.check(b) for b in self.backends.values()))

    async def check(self, backend: Backend) -> None:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.get(backend.url + "/health", headers=backend.headers(), timeout=timeout) as r:
                status = r.status
            if status == 404:  # a server without /health: any answer from /v1/models will do
                async with self.session.get(backend.url + "/v1/models", headers=backend.headers(),
                                            timeout=timeout) as r:
                    status = r.status
            ok = status == 200
            reason = None if ok else f"health check answered {status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
        backend.last_check = time.monotonic()
        if not ok:
            self.mark_down(backend.url, reason or "unhealthy")
            return
        if not backend.healthy:
            logger.warning("backend %s is healthy again", backend.url)
        backend.healthy, backend.last_error = True, None
        await self._read_queue(backend, timeout)

    async def _read_queue(self, backend: Backend, timeout: aiohttp.ClientTimeout) -> None:
        assert self.session is not None
        try:
            async with self.session.get(backend.url + "/metrics", headers=backend.headers(), timeout=timeout) as r:
                text = await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
            text = ""
        backend.queued = int(sum(float(v) for v in _QUEUE_GAUGE.findall(text)))
