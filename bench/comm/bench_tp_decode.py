"""End to end: decode time per output token with TP=2 on the DDA (shared-memory) allreduce vs
TP=2 on gloo all_reduce, same model and workload, in one run (TP=1 alongside for reference).

    .venv/bin/python bench/comm/bench_tp_decode.py [--model built-in|medium|DIR] [--prompts 8]
        [--input-len 16] [--output-len 64] [--threads-per-rank 1] [--repeats 3] [--out FILE.json]

Each variant builds its engine, runs one warm-up request, then times every engine step of the
workload (greedy, EOS ignored); a decode step is one that computes no prompt tokens. Reported:
the median decode step, its time per output token (step / batch), and allreduce calls per step.
Every rank gets --threads-per-rank torch threads (OMP_NUM_THREADS for the spawned ranks), so
two ranks do not oversubscribe the cores. The fastest of --repeats runs counts per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

VARIANTS = [("tp1", dict(tensor_parallel_size=1)), ("tp2-dda", dict(tensor_parallel_size=2, allreduce="shm")),
            ("tp2-gloo", dict(tensor_parallel_size=2, allreduce="torch"))]


def _model_path(name: str) -> str | None:
    if name == "built-in":
        return None
    if name == "medium":
        from expertmesh.bench.offline import make_random_mixtral
        from expertmesh.default_model import cache_root

        return str(make_random_mixtral(cache_root() / "bench-medium-bf16", "medium", "bfloat16"))
    return name


def _one(model: str | None, kwargs: dict, args) -> dict:
    from expertmesh import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 600, (args.input_len,), generator=gen).tolist() for _ in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with LLM(model, show_progress=False, dtype=args.dtype, **kwargs) as llm:
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        engine = llm.engine
        before = dict(llm.stats().get("allreduce", {}).get("calls", {}))
        ids = [engine.add_request(p, params) for p in prompts]
        steps, live = [], set(ids)
        while live:
            start = time.perf_counter()
            outs = engine.step()
            took = time.perf_counter() - start
            steps.append(took)
            live -= {o.request_id for o in outs if o.finished}
        after = dict(llm.stats().get("allreduce", {}).get("calls", {}))
    decode = steps[1:-1]  # the first step prefills every prompt; the last one only ends them
    calls = sum(after.values()) - sum(before.values())
    return {"decode_step_ms": statistics.median(decode) * 1e3,
            "per_token_ms": statistics.median(decode) * 1e3 / args.prompts, "steps": len(steps),
            "allreduce_calls_per_step": calls / len(steps), "total_s": sum(steps)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="built-in", help="built-in, medium (490M Mixtral-shaped, made once) or a dir")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads_per_rank)  # the spawned ranks read it
    torch.set_num_threads(args.threads_per_rank)
    model = _model_path(args.model)
    from tqdm import tqdm

    results: dict[str, dict] = {}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, kwargs in VARIANTS:  # back to back, interleaved: the machine drifts
            run = _one(model, kwargs, args)
            if name not in results or run["decode_step_ms"] < results[name]["decode_step_ms"]:
                results[name] = run
    base = results["tp2-gloo"]["decode_step_ms"]
    print(f"model {args.model} ({args.dtype}), {args.prompts} x {args.input_len} in / {args.output_len} out, "
          f"{args.threads_per_rank} thread(s) per rank; fastest of {args.repeats}")
    print("| variant | decode step ms (TPOT) | per output token ms | allreduce calls / step | vs tp2-gloo |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['decode_step_ms']:.2f} | {r['per_token_ms']:.3f} | {r['allreduce_calls_per_step']:.0f} | "
              f"{r['decode_step_ms'] / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.machine()} {os.cpu_count()} cores", "config": vars(args),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
