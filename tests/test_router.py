"""`expertmesh router` in front of three real `expertmesh serve` replicas on loopback, each with
its own API key (from the router's config file), the router with its own.

The official openai client through the router (stream and not) gets what a replica gives;
requests sharing a prefix land on one replica (its prefix cache hits); a stopped replica is
taken out and comes back; and when one is killed mid-run, no request is lost or hangs: each
ends in a response or a clean error, counted in /metrics. The kill comes last: it changes the pool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from server_util import ServerProcess, free_port, http, metric, wait_until

KEY = "router-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class RouterProcess:
    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "router", "--port", str(self.port),
                                      *args], stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._healthy(), 60, "the router to answer /health")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"router exited:\n{self.log_path.read_text()}")
        try:
            return http("GET", self.url + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self._log.close()
        return code


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    servers = [ServerProcess(["--api-key", f"replica-{i}", "--kv-cache-blocks", "512"], root / f"s{i}.log")
               for i in range(3)]
    config = root / "router.toml"
    config.write_text("policy = \"prefix-hash\"\nhealth_interval = 0.5\n" + "".join(
        f"[[backends]]\nurl = \"{s.url}\"\napi_key = \"replica-{i}\"\n" for i, s in enumerate(servers)))
    router = RouterProcess(["--config", str(config), "--api-key", KEY], root / "router.log")
    yield router, servers
    router.stop()
    for s in servers:
        s.stop()


def _oai(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_through_the_router_gets_what_a_replica_gives(cluster):
    router, servers = cluster
    kwargs = dict(model="expertmesh-tiny-moe", prompt="The experts of a mixture", max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    direct = _oai(servers[0].url, "replica-0").completions.create(**kwargs).choices[0].text
    assert _oai(router.url).completions.create(**kwargs).choices[0].text == direct
    chunks = list(_oai(router.url).completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct
    chat = _oai(router.url).chat.completions.create(model="expertmesh-tiny-moe", max_tokens=4,
                                                    messages=[{"role": "user", "content": "hi"}], stream=True)
    assert any(c.choices and c.choices[0].delta.content for c in chat)
    assert [m.id for m in _oai(router.url).models.list().data] == ["expertmesh-tiny-moe"]
    with pytest.raises(openai.AuthenticationError):
        _oai(router.url, "wrong").models.list()
    # Backends' own errors reach the client as they are.
    status, _, body = http("POST", router.url + "/v1/completions", {"prompt": "x", "temperature": -1}, headers=AUTH)
    assert status == 400 and body["error"]["param"] == "temperature"


def _hits(server) -> float:
    return metric(http("GET", server.url + "/metrics")[2], "expertmesh:prefix_cache_hits_total")


def test_requests_sharing_a_prefix_land_on_one_replica(cluster):
    router, servers = cluster
    before = [_hits(s) for s in servers]
    prefix = "You are a helpful assistant. " * 12  # several KV blocks
    for question in ("What is two plus two?", "Name a color.", "Spell cat.", "Count to three."):
        status, _, body = http("POST", router.url + "/v1/completions",
                               {"prompt": prefix + question, "max_tokens": 2}, headers=AUTH)
        assert status == 200, body
    gained = [_hits(s) - b for s, b in zip(servers, before)]
    assert sum(g > 0 for g in gained) == 1 and max(gained) >= 3 * 16, gained  # one replica, three warm hits


def test_a_stopped_replica_is_taken_out_and_comes_back(cluster):
    router, servers = cluster
    victim = servers[1]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: victim.url not in http("GET", router.url + "/health")[2]["healthy"], 15,
                   "the stopped replica to be taken out")
        for i in range(6):  # everything goes to the two others meanwhile
            status, _, _ = http("POST", router.url + "/v1/completions", {"prompt": f"q{i}", "max_tokens": 2},
                                headers=AUTH)
            assert status == 200
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    wait_until(lambda: victim.url in http("GET", router.url + "/health")[2]["healthy"], 15,
               "the replica to come back")


def _stream(url: str, body: dict, result: dict) -> None:
    import urllib.request

    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", **AUTH})
    lines = result["lines"] = []  # filled as chunks arrive, so the test can see a stream has started
    try:
        with urllib.request.urlopen(req, timeout=90) as resp:
            for raw in resp:
                if raw.startswith(b"data:"):
                    lines.append(raw.decode().strip())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = exc


def test_killing_a_replica_mid_run_loses_no_request(cluster):
    router, servers = cluster
    results = [dict() for _ in range(12)]
    threads = [threading.Thread(target=_stream, args=(router.url, {"prompt": f"story {i}", "max_tokens": 400,
                                                                   "ignore_eos": True}, results[i]), daemon=True)
               for i in range(12)]
    for t in threads:
        t.start()
    # Every stream has its first chunk: none can be failed over any more, so the victim's are cut.
    wait_until(lambda: all(r.get("lines") for r in results), 60, "every stream to start")
    text = http("GET", router.url + "/metrics")[2]
    busy = {s.url: metric(text, "expertmesh_router:backend_in_flight", backend=s.url) for s in servers}
    victim = max(servers, key=lambda s: busy[s.url])  # the replica with the most open streams
    assert busy[victim.url] > 0, busy
    os.kill(victim.engine_pid, signal.SIGKILL)
    os.kill(victim.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    ended = {"done": 0, "error": 0}
    for r in results:
        assert "error" not in r, r.get("error")  # every client got an answer, not a broken connection
        assert r["lines"][-1] == "data: [DONE]", r["lines"][-3:]
        ended["error" if "error" in json.loads(r["lines"][-2][5:]) else "done"] += 1
    assert ended["error"] == busy[victim.url], (ended, busy)  # exactly the victim's streams were cut...
    assert ended["done"] == 12 - busy[victim.url]  # ...and the others finished
    # New requests still succeed, on the survivors.
    for i in range(4):
        assert http("POST", router.url + "/v1/completions", {"prompt": f"after {i}", "max_tokens": 2},
                    headers=AUTH)[0] == 200
    text = http("GET", router.url + "/metrics")[2]
    outcomes = {o: sum(metric(text, "expertmesh_router:requests_total", backend=s.url, outcome=o) for s in servers)
                for o in ("ok", "stream_error", "retried")}
    assert outcomes["stream_error"] == ended["error"], (outcomes, ended)  # every cut stream is counted
