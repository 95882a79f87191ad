"""`Client` and `AsyncClient`: completions and chat, whole or streamed, with typed results
(the server's own protocol types), errors mapped from status codes, and retries on 429/503
and connection failures that wait as long as the server's Retry-After asks.

Only the request is retried, never a stream that has begun: replaying it would duplicate text.
The sync client uses http.client and the async one aiohttp, so neither needs another package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

from expertmesh.sdk.errors import RETRYABLE, APIConnectionError, APIError, from_response
from expertmesh.server.protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest

_BACKOFF_S = 0.25


def _request_body(cls: type, **fields: Any) -> dict[str, Any]:
    """Build the body through the shared request type: known fields by name, the rest as extras."""
    include_usage = bool((fields.pop("stream_options", None) or {}).get("include_usage", fields.pop("include_usage", False)))
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in fields.items() if k in names}
    extra = {k: v for k, v in fields.items() if k not in names and v is not None}
    return cls(**known, include_usage=include_usage, extra=extra).to_body()


def _wait_s(error: APIError | None, attempt: int) -> float:
    if error is not None and error.retry_after is not None:
        return error.retry_after
    return _BACKOFF_S * 2**attempt


def _parse_sse_line(line: str, parse) -> Any | None:
    """One SSE line -> a parsed chunk, None for blank/other lines; StopIteration at [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        raise StopIteration
    payload = json.loads(data)
    if "error" in payload:  # an error after the stream began
        raise from_response(500, payload)
    return parse(payload)


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout, self.max_retries = api_key, timeout, max_retries

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


class Client(_Base):
    """Blocking client. `completion(...)`/`chat(...)` return Completion/ChatCompletion, or an
    iterator of chunks of the same types with stream=True."""

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> http.client.HTTPResponse:
        url = urlsplit(self.base_url)
        last: APIError | None = None
        for attempt in range(self.max_retries + 1):
            conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(url.hostname, url.port, timeout=self.timeout)
            try:
                conn.request(method, url.path + path, None if body is None else json.dumps(body), self._headers())
                response = conn.getresponse()
            except OSError as exc:
                last = APIConnectionError(f"cannot reach {self.base_url}: {exc}")
            else:
                if response.status < 400:
                    return response
                raw = response.read()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
                last = from_response(response.status, payload, response.getheader("Retry-After"))
                if response.status not in RETRYABLE:
                    raise last
            if attempt < self.max_retries:
                time.sleep(_wait_s(last, attempt))
        assert last is not None
        raise last

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _stream(self, path: str, body: dict[str, Any], parse) -> Iterator[Any]:
        response = self._open("POST", path, body)
        with response:
            while True:
                raw = response.readline()
                if not raw:
                    raise APIConnectionError("stream ended without [DONE]")
                try:
                    chunk = _parse_sse_line(raw.decode(), parse)
                except StopIteration:
                    return
                if chunk is not None:
                    yield chunk

    def completion(self, prompt: str | list[int] | list[str] | list[list[int]], *, stream: bool = False,
                         **fields: Any):
        body = _request_body(CompletionRequest, prompt=prompt, stream=stream, **fields)
        if stream:
            return self._stream("/v1/completions", body, Completion.from_dict)
        return Completion.from_dict(self._call("POST", "/v1/completions", body))

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **fields: Any):
        body = _request_body(ChatCompletionRequest, messages=messages, stream=stream, **fields)
        if stream:
            return self._stream("/v1/chat/completions", body, ChatCompletion.from_dict)
        return ChatCompletion.from_dict(self._call("POST", "/v1/chat/completions", body))

    def models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models")["data"]]

    def tokenize(self, text: str) -> list[int]:
        return self._call("POST", "/tokenize", {"prompt": text})["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        return self._call("POST", "/detokenize", {"tokens": tokens})["prompt"]


class AsyncClient(_Base):
    """asyncio client with the same calls; streams are async iterators. Use `async with`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self, method: str, path: str, body: dict[str, Any] | None):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        last: APIError | None = None
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._session.request(method, self.base_url + path, json=body, headers=self._headers())
            except (aiohttp.ClientError, OSError) as exc:
                last = APIConnectionError(f"cannot reach {self.base_url}: {exc}")
            else:
                if response.status < 400:
                    return response
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = await response.text()
                last = from_response(response.status, payload, response.headers.get("Retry-After"))
                response.release()
                if response.status not in RETRYABLE:
                    raise last
            if attempt < self.max_retries:
                await asyncio.sleep(_wait_s(last, attempt))
        assert last is not None
        raise last

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self._open(method, path, body)
        async with response:
            return await response.json()

    async def _stream(self, path: str, body: dict[str, Any], parse) -> AsyncIterator[Any]:
        response = await self._open("POST", path, body)
        async with response:
            async for raw in response.content:
                try:
                    chunk = _parse_sse_line(raw.decode(), parse)
                except StopIteration:
                    return
                if chunk is not None:
                    yield chunk
        raise APIConnectionError("stream ended without [DONE]")

    async def completion(self, prompt: str | list[int] | list[str] | list[list[int]], *, stream: bool = False,
                               **fields: Any):
        body = _request_body(CompletionRequest, prompt=prompt, stream=stream, **fields)
        if stream:
            return self._stream("/v1/completions", body, Completion.from_dict)
        return Completion.from_dict(await self._call("POST", "/v1/completions", body))

    async def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **fields: Any):
        body = _request_body(ChatCompletionRequest, messages=messages, stream=stream, **fields)
        if stream:
            return self._stream("/v1/chat/completions", body, ChatCompletion.from_dict)
        return ChatCompletion.from_dict(await self._call("POST", "/v1/chat/completions", body))

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._call("GET", "/v1/models"))["data"]]
