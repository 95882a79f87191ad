"""Quantized weights (int8, fp8) against full precision, in one run: accuracy and decode speed.

    .venv/bin/python bench/quant/bench_quant.py --model ~/.cache/expertmesh/bench-mixtral-medium \
        --save-result bench/results/quant-medium-cpu.json

Accuracy: every variant (dtype x quantization) prefills the same prompts; its logits at every
position are compared with the fp32 unquantized model's (relative RMS error, top-1 agreement,
mean KL(fp32 || variant)), on two checkpoints. "flat" is the random checkpoint as made: its
next-token distributions are nearly flat over 32,000 tokens, so top-1 agreement there is a
strict test (small logit errors flip near-ties a trained model would not have). "peaked" is the
same checkpoint with its embeddings scaled up and lm_head made a multiple of them (a copy
model: the residual stream keeps the token's own embedding, which lm_head then picks out), so
the next-token distribution has a clear winner, as a trained model's mostly does; the layers,
quantized or not, are unchanged and still perturb every logit.

Speed: `bench offline`'s engine run (python/expertmesh/bench/offline.py) for each speed variant,
back to back, with output tokens/s as a ratio against the bf16 run of the same sitting. Two
floors for a decode step of the whole batch: every weight read once (top-k over all experts
touches them all), weight_bytes / memory bandwidth, and the matmul FLOPs (2 x the parameters a
token uses x batch) at the bf16 GEMM peak; both bandwidth and peak are measured in the same run
(a copy far larger than the caches; torch's bf16 matmul at 2048^3). The larger floor binds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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


def peaked_checkpoint(src: Path, dst: Path, embed_scale: float, head_scale: float) -> Path:
    """A copy of checkpoint `src` whose embeddings are scaled by embed_scale and whose lm_head is
    the original embeddings times head_scale (the layers are the same tensors)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors[file.name] = load_file(str(file))
    embed = next(t["model.embed_tokens.weight"] for t in tensors.values() if "model.embed_tokens.weight" in t)
    for name, group in tensors.items():
        if "model.embed_tokens.weight" in group:
            group["model.embed_tokens.weight"] = embed * embed_scale
        if "lm_head.weight" in group:
            group["lm_head.weight"] = embed * head_scale
        save_file(group, str(dst / name), metadata={"format": "pt"})
    return dst


def accuracy(model_path: str, prompts: list[list[int]]) -> dict[str, Any]:
    ref_model, _ = load_model(model_path, dtype="float32", show_progress=False)
    ref = [prefill_logits(ref_model, p) for p in tqdm(prompts, desc="fp32 reference", leave=False)]
    del ref_model
    out: dict[str, Any] = {"fp32_mean_top1_probability": sum(float(r.softmax(-1).amax(-1).sum()) for r in ref)
                           / sum(len(p) for p in prompts)}
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


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of torch's bf16 matmul [n, n] x [n, n], the best of `repeats`."""
    a = torch.randn(n, n).bfloat16()
    b = torch.randn(n, n).bfloat16()
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(hf: dict[str, Any]) -> float:
    """Matmul FLOPs one decoded token costs: attention projections, top-k experts, lm_head."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    d = hf.get("head_dim") or h // heads
    attn = h * heads * d * 2 + h * kv * d * 2
    experts = hf["num_experts_per_tok"] * 3 * h * hf["intermediate_size"]
    return 2.0 * (layers * (attn + experts) + h * hf["vocab_size"])


def speed(model_path: str, prompts: list[list[int]], output_len: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype, quantization in tqdm(SPEED_VARIANTS, desc=f"speed, batch {len(prompts)}"):
        kwargs = {"quantization": quantization} if quantization else {}
        eng = run_engine(model_path, prompts, output_len, dtype, kwargs, repeats=repeats)
        out[_name(dtype, quantization)] = {k: v for k, v in eng.items() if k != "token_ids"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--accuracy-prompts", type=int, default=8)
    parser.add_argument("--accuracy-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, nargs="+", default=[64, 8],
                        help="batch sizes: 64 (compute-bound here), 8 (weight reads bind)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--embed-scale", type=float, default=8.0, help="peaked checkpoint: embeddings x this")
    parser.add_argument("--head-scale", type=float, default=8.0, help="peaked checkpoint: lm_head = embeddings x this")
    parser.add_argument("--peaked-dir", default="/tmp/expertmesh-bench-peaked", help="where the peaked copy goes")
    parser.add_argument("--save-result", default=None)
    args = parser.parse_args()

    hf = read_hf_config(Path(args.model))
    vocab = int(hf["vocab_size"])
    acc_prompts = workload(args.accuracy_prompts, args.accuracy_len, vocab, seed=1)
    peaked = peaked_checkpoint(Path(args.model), Path(args.peaked_dir), args.embed_scale, args.head_scale)
    acc = {"flat": accuracy(args.model, acc_prompts), "peaked": accuracy(str(peaked), acc_prompts)}
    shutil.rmtree(peaked)
    bandwidth, peak = memory_bandwidth(), gemm_peak()
    runs: dict[str, Any] = {}
    for batch in args.num_prompts:
        compute_step_s = flops_per_token(hf) * batch / peak
        runs[f"batch{batch}"] = batch_runs = speed(args.model, workload(batch, args.input_len, vocab, seed=0),
                                                   args.output_len, args.repeats)
        base = batch_runs["bf16"]["output_tokens_per_s"]
        for name, run in batch_runs.items():
            wbytes = acc["flat"][name]["weight_bytes"]
            read_step_s = wbytes / bandwidth
            floor = batch / max(read_step_s, compute_step_s)  # output tok/s of a decode at the floor
            run.update(weight_bytes=wbytes, ratio_vs_bf16=run["output_tokens_per_s"] / base,
                       floor_weight_read_step_ms=1e3 * read_step_s, floor_compute_step_ms=1e3 * compute_step_s,
                       decode_floor_output_tokens_per_s=floor, share_of_floor=run["output_tokens_per_s"] / floor)
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "memory_bandwidth_gb_s": bandwidth / 1e9, "bf16_gemm_peak_gflop_s": peak / 1e9},
           "config": vars(args), "accuracy_vs_fp32": acc, "speed": runs}
    print(json.dumps({"accuracy_vs_fp32": acc, "speed": runs, "machine": doc["machine"]}, indent=1))
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
