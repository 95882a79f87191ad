"""Run a function on R CPU rank processes (gloo) for the expert-parallel tests.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) in each process

Each rank joins a fresh gloo group on a free port; results come back in rank order, and an
exception in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import pickle
import traceback

import torch.multiprocessing as mp

from expertmesh.parallel.groups import RankInfo, destroy_groups, free_port, init_groups


def _entry(rank, world_size, port, fn, args, queue):
    import torch

    torch.set_num_threads(1)
    try:
        groups = init_groups(RankInfo(rank, world_size, "127.0.0.1", port), torch.device("cpu"), timeout_s=60)
        result = fn(rank, world_size, groups, *args)
        queue.put((rank, "ok", pickle.dumps(result)))  # bytes: tensors must not share memory
    except BaseException:  # report, then let the parent fail the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_groups()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
