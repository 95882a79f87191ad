"""Requests that used to kill or wedge the server, one test per bug, against one real server on
the built-in model: each gets an OpenAI-style 4xx naming the field, the limit and the value,
the engine process survives (same pid), and what the request held is released (the admission
gauges return to 0, so the limits never fill up with ghosts). Plus the API key's edge cases
and a disconnect storm.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from server_util import ServerProcess, http, metric, wait_until

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_WAITING_SEQS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(["--api-key", KEY, "--protect-metrics", "--max-waiting-seqs", str(MAX_WAITING_SEQS),
                         "--max-num-seqs-per-request", "64", "--kv-cache-blocks", "1024"],
                        tmp_path_factory.mktemp("bad") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


def _post(server, body_text: str, path: str = "/v1/completions"):
    return http("POST", server.url + path, raw=body_text.encode(), headers=AUTH)


def _assert_alive(server) -> None:
    assert os.path.exists(f"/proc/{server.engine_pid}"), "the engine process died"
    status, _, body = http("POST", server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 4}, headers=AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body


def _assert_released(server) -> None:
    def idle() -> bool:
        text = http("GET", server.url + "/metrics", headers=AUTH)[2]
        return (metric(text, "expertmesh:frontend_waiting_seqs") == 0 and
                metric(text, "expertmesh:frontend_waiting_tokens") == 0 and
                metric(text, "expertmesh:num_requests_running") == 0 and
                metric(text, "expertmesh:num_requests_waiting") == 0 and
                metric(text, "expertmesh:kv_cache_usage_perc") == 0)
    wait_until(idle, 10, "admission slots and KV blocks to be released")


# (raw JSON body, path, the field the error must name, a fragment of its message)
BAD = [
    # The core stores token ids in 31 bits; the frontend used to check only >= 0.
    ('{"prompt": "hi", "max_tokens": 4, "stop_token_ids": [3000000000]}', "/v1/completions", "stop_token_ids[0]",
     "3000000000"),
    ('{"prompt": "hi", "max_tokens": 4, "stop_token_ids": [9223372036854775808]}', "/v1/completions",
     "stop_token_ids[0]", "9223372036854775808"),
    # msgpack cannot encode integers >= 2**64 nor lone surrogates: these used to be 500s that leaked admission.
    ('{"prompt": "hi", "max_tokens": 4, "stop_token_ids": [18446744073709551616]}', "/v1/completions",
     "stop_token_ids[0]", "18446744073709551616"),
    ('{"prompt": "hi", "max_tokens": 4, "stop": "\\ud800"}', "/v1/completions", "stop", "surrogate"),
    ('{"prompt": "hi", "max_tokens": 4, "stop": ["ok", "a\\udfffb"]}', "/v1/completions", "stop[1]", "surrogate"),
    ('{"prompt": "\\ud800", "max_tokens": 4}', "/v1/completions", "prompt", "surrogate"),
    ('{"messages": [{"role": "user", "content": "x\\ud83d"}]}', "/v1/chat/completions", "messages[0].content",
     "surrogate"),
    ('{"prompt": "hi", "\\udc80": 1}', "/v1/completions", None, "surrogate"),
    ('{"prompt": "hi", "seed": 1' + "0" * 5000 + "}", "/v1/completions", None, "JSON"),  # past int's 4,300 digits
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "/v1/completions", None, "JSON"),  # past the parser's depth
    ('{"prompt": ' + "[" * 70 + "1" + "]" * 70 + "}", "/v1/completions", None, "deeper than 64"),
    # One request fanning out to 512 prompts x n=128 sequences; admission used to count prompts.
    (json.dumps({"prompt": ["a"] * 512, "n": 128}), "/v1/completions", "prompt", "over the limit of 64"),
    (json.dumps({"prompt": ["a"] * 8, "n": 16}), "/v1/completions", "prompt", "128 sequences"),
    (json.dumps({"prompt": "a", "n": 100}), "/v1/completions", "n", "n must be in [1, 64], got 100"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}], "n": 65}), "/v1/chat/completions", "n", "65"),
    (json.dumps({"tokens": [1, 2**40]}), "/detokenize", "tokens[1]", str(2**40)),
]


@pytest.mark.parametrize("body, path, param, fragment", BAD, ids=[f"{b[1]}:{b[0][:50]}" for b in BAD])
def test_bad_request_is_a_clear_4xx_and_the_engine_survives(server, body, path, param, fragment):
    status, _, payload = _post(server, body, path)
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"], error
    _assert_alive(server)


def test_a_request_above_the_waiting_limit_alone_is_400_not_a_forever_429(server):
    status, headers, payload = _post(server, json.dumps({"prompt": "a", "n": MAX_WAITING_SEQS + 1}))
    assert status == 400 and "Retry-After" not in headers and "--max-waiting-seqs" in payload["error"]["message"]


def test_many_failed_requests_leave_no_admission_behind(server):
    # More failures than the waiting limit: if any of them kept its slot, the good request would get 429.
    for i in range(3 * MAX_WAITING_SEQS):
        status, _, _ = _post(server, BAD[i % 4][0])
        assert status == 400
    _assert_alive(server)
    _assert_released(server)


def test_api_key_edges(server):
    odd = {"Authorization": "Bearer s\u00e9kret"}  # not ASCII: compared as bytes, never a 500
    assert http("POST", server.url + "/v1/completions", {"prompt": "x"}, headers=odd)[0] == 401
    assert http("POST", server.url + "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer"})[0] == 401
    assert http("GET", server.url + "/metrics")[0] == 401  # --protect-metrics
    assert http("GET", server.url + "/metrics", headers=AUTH)[0] == 200
    assert http("GET", server.url + "/health")[0] == 200  # probes never need the key
    assert http("GET", server.url + "/openapi.json")[0] == 200


@pytest.fixture
def storm_server(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "4096"], tmp_path / "storm.log")  # default admission limits
    yield srv
    assert srv.stop() == 0, srv.log()


def test_disconnect_storm_returns_to_idle_and_serves_again(storm_server):
    """Hundreds of streams cut right after their first chunks end with nothing held."""
    server = storm_server
    async def one(session: aiohttp.ClientSession, i: int) -> bool:
        body = {"prompt": f"storm {i}", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with session.post(server.url + "/v1/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            await resp.content.readline()  # first chunk arrived: now hang up
            return True

    async def storm() -> list[bool]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(300))), 120)

    assert all(asyncio.run(storm()))
    _assert_released(server)
    started = time.monotonic()
    _assert_alive(server)
    assert time.monotonic() - started < 5, "a fresh request took more than 5 s after the storm"
    text = http("GET", server.url + "/metrics", headers=AUTH)[2]
    assert metric(text, "expertmesh:request_errors", status="500") == 0
