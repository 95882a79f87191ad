"""What two-batch overlap would cost on this CPU: the expert GEMMs of one step run once over
all of a rank's pairs vs. twice over two halves (what splitting a step into two micro-batches
does), on one bound core, with the shapes of a checkpoint's experts.

    .venv/bin/python bench/ep/bench_split_cost.py --model $PEER/models/tiny-mixtral-large \\
        [--ranks 2] [--tokens 16 32 64 256 1024] [--iters 30]

Micro-batch overlap can only hide what a rank spends waiting for its peers (the step
breakdown's "wait"); splitting pays this extra expert time on every step. A rank holds E/R
experts and, for T tokens per replica, receives about T*k pairs (R replicas' T*k pairs each,
spread over R ranks; uniform routing). Each variant runs the same pairs through the rank's experts with
kernels' expert_mlp_ref (the engine's CPU path), bf16, median of --iters.
Legend: T tokens per replica, k top-k, E experts, R ranks, Q pairs on a rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from expertmesh_kernels.moe import expert_mlp_ref

from expertmesh.parallel.cpu_binding import bind_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comm"))
from timing import median_time  # noqa: E402 - bench/comm/timing.py, the benches' one timer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 256, 1024])
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    experts, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    local = experts // args.ranks
    bind_rank("auto", 0, args.ranks)  # one rank's share of the cores, as the engine binds it
    g = torch.Generator().manual_seed(0)
    w_gate_up = (torch.randn(local, 2 * inter, hidden, generator=g) * 0.02).bfloat16()  # [El, 2I, H]
    w_down = (torch.randn(local, hidden, inter, generator=g) * 0.02).bfloat16()  # [El, H, I]
    print(f"{Path(args.model).name}: hidden {hidden}, intermediate {inter}, {local} experts on the rank, "
          f"top-{top_k}, R={args.ranks}, {torch.get_num_threads()} thread(s)")
    print("| T/replica | pairs Q | one batch ms | two halves ms | halves/one |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for tokens in args.tokens:
        pairs = tokens * top_k  # R replicas' pairs, 1/R of them on this rank
        x = (torch.randn(pairs, hidden, generator=g)).bfloat16()  # [Q, H] grouped by expert
        offsets = torch.linspace(0, pairs, local + 1).long()  # [El+1] uniform routing

        # A micro-batch holds half of the tokens, so half of every expert's pairs.
        half = (offsets // 2, (offsets - offsets // 2))  # [El+1] each: per-expert halves, rounded
        halves_x = [x[: int(h[-1])] for h in half]

        def halves():
            for hx, h in zip(halves_x, half):
                expert_mlp_ref(hx, w_gate_up, w_down, h)

        one = median_time(lambda: expert_mlp_ref(x, w_gate_up, w_down, offsets), args.iters) * 1e3
        two = median_time(halves, args.iters) * 1e3
        print(f"| {tokens} | {pairs} | {one:.2f} | {two:.2f} | {two / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
