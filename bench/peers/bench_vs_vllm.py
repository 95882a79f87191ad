"""expertmesh against vLLM's CPU backend (and transformers) on the peers' checkpoints and
workloads, back to back in one sitting: output tokens/s and the ratio per round.

    .venv/bin/python bench/peers/bench_vs_vllm.py --model $PEER/models/tiny-mixtral-small \\
        --workloads 32x16x3000 8x3500x256 [--engines expertmesh vllm] [--rounds 3] \\
        [--out bench/results/long-context-vs-vllm-cpu.json]

Workload NxIxO: ../shared/peers/workload.py (N prompts of seeded random token ids, I in,
exactly O out, greedy, EOS ignored), bf16. Engines, each a fresh process per run:
- expertmesh: `LLM(model, dtype="bfloat16")`, defaults otherwise (both cores);
- vllm: the kit's vllm_cpu/offline_bench.py in $PEER/venv, vLLM's fastest configuration on this
  machine (--compile --omp-bind 0-1 --preload, ../shared/peers/README.md);
- transformers: the kit's hf_bench.py, all prompts in one batch.
Each engine's load and warm-up are outside its timed run. A round runs every engine once per
workload; ratios are taken within a round (the machine is noisy), then the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_KIT = HERE.parents[2] / "shared" / "peers"


def run_expertmesh(args: argparse.Namespace, n: int, input_len: int, output_len: int) -> dict:
    """One timed run in this process (the child side of --one)."""
    sys.path.insert(0, str(args.kit))
    from workload import make_prompts, vocab_size_of

    from expertmesh import LLM, SamplingParams

    prompts = make_prompts(vocab_size_of(args.model), n, input_len, seed=0)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with LLM(args.model, dtype="bfloat16", show_progress=False, max_model_len=input_len + output_len) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "expertmesh", "wall_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def command(args: argparse.Namespace, engine: str, n: int, input_len: int, output_len: int) -> list[str]:
    shape = ["--n", str(n), "--input-len", str(input_len), "--output-len", str(output_len)]
    if engine == "expertmesh":
        return [sys.executable, __file__, "--model", args.model, "--kit", str(args.kit), "--one", *shape]
    peer_python = str(Path(os.environ.get("PEER", "/tmp/peer")) / "venv" / "bin" / "python")
    if engine == "vllm":
        return [peer_python, str(args.kit / "vllm_cpu" / "offline_bench.py"), "--model", args.model, *shape,
                "--compile", "--omp-bind", "0-1", "--preload", "--max-model-len", str(input_len + output_len)]
    return [peer_python, str(args.kit / "hf_bench.py"), "--model", args.model, *shape, "--batch-size", "0"]


def parse_workload(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a workload is NxIxO with positive integers (e.g. 32x16x3000), got {text!r}")
    n, i, o = map(int, parts)
    return n, i, o


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="../shared/peers")
    parser.add_argument("--workloads", nargs="+", type=parse_workload, default=[(32, 16, 3000), (8, 3500, 256)])
    parser.add_argument("--engines", nargs="+", choices=("expertmesh", "vllm", "transformers"),
                        default=["expertmesh", "vllm"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one expertmesh run
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_expertmesh(args, args.n, args.input_len, args.output_len)))
        return
    runs: list[dict] = []
    with tqdm(total=args.rounds * len(args.workloads) * len(args.engines), desc="runs") as bar:
        for r in range(args.rounds):
            for n, i, o in args.workloads:
                for engine in args.engines:
                    proc = subprocess.run(command(args, engine, n, i, o), capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{engine} {n}x{i}x{o} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                    line = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.append({"round": r, "workload": f"{n}x{i}x{o}", "engine": engine,
                                 "wall_s": line["wall_s"], "output_tokens_per_s": line["output_tokens_per_s"]})
                    bar.set_postfix_str(f"{engine} {n}x{i}x{o}: {line['wall_s']:.1f} s")
                    bar.update()
    base = args.engines[-1] if "vllm" not in args.engines else "vllm"
    summary = {}
    print(f"| workload | engine | wall s per round | median out tok/s | ratio vs {base} per round | median ratio |")
    print("|---|---|---|---:|---|---:|")
    for n, i, o in args.workloads:
        wl = f"{n}x{i}x{o}"
        for engine in args.engines:
            mine = [x for x in runs if x["workload"] == wl and x["engine"] == engine]
            ref = {x["round"]: x for x in runs if x["workload"] == wl and x["engine"] == base}
            ratios = [x["output_tokens_per_s"] / ref[x["round"]]["output_tokens_per_s"] for x in mine]
            tps = statistics.median(x["output_tokens_per_s"] for x in mine)
            summary.setdefault(wl, {})[engine] = {"median_output_tokens_per_s": tps, f"ratios_vs_{base}": ratios,
                                                   f"median_ratio_vs_{base}": statistics.median(ratios)}
            walls = ", ".join(f"{x['wall_s']:.1f}" for x in mine)
            print(f"| {wl} | {engine} | {walls} | {tps:.0f} | "
                  f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |")
    if args.out:
        doc = {"command": " ".join(["bench/peers/bench_vs_vllm.py"] + sys.argv[1:]), "model": args.model,
               "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
