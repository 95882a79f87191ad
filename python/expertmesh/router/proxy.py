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
import contextlib
import json
import logging
import socket
from dataclasses import dataclass

from aiohttp import web

from expertmesh.router.backends import BackendPool
from expertmesh.router.metrics import RouterMetrics
from expertmesh.router.upstream import Exchange, UpstreamError

logger = logging.getLogger(__name__)
_RETRYABLE_STATUS = {502, 503}  # the backend is not serving (down, draining, engine dead)
_PASS_HEADERS = {"content-type": "Content-Type", "retry-after": "Retry-After", "cache-control": "Cache-Control"}


@dataclass
class ProxySettings:
    read_timeout_s: float = 120.0  # longest silence of a backend between two chunks
    max_attempts: int = 3


def error_body(status: int, message: str, code: str) -> dict:
    kind = "service_unavailable" if status == 503 else "internal_server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse_error(message: str) -> bytes:
    return b"data: " + json.dumps(error_body(502, message, "backend_failed")).encode() + b"\n\ndata: [DONE]\n\n"


@contextlib.contextmanager
def _corked(request: web.Request):
    """Hold the client's socket's sends until the block ends (TCP_CORK), so aiohttp's separate
    writes of a stream's headers and first bytes leave as one segment: each segment wakes the
    client, and on few cores a woken client preempts the router between the two."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None:
        yield
        return
    sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)
        except OSError:
            pass  # the client is gone


def _passed(exchange: Exchange) -> dict[str, str]:
    return {name: exchange.headers[key] for key, name in _PASS_HEADERS.items() if key in exchange.headers}


async def forward(request: web.Request, pool: BackendPool, metrics: RouterMetrics, settings: ProxySettings,
                  order: list[str], path: str, payload: bytes, stream: bool) -> web.StreamResponse:
    timeout = settings.read_timeout_s
    last = "no healthy backend"
    for url in order[: settings.max_attempts]:
        backend = pool.backends[url]
        headers = {"Content-Type": "application/json", **backend.headers()}
        backend.in_flight += 1
        exchange = None
        try:
            try:
                exchange = await pool.upstream.post(url, path, headers, payload, timeout)
            except UpstreamError as exc:
                last = f"{url}: {exc}"
                pool.mark_down(url, last)
                metrics.outcome(url, "retried")
                continue
            if exchange.status in _RETRYABLE_STATUS:
                last = f"{url} answered {exchange.status}"
                pool.mark_down(url, last)
                metrics.outcome(url, "retried")
                continue
            if not stream or not exchange.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    body = await exchange.read(timeout)
                except UpstreamError as exc:
                    last = f"{url} failed while sending its answer: {exc}"
                    pool.mark_down(url, last)
                    metrics.outcome(url, "retried")
                    continue
                metrics.outcome(url, "ok" if exchange.status < 400 else f"status_{exchange.status // 100}xx")
                return web.Response(body=body, status=exchange.status, headers=_passed(exchange))
            out = await _relay(request, exchange, url, pool, metrics, timeout)
            if out is not None:
                return out
            last = f"{url} failed before its first chunk"
        finally:
            backend.in_flight -= 1
            if exchange is not None:
                pool.upstream.release(exchange)  # closed unless complete: a departed client aborts the backend's work
    metrics.outcome("none", "failed")
    return web.json_response(error_body(503, f"no backend could serve the request ({last})", "no_backend"),
                             status=503)


async def _relay(request: web.Request, exchange: Exchange, url: str, pool: BackendPool, metrics: RouterMetrics,
                 timeout_s: float) -> web.StreamResponse | None:
    """Pass a backend's stream through chunk by chunk; None if it failed before the first."""
    out: web.StreamResponse | None = None
    tail, last = b"\n\n", b""
    try:
        while (chunk := await exchange.next_chunk(timeout_s)) is not None:
            tail = (tail + chunk)[-2:]
            if exchange.complete:  # the stream's last bytes go out with its end, below
                last = chunk
                break
            if out is None:  # the headers and the first chunk in one segment: the client wakes once
                with _corked(request):
                    out = web.StreamResponse(status=exchange.status, headers=_passed(exchange))
                    await out.prepare(request)
                    await out.write(chunk)
            else:
                await out.write(chunk)
    except UpstreamError as exc:
        pool.mark_down(url, f"in a stream: {exc}")
        if out is None:
            metrics.outcome(url, "retried")
            return None
        metrics.outcome(url, "stream_error")
        sep = b"" if tail == b"\n\n" else b"\n\n"  # end a half-sent event before the error
        await out.write(sep + _sse_error(f"the backend failed during the stream: {exc}"))
        await out.write_eof()
        return out
    except (ConnectionResetError, asyncio.CancelledError):
        metrics.outcome(url, "client_gone")
        raise
    with _corked(request):
        if out is None:  # an empty stream (or all of it at once): answer with headers and body together
            out = web.StreamResponse(status=exchange.status, headers=_passed(exchange))
            await out.prepare(request)
        await out.write_eof(last)
    metrics.outcome(url, "ok" if exchange.status < 400 else f"status_{exchange.status // 100}xx")
    return out
