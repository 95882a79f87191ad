"""Context parallelism: one attention layer's ring time vs its attention time, pass-KV vs pass-Q,
on CPU rank processes, and a FLOPs / bytes model of CP prefill checked against them.

    .venv/bin/python bench/cp/bench_ring_attention.py [--lengths 8192 16384 32768 65536 131072]
        [--out bench/results/cp-ring-cpu.json]

Two CP ranks (the VM's 2 cores, one thread each) run `ring_attention` -- the engine's code, on a
batch the Rust scheduler plans with the CP block placement -- for one request:

  prefill   S new tokens, nothing cached, each variant forced, S in --lengths;
  append    n new tokens after C = --cached cached ones (a prefix hit), n swept so that
            new / (new + cached) crosses the rule's 2 NKV / NH: where pass-KV starts to win.

Per case, on the slowest rank: `ring` (the real call), `attention` (the same call on a ring that
moves nothing: compute only) and `messages` (the same ring with every partial attention taken
out: communication only). hidden = (attention + messages - ring) / messages is the share of
the communication the overlap hid. Median of --iters calls (1 call from 65,536 tokens on).

The model: compute = causal FLOPs (4 NH D per visible query-key pair) / a peak measured in the
same run (one rank's causal attention of --calibrate tokens); communication = bytes each rank
sends / a bandwidth measured in the same run (one --probe-mb message each way over the ring).
On CPUs the ranks copy the bytes themselves, so the model adds the two (no overlap); with DMA
(GPUs, RDMA) it takes the larger. Then the same model, with H100 constants, for the published
case: Llama 3 405B, 128K and 1M-token prefill on 16 nodes of 8 H100 (TP 8 x CP 16).

Legend: S tokens, NH / NKV query / KV heads, D head dim, N CP ranks, B block size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import platform
import statistics
import time

import numpy as np
import torch
import torch.multiprocessing as mp

NH, NKV, D, B = 4, 1, 16, 16  # rule threshold 2 NKV / NH = 0.5
WORLD = 2


class _NullRing:
    """A ring that moves nothing (receive buffers zeroed, so the compute reads no stale floats)."""

    name = "none"

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def post(self, sends, recvs):
        for t in recvs.values():
            t.zero_()
        return []

    def wait(self, works) -> None:
        pass


def _batch(cached: int, new: int):
    """The scheduler's batch for one request of `new` tokens after `cached` cached ones."""
    from expertmesh._core import Scheduler, kv_blocks_per_rank

    total = cached + new
    per_rank = kv_blocks_per_rank(-(-(total + 1) // B), context_parallel_size=WORLD, cp_first_blocks=0) + 1
    sched = Scheduler(num_blocks=WORLD * per_rank, block_size=B, max_num_seqs=2, max_num_batched_tokens=total + 1,
                      max_model_len=total + 2, enable_prefix_caching=True, context_parallel_size=WORLD,
                      cp_first_blocks=0)
    tokens = np.arange(total, dtype=np.int64) % 50_000
    if cached:
        sched.add_request(0, tokens[:cached + 1], max_tokens=1)  # its full blocks stay cached
        sched.schedule()
        sched.update([0])
    sched.add_request(1, tokens, max_tokens=1)
    batch = sched.schedule()
    assert int(batch.seq_lens[0]) - int(batch.query_start_loc[1]) == cached, "the prefix was not a hit"
    return batch, per_rank


def _time(fn, iters: int, barrier) -> float:
    times = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank, port, cases, args, queue):
    torch.set_num_threads(1)
    import torch.distributed as dist

    from expertmesh.parallel.context_parallel import plan_step
    from expertmesh.parallel.groups import RankInfo, destroy_groups, init_groups
    from expertmesh.parallel.ring_attention import TorchRing, partial_attention, ring_attention
    from expertmesh.parallel.shm_ring import ShmRing

    groups = init_groups(RankInfo(rank, WORLD, "127.0.0.1", port), torch.device("cpu"), 3600)
    barrier = lambda: dist.barrier(group=groups.control)  # noqa: E731
    rings = {"shm": ShmRing(groups.data, [0, 1], rank, 3600), "torch": TorchRing(groups.data, [0, 1], rank, 3600)}
    scale = D ** -0.5
    out = {"rows": []}

    # Peak: one rank's causal attention, the kernel ring_attention runs.
    s = args.calibrate
    q, k, v = torch.randn(s, NH, D), torch.randn(s, NKV, D), torch.randn(s, NKV, D)
    pos = np.arange(s)
    t = _time(lambda: partial_attention(q, pos, k, v, pos, [(0, s, 0, s)], scale, None), 3, barrier)
    out["causal_flops_per_s"] = 4 * NH * D * s * (s + 1) / 2 / t
    # Bandwidth: one big message each way over the shared-memory ring.
    msg, inbox = torch.randn(args.probe_mb << 18), torch.empty(args.probe_mb << 18)
    ring = rings["shm"]
    t = _time(lambda: ring.wait(ring.post({1 - rank: msg}, {1 - rank: inbox})), 5, barrier)
    out["ring_bytes_per_s"] = msg.numel() * 4 / t

    for case in cases:
        batch, per_rank = _batch(case["cached"], case["new"])
        step = plan_step(batch, rank, WORLD, 0, B, per_rank, case["variant"], NH, NKV)
        kc, vc = torch.randn(per_rank, B, NKV, D), torch.randn(per_rank, B, NKV, D)
        q = torch.randn(step.local.shape[0], NH, D)
        quiet = dataclasses.replace(step, kv_pairs={x: [] for x in step.kv_pairs},
                                    q_pairs={x: [] for x in step.q_pairs}, returns_from=[])
        iters = args.iters if case["cached"] + case["new"] < 65536 else 1
        ring = rings[case["transport"]]
        sent = ring_attention(ring, step, q, kc, vc, scale, None)[1]
        row = dict(case, sent_bytes=sent,
                   ring=_time(lambda: ring_attention(ring, step, q, kc, vc, scale, None), iters, barrier),
                   attention=_time(lambda: ring_attention(_NullRing(rank, WORLD), step, q, kc, vc, scale, None),
                                   iters, barrier),
                   messages=_time(lambda: ring_attention(ring, quiet, q, kc, vc, scale, None), iters, barrier))
        out["rows"].append(row)
        queue.put(("progress", rank, None))
    for r in rings.values():
        r.close()
    destroy_groups()
    queue.put(("done", rank, pickle.dumps(out)))


def _model(row, flops_per_s, bytes_per_s):
    """Seconds the model gives a case on one rank: (compute, communication)."""
    cached, new = row["cached"], row["new"]
    pairs = new * cached + new * (new + 1) / 2  # visible query-key pairs, causal
    return 4 * NH * D * pairs / WORLD / flops_per_s, row["sent_bytes"] / bytes_per_s


def published_case() -> dict:
    """The model with H100 constants for Llama 3 405B prefill on 16 nodes x 8 H100 (TP 8 in a
    node, CP 16 across nodes), against the published 3.8 s (128K) and 77 s (1M). Datasheet
    constants, not measured here (no GPU): 989 TFLOP/s bf16 dense per H100 at an assumed 70%
    (long-sequence attention and GEMMs reach 70-75% on H100), 50 GB/s RDMA per GPU (400 Gb/s),
    NVLink allreduce at 360 GB/s bus bandwidth."""
    layers, d_model, nh, nkv, hd, params = 126, 16384, 128, 8, 128, 405e9
    gpus, tp, cp = 128, 8, 16
    flops_per_s, rdma, nvlink = 0.7 * 989e12, 50e9, 360e9
    out = {}
    for label, s, published in (("128K", 131072, 3.8), ("1M", 1048576, 77.0)):
        linear = 2 * params * s
        attention = layers * 4 * nh * hd * s * s / 2
        compute = (linear + attention) / gpus / flops_per_s
        # Ring: per layer, per step, the KV of S/CP tokens of this GPU's NKV/TP heads, bf16.
        step_bytes = s / cp * (nkv / tp) * hd * 2 * 2
        step_attention = 4 * (nh / tp) * hd * (s / cp) ** 2 / 2 / flops_per_s  # a causal block pair, one GPU
        ring_exposed = layers * max(0.0, step_bytes / rdma - step_attention) * (cp - 1)
        # TP: two allreduces per layer of the rank's S/CP hidden states, bf16 (ring allreduce moves 2 (TP-1)/TP).
        allreduce = layers * 2 * (s / cp * d_model * 2) * 2 * (tp - 1) / tp / nvlink
        total = compute + ring_exposed + allreduce
        out[label] = {"tokens": s, "predicted_s": total, "published_s": published, "ratio": total / published,
                      "compute_s": compute, "ring_exposed_s": ring_exposed, "allreduce_s": allreduce,
                      "ring_step_comm_over_attention": step_bytes / rdma / step_attention}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--torch-up-to", type=int, default=32768, help="also time the gloo ring up to this length")
    parser.add_argument("--cached", type=int, default=8192)
    parser.add_argument("--appends", type=int, nargs="+",
                        default=[1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--calibrate", type=int, default=8192)
    parser.add_argument("--probe-mb", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    from tqdm import tqdm

    from expertmesh.parallel.groups import free_port

    cases = []
    for s in args.lengths:
        for transport in ("shm", "torch") if s <= args.torch_up_to else ("shm",):
            for variant in ("pass-kv", "pass-q"):
                cases.append({"kind": "prefill", "cached": 0, "new": s, "variant": variant, "transport": transport})
    for n in args.appends:
        for transport in ("shm", "torch"):
            for variant in ("pass-kv", "pass-q"):
                cases.append({"kind": "append", "cached": args.cached, "new": n, "variant": variant,
                              "transport": transport})

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, cases, args, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results, bar = {}, tqdm(total=len(cases) * WORLD, desc="cases x ranks")
    while len(results) < WORLD:
        kind, rank, value = queue.get(timeout=7200)
        if kind == "progress":
            bar.update()
        else:
            results[rank] = pickle.loads(value)
    bar.close()
    for p in procs:
        p.join()

    flops = min(r["causal_flops_per_s"] for r in results.values())
    bw = min(r["ring_bytes_per_s"] for r in results.values())
    rows = []
    for i, case in enumerate(cases):
        per_rank = [results[r]["rows"][i] for r in range(WORLD)]
        row = dict(case, **{k: max(p[k] for p in per_rank) for k in ("ring", "attention", "messages", "sent_bytes")})
        # Below 2% of the attention time the difference is within the timing noise: nothing to tell.
        visible = row["messages"] >= 0.02 * row["attention"]
        row["hidden"] = (row["attention"] + row["messages"] - row["ring"]) / row["messages"] if visible else None
        compute, comm = _model(row, flops, bw)
        row.update(model_compute=compute, model_comm=comm, model_sum=compute + comm, model_max=max(compute, comm))
        rows.append(row)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "ranks": WORLD, "threads_per_rank": 1,
                          "torch": torch.__version__},
              "config": {"num_heads": NH, "num_kv_heads": NKV, "head_dim": D, "block_size": B, "dtype": "float32",
                         **vars(args)},
              "causal_flops_per_s": flops, "ring_bytes_per_s": bw, "rows": rows, "published": published_case()}
    _print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        _plot(report, args.out.rsplit(".", 1)[0] + ".png")


def _print(report) -> None:
    print(f"\nmeasured: causal attention {report['causal_flops_per_s'] / 1e9:.2f} GFLOP/s per rank, "
          f"shared-memory ring {report['ring_bytes_per_s'] / 1e9:.2f} GB/s")
    print("| case | cached | new | variant | transport | ring ms | attention ms | messages ms | hidden | "
          "sent MB | model (sum) ms | ring / model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        print(f"| {r['kind']} | {r['cached']} | {r['new']} | {r['variant']} | {r['transport']} | {r['ring'] * 1e3:.1f} "
              f"| {r['attention'] * 1e3:.1f} | {r['messages'] * 1e3:.1f} | "
              f"{'-' if r['hidden'] is None else format(r['hidden'], '.0%')} | "
              f"{r['sent_bytes'] / 1e6:.2f} | {r['model_sum'] * 1e3:.1f} | {r['ring'] / r['model_sum']:.2f} |")
    appends = [r for r in report["rows"] if r["kind"] == "append"]
    for transport in ("shm", "torch"):
        for n in sorted({r["new"] for r in appends}):
            kv, q = (next(r for r in appends if r["new"] == n and r["variant"] == v and r["transport"] == transport)
                     for v in ("pass-kv", "pass-q"))
            frac = n / (n + kv["cached"])
            print(f"append {n} ({transport}): new/(new+cached) {frac:.2f}, pass-KV / pass-Q ring time "
                  f"{kv['ring'] / q['ring']:.2f} (rule picks {'pass-kv' if frac >= 2 * NKV / NH else 'pass-q'})")
    for label, p in report["published"].items():
        print(f"published {label}: model {p['predicted_s']:.2f} s vs {p['published_s']} s ({p['ratio']:.2f}x); "
              f"ring step comm / attention {p['ring_step_comm_over_attention']:.2f}")


def _plot(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, color in (("pass-kv", "tab:blue"), ("pass-q", "tab:orange")):
        rows = [r for r in report["rows"] if r["kind"] == "prefill" and r["variant"] == variant
                and r["transport"] == "shm"]
        xs = [r["new"] for r in rows]
        left.plot(xs, [r["ring"] for r in rows], "o-", color=color, label=f"{variant} ring")
        left.plot(xs, [r["attention"] for r in rows], "--", color=color, label=f"{variant} attention only")
        left.plot(xs, [r["model_sum"] for r in rows], ":", color=color, label=f"{variant} model")
        for transport, style in (("shm", "o-"), ("torch", "s--")):
            rows = [r for r in report["rows"] if r["kind"] == "append" and r["variant"] == variant
                    and r["transport"] == transport]
            right.plot([r["new"] / (r["new"] + r["cached"]) for r in rows], [r["ring"] * 1e3 for r in rows], style,
                       color=color, label=f"{variant} ({transport})")
    left.set(xscale="log", yscale="log", xlabel="prefill tokens", ylabel="s per layer", title="prefill, CP=2 (CPU)")
    right.axvline(2 * NKV / NH, color="grey", linestyle=":", label="rule 2 NKV / NH")
    right.set(xscale="log", yscale="log", xlabel="new / (new + cached)", ylabel="ms per layer",
              title=f"append to {report['config']['cached']} cached tokens")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
