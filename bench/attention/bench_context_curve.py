"""Decode time per token against context length (256 to 32K tokens), one sequence, beside the
floor of reading that much KV at this machine's measured memory bandwidth.

    .venv/bin/python bench/attention/bench_context_curve.py [--out bench/results/context-curve-cpu.json]

Model: the "small-long" preset of expertmesh.bench.offline (the peers' small Mixtral shape:
hidden 256, 4 layers, 8 heads / 2 KV heads, head dim 32, 8 experts top-2; 32K+ positions;
random weights, bf16), made once into the cache directory. The longest prompt is prefilled
first; every shorter prompt is a prefix of it, so it comes from the prefix cache and only its
decode steps are timed: 32 steps per length, median step time.
Floor per step: every layer reads K and V of the whole context once (layers x L x NKV x D x 2
x 2 bytes) at the read bandwidth of a 1 GiB tensor sum. The fitted slope (ms per 1K tokens of
context) is compared with the floor's: the issue's target is within 2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
STEPS = 32


def read_bandwidth() -> float:
    x = torch.ones(1 << 28, dtype=torch.float32)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times[1:])


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    xs = [r["context"] for r in rows]
    base = rows[0]["ms_per_token"] - rows[0]["kv_floor_ms"]  # what does not depend on the context
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["ms_per_token"] for r in rows], "o-", label="expertmesh decode, ms per token")
    ax.plot(xs, [base + r["kv_floor_ms"] for r in rows], "s--",
            label="shortest context's time + KV bytes / read bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per output token (batch 1)")
    ax.set_title(f"decode vs context, {doc['model_shape']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    args = parser.parse_args()

    from expertmesh import SamplingParams
    from expertmesh.bench.offline import MODEL_PRESETS, make_random_mixtral
    from expertmesh.config import EngineConfig
    from expertmesh.default_model import cache_root
    from expertmesh.engine.llm_engine import LLMEngine

    preset = MODEL_PRESETS["small-long"]
    model = make_random_mixtral(cache_root() / "bench-mixtral-small-long", "small-long")
    longest = max(args.lengths)
    engine = LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", max_model_len=longest + STEPS + 8,
                                    show_progress=False))
    prompt = torch.randint(4, preset["vocab_size"], (longest,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=STEPS + 1, ignore_eos=True)

    def decode_steps(length: int) -> list[float]:
        rid = engine.add_request(prompt[:length], params)
        times = []
        while True:
            start = time.perf_counter()
            outs = engine.step()
            times.append(time.perf_counter() - start)
            if any(o.request_id == rid and o.finished for o in outs):
                return times[1:]  # the first step is the prefill (or the prefix-cache hit's tail)

    start = time.perf_counter()
    decode_steps(longest)  # fills the prefix cache with the longest prompt's blocks
    prefill_s = time.perf_counter() - start
    bandwidth = read_bandwidth()
    layers, nkv, d = preset["num_hidden_layers"], preset["num_key_value_heads"], preset["head_dim"]
    rows = []
    for length in tqdm(sorted(args.lengths), desc="context lengths"):
        times = decode_steps(length)
        ctx = length + STEPS // 2
        rows.append({"context": length, "ms_per_token": 1e3 * statistics.median(times),
                     "kv_floor_ms": 1e3 * layers * ctx * nkv * d * 2 * 2 / bandwidth})
    xs = [r["context"] / 1024 for r in rows]
    fit = slope(xs, [r["ms_per_token"] for r in rows])
    floor_fit = slope(xs, [r["kv_floor_ms"] for r in rows])
    shape = f"hidden {preset['hidden_size']}, {layers} layers, {preset['num_attention_heads']}/{nkv} heads, D {d}, bf16"
    doc = {"command": " ".join(["bench/attention/bench_context_curve.py"] + sys.argv[1:]), "model_shape": shape,
           "read_bandwidth_gb_s": bandwidth / 1e9, "threads": torch.get_num_threads(),
           "prefill_longest_s": prefill_s, "rows": rows, "slope_ms_per_1k_tokens": fit,
           "floor_slope_ms_per_1k_tokens": floor_fit, "slope_over_floor": fit / floor_fit}
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; prefill of {longest} tokens {prefill_s:.1f} s\n")
    print("| context | ms per token | KV floor ms |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['ms_per_token']:.2f} | {r['kv_floor_ms']:.2f} |")
    print(f"\nslope {fit:.3f} ms per 1K tokens, floor {floor_fit:.3f}: {fit / floor_fit:.2f}x the floor's")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
