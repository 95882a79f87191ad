"""Dispatch + combine time of the expert-parallel all-to-all: shared memory vs gloo
all_to_all_single, in one run, against the memcpy floor.

    .venv/bin/python bench/comm/bench_a2a.py [--ranks 2 4] [--iters 20] [--tokens 16 64 256 4096]

Each rank routes T random tokens (hidden 4096, fp32, 64 experts, top-k) and times
dispatch + combine (no expert math: the received rows go straight back). The floor is one
local copy of the same bytes a rank sends and receives (torch copy_ of contiguous buffers).
Legend: T tokens per rank, H hidden, k top-k, R ranks.
"""

from __future__ import annotations

import argparse
import os
import pickle

import torch
import torch.multiprocessing as mp
from timing import median_time  # bench/comm/timing.py (the script's folder is on sys.path)

HIDDEN, EXPERTS = 4096, 64
DECODE = [16, 64, 256]
PREFILL = 4096
CHUNK = 1024  # tokens per rank per call at prefill (the registered capacity)


def _rank(rank, world, port, iters, sizes, queue):
    from expertmesh.parallel.cpu_binding import bind_rank

    bind_rank(os.environ.get("BIND", "auto"), rank, world)  # the engine's default: a share of the cores each
    from expertmesh.parallel.all_to_all import ExpertParallel, combine, dispatch
    from expertmesh.parallel.groups import RankInfo, destroy_groups, init_groups
    from expertmesh.parallel.shm import ShmTransport
    from expertmesh.parallel.transport import TorchTransport

    groups = init_groups(RankInfo(rank, world, "127.0.0.1", port), torch.device("cpu"), 120)
    row_bytes = max(HIDDEN * 4 + 12 * 8, 4 * HIDDEN)
    results = []
    transports = {
        "gloo": TorchTransport(groups.data, rank, world, torch.device("cpu")),
        "shm": ShmTransport(groups.control, rank, world, CHUNK, row_bytes),
    }
    # Touch every slot and buffer page once before any row is timed (first-touch page faults).
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(CHUNK, HIDDEN, generator=g)
    weights, ids = torch.rand(CHUNK, EXPERTS, generator=g).topk(8, dim=-1)
    for tr in transports.values():
        ep = ExpertParallel(rank, world, tr, CHUNK)
        for _ in range(4):
            d = dispatch(ep, x, weights, ids, EXPERTS)
            combine(ep, d, d.x, CHUNK)
    for top_k in (2, 8):
        for tokens in sizes:
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(tokens, HIDDEN, generator=g)
            weights, ids = torch.rand(tokens, EXPERTS, generator=g).topk(top_k, dim=-1)

            def one(ep):
                for lo in range(0, tokens, CHUNK):
                    hi = min(lo + CHUNK, tokens)
                    d = dispatch(ep, x[lo:hi], weights[lo:hi], ids[lo:hi], EXPERTS)
                    combine(ep, d, d.x, hi - lo)  # the received rows go back as they landed

            row = {"top_k": top_k, "tokens": tokens}
            n = iters if tokens < PREFILL else max(3, iters // 10)
            for name, tr in transports.items():
                ep = ExpertParallel(rank, world, tr, CHUNK)
                torch.distributed.barrier(group=groups.control)
                row[name] = median_time(lambda: one(ep), n)
            d = dispatch(ExpertParallel(rank, world, transports["shm"], CHUNK), x[:CHUNK], weights[:CHUNK],
                         ids[:CHUNK], EXPERTS)
            sent = d.send_token_ids.numel() * (tokens // min(tokens, CHUNK))
            buf = torch.empty(2 * max(sent, 1), HIDDEN)
            src = torch.randn_like(buf)
            row["memcpy"] = median_time(lambda: buf.copy_(src), n)  # send + return bytes, one copy each
            results.append(row)
    for tr in transports.values():
        tr.close()
    destroy_groups()
    queue.put(pickle.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=DECODE + [PREFILL], help="tokens per rank")
    args = parser.parse_args()
    from expertmesh.parallel.groups import free_port

    ctx = mp.get_context("spawn")
    print(f"hidden {HIDDEN} fp32, {EXPERTS} experts, random routing; times per dispatch+combine (ms), "
          f"rank 0 of R; prefill runs in chunks of {CHUNK} tokens")
    print("| R | top-k | tokens/rank | gloo ms | shm ms | gloo/shm | memcpy floor ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for world in args.ranks:
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, args.iters, args.tokens, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = [pickle.loads(queue.get(timeout=1800)) for _ in procs]
        for p in procs:
            p.join()
        # Report the slowest rank per row: a collective is done when its last rank is.
        for i, row in enumerate(rows[0]):
            gloo = max(r[i]["gloo"] for r in rows)
            shm = max(r[i]["shm"] for r in rows)
            memcpy = max(r[i]["memcpy"] for r in rows)
            print(f"| {world} | {row['top_k']} | {row['tokens']} | {gloo * 1e3:.2f} | {shm * 1e3:.2f} | "
                  f"{gloo / shm:.1f}x | {memcpy * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
