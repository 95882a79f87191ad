"""HTTP/1.1 to the backends over pooled keep-alive connections: the router's hot path.

aiohttp's client cost about 0.5 ms of CPU per request on this machine (timeouts, tracing,
cookie and header machinery around every call), most of what the router added to TTFT
(bench/router/README.md). The router needs little of it: one POST with a body it already holds,
the status and a few headers back, then the body bytes as they arrive. So each backend gets a
pool of keep-alive connections that speak HTTP/1.1 directly, and httptools (llhttp, the parser
uvicorn uses) reads the answers: chunked, Content-Length or until close.

A pooled connection that the backend closed while it sat idle (its keep-alive timeout) fails on
the next request before any byte of an answer. That is not the backend failing, so the request
goes again once, on a fresh connection; every other failure is the caller's to handle.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

_PAUSE_BYTES = 1 << 18  # stop reading a backend that is this far ahead of its client
_READ_BYTES = 1 << 16  # one connection's receive buffer: asyncio's default allocates 256 KiB per read


class UpstreamError(Exception):
    """A backend connection failed: refused, dropped, timed out or answered broken HTTP."""


class UpstreamClosed(UpstreamError):
    """The backend closed the connection before its answer was complete."""


class UpstreamTimeout(UpstreamError):
    """The backend said nothing for longer than the read timeout."""


class Exchange(asyncio.BufferedProtocol):
    """One connection to a backend and the answer in flight on it."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key  # (host, port) of the backend: its pool
        self.transport: asyncio.Transport | None = None
        self.status = 0  # of the current answer, once its headers are in
        self.headers: dict[str, str] = {}  # of the current answer, names lower-cased
        self.headers_done = False  # the current answer's headers are complete
        self.complete = False  # the current answer's body is complete
        self.got_bytes = False  # some byte of the current answer arrived
        self.keep_alive = False  # the current answer lets the connection be reused
        self.error: UpstreamError | None = None  # why the connection failed, if it did
        self.closed = False  # the transport is gone
        self.idle_since = 0.0  # monotonic time it went back to the pool
        self._parser = httptools.HttpResponseParser(self)
        self._body: deque[bytes] = deque()  # body bytes not yet taken by the caller
        self._buffered = 0  # their total length
        self._paused = False  # reading is paused because the caller is behind
        self._waiter: asyncio.Future | None = None
        self._read_buffer = memoryview(bytearray(_READ_BYTES))  # reads land here, reused

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's are not subclasses)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(self._read_buffer[:nbytes])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the backend answered broken HTTP: {exc}"))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._until_close():
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete:
            self._fail(UpstreamClosed(f"the backend closed the connection{f': {exc}' if exc else ''}"))
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()  # read now: llhttp forgets it once the message ends
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # the caller's side
    def send(self, request: bytes) -> None:
        self.status, self.headers, self.headers_done, self.complete, self.got_bytes = 0, {}, False, False, False
        self.keep_alive = False
        self._parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(request)

    async def wait_headers(self, timeout_s: float) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout_s)

    async def next_chunk(self, timeout_s: float) -> bytes | None:
        """The body bytes that arrived since the last call (waiting for some); None at its end.
        Bytes that arrived before a failure are returned before the failure is raised."""
        while not self._body:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(timeout_s)
        data = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self, timeout_s: float) -> bytes:
        parts = []
        while (chunk := await self.next_chunk(timeout_s)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()  # also how a backend learns that the client went away
        self.closed = True

    def _until_close(self) -> bool:
        return "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._time_out, waiter, timeout_s)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: asyncio.Future, timeout_s: float) -> None:
        if not waiter.done():
            self._fail(UpstreamTimeout(f"the backend sent nothing for {timeout_s:g} s (the read timeout)"))
            waiter.set_result(None)


class UpstreamPool:
    """Keep-alive connections to every backend, reused most-recent first."""

    def __init__(self, connect_timeout_s: float = 5.0, idle_timeout_s: float = 4.0) -> None:
        # Under uvicorn's 5 s default keep-alive (vLLM's and SGLang's servers): a connection
        # idle longer is likelier closed than not.
        self.connect_timeout_s, self.idle_timeout_s = connect_timeout_s, idle_timeout_s
        self._idle: dict[tuple[str, int], list[Exchange]] = {}
        self._targets: dict[str, tuple[tuple[str, int], str]] = {}  # base URL -> ((host, port), path prefix)

    def target(self, base_url: str) -> tuple[tuple[str, int], str]:
        """(host, port) and path prefix of a backend URL; ValueError for what this client cannot speak."""
        if base_url not in self._targets:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"backend URL must be http://host[:port][/prefix], got {base_url!r} "
                                 "(the router talks plain HTTP to its backends)")
            self._targets[base_url] = ((parts.hostname, parts.port or 80), parts.path.rstrip("/"))
        return self._targets[base_url]

    async def post(self, base_url: str, path: str, headers: dict[str, str], body: bytes,
                   read_timeout_s: float) -> Exchange:
        """Send a POST and wait for the answer's headers; the caller reads the body, then gives
        the exchange back with `release`."""
        key, prefix = self.target(base_url)
        head = (f"POST {prefix}{path} HTTP/1.1\r\nHost: {key[0]}:{key[1]}\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")
        while True:
            exchange, reused = self._take_idle(key), True
            if exchange is None:
                exchange, reused = await self._open(key), False
            exchange.send(head + body)
            try:
                await exchange.wait_headers(read_timeout_s)
                return exchange
            except UpstreamClosed:
                exchange.close()
                if reused and not exchange.got_bytes:
                    continue  # it had been closed while idle: try a fresh one
                raise
            except BaseException:
                exchange.close()
                raise

    def release(self, exchange: Exchange) -> None:
        """Back to the pool if its answer is complete and the connection may be kept, else closed."""
        if not exchange.reusable():
            exchange.close()
            return
        exchange.idle_since = time.monotonic()
        self._idle.setdefault(exchange.key, []).append(exchange)

    def close(self) -> None:
        for idle in self._idle.values():
            for exchange in idle:
                exchange.close()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, int]) -> Exchange | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            exchange = idle.pop()
            if not exchange.closed and now - exchange.idle_since < self.idle_timeout_s:
                return exchange
            exchange.close()
        return None

    async def _open(self, key: tuple[str, int]) -> Exchange:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, exchange = await loop.create_connection(lambda: Exchange(key), *key)
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {key[0]}:{key[1]} took over {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        return exchange
