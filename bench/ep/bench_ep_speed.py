"""Expert parallelism on one host against one rank on the same cores: output tokens/s and
where each rank's step time goes, every variant measured in the same sitting.

    .venv/bin/python bench/ep/bench_ep_speed.py --model $PEER/models/tiny-mixtral-large \\
        [--variants ep1 ep2 ep4 ep2-nobind] [--rounds 3] [--out bench/results/ep-speed-cpu.json]

Workload: ../shared/peers/workload.py (N prompts of seeded random ids, I in, exactly O out,
greedy, EOS ignored; default 64 x 128 x 128), bf16. A variant is `ep<R>` (LLM(model,
expert_parallel_size=R), ranks bound to the cores: the default) or `ep<R>-nobind` (torch's
default threads in every rank: what expertmesh did before cpu_binding.py). Each run is a fresh
process; a round runs every variant once, rounds repeat back to back and ratios are taken
within a round (the machine is noisy). The last round's runs record the step breakdown
(EngineConfig(step_breakdown=True), one dict per rank), which also writes a stacked-bar plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_KIT = HERE.parents[2] / "shared" / "peers"


def run_one(args: argparse.Namespace, variant: str, breakdown: bool) -> dict:
    """One variant in this process: load, warm up, time the workload."""
    sys.path.insert(0, str(args.kit))
    from workload import make_prompts, vocab_size_of

    from expertmesh import LLM, SamplingParams

    ranks = int(variant.split("-")[0][2:])
    kw = {"expert_parallel_size": ranks} if ranks > 1 else {}
    prompts = make_prompts(vocab_size_of(args.model), args.n, args.input_len, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with LLM(args.model, dtype="bfloat16", show_progress=False, step_breakdown=breakdown,
             cpu_bind="nobind" if variant.endswith("-nobind") else "auto", **kw) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.engine.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"variant": variant, "output_tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
    if breakdown:
        result["breakdown"] = [r["step_breakdown"] for r in stats.get("ranks", [stats])]
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expertmesh.step_profile import SECTIONS

    bars = [(f"{v}\nrank {r}", b["ms_per_step"]) for v, per in results["breakdown"].items() for r, b in enumerate(per)]
    fig, ax = plt.subplots(figsize=(1.1 * len(bars) + 2, 4.5))
    bottom = [0.0] * len(bars)
    for section in SECTIONS:
        values = [ms[section] for _, ms in bars]
        ax.bar([name for name, _ in bars], values, bottom=bottom, label=section)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per engine step (wall time of the rank)")
    ax.set_title(f"EP step breakdown, {results['workload']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="../shared/peers (workload.py)")
    parser.add_argument("--variants", nargs="+", default=["ep1", "ep2", "ep4", "ep2-nobind"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON (and a .png beside it)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args, args.one, args.breakdown)))
        return
    base = [sys.executable, __file__, "--model", args.model, "--kit", str(args.kit), "--n", str(args.n),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    rounds: list[dict[str, dict]] = []
    with tqdm(total=args.rounds * len(args.variants), desc="runs") as bar:
        for r in range(args.rounds):
            row = {}
            for variant in args.variants:
                cmd = base + ["--one", variant] + (["--breakdown"] if r == args.rounds - 1 else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row[variant] = json.loads(out.strip().splitlines()[-1])
                bar.set_postfix_str(f"{variant}: {row[variant]['tokens_per_s']:.1f} tok/s")
                bar.update()
            rounds.append(row)
    ref = args.variants[0]
    summary = {}
    for variant in args.variants:
        tps = [row[variant]["tokens_per_s"] for row in rounds]
        ratios = [row[variant]["tokens_per_s"] / row[ref]["tokens_per_s"] for row in rounds]
        summary[variant] = {"tokens_per_s": tps, "median_tokens_per_s": statistics.median(tps),
                            f"ratio_vs_{ref}": ratios, f"median_ratio_vs_{ref}": statistics.median(ratios)}
    results = {
        "command": " ".join(["bench/ep/bench_ep_speed.py"] + sys.argv[1:]),
        "workload": f"{args.n} prompts x {args.input_len} in x {args.output_len} out, greedy, bf16",
        "model": args.model,
        "summary": summary,
        "breakdown": {v: rounds[-1][v]["breakdown"] for v in args.variants},
        "rounds": rounds,
    }
    print(f"| variant | tok/s per round | median | ratio vs {ref} per round | median ratio |")
    print("| --- | --- | ---: | --- | ---: |")
    for v, s in summary.items():
        print(f"| {v} | {', '.join(f'{t:.1f}' for t in s['tokens_per_s'])} | {s['median_tokens_per_s']:.1f} | "
              f"{', '.join(f'{x:.2f}' for x in s[f'ratio_vs_{ref}'])} | {s[f'median_ratio_vs_{ref}']:.2f} |")
    print("\nstep breakdown, ms per step (last round):")
    for v, per in results["breakdown"].items():
        for rank, b in enumerate(per):
            print(f"  {v} rank {rank}: " + ", ".join(f"{k} {ms:.1f}" for k, ms in b["ms_per_step"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
