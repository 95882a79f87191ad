"""The SDK without a model: error mapping, request bodies built from the shared protocol types,
SSE parsing, and retries that wait for Retry-After, against a small aiohttp stand-in server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web

from expertmesh.sdk import AsyncClient, Client, Completion
from expertmesh.sdk import errors
from expertmesh.sdk.client import _request_body
from expertmesh.server.protocol import ChatCompletionRequest, CompletionRequest
from server_util import free_port


def test_errors_map_from_status_and_body():
    body = {"error": {"message": "bad top_p", "type": "invalid_request_error", "param": "top_p", "code": "x"}}
    err = errors.from_response(400, body)
    assert isinstance(err, errors.BadRequestError) and err.param == "top_p" and err.message == "bad top_p"
    assert isinstance(errors.from_response(429, body, "3"), errors.RateLimitError)
    assert errors.from_response(429, body, "3").retry_after == 3.0
    assert isinstance(errors.from_response(503, "oops"), errors.ServiceUnavailableError)
    assert type(errors.from_response(418, {})) is errors.APIError
    from expertmesh.errors import ExpertMeshError  # one hierarchy: the SDK's errors too

    assert isinstance(err, ExpertMeshError) and not isinstance(err, ValueError)


def test_request_bodies_round_trip_through_the_server_parser():
    body = _request_body(CompletionRequest, prompt="hi", max_tokens=3, stop=["x"], stream=True, include_usage=True,
                         top_k=5, logprobs=2)
    parsed = CompletionRequest.from_body(body)
    assert (parsed.prompt, parsed.max_tokens, parsed.stop, parsed.include_usage, parsed.logprobs) == (
        "hi", 3, ("x",), True, 2)
    assert parsed.extra == {"top_k": 5}
    chat = _request_body(ChatCompletionRequest, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                         top_logprobs=2)
    assert ChatCompletionRequest.from_body(chat).engine_logprobs == 2


class _FakeServer:
    """Answers 429 (Retry-After: 1) `fail` times, then a completion or a stream."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls, self.times = fail, 0, []
        self.port = free_port()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.times.append(time.monotonic())
        if self.calls <= self.fail:
            return web.json_response({"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                                "code": None}}, status=429, headers={"Retry-After": "1"})
        body = await request.json()
        out = Completion("cmpl-1", 0, "m", [], None).to_dict()
        out["choices"] = [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}]
        if not body.get("stream"):
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        import json

        await resp.write(f"data: {json.dumps(out)}\n\n".encode())
        await resp.write(b'data: {"error": {"message": "engine died", "type": "x", "param": null, "code": "d"}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _run(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/completions", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


def test_sync_client_retries_after_retry_after_then_succeeds():
    fake = _FakeServer(fail=1)
    out = Client(f"http://127.0.0.1:{fake.port}", max_retries=2).completion("hi")
    assert out.choices[0].text == "ok" and fake.calls == 2
    assert fake.times[1] - fake.times[0] >= 0.95  # it waited the second Retry-After asked for


def test_async_client_gives_up_after_max_retries():
    fake = _FakeServer(fail=10)

    async def run():
        async with AsyncClient(f"http://127.0.0.1:{fake.port}", max_retries=1) as client:
            await client.completion("hi")

    with pytest.raises(errors.RateLimitError):
        asyncio.run(run())
    assert fake.calls == 2


def test_error_chunk_in_a_stream_raises():
    fake = _FakeServer(fail=0)
    stream = Client(f"http://127.0.0.1:{fake.port}").completion("hi", stream=True)
    first = next(stream)
    assert first.choices[0].text == "ok"
    with pytest.raises(errors.APIError) as info:
        next(stream)
    assert info.value.code == "d" and "engine died" in info.value.message


def test_importing_the_sdk_does_not_import_torch():
    # A client-only install must not pay for (or need) torch: expertmesh/__init__ is lazy.
    import subprocess
    import sys

    code = ("import expertmesh.sdk, sys; assert 'torch' not in sys.modules, 'torch imported'; "
            "import expertmesh; assert 'torch' not in sys.modules; assert expertmesh.__version__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    lazy = subprocess.run([sys.executable, "-c", "from expertmesh import LLM, SamplingParams; print(LLM.__name__)"],
                          check=True, timeout=120, capture_output=True, text=True)
    assert lazy.stdout.strip() == "LLM"
