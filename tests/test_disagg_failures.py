"""Disaggregated tiers losing a server, as a user would see it: two prefill and two decode
servers behind `expertmesh router --prefill ... --decode ...`, servers killed (SIGKILL, engine
and frontend) one after another, in the order of the tests below.

A dead prefill server is replaced by the other, the answers unchanged; a decode server that
dies mid-stream ends exactly its own streams with an OpenAI error chunk and [DONE] (no hang, no
silent cut) while the others finish, and later requests go to the survivor; with every
prefill server dead, the client gets a 503 naming the cause at once. After each case the
surviving servers hold no block, no pin and no request.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from server_util import ServerProcess, http, metric, wait_until
from test_disagg import _m, _settled
from test_router import RouterProcess

BODY = dict(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [f"Tiers may fail; prompt {i} goes on regardless. " * 3 for i in range(4)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("disagg-failures")
    common = ["--kv-cache-blocks", "256", "--kv-transfer-timeout", "3"]
    prefill = [ServerProcess(["--role", "prefill", *common], root / f"prefill{i}.log") for i in range(2)]
    decode = [ServerProcess(["--role", "decode", *common], root / f"decode{i}.log") for i in range(2)]
    colocated = ServerProcess(["--kv-cache-blocks", "256"], root / "colocated.log")
    router = RouterProcess(["--prefill", prefill[0].url, "--prefill", prefill[1].url, "--decode", decode[0].url,
                            "--decode", decode[1].url, "--health-interval", "0.5"], root / "router.log")
    want = [http("POST", colocated.url + "/v1/completions", {"prompt": p, **BODY})[2]["choices"][0]["text"]
            for p in PROMPTS]
    colocated.stop()
    yield router, prefill, decode, want
    router.stop()
    for s in (*prefill, *decode):
        s.stop()


def _kill(server: ServerProcess) -> None:
    for pid in (server.engine_pid, server.proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)


def _texts(router) -> list[str]:
    out = []
    for prompt in PROMPTS:
        status, _, answer = http("POST", router.url + "/v1/completions", {"prompt": prompt, **BODY})
        assert status == 200, answer
        out.append(answer["choices"][0]["text"])
    return out


def test_a_dead_prefill_server_is_replaced_by_the_other(cluster):
    router, prefill, decode, want = cluster
    assert _texts(router) == want
    _kill(prefill[0])
    assert _texts(router) == want  # every prompt, whichever prefill server the policy named first
    assert _m(prefill[1], "kv_transfer_exports_total") > 0
    wait_until(lambda: _settled(prefill[1], *decode), 10, "the survivors to hold no block and no pin")


def _stream(url: str, body: dict, result: dict) -> None:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    lines = result["lines"] = []
    try:
        with urllib.request.urlopen(req, timeout=90) as resp:
            for raw in resp:
                if raw.startswith(b"data:"):
                    lines.append(raw.decode().strip())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = exc


def test_a_decode_server_dying_mid_stream_cuts_only_its_streams(cluster):
    router, prefill, decode, want = cluster
    results = [dict() for _ in range(6)]
    threads = [threading.Thread(target=_stream, args=(router.url, {"prompt": f"a long story {i}", "max_tokens": 400,
                                                                   "ignore_eos": True}, results[i]), daemon=True)
               for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: all(r.get("lines") for r in results), 60, "every stream to start")
    text = http("GET", router.url + "/metrics")[2]
    busy = [metric(text, "expertmesh_router:backend_in_flight", backend=s.url) for s in decode]
    victim, survivor = (decode[0], decode[1]) if busy[0] >= busy[1] else (decode[1], decode[0])
    cut = int(max(busy))
    assert cut > 0, busy
    start = time.monotonic()
    _kill(victim)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stream hung after its decode server was killed"
    assert time.monotonic() - start < 60
    ended = {"done": 0, "error": 0}
    for r in results:
        assert "error" not in r, r.get("error")  # an answer, not a broken connection
        assert r["lines"][-1] == "data: [DONE]", r["lines"][-3:]
        ended["error" if "error" in json.loads(r["lines"][-2][5:]) else "done"] += 1
    assert ended == {"error": cut, "done": 6 - cut}, (ended, busy)
    assert _texts(router) == want  # later requests: the surviving decode server
    wait_until(lambda: _settled(prefill[1], survivor), 10, "the survivors to hold no block and no pin")


def test_with_every_prefill_server_dead_the_client_gets_a_clear_error(cluster):
    router, prefill, decode, _ = cluster
    _kill(prefill[1])
    start = time.monotonic()
    status, _, answer = http("POST", router.url + "/v1/completions", {"prompt": PROMPTS[0], **BODY})
    assert status == 503 and answer["error"]["code"] == "no_backend", answer
    assert "prefill" in answer["error"]["message"] or prefill[1].url in answer["error"]["message"], answer
    assert time.monotonic() - start < 10
    survivor = decode[0] if decode[0].proc.poll() is None else decode[1]
    assert _settled(survivor)
