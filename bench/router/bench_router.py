"""The router's policies side by side, and what the router adds to TTFT, in one sitting.

    .venv/bin/python bench/router/bench_router.py [--replicas 2 4] [--out FILE.json]

1. Prefix-cache hit rate: `expertmesh bench serve --dataset prefix-repetition` (P prefixes of
   L tokens, shuffled) through `expertmesh router` over N replicas of the built-in model, per
   policy (prefix-hash, round-robin, least-loaded), against one replica with N times the KV
   blocks and the same workload. Each replica's KV cache holds about 1.5x its share of the
   prefixes (N x that for the single one), so a policy that scatters a prefix over replicas
   makes every replica hold every prefix and evict. Hit rate = prefix_cache_hits /
   prefix_cache_queries summed over the replicas' /metrics, the deltas over the run. Fresh
   servers per cell: no cell inherits a warm cache.
2. Router overhead: short requests (16 tokens in, 1 out) at --rate requests/s to one replica
   (one torch thread, so a core is left for the router and the load generator):
   - whole runs directly and through the router, --pairs times each, alternating: the median of
     the pairs' p50 TTFT differences;
   - one arrival stream interleaving direct and routed requests (`interleaved`), so both halves
     meet the same load and noise: the difference of their p50 TTFTs, three seeds; then again
     with the router at nice -10, which gets it a core as soon as it is woken, as a router on a
     host of its own would have (here it otherwise waits behind the replica's busy engine);
   - the alternating runs against instant_backend.py, which answers at once, so only the HTTP
     path is left.

Everything (replicas, router, load generator) shares this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from server_util import ServerProcess, free_port, metric  # noqa: E402 - the tests' launcher

PREFIXES, PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN, PROMPTS = 32, 256, 16, 4, 320
REQUESTS = 500  # per overhead run
BLOCKS_PER_PREFIX = PREFIX_LEN // 16


def _cache_counters(servers) -> tuple[float, float]:
    text = [urllib.request.urlopen(s.url + "/metrics", timeout=10).read().decode() for s in servers]
    return (sum(metric(t, "expertmesh:prefix_cache_hits_total") for t in text),
            sum(metric(t, "expertmesh:prefix_cache_queries_total") for t in text))


LOAD_FACTOR = ["--load-factor", "1.25"]  # replaced from the command line


def _router(backends: list[str], policy: str, log: Path, extra: tuple[str, ...] | list[str] = ()
            ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "expertmesh.cli", "router", "--port", str(port), "--policy", policy, *LOAD_FACTOR,
            *extra]
    for url in backends:
        args += ["--backend", url]
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"router did not start: {log.read_text()}")


def _load(url: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "expertmesh.cli", "bench", "serve", "--base-url", url, "--no-progress",
           "--save-result", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["metrics"]


def _servers(n: int, blocks: int, tmp: Path, threads: int | None = None) -> list[ServerProcess]:
    """n replicas splitting the cores' torch threads between them (more replicas than cores:
    one thread each), so that a cell measures routing, not oversubscription."""
    os.environ["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // n))
    try:
        return [ServerProcess(["--kv-cache-blocks", str(blocks), "--max-model-len", "512"], tmp / f"s{n}-{i}.log")
                for i in range(n)]
    finally:
        os.environ.pop("OMP_NUM_THREADS")


def hit_rates(replicas: int, tmp: Path) -> dict:
    per_replica = int(1.5 * PREFIXES * BLOCKS_PER_PREFIX / replicas) + 64  # +64: the running requests' own blocks
    load = ["--dataset", "prefix-repetition", "--num-prefixes", str(PREFIXES), "--prefix-len", str(PREFIX_LEN),
            "--suffix-len", str(SUFFIX_LEN), "--output-len", str(OUTPUT_LEN), "--num-prompts", str(PROMPTS),
            "--max-concurrency", "8", "--tokenizer", str(_builtin()), "--seed", "1"]
    row: dict = {"replicas": replicas, "kv_blocks_per_replica": per_replica}
    cells = [("single", 1, per_replica * replicas, None)] + [(p, replicas, per_replica, p) for p in
                                                             ("prefix-hash", "round-robin", "least-loaded")]
    for name, n, blocks, policy in cells:
        servers = _servers(n, blocks, tmp)
        router = None
        try:
            url = servers[0].url
            if policy is not None:
                router, url = _router([s.url for s in servers], policy, tmp / f"router-{name}.log")
            hits0, queries0 = _cache_counters(servers)
            m = _load(url, load, tmp / f"{name}-{replicas}.json")
            hits, queries = _cache_counters(servers)
            row[name] = {"hit_rate": (hits - hits0) / max(queries - queries0, 1), "ttft_p50_ms": m["median_ttft_ms"],
                         "output_throughput": m["output_throughput"], "errors": m.get("failed", 0)}
        finally:
            if router is not None:
                router.send_signal(signal.SIGTERM)
                router.wait(20)
            for s in servers:
                s.stop()
    return row


def _alternate(direct: str, router: subprocess.Popen, router_url: str, load: list[str], tmp: Path,
               pairs: int) -> dict:
    """A warm-up run each way, then `pairs` pairs of runs, direct and through the router, the
    order flipping every pair so that drift cancels: p50 TTFT of each run, the router's own CPU
    time per request (from /proc) over each of its runs, and the median of the pairs'
    differences."""
    for url in (direct, router_url):
        _load(url, load, tmp / "warm-up.json")
    out: dict = {"direct": [], "router": [], "router_cpu_ms_per_request": []}
    for i in range(pairs):
        for name in (("direct", "router") if i % 2 == 0 else ("router", "direct")):
            cpu = _cpu_seconds(router.pid)
            out[name].append(_load(direct if name == "direct" else router_url, load,
                                   tmp / f"{name}-{i}.json")["median_ttft_ms"])
            if name == "router":
                out["router_cpu_ms_per_request"].append((_cpu_seconds(router.pid) - cpu) * 1e3 / REQUESTS)
    out["added_ms"] = statistics.median(r - d for r, d in zip(out["router"], out["direct"]))
    return out


def interleaved(direct: str, router_url: str, rate: float, requests: int, seed: int = 5) -> dict:
    """One Poisson arrival stream at `rate`, every other request direct and the rest through the
    router, so that both halves meet the same load, the same noise and the router's own CPU use:
    the difference of their p50 TTFTs is what the path through the router adds."""
    import asyncio

    import aiohttp
    import numpy as np

    from expertmesh.bench.datasets import SampleRequest
    from expertmesh.bench.load_generator import LoadConfig, arrival_times, send_request

    rng = np.random.default_rng(seed)
    reqs = [SampleRequest(rng.integers(3, 600, 16).tolist(), 16, 1) for _ in range(requests)]
    cfgs = [LoadConfig(url, "expertmesh-tiny-moe") for url in (direct, router_url)]

    async def run() -> list:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for cfg in cfgs:  # warm both paths' connections
                await send_request(session, cfg, reqs[0], -1, time.perf_counter())
            times, t0 = arrival_times(requests, rate, 1.0, seed), time.perf_counter()

            async def one(i: int):
                await asyncio.sleep(max(0.0, t0 + float(times[i]) - time.perf_counter()))
                return await send_request(session, cfgs[i % 2], reqs[i], i, t0)

            return await asyncio.gather(*(one(i) for i in range(requests)))

    results = asyncio.run(run())
    ttft = [[r.ttft * 1e3 for r in results[k::2] if r.success] for k in (0, 1)]
    out = {"direct_p50_ms": statistics.median(ttft[0]), "router_p50_ms": statistics.median(ttft[1]),
           "requests": requests, "failed": sum(not r.success for r in results)}
    out["added_ms"] = out["router_p50_ms"] - out["direct_p50_ms"]
    return out


def overhead(rate: float, tmp: Path, pairs: int) -> dict:
    """Against a real replica: whole runs alternating direct / through the router, then one
    arrival stream interleaving both (three seeds), then the same with the router at nice -10,
    which gets it a core as soon as it is woken -- what a router on a host of its own has; on
    these two shared cores it otherwise waits behind the replica's engine at every hop."""
    (server,) = _servers(1, 512, tmp, threads=1)  # a core left for the router and the load generator
    router, router_url = _router([server.url], "prefix-hash", tmp / "router-overhead.log")
    try:
        load = ["--dataset", "random", "--random-input-len", "16", "--random-output-len", "1", "--num-prompts",
                str(REQUESTS), "--request-rate", str(rate), "--tokenizer", str(_builtin()), "--seed", "2"]
        out = _alternate(server.url, router, router_url, load, tmp, pairs)
        out["interleaved"] = [interleaved(server.url, router_url, rate, 2 * REQUESTS, seed) for seed in range(3)]
        os.setpriority(os.PRIO_PROCESS, router.pid, -10)  # needs root (or CAP_SYS_NICE)
        out["interleaved_router_nice_-10"] = [interleaved(server.url, router_url, rate, 2 * REQUESTS, seed)
                                              for seed in range(3)]
        return out
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(20)
        server.stop()


def isolated_overhead(rate: float, pairs: int) -> dict:
    """The same comparison against instant_backend.py: only the HTTP path is left."""
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(Path(__file__).with_name("instant_backend.py")), str(port)])
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        router, router_url = _router([url], "round-robin", tmp / "router-instant.log")
        load = ["--dataset", "random", "--random-input-len", "16", "--random-output-len", "1", "--num-prompts",
                str(REQUESTS), "--request-rate", str(rate), "--vocab-size", "600", "--seed", "3"]
        try:
            return _alternate(url, router, router_url, load, tmp, pairs)
        finally:
            router.send_signal(signal.SIGTERM)
            router.wait(20)
            backend.terminate()
            backend.wait(10)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _ms(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _builtin() -> Path:
    from expertmesh.default_model import default_model_path

    return default_model_path()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--pairs", type=int, default=5, help="direct/router run pairs per overhead cell")
    parser.add_argument("--load-factor", type=float, default=None,
                        help="the router's --load-factor (its default if unset)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    LOAD_FACTOR[:] = [] if args.load_factor is None else ["--load-factor", str(args.load_factor)]
    from tqdm import tqdm

    os.environ.setdefault("EXPERTMESH_CACHE", str(Path(tempfile.gettempdir()) / "expertmesh-bench-router"))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [hit_rates(n, tmp) for n in tqdm(args.replicas, desc="replica counts")]
        ttft = overhead(args.rate, tmp, args.pairs)
    instant = isolated_overhead(args.rate, args.pairs)
    print(f"prefix-repetition: {PREFIXES} prefixes x {PREFIX_LEN} tokens + {SUFFIX_LEN}, {PROMPTS} prompts, "
          f"{OUTPUT_LEN} out, 8 in flight")
    print("| replicas | policy | prefix-cache hit rate | vs single | TTFT p50 ms | output tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        single = row["single"]["hit_rate"]
        for name in ("single", "prefix-hash", "round-robin", "least-loaded"):
            r = row[name]
            print(f"| {row['replicas'] if name != 'single' else 1} | {name} | {r['hit_rate']:.3f} | "
                  f"{r['hit_rate'] / single:.2f} | {r['ttft_p50_ms']:.1f} | {r['output_throughput']:.1f} |")
    for name, t in (("a replica", ttft), ("instant_backend.py (the HTTP path alone)", instant)):
        print(f"TTFT p50 at {args.rate:g} req/s, {name}: direct {_ms(t['direct'])} ms, through the router "
              f"{_ms(t['router'])} ms: the router adds {t['added_ms']:.2f} ms (median of the pairs); its own CPU "
              f"{_ms(t['router_cpu_ms_per_request'])} ms per request")
        for key in ("interleaved", "interleaved_router_nice_-10"):
            for run in t.get(key, []):
                print(f"    {key}, {run['requests']} requests: direct {run['direct_p50_ms']:.2f} ms, through the "
                      f"router {run['router_p50_ms']:.2f} ms: adds {run['added_ms']:.2f} ms")
    if args.out:
        result = {"config": vars(args), "hit_rates": rows, "ttft_ms": ttft,
                  "instant_ttft_ms": instant}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
