"""Process faults against real `expertmesh serve` processes on the built-in model.

SIGTERM drains in-flight streams (new requests get 503) and exits; past --drain-timeout the
rest are cut off with an error chunk, shutdown takes about the timeout, and the log counts what
ran to the end and what was cut off truthfully. An engine that dies or stops answering fails
the requests in flight at once, and the server exits with status 3 for its supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

from server_util import ServerProcess, http, wait_until

EXIT_ENGINE_DIED = 3


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


def _error_chunk(result: dict) -> dict:
    assert result["error"] is None, result["error"]
    assert result["lines"][-1] == "[DONE]", result["lines"][-3:]
    return json.loads(result["lines"][-2])["error"]


def _exited(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


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
        assert "1 request(s) ended during the drain, 0 cut off" in srv.log(), srv.log()
        assert "engine is dead" not in srv.log()  # a planned stop is not reported as a death
        wait_until(lambda: _exited(srv.engine_pid), 10, "the engine process to exit")
    finally:
        srv.stop()


def test_drain_timeout_bounds_shutdown_and_the_log_tells_the_truth(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "512", "--drain-timeout", "2"], tmp_path / "timeout.log")
    try:
        # One stream ends well within the drain, two would run for many seconds more.
        short_thread, short = _start_stream(srv.url, {"prompt": "short", "max_tokens": 40, "ignore_eos": True})
        longs = [_start_stream(srv.url, {"prompt": f"long {i}", "max_tokens": 4000, "ignore_eos": True})
                 for i in range(2)]
        for _, result in longs:
            assert result["started"].wait(30), "stream did not start"
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(20)
        took = time.monotonic() - sent
        assert code == 0, srv.log()
        assert took < 2 + 3, f"shutdown took {took:.1f} s with --drain-timeout 2"
        for thread, result in longs:
            thread.join(10)
            error = _error_chunk(result)  # cut off: an error chunk, then [DONE] -- never a silent cut
            assert error["code"] == "shutting_down" and "drain timeout" in error["message"], error
        short_thread.join(10)
        assert short["error"] is None and short["lines"][-1] == "[DONE]"
        assert json.loads(short["lines"][-2])["choices"][0]["finish_reason"] == "length"
        assert "1 request(s) ended during the drain, 2 cut off by the drain timeout" in srv.log(), srv.log()
        wait_until(lambda: _exited(srv.engine_pid), 10, "the engine process to exit")
    finally:
        srv.stop()


def test_engine_death_fails_in_flight_requests_and_the_server_exits_for_its_supervisor(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "256"], tmp_path / "death.log")
    try:
        thread, result = _start_stream(srv.url, {"prompt": "doomed", "max_tokens": 3000, "ignore_eos": True})
        assert result["started"].wait(30), "stream did not start"
        killed = time.monotonic()
        os.kill(srv.engine_pid, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive(), "in-flight stream hung after the engine died"
        error = _error_chunk(result)
        assert error["code"] == "engine_dead" and "died" in error["message"]
        assert srv.proc.wait(15) == EXIT_ENGINE_DIED, srv.log()
        assert time.monotonic() - killed < 10
        log = srv.log()
        assert "engine is dead: engine process exited" in log and "1 request(s) in flight got an error" in log, log
    finally:
        srv.stop()


def test_a_wedged_engine_is_declared_dead_within_the_engine_timeout(tmp_path):
    srv = ServerProcess(["--kv-cache-blocks", "256", "--engine-timeout", "2"], tmp_path / "wedged.log")
    try:
        thread, result = _start_stream(srv.url, {"prompt": "stuck", "max_tokens": 3000, "ignore_eos": True})
        assert result["started"].wait(30), "stream did not start"
        stopped = time.monotonic()
        os.kill(srv.engine_pid, signal.SIGSTOP)  # alive but silent: no frame will come
        thread.join(30)
        assert not thread.is_alive(), "in-flight stream hung on a silent engine"
        waited = time.monotonic() - stopped
        error = _error_chunk(result)
        assert error["code"] == "engine_dead" and "--engine-timeout 2" in error["message"], error
        assert 1.5 < waited < 8, f"declared dead after {waited:.1f} s with --engine-timeout 2"
        assert srv.proc.wait(15) == EXIT_ENGINE_DIED, srv.log()
        wait_until(lambda: _exited(srv.engine_pid), 10, "the wedged engine to be killed")
    finally:
        srv.stop()


def test_serve_without_arguments_means_builtin_model_on_localhost_8000(monkeypatch):
    from expertmesh.cli import build_parser

    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)
    assert (args.max_waiting_seqs, args.max_num_seqs_per_request, args.protect_metrics) == (512, 256, False)
