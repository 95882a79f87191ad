"""Disaggregated prefill/decode vs one colocated server on the same cores, in one sitting.

    .venv/bin/python bench/disagg/bench_disagg.py [--model DIR] [--out FILE.json]

Workload: --streams decode streams (16 tokens in, --stream-tokens out) start together; while
they run, --long-prompts prompts of --long-len tokens (8 out) arrive every --interval s. The
claim under test: with prefill and decode on separate servers, long prefills no longer stall
the running decodes, so their inter-token latency (ITL) p99 stays flat.

Cells, each on fresh servers:
  colocated-idle   one server on every core, the streams alone: the ITL floor
  colocated        one server on every core (torch threads = cores), streams + long prompts
  disaggregated    `serve --role prefill` on the first half of the cores, `serve --role decode`
                   on the rest (taskset, threads = their cores), `router --prefill --decode`
                   in front; streams + long prompts

Also: the KV bytes and pull time per moved prompt (from the decode server's /metrics) against
this machine's loopback TCP bandwidth, measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PERCENTILES = [*range(50, 90), *np.round(np.arange(90, 100.01, 0.1), 1).tolist()]  # the tail in detail
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench" / "router"))
from bench_router import _router  # noqa: E402 - the router launcher
from server_util import ServerProcess, http, metric  # noqa: E402 - the tests' launcher


def _server(args: list[str], cores: list[int], log: Path) -> ServerProcess:
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    try:
        server = ServerProcess(args, log)
    finally:
        os.environ.pop("OMP_NUM_THREADS")
    for pid in (server.proc.pid, server.engine_pid):
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, cores)), str(pid)], check=True,
                       capture_output=True)
    return server


async def _workload(url: str, model: str, a: argparse.Namespace, long_prompts: int) -> dict:
    import aiohttp

    from expertmesh.bench.datasets import SampleRequest
    from expertmesh.bench.load_generator import LoadConfig, send_request

    rng = np.random.default_rng(0)
    cfg = LoadConfig(url, model)
    streams = [SampleRequest(rng.integers(3, 600, 16).tolist(), 16, a.stream_tokens) for _ in range(a.streams)]
    longs = [SampleRequest(rng.integers(3, 600, a.long_len).tolist(), a.long_len, 8) for _ in range(long_prompts)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await send_request(session, cfg, SampleRequest([5, 6, 7], 3, 2), -1, time.perf_counter())  # warm-up
        t0 = time.perf_counter()

        async def late(i: int, req: SampleRequest):
            await asyncio.sleep(0.5 + i * a.interval)
            return await send_request(session, cfg, req, 1000 + i, t0)

        results = await asyncio.gather(*(send_request(session, cfg, r, i, t0) for i, r in enumerate(streams)),
                                       *(late(i, r) for i, r in enumerate(longs)))
        duration = time.perf_counter() - t0
    stream_results, long_results = results[: a.streams], results[a.streams:]
    itl = np.array([x * 1e3 for r in stream_results for x in r.itl])
    return {"itl_percentiles_ms": [[q, float(np.percentile(itl, q))] for q in PERCENTILES],
            "itl_p50_ms": float(np.percentile(itl, 50)), "itl_p99_ms": float(np.percentile(itl, 99)),
            "itl_max_ms": float(itl.max()), "output_tok_s": sum(r.output_tokens for r in results) / duration,
            "long_ttft_p50_ms": float(np.median([r.ttft * 1e3 for r in long_results])) if long_results else None,
            "failed": sum(not r.success for r in results), "duration_s": duration}


def _loopback_gbps(nbytes: int = 256 << 20) -> float:
    """This machine's loopback TCP bandwidth, one stream, as the KV pulls use it."""
    server = socket.create_server(("127.0.0.1", 0))
    got = []

    def drain():
        conn, _ = server.accept()
        n, buf = 0, bytearray(1 << 20)
        while n < nbytes:
            n += conn.recv_into(buf)
        conn.sendall(b"x")
        got.append(n)

    thread = threading.Thread(target=drain)
    thread.start()
    client = socket.create_connection(server.getsockname())
    chunk = bytes(4 << 20)
    t0 = time.perf_counter()
    for _ in range(nbytes // len(chunk)):
        client.sendall(chunk)
    client.recv(1)
    seconds = time.perf_counter() - t0
    thread.join()
    client.close()
    server.close()
    return nbytes / seconds / 1e9


def plot(out: dict, path: Path) -> None:
    """The decode streams' ITL distribution per cell: where the prefill stalls show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell, style in (("colocated-idle", ":"), ("colocated", "-"), ("disaggregated", "--")):
        qs, ms = zip(*out[cell]["itl_percentiles_ms"])
        ax.plot(qs, ms, style, label=cell)
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("inter-token latency of the running decode streams (ms)")
    a = out["config"]
    ax.set_title(f"{a['streams']} decode streams; {a['long_prompts']} prompts of {a['long_len']} tokens arriving")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the built-in model)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=160)
    parser.add_argument("--long-prompts", type=int, default=6)
    parser.add_argument("--long-len", type=int, default=1536)
    parser.add_argument("--interval", type=float, default=0.6)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    model_args = ["--model", a.model] if a.model else []
    common = [*model_args, "--kv-cache-blocks", "2048", "--max-model-len", "2048"]
    name = os.path.basename(os.path.normpath(a.model)) if a.model else "expertmesh-tiny-moe"
    out: dict = {"command": " ".join(["bench/disagg/bench_disagg.py", *sys.argv[1:]]), "config": vars(a),
                 "cores": cores, "machine": os.uname().machine + f", {len(cores)} cores"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for cell, longs in (("colocated-idle", 0), ("colocated", a.long_prompts)):
            server = _server(common, cores, tmp / f"{cell}.log")
            try:
                out[cell] = asyncio.run(_workload(server.url, name, a, longs))
            finally:
                server.stop()
        prefill = _server([*common, "--role", "prefill"], cores[:half], tmp / "prefill.log")
        decode = _server([*common, "--role", "decode"], cores[half:] or cores, tmp / "decode.log")
        router, url = _router([], "prefix-hash", tmp / "router.log", ["--prefill", prefill.url, "--decode", decode.url])
        try:
            out["disaggregated"] = asyncio.run(_workload(url, name, a, a.long_prompts))
            text = http("GET", decode.url + "/metrics")[2]
            kv = {k: metric(text, f"expertmesh:kv_transfer_{k}_total")
                  for k in ("imports", "bytes", "blocks", "seconds")}
            out["kv_transfer"] = {**kv, "bytes_per_import": kv["bytes"] / max(kv["imports"], 1),
                                  "ms_per_import": kv["seconds"] * 1e3 / max(kv["imports"], 1),
                                  "pull_gbps": kv["bytes"] / kv["seconds"] / 1e9 if kv["seconds"] else None}
        finally:
            router.send_signal(signal.SIGTERM)
            router.wait(20)
            prefill.stop()
            decode.stop()
    out["loopback_tcp_gbps"] = _loopback_gbps()
    print(f"{a.streams} streams x {a.stream_tokens} tokens; {a.long_prompts} prompts of {a.long_len} tokens arriving "
          f"every {a.interval:g} s; cores {cores}")
    print("| cell | ITL p50 ms | ITL p99 ms | ITL max ms | long-prompt TTFT p50 ms | output tok/s | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in ("colocated-idle", "colocated", "disaggregated"):
        r = out[cell]
        ttft = "-" if r["long_ttft_p50_ms"] is None else f"{r['long_ttft_p50_ms']:.1f}"
        print(f"| {cell} | {r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {r['itl_max_ms']:.2f} | {ttft} | "
              f"{r['output_tok_s']:.1f} | {r['failed']} |")
    kv = out["kv_transfer"]
    print(f"KV moved: {kv['imports']:.0f} pulls, {kv['bytes_per_import'] / 1e6:.2f} MB and "
          f"{kv['ms_per_import']:.2f} ms per pull ({kv['pull_gbps'] or 0:.2f} GB/s); loopback TCP on this machine: "
          f"{out['loopback_tcp_gbps']:.2f} GB/s")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        plot(out, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
