"""CPU paged attention: the Rust kernel reading the cache in place against the torch reference
(gather the blocks, then torch's attention), on the peers' model shapes, with the floor of
reading the KV once at this machine's measured memory bandwidth.

    .venv/bin/python bench/attention/bench_paged_attention.py [--out bench/results/attention-cpu.json]

Variants, all measured in this run on the same inputs:
- rust-bf16: expertmesh_kernels.cpu_attention on a bf16 cache (what the engine runs now);
- ref-fp32cache: paged_attention_ref with bf16 queries over an fp32 cache of the same values
  (what the engine ran before: the fp32 copy let torch's fused attention skip conversions);
- ref-bf16: paged_attention_ref on the bf16 cache.
Floors: decode reads K and V once (bytes / the read bandwidth of a 1 GiB tensor sum, torch, all
threads); prefill is compute-bound (4 x NH x D FLOPs per visible (query, key) pair / the fp32
GFLOP/s of a 2048^3 torch matmul on the same threads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comm"))
from timing import median_time  # noqa: E402

from expertmesh_kernels.attention import paged_attention_ref  # noqa: E402
from expertmesh_kernels.cpu_attention import paged_attention_cpu  # noqa: E402

SHAPES = {"small": (8, 2, 32), "large": (16, 4, 64)}  # NH, NKV, D of tiny-mixtral-small / -large
# (name, requests, context before this step, new tokens per request)
CASES = [
    ("decode 64 x ctx 128", 64, 127, 1),
    ("decode 64 x ctx 3000", 64, 2999, 1),
    ("decode 1 x ctx 32768", 1, 32767, 1),
    ("prefill 1 x 3500", 1, 0, 3500),
    ("chunk 512 after 3000", 1, 3000, 512),
]
BLOCK = 16


def read_bandwidth() -> float:
    """Bytes/s of reading a 1 GiB tensor (median of 5)."""
    x = torch.ones(1 << 28, dtype=torch.float32)
    return x.numel() * 4 / median_time(lambda: x.sum(), 5)


def matmul_flops() -> float:
    """FLOP/s of an fp32 2048^3 matmul (median of 5): the compute floor's peak."""
    a = torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: a @ a, 5)


def make_case(heads: tuple[int, int, int], reqs: int, ctx: int, new: int, seed: int = 0) -> dict:
    nh, nkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    total = ctx + new
    per_req = -(-total // BLOCK)
    num_blocks = reqs * per_req + 1
    k = torch.randn(num_blocks, BLOCK, nkv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(num_blocks, BLOCK, nkv, d, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks - 1, generator=gen)[: reqs * per_req].view(reqs, per_req).int()
    q = torch.randn(reqs * new, nh, d, generator=gen).to(torch.bfloat16)
    pairs = reqs * sum(ctx + i + 1 for i in range(new))  # visible (query, key) pairs
    return dict(q=q, k=k, v=v, tables=tables, qsl=(torch.arange(reqs + 1) * new).int(),
                lens=torch.full((reqs,), total, dtype=torch.int32), scale=d**-0.5,
                kv_bytes=reqs * total * nkv * d * 2 * 2, flops=4 * nh * d * pairs)


def variants(c: dict) -> dict:
    k32, v32 = c["k"].float(), c["v"].float()
    args = (c["tables"], c["qsl"], c["lens"], c["scale"])
    return {
        "rust-bf16": lambda: paged_attention_cpu(c["q"], c["k"], c["v"], *args),
        "ref-fp32cache": lambda: paged_attention_ref(c["q"], k32, v32, *args),
        "ref-bf16": lambda: paged_attention_ref(c["q"], c["k"], c["v"], *args),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    bandwidth, peak = read_bandwidth(), matmul_flops()
    rows = []
    todo = [(m, case) for m in SHAPES for case in CASES]
    for model, (name, reqs, ctx, new) in tqdm(todo, desc="cases"):
        c = make_case(SHAPES[model], reqs, ctx, new)
        ms = {v: 1e3 * median_time(fn, args.iters if new == 1 else 3) for v, fn in variants(c).items()}
        floor = c["kv_bytes"] / bandwidth if new == 1 else c["flops"] / peak
        rows.append({"model": model, "case": name, "ms": ms, "floor_ms": 1e3 * floor,
                     "floor": "KV read" if new == 1 else "fp32 FLOPs",
                     "rust_gflop_s": c["flops"] / ms["rust-bf16"] / 1e6,
                     "speedup_vs_ref_fp32cache": ms["ref-fp32cache"] / ms["rust-bf16"]})
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, fp32 matmul {peak / 1e9:.0f} GFLOP/s, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| model | case | rust-bf16 ms | ref-fp32cache ms | ref-bf16 ms | speedup | rust GFLOP/s | floor ms "
          "| rust / floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ms = r["ms"]
        print(f"| {r['model']} | {r['case']} | {ms['rust-bf16']:.2f} | {ms['ref-fp32cache']:.2f} "
              f"| {ms['ref-bf16']:.2f} | {r['speedup_vs_ref_fp32cache']:.1f}x | {r['rust_gflop_s']:.0f} "
              f"| {r['floor_ms']:.2f} ({r['floor']}) | {ms['rust-bf16'] / r['floor_ms']:.1f} |")
    if args.out:
        doc = {"command": " ".join(["bench/attention/bench_paged_attention.py"] + sys.argv[1:]),
               "read_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": peak / 1e9,
               "threads": torch.get_num_threads(), "rows": rows}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
