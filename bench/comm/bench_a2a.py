"""Dispatch + combine time of the expert-parallel all-to-all: gloo all_to_all_single, the
shared-memory transport's generic calls and its fused Rust path, in one run, against the
memcpy floor.

    .venv/bin/python bench/comm/bench_a2a.py [--ranks 2 4] [--iters 20] [--tokens 1 16 64 256 4096]

Each rank routes T random tokens (hidden 4096, fp32, 64 experts, top-k) and times what
moe_forward runs around the expert GEMMs, with identity experts: dispatch, gathering the
pairs' inputs by local expert, each row's weighted sum over its slots, combine. gloo and shm:
the generic path (all_to_all.dispatch / run_local_experts / combine, torch ops around the
transport calls); shm-fused: ShmTransport.moe_exchange (two Rust calls and a Rust gather), the
path the engine takes on shared memory. T = 1 measures the fixed cost of a dispatch+combine pair.
The floor is one local copy of the same bytes a rank sends and receives (torch copy_ of
contiguous buffers). "1-rank" is what one rank does for the same tokens without any exchange:
gather the T*k (token, slot) inputs and sum each token's k slots with their weights (the
single-rank MoE's own gather and sum, in torch), for scale. Ranks are bound as the engine binds
them (cpu_binding.py).
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


def identity(xs, _offsets):
    return xs
DECODE = [1, 16, 64, 256]
PREFILL = 4096
CHUNK = 1024  # tokens per rank per call at prefill (the registered capacity)


def _rank(rank, world, port, iters, sizes, queue):
    from expertmesh.parallel.cpu_binding import bind_rank

    bind_rank(os.environ.get("BIND", "auto"), rank, world)  # the engine's default: a share of the cores each
    from expertmesh.parallel.all_to_all import ExpertParallel, combine, dispatch, run_local_experts
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
                    combine(ep, d, run_local_experts(ep, d, identity, EXPERTS), hi - lo)

            def fused(ep):
                for lo in range(0, tokens, CHUNK):
                    hi = min(lo + CHUNK, tokens)
                    out = ep.combine_buffer(hi - lo, HIDDEN, x.device)
                    ep.transport.moe_exchange(x[lo:hi], weights[lo:hi], ids[lo:hi], EXPERTS, identity, out)

            row = {"top_k": top_k, "tokens": tokens}
            n = iters if tokens < PREFILL else max(3, iters // 10)
            for name, tr, fn in [("gloo", transports["gloo"], one), ("shm", transports["shm"], one),
                                 ("shm-fused", transports["shm"], fused)]:
                ep = ExpertParallel(rank, world, tr, CHUNK)
                torch.distributed.barrier(group=groups.control)
                row[name] = median_time(lambda: fn(ep), n)
            d = dispatch(ExpertParallel(rank, world, transports["shm"], CHUNK), x[:CHUNK], weights[:CHUNK],
                         ids[:CHUNK], EXPERTS)
            sent = d.send_token_ids.numel() * (tokens // min(tokens, CHUNK))
            buf = torch.empty(2 * max(sent, 1), HIDDEN)
            src = torch.randn_like(buf)
            row["memcpy"] = median_time(lambda: buf.copy_(src), n)  # send + return bytes, one copy each
            pair_tokens = torch.arange(tokens).repeat_interleave(top_k)  # [T*k]
            row["local"] = median_time(
                lambda: (x.index_select(0, pair_tokens).view(tokens, top_k, HIDDEN) * weights.unsqueeze(-1)).sum(1), n)
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
    print("| R | top-k | tokens/rank | gloo ms | shm ms | shm-fused ms | gloo/fused | 1-rank ms | memcpy floor ms | "
          "fused/floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
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
            gloo, shm, fused, local, memcpy = (max(r[i][k] for r in rows)
                                               for k in ("gloo", "shm", "shm-fused", "local", "memcpy"))
            print(f"| {world} | {row['top_k']} | {row['tokens']} | {gloo * 1e3:.3f} | {shm * 1e3:.3f} | "
                  f"{fused * 1e3:.3f} | {gloo / fused:.1f}x | {local * 1e3:.3f} | {memcpy * 1e3:.3f} | "
                  f"{fused / memcpy:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
