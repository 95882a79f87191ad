"""How long the offline workload's matrix products alone take with torch's CPU GEMMs.

Any engine built on torch's CPU kernels (expertmesh's reference path and transformers alike)
runs at least these GEMMs: for a Mixtral-shaped model, every token's q/k/v/o projections,
router and its top-k experts' gate/up/down projections in every layer, plus the lm_head for
each sampled token. This script times exactly those products at the workload's shapes, with
a separate weight tensor per layer and expert (so weights stream from memory as they do in a
real step), and prints the total next to the time a 3x target allows.

    .venv/bin/python bench/offline/gemm_floor.py --baseline-s 24.8      # transformers' time, same run config

Model: the bench's "medium" Mixtral shape (bench/offline/make_model.py). Workload: N prompts
of L_in tokens prefilled in chunks of --chunk tokens, then L_out - 1 decode steps of N tokens
(the first output token comes from the prefill). Experts see T*k/E rows each (even routing;
uneven routing only makes small-M GEMMs slower).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

MEDIUM = {"hidden": 1024, "inter": 2048, "layers": 8, "experts": 8, "top_k": 2, "heads": 8, "kv_heads": 2,
          "head_dim": 128, "vocab": 32000}


def _weights(cfg: dict, dtype: torch.dtype) -> list[dict]:
    h, d = cfg["hidden"], cfg["head_dim"]
    qkv = (cfg["heads"] + 2 * cfg["kv_heads"]) * d
    return [{
        "qkv": torch.randn(qkv, h, dtype=dtype), "o": torch.randn(h, cfg["heads"] * d, dtype=dtype),
        "router": torch.randn(cfg["experts"], h, dtype=dtype),
        "gate_up": [torch.randn(2 * cfg["inter"], h, dtype=dtype) for _ in range(cfg["experts"])],
        "down": [torch.randn(h, cfg["inter"], dtype=dtype) for _ in range(cfg["experts"])],
    } for _ in range(cfg["layers"])]


def _step_gemms(cfg: dict, layers: list[dict], lm_head: torch.Tensor, tokens: int, sampled: int,
                dtype: torch.dtype) -> None:
    """Every GEMM of one engine step over `tokens` tokens, `sampled` of which get logits."""
    x = torch.randn(tokens, cfg["hidden"], dtype=dtype)
    rows = max(1, tokens * cfg["top_k"] // cfg["experts"])
    xe = torch.randn(rows, cfg["hidden"], dtype=dtype)
    act = torch.randn(rows, cfg["inter"], dtype=dtype)
    attn = torch.randn(tokens, cfg["heads"] * cfg["head_dim"], dtype=dtype)
    for w in layers:
        F.linear(x, w["qkv"])
        F.linear(attn, w["o"])
        F.linear(x, w["router"])
        for gu, dn in zip(w["gate_up"], w["down"]):
            F.linear(xe, gu)
            F.linear(act, dn)
    F.linear(x[:sampled], lm_head)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (max_num_batched_tokens)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-s", type=float, default=None, help="the baseline's measured seconds")
    parser.add_argument("--save-result", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = MEDIUM
    torch.manual_seed(0)
    layers = _weights(cfg, dtype)
    lm_head = torch.randn(cfg["vocab"], cfg["hidden"], dtype=dtype)
    n = args.num_prompts
    prefill_tokens = n * args.input_len
    chunks = [min(args.chunk, prefill_tokens - lo) for lo in range(0, prefill_tokens, args.chunk)]
    prefill_s = sum(_time(lambda c=c: _step_gemms(cfg, layers, lm_head, c, 1, dtype), args.repeats) for c in chunks)
    prefill_s += _time(lambda: F.linear(torch.randn(n, cfg["hidden"], dtype=dtype), lm_head), args.repeats)
    decode_step_s = _time(lambda: _step_gemms(cfg, layers, lm_head, n, n, dtype), args.repeats)
    decode_s = decode_step_s * (args.output_len - 1)
    total = prefill_s + decode_s
    result = {
        "config": vars(args) | {"model": cfg, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "prefill_gemm_s": prefill_s, "decode_step_gemm_s": decode_step_s, "decode_gemm_s": decode_s,
        "total_gemm_s": total,
    }
    print(f"GEMMs only, torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} threads: "
          f"prefill {prefill_s:.2f} s + decode {decode_step_s * 1e3:.1f} ms x {args.output_len - 1} steps "
          f"= {decode_s:.2f} s; total {total:.2f} s")
    if args.baseline_s:
        result["baseline_s"] = args.baseline_s
        result["max_ratio"] = args.baseline_s / total
        print(f"baseline {args.baseline_s:.2f} s: a 3x engine must finish in {args.baseline_s / 3:.2f} s; "
              f"its GEMMs alone take {total:.2f} s, so the ratio cannot exceed {args.baseline_s / total:.2f}x "
              "on these kernels")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
