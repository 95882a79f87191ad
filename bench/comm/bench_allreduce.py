"""Tensor-parallel allreduce: DDA one-shot, two-shot and the per-size pick vs gloo all_reduce,
in one run, against the memcpy floor.

    .venv/bin/python bench/comm/bench_allreduce.py [--ranks 2 4] [--iters 50] [--out FILE.json]

Each rank reduces a fp32 (or --dtype bf16) message of each size: decode sizes 8 KB - 2 MB
(a few tokens' hidden states) and prefill sizes up to 32 MB. Times are the median of `--iters`
calls on the slowest rank, after a warm-up that touches every buffer page. The floor is one
local copy of the message (what a rank must at least move to publish its input). Prints a
markdown table and the size where two-shot starts to beat one-shot (the table `pick` uses).

Legend: R ranks.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform

import torch
import torch.multiprocessing as mp
from timing import median_time  # bench/comm/timing.py (the script's folder is on sys.path)

SIZES_KB = [8, 32, 128, 256, 512, 1024, 2048, 8192, 32768]
DECODE_MAX_KB = 2048


def _rank(rank, world, port, iters, dtype_name, queue):
    torch.set_num_threads(1)
    import torch.distributed as dist

    from expertmesh.parallel.allreduce import ShmAllReduce, TorchAllReduce
    from expertmesh.parallel.groups import RankInfo, destroy_groups, init_groups

    dtype = getattr(torch, dtype_name)
    groups = init_groups(RankInfo(rank, world, "127.0.0.1", port), torch.device("cpu"), 300)
    biggest = max(SIZES_KB) << 10
    shm = ShmAllReduce(groups.control, rank, world, max_bytes=biggest, timeout_s=300)
    gloo = TorchAllReduce(groups.data)
    warm = torch.ones(biggest // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
    for algo in ("one_shot", "two_shot"):
        shm(warm, algo)
    rows = []
    for kb in SIZES_KB:
        numel = (kb << 10) // warm.element_size()
        x = torch.randn(numel).to(dtype)
        n = iters if kb <= DECODE_MAX_KB else max(5, iters // 5)
        row = {"kb": kb}
        for name, fn in (("gloo", lambda: gloo(x)), ("one_shot", lambda: shm(x, "one_shot")),
                         ("two_shot", lambda: shm(x, "two_shot")), ("picked", lambda: shm(x))):
            dist.barrier(group=groups.control)
            row[name] = median_time(fn, n)
        dst = torch.empty_like(x)
        row["memcpy"] = median_time(lambda: dst.copy_(x), n)
        rows.append(row)
    shm.close()
    destroy_groups()
    queue.put(pickle.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    from tqdm import tqdm

    from expertmesh.parallel.groups import free_port

    ctx = mp.get_context("spawn")
    table = []
    for world in tqdm(args.ranks, desc="world sizes"):
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, args.iters, args.dtype, queue)) for r in range(world)]
        for p in procs:
            p.start()
        per_rank = [pickle.loads(queue.get(timeout=3600)) for _ in procs]
        for p in procs:
            p.join()
        for i, row in enumerate(per_rank[0]):  # a collective is done when its slowest rank is
            table.append({"ranks": world, "kb": row["kb"], **{k: max(r[i][k] for r in per_rank)
                                                              for k in ("gloo", "one_shot", "two_shot", "picked")},
                          "memcpy": row["memcpy"]})
    print(f"{args.dtype}, median of {args.iters} calls (decode sizes) on the slowest rank, ms")
    print("| R | KB | gloo | one-shot | two-shot | picked | gloo/picked | memcpy floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        ms = {k: r[k] * 1e3 for k in ("gloo", "one_shot", "two_shot", "picked", "memcpy")}
        print(f"| {r['ranks']} | {r['kb']} | {ms['gloo']:.3f} | {ms['one_shot']:.3f} | {ms['two_shot']:.3f} | "
              f"{ms['picked']:.3f} | {r['gloo'] / r['picked']:.1f}x | {ms['memcpy']:.3f} |")
    for world in args.ranks:
        wins = [r["kb"] for r in table if r["ranks"] == world and r["two_shot"] < r["one_shot"]]
        print(f"R={world}: two-shot faster than one-shot from {min(wins) if wins else 'never'} KB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.machine()} {platform.processor()}", "config": vars(args),
                       "rows": table}, f, indent=2)


if __name__ == "__main__":
    main()
