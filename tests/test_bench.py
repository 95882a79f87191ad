"""`expertmesh bench`: metric definitions on synthetic streams with known timings, the load
generator against a scripted SSE server and a real expertmesh server, the JSON layout, and
the offline bench on a tiny workload."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from aiohttp import web

from expertmesh.bench import datasets, report
from expertmesh.bench.load_generator import LoadConfig, arrival_times, run_load
from expertmesh.bench.metrics import RequestResult, compute_metrics, parse_goodput, timeline
from expertmesh.cli import main
from server_util import ServerProcess


def _req(i, start, ttft, itl, out, ok=True, kind=None, prompt_len=10):
    latency = ttft + sum(itl)
    return RequestResult(index=i, prompt_len=prompt_len, max_tokens=out, success=ok, start_time=start, ttft=ttft,
                         latency=latency if ok else 0.0, itl=list(itl), output_tokens=out if ok else 0,
                         error_kind=kind)


# ---- metric definitions ----------------------------------------------------------------------


def test_metrics_follow_vllm_definitions_on_known_timings():
    a = _req(0, 0.0, 0.100, [0.010, 0.020, 0.030], 4)  # e2e 0.16 s, TPOT (0.16-0.1)/3 = 20 ms
    b = _req(1, 0.9, 0.300, [0.050], 2)  # e2e 0.35 s, TPOT 50 ms
    c = _req(2, 1.0, 0.200, [], 1)  # one token: no TPOT, no ITL
    d = _req(3, 1.0, 0.0, [], 0, ok=False, kind="http_429")
    m = compute_metrics([a, b, c, d], duration_s=2.0, slos=parse_goodput(["ttft:250 tpot:30"]))
    assert m["completed"] == 3 and m["failed"] == 1 and m["lost"] == 0
    assert m["errors"] == {"http_429": 1}
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(18.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(35.0)  # (20 + 50) / 2: c has one token, so no TPOT
    assert m["mean_itl_ms"] == pytest.approx(27.5)  # pooled gaps 10, 20, 30, 50
    assert m["p99_itl_ms"] == pytest.approx(49.4)  # numpy linear interpolation
    assert m["mean_e2el_ms"] == pytest.approx((160 + 350 + 200) / 3)
    # Goodput: a (ttft 100, tpot 20) and c (ttft 200, tpot counted as 0) pass; b fails both.
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["max_concurrent_requests"] == 2  # b [.9, 1.25) overlaps c [1, 1.2)
    assert math.isclose(b.tpot, 0.05)


def test_empty_and_all_failed_runs_report_zeros_not_errors():
    m = compute_metrics([_req(0, 0, 0, [], 0, ok=False, kind="timeout")], 1.0, num_requested=3)
    assert m["completed"] == 0 and m["lost"] == 2 and m["mean_ttft_ms"] == 0.0 and m["request_goodput"] is None


def test_goodput_spec_is_validated():
    assert parse_goodput(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["foo:1"], ["tpot:x"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_timeline_counts_chunks_per_bucket():
    tl = timeline([_req(0, 0.0, 0.5, [0.25, 0.5], 3), _req(1, 1.0, 0.1, [], 1)], 1.0)
    assert tl["output_chunks_per_s"][:3] == [2.0, 2.0, 0.0]  # chunks at 0.5, 0.75 | 1.1, 1.25
    assert tl["in_flight"][:2] == [1.0, 2.0]


# ---- arrivals and datasets --------------------------------------------------------------------


def test_arrivals_are_scaled_to_the_rate_and_seeded():
    t = arrival_times(100, 10.0, 1.0, seed=3)
    assert t[-1] == pytest.approx(10.0) and (t[1:] >= t[:-1]).all()
    assert (arrival_times(100, 10.0, 1.0, seed=3) == t).all()
    assert not (arrival_times(100, 10.0, 0.2, seed=3) == t).all()
    assert (arrival_times(5, float("inf"), 1.0, 0) == 0).all()
    # Low burstiness clusters arrivals: the gaps' coefficient of variation grows (1 for Poisson).
    gaps = lambda b: (lambda g: g.std() / g.mean())(  # noqa: E731
        __import__("numpy").diff(arrival_times(4000, 10.0, b, 1)))
    assert gaps(0.25) > 1.5 > gaps(1.0) > 0.8 > gaps(16.0)


def test_random_and_prefix_datasets():
    reqs = datasets.random_requests(200, 100, 20, vocab_size=50, range_ratio=0.5, seed=1)
    lens = [r.prompt_len for r in reqs]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    assert all(len(r.prompt) == r.prompt_len and 0 < min(r.prompt) and max(r.prompt) < 50 for r in reqs)
    exact = datasets.random_requests(5, 16, 4, vocab_size=50, seed=1)
    assert {r.prompt_len for r in exact} == {16} and {r.output_len for r in exact} == {4}
    groups = datasets.prefix_repetition_requests(12, 32, 8, 3, 5, vocab_size=1000, seed=0)
    assert len({tuple(r.prompt[:32]) for r in groups}) == 3 and len({tuple(r.prompt) for r in groups}) == 12
    assert all(len(r.prompt) == 40 and r.output_len == 5 for r in groups)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello", "output_len": 3}\n\n{"prompt": [5, 6, 7]}\n')
    reqs = datasets.jsonl_requests(path, 3, 9)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [("hello", 0, 3), ([5, 6, 7], 3, 9),
                                                                       ("hello", 0, 3)]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        datasets.jsonl_requests(path, None, 1)


# ---- the load generator against a scripted SSE server ----------------------------------------

GAP = 0.05


async def _scripted(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body["prompt"]
    if prompt == [1]:
        return web.json_response({"error": {"message": "slow down"}}, status=429)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(2 * GAP)  # TTFT ~ 2 gaps
    n = body["max_tokens"]
    for i in range(n):
        if i:
            await asyncio.sleep(GAP)
        await resp.write(f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i}'}]})}\n\n".encode())
        if prompt == [2] and i == 1:
            await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
            return resp
    usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
    await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    if prompt != [3]:
        await resp.write(b"data: [DONE]\n\n")
    return resp


async def _with_scripted_server(fn):
    app = web.Application()
    app.router.add_post("/v1/completions", _scripted)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await fn(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_load_generator_times_streams_and_classifies_errors():
    reqs = [datasets.SampleRequest([9, 9], 2, 4), datasets.SampleRequest([1], 1, 4),
            datasets.SampleRequest([2], 1, 4), datasets.SampleRequest([3], 1, 4)]

    async def go(url):
        cfg = LoadConfig(base_url=url, model="m", max_concurrency=4)
        return await run_load(cfg, reqs, warmups=[reqs[0]], progress=False)

    results, duration, warm = asyncio.run(_with_scripted_server(go))
    ok, throttled, died, undone = results
    assert warm[0].success and ok.success and ok.output_tokens == 4 and ok.usage_reported
    assert ok.ttft == pytest.approx(2 * GAP, abs=0.04)
    assert len(ok.itl) == 3 and all(g == pytest.approx(GAP, abs=0.04) for g in ok.itl)
    assert ok.latency == pytest.approx(ok.ttft + sum(ok.itl))
    assert ok.tpot == pytest.approx((ok.latency - ok.ttft) / 3)
    assert ok.generated_text == "t0t1t2t3"
    assert (throttled.error_kind, died.error_kind, undone.error_kind) == ("http_429", "stream_error", "incomplete")
    m = compute_metrics(results, duration)
    assert m["errors"] == {"http_429": 1, "incomplete": 1, "stream_error": 1} and m["lost"] == 0


def test_connection_refused_is_an_error_not_a_crash():
    from server_util import free_port

    cfg = LoadConfig(base_url=f"http://127.0.0.1:{free_port()}", model="m")
    results, _, _ = asyncio.run(run_load(cfg, [datasets.SampleRequest([5], 1, 2)], progress=False))
    assert results[0].error_kind == "connection"


# ---- against a real expertmesh server -------------------------------------------------------


def test_bench_serve_against_a_real_server(tmp_path, capsys):
    server = ServerProcess([], tmp_path / "server.log")
    try:
        out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
        argv = ["bench", "serve", "--base-url", server.url, "--vocab-size", "600", "--num-prompts", "12",
                "--random-input-len", "24", "--random-output-len", "6", "--request-rate", "40",
                "--max-concurrency", "8", "--goodput", "e2el:60000", "--save-result", str(out_json),
                "--plot", str(out_png), "--no-progress"]
        assert main(argv) == 0
    finally:
        server.stop()
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Mean TPOT (ms):" in table
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"schema_version", "kind", "date", "machine", "config", "metrics", "requests", "timeline"}
    assert doc["schema_version"] == report.SCHEMA_VERSION and doc["kind"] == "serve"
    m = doc["metrics"]
    assert (m["completed"], m["failed"], m["lost"]) == (12, 0, 0)
    assert m["total_input_tokens"] == 12 * 24 and m["total_output_tokens"] == 12 * 6
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert {f"{s}_{key}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99")} <= set(m)
    assert [r["index"] for r in doc["requests"]] == list(range(12))
    assert set(doc["requests"][0]) == set(report.REQUEST_FIELDS)
    assert all(r["output_tokens"] == 6 and r["ttft"] > 0 and len(r["itl"]) >= 1 for r in doc["requests"])
    assert set(doc["timeline"]) == {"t", "output_chunks_per_s", "completed_per_s", "in_flight"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_needs_a_vocabulary_for_random_ids(capsys):
    assert main(["bench", "serve", "--model", "m", "--num-prompts", "1"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


# ---- offline ----------------------------------------------------------------------------------


def test_bench_offline_against_transformers_on_the_same_workload(tmp_path, capsys):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--num-prompts", "4", "--input-len", "40", "--output-len", "5",
            "--baseline", "transformers", "--repeats", "2", "--save-result", str(out)]
    assert main(argv) == 0
    assert "speedup" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) == {"schema_version", "kind", "date", "machine", "config", "metrics"}
    m = doc["metrics"]
    for name in ("expertmesh", "transformers"):
        assert m[name]["output_tokens"] == 4 * 5
        assert {"elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"} <= set(m[name])
    assert m["speedup_output_tokens_per_s"] == pytest.approx(
        m["expertmesh"]["output_tokens_per_s"] / m["transformers"]["output_tokens_per_s"])
    assert m["greedy_agreement"] == 1.0  # fp32: the same prompts give the same greedy tokens
    assert len(m["expertmesh"]["runs_s"]) == 2
    assert m["expertmesh"]["prefix_cache_hits"] == 0  # a repeat must redo its prefill, not hit the cache
    assert doc["config"]["dtype"] == "float32" and doc["config"]["num_prompts"] == 4
