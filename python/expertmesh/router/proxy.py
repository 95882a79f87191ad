"""Forwarding one request to a backend, with failover, and passing its stream through.

A completion has no side effects, so a request is safe to retry as long as nothing of it has
reached the client: a backend that refuses the connection, drops it, times out or answers
502/503 before the first byte is marked down and the request goes to the next backend in the
policy's order. Non-streaming answers are read whole before the client sees a byte, so they
fail over at any point. Once a stream's first chunk is out, a backend failure ends the stream
with an OpenAI-style error chunk and [DONE] -- never a hang, never a silent cut. Every request
ends in exactly one outcome, counted per backend in /metrics. A client that goes away closes
the backend connection, which the backend takes as an abort.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from expertmesh.router.backends import BackendPool
from expertmesh.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)
_RETRYABLE_STATUS = {502, 503}  # the backend is not serving (down, draining, engine dead)
_PASS_HEADERS = ("Content-Type", "Retry-After", "Cache-Control")
_BACKEND_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass
class ProxySettings:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0  # longest silence of a backend between two chunks
    max_attempts: int = 3

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)


def error_body(status: int, message: str, code: str) -> dict:
    kind = "service_unavailable" if status == 503 else "internal_server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse_error(message: str) -> bytes:
    return b"data: " + json.dumps(error_body(502, message, "backend_failed")).encode() + b"\n\ndata: [DONE]\n\n"


async def forward(request: web.Request, pool: BackendPool, metrics: RouterMetrics, settings: ProxySettings,
                  order: list[str], path: str, payload: bytes, stream: bool) -> web.StreamResponse:
    assert pool.session is not None
    timeout = settings.timeout
    last = "no healthy backend"
    for url in order[: settings.max_attempts]:
        backend = pool.backends[url]
        headers = {"Content-Type": "application/json", **backend.headers()}
        backend.in_flight += 1
        try:
            try:
                resp = await pool.session.post(url + path, data=payload, headers=headers, timeout=timeout)
            except _BACKEND_ERRORS as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
                pool.mark_down(url, last)
                metrics.outcome(url, "retried")
                continue
            try:
                if resp.status in _RETRYABLE_STATUS:
                    last = f"{url} answered {resp.status}"
                    pool.mark_down(url, last)
                    metrics.outcome(url, "retried")
                    continue
                if not stream or resp.content_type != "text/event-stream":
                    try:
                        body = await resp.read()
                    except _BACKEND_ERRORS as exc:
                        last = f"{url}: {type(exc).__name__} while reading the answer: {exc}"
                        pool.mark_down(url, last)
                        metrics.outcome(url, "retried")
                        continue
                    metrics.outcome(url, "ok" if resp.status < 400 else f"status_{resp.status // 100}xx")
                    return web.Response(body=body, status=resp.status,
                                        headers={h: resp.headers[h] for h in _PASS_HEADERS if h in resp.headers})
                out = await _relay(request, resp, url, pool, metrics)
                if out is not None:
                    return out
                last = f"{url} failed before its first chunk"
            finally:
                resp.close()  # also what tells the backend that a departed client is gone
        finally:
            backend.in_flight -= 1
    metrics.outcome("none", "failed")
    return web.json_response(error_body(503, f"no backend could serve the request ({last})", "no_backend"),
                             status=503)


async def _relay(request: web.Request, resp: aiohttp.ClientResponse, url: str, pool: BackendPool,
                 metrics: RouterMetrics) -> web.StreamResponse | None:
    """Pass a backend's stream through chunk by chunk; None if it failed before the first."""
    out: web.StreamResponse | None = None
    tail = b"\n\n"
    try:
        async for chunk in resp.content.iter_any():
            if out is None:
                out = web.StreamResponse(status=resp.status, headers={h: resp.headers[h] for h in _PASS_HEADERS
                                                                      if h in resp.headers})
                await out.prepare(request)
            await out.write(chunk)
            tail = (tail + chunk)[-2:]
    except _BACKEND_ERRORS as exc:
        pool.mark_down(url, f"{type(exc).__name__} in a stream: {exc}")
        if out is None:
            metrics.outcome(url, "retried")
            return None
        metrics.outcome(url, "stream_error")
        sep = b"" if tail == b"\n\n" else b"\n\n"  # end a half-sent event before the error
        await out.write(sep + _sse_error(f"the backend failed during the stream: {type(exc).__name__}: {exc}"))
        await out.write_eof()
        return out
    except (ConnectionResetError, asyncio.CancelledError):
        metrics.outcome(url, "client_gone")
        raise
    if out is None:  # an empty stream: answer it empty
        out = web.StreamResponse(status=resp.status)
        await out.prepare(request)
    await out.write_eof()
    metrics.outcome(url, "ok" if resp.status < 400 else f"status_{resp.status // 100}xx")
    return out
