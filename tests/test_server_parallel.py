"""`expertmesh serve --ep 2`, `--tensor-parallel-size 2` and `-cp 2`: the server's engine process
becomes rank 0 of two ranks; answers equal a single-rank server's, /metrics shows per-rank load
(EP), the layout and allreduce counts (TP) or context-parallel requests by variant and ring
bytes (CP), and stopping the server stops every rank."""

from __future__ import annotations

import os
import urllib.request

from server_util import ServerProcess, http, wait_until

PROMPTS = ["The experts of a mixture", "Hello, world! How are you today?", "one, two, three"]


def _greedy_texts(url: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        status, _, body = http("POST", url + "/v1/completions",
                               {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        texts.append(body["choices"][0]["text"])
    return texts


def _rank_pids(engine_pid: int) -> list[int]:
    """Worker rank processes started by the engine process (its children)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == engine_pid:
                children.append(int(entry))
    return children


def test_serve_ep2_equals_single_rank_and_reports_rank_load(tmp_path):
    single = ServerProcess(["--kv-cache-blocks", "256"], tmp_path / "single.log")
    try:
        want = _greedy_texts(single.url)
    finally:
        single.stop()
    ep = ServerProcess(["--kv-cache-blocks", "256", "--ep", "2"], tmp_path / "ep.log")
    try:
        workers = _rank_pids(ep.engine_pid)
        assert workers, ep.log()
        assert _greedy_texts(ep.url) == want
        metrics = urllib.request.urlopen(ep.url + "/metrics", timeout=30).read().decode()
        rank_lines = [line for line in metrics.splitlines() if line.startswith("expertmesh:rank_tokens_total{")]
        assert {'rank="0"' in line for line in rank_lines} == {True, False}, rank_lines
        assert sum(float(line.rsplit(" ", 1)[1]) for line in rank_lines) > 0
    finally:
        assert ep.stop() == 0, ep.log()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and
                               open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                               for pid in workers), 20, "the worker ranks to exit")


def test_serve_tp2_equals_single_rank_and_reports_the_allreduce(tmp_path):
    single = ServerProcess(["--kv-cache-blocks", "256"], tmp_path / "single.log")
    try:
        want = _greedy_texts(single.url)
    finally:
        single.stop()
    tp = ServerProcess(["--kv-cache-blocks", "256", "--tensor-parallel-size", "2"], tmp_path / "tp.log")
    try:
        workers = _rank_pids(tp.engine_pid)
        assert len(workers) == 1, tp.log()
        assert _greedy_texts(tp.url) == want
        metrics = urllib.request.urlopen(tp.url + "/metrics", timeout=30).read().decode()
        assert 'expertmesh:parallel_size{dim="tensor_parallel",model_name="expertmesh-tiny-moe"} 2.0' in metrics
        calls = [line for line in metrics.splitlines() if line.startswith("expertmesh:allreduce_calls_total{")]
        assert calls and sum(float(line.rsplit(" ", 1)[1]) for line in calls) > 0, calls
    finally:
        assert tp.stop() == 0, tp.log()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and
                               open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                               for pid in workers), 20, "the worker ranks to exit")


def test_serve_cp2_equals_single_rank_and_reports_the_ring(tmp_path):
    args = ["--kv-cache-blocks", "128", "--block-size", "4", "--max-model-len", "256", "--cp-min-tokens", "4"]
    single = ServerProcess(args, tmp_path / "single.log")
    try:
        want = _greedy_texts(single.url)
    finally:
        single.stop()
    cp = ServerProcess([*args, "-cp", "2"], tmp_path / "cp.log")
    try:
        workers = _rank_pids(cp.engine_pid)
        assert len(workers) == 1, cp.log()
        assert _greedy_texts(cp.url) == want
        metrics = urllib.request.urlopen(cp.url + "/metrics", timeout=30).read().decode()
        assert 'expertmesh:parallel_size{dim="context_parallel",model_name="expertmesh-tiny-moe"} 2.0' in metrics
        requests = {line.split('variant="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines() if line.startswith("expertmesh:cp_requests_total{")}
        assert requests == {"pass-kv": 3.0, "pass-q": 3.0}, requests  # every prefill passes KV, decodes queries
        ring = [line for line in metrics.splitlines() if line.startswith("expertmesh:cp_ring_bytes_total{")]
        assert len(ring) == 1 and 'transport="shm"' in ring[0] and float(ring[0].rsplit(" ", 1)[1]) > 0, ring
    finally:
        assert cp.stop() == 0, cp.log()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and
                               open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                               for pid in workers), 20, "the worker ranks to exit")
