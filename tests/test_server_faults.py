"""Faults against real server processes serving the built-in model: SIGTERM drains in-flight
streams (new requests get 503) and the process exits; a killed engine process fails /health
and ends in-flight streams with an error chunk instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request

from server_util import ServerProcess, http, wait_until


def _start_stream(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """Run one streaming request on a thread; the result dict gets its SSE data lines."""
    result: dict = {"lines": [], "error": None, "started": threading.Event()}

    def run() -> None:
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        result["lines"].append(line[5:].strip())
                        result["started"].set()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc
        result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_drains_in_flight_then_exits(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "256", "--drain-timeout", "30"], tmp_path / "drain.log")
    try:
        thread, result = _start_stream(srv.url, {"prompt": "drain me", "max_tokens": 1000, "ignore_eos": True,
                                                 "stream_options": {"include_usage": True}})
        assert result["started"].wait(30), "stream did not start"
        srv.proc.send_signal(signal.SIGTERM)
        status = wait_until(lambda: (s := http("POST", srv.url + "/v1/completions", {"prompt": "late"})[0]) != 200
                            and s, 10, "a new request to be refused while draining")
        assert status == 503
        assert http("GET", srv.url + "/health")[0] == 503
        thread.join(60)
        assert not thread.is_alive() and result["error"] is None, result
        assert result["lines"][-1] == "[DONE]"
        usage = json.loads(result["lines"][-2])["usage"]
        assert usage["completion_tokens"] == 1000  # the in-flight stream ran to its end
        assert srv.proc.wait(30) == 0, srv.log()
        wait_until(lambda: not os.path.exists(f"/proc/{srv.engine_pid}") or
                   open(f"/proc/{srv.engine_pid}/stat").read().split()[2] == "Z", 10, "the engine process to exit")
    finally:
        srv.stop()


def test_engine_death_fails_health_and_in_flight_requests(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "256"], tmp_path / "death.log")
    try:
        thread, result = _start_stream(srv.url, {"prompt": "doomed", "max_tokens": 3000, "ignore_eos": True})
        assert result["started"].wait(30), "stream did not start"
        os.kill(srv.engine_pid, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive(), "in-flight stream hung after the engine died"
        assert result["lines"][-1] == "[DONE]"
        error = json.loads(result["lines"][-2])["error"]
        assert error["code"] == "engine_dead" and "died" in error["message"]
        status, _, body = http("GET", srv.url + "/health")
        assert status == 503 and body["status"] == "engine_dead"
        status, _, body = http("POST", srv.url + "/v1/completions", {"prompt": "after"})
        assert status == 503 and body["error"]["code"] == "engine_dead"
    finally:
        srv.stop()


def test_serve_without_arguments_means_builtin_model_on_localhost_8000(monkeypatch):
    from expertmesh.cli import build_parser

    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)
