"""Quantized weights (int8, fp8) against full precision, in one run: accuracy and decode speed.

    .venv/bin/python bench/quant/bench_quant.py --model ~/.cache/expertmesh/bench-mixtral-medium \
        --save-result bench/results/quant-medium-cpu.json

Accuracy: every variant (dtype x quantization) prefills the same prompts; its logits at every
position are compared with the fp32 unquantized model's (relative RMS error, top-1 agreement,
mean KL(fp32 || variant)). Random weights give near-flat logits, so top-1 agreement here is a
strict test: small logit errors flip near-ties that a trained model would not have.

Speed: `bench offline`'s engine run (python/expertmesh/bench/offline.py) for each speed variant,
back to back, with output tokens/s as a ratio against the bf16 run of the same sitting. The
floor: at decode every step of a large batch reads every weight once (top-k over all experts
touches them all), so a step takes at least weight_bytes / memory bandwidth; the bandwidth is
measured in the same run by copying a tensor far larger than the caches.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from expertmesh.bench.offline import run_engine, workload
from expertmesh.layers.attention import AttentionMetadata, allocate_kv_caches
from expertmesh.models.loader import load_model, read_hf_config
from expertmesh.quant.apply import weight_bytes

BLOCK = 16
ACCURACY_VARIANTS = [("float32", "int8"), ("float32", "fp8"), ("bfloat16", None), ("bfloat16", "int8"),
                     ("bfloat16", "fp8")]
SPEED_VARIANTS = [("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "fp8")]


def _name(dtype: str, quantization: str | None) -> str:
    return f"{'fp32' if dtype == 'float32' else 'bf16'}{'+' + quantization if quantization else ''}"


@torch.inference_mode()
def prefill_logits(model: Any, prompt: list[int]) -> torch.Tensor:
    """Logits [L, V] (fp32) at every position of one prompt, prefilled in one step."""
    n = len(prompt)
    blocks = math.ceil(n / BLOCK)
    caches = allocate_kv_caches(model.num_layers, blocks, BLOCK, model.num_kv_heads, model.head_dim, model.dtype)
    meta = AttentionMetadata(
        positions=torch.arange(n, dtype=torch.int64),
        slot_mapping=torch.arange(n, dtype=torch.int64),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
    )
    hidden = model(torch.tensor(prompt), meta.positions, caches, meta)  # [L, H]
    return model.compute_logits(hidden)  # [L, V]


def accuracy(model_path: str, prompts: list[list[int]]) -> dict[str, Any]:
    ref_model, _ = load_model(model_path, dtype="float32", show_progress=False)
    ref = [prefill_logits(ref_model, p) for p in tqdm(prompts, desc="fp32 reference", leave=False)]
    del ref_model
    out: dict[str, Any] = {}
    for dtype, quantization in ACCURACY_VARIANTS:
        name = _name(dtype, quantization)
        model, _ = load_model(model_path, dtype=dtype, show_progress=False, quantization=quantization)
        err2 = ref2 = kl = 0.0
        agree = positions = 0
        for prompt, want in zip(tqdm(prompts, desc=name, leave=False), ref):
            got = prefill_logits(model, prompt)  # [L, V]
            err2 += float((got - want).pow(2).sum())
            ref2 += float(want.pow(2).sum())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            positions += len(prompt)
            logp_ref, logp = want.log_softmax(-1), got.log_softmax(-1)
            kl += float((logp_ref.exp() * (logp_ref - logp)).sum())
        out[name] = {"relative_rms_logit_error": math.sqrt(err2 / ref2), "top1_agreement": agree / positions,
                     "mean_kl_nats": kl / positions, "positions": positions, "weight_bytes": weight_bytes(model)}
        del model
    return out


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the best of `repeats`."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def speed(model_path: str, prompts: list[list[int]], output_len: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype, quantization in tqdm(SPEED_VARIANTS, desc="speed"):
        kwargs = {"quantization": quantization} if quantization else {}
        eng = run_engine(model_path, prompts, output_len, dtype, kwargs, repeats=repeats)
        out[_name(dtype, quantization)] = {k: v for k, v in eng.items() if k != "token_ids"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--accuracy-prompts", type=int, default=8)
    parser.add_argument("--accuracy-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save-result", default=None)
    args = parser.parse_args()

    vocab = int(read_hf_config(Path(args.model))["vocab_size"])
    acc = accuracy(args.model, workload(args.accuracy_prompts, args.accuracy_len, vocab, seed=1))
    bandwidth = memory_bandwidth()
    runs = speed(args.model, workload(args.num_prompts, args.input_len, vocab, seed=0), args.output_len, args.repeats)
    base = runs["bf16"]["output_tokens_per_s"]
    for name, run in runs.items():
        wbytes = acc[name]["weight_bytes"]
        floor = args.num_prompts * bandwidth / wbytes  # output tok/s if a decode step only read the weights
        run.update(weight_bytes=wbytes, ratio_vs_bf16=run["output_tokens_per_s"] / base,
                   decode_floor_output_tokens_per_s=floor, share_of_floor=run["output_tokens_per_s"] / floor)
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "memory_bandwidth_gb_s": bandwidth / 1e9},
           "config": vars(args), "accuracy_vs_fp32": acc, "speed": runs}
    print(json.dumps({"accuracy_vs_fp32": acc, "speed": runs, "memory_bandwidth_gb_s": bandwidth / 1e9}, indent=1))
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
