"""`expertmesh bench offline`: the engine in this process on a fixed workload, against
transformers generate() on the same workload in the same run.

Workload: N prompts of random token ids (fixed seed, ids 1..V-1), each exactly input_len
long; greedy; exactly output_len new tokens each (the engine with ignore_eos, transformers
with eos disabled: eos_token_id=None, max_new_tokens = min_new_tokens = output_len).
transformers runs the N prompts as ONE batch (left padding and an attention mask, though
equal lengths need no pads), with its default attention and experts implementations, in
the same dtype and with the same torch threads. Only generation is timed: loading and a
short warm-up run happen before the clock starts. With --repeats R each side runs R times
and the fastest run counts (all are recorded): on a shared machine a neighbour's burst can
slow one run many times over. The ratio is engine output tokens/s over
transformers output tokens/s. Greedy agreement (the fraction of requests whose tokens match
exactly) is reported as a sanity check; in bf16 small numeric differences can flip argmaxes.

--profile adds a separate, untimed profiled engine run: cProfile time per engine component
and torch.profiler's op table, so a result says where the time goes.
"""

from __future__ import annotations

import copy
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch

from expertmesh.bench.datasets import random_requests

# Mixtral-shaped random-weight models the offline bench can make (never committed: they
# are written into a cache directory). "medium": about 490M parameters, ~1 GB in bf16.
# "small-long": the peers' small shape (../shared/peers, 14.8M + a 32K vocabulary) with 33K
# positions, for the long-context curve (bench/attention).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "medium": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                   vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "small-long": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                       vocab_size=32000, max_position_embeddings=33024, rms_norm_eps=1e-5, rope_theta=1e6,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def make_random_mixtral(out_dir: str | Path, preset: str = "medium", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a Mixtral checkpoint with random weights (transformers MixtralConfig +
    save_pretrained) and the built-in tokenizer files; returns its directory. Idempotent."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertmesh import default_model

    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    torch.manual_seed(seed)
    config = MixtralConfig(**MODEL_PRESETS[preset], initializer_range=0.02)
    model = MixtralForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(default_model._tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": default_model.CHAT_TEMPLATE}))
    return out


def workload(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    return [r.prompt for r in random_requests(num_prompts, input_len, 1, vocab_size, 0.0, seed)]  # type: ignore[misc]


def _throughput(n: int, input_len: int, output_tokens: int, elapsed: float) -> dict[str, float]:
    return {"elapsed_s": elapsed, "requests_per_s": n / elapsed, "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (n * input_len + output_tokens) / elapsed, "output_tokens": output_tokens}


def run_engine(model: str | None, prompts: list[list[int]], output_len: int, dtype: str,
               engine_kwargs: dict[str, Any], profile_dir: Path | None = None, repeats: int = 1) -> dict[str, Any]:
    from expertmesh import LLM, SamplingParams

    # Repeats run the same prompts: with the prefix cache on, every repeat after the first would
    # skip its prefill and time a different workload.
    llm = LLM(model, dtype=dtype, show_progress=False, **{"enable_prefix_caching": False, **engine_kwargs})
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    result = {**_throughput(len(prompts), len(prompts[0]), sum(map(len, tokens)), min(times)),
              "runs_s": times, "dtype": str(llm.engine.runner.dtype).removeprefix("torch."), "token_ids": tokens,
              "prefix_cache_hits": llm.stats()["prefix_cache_hits"]}
    if profile_dir is not None:
        result["profile"] = _profile_engine(llm, prompts, params, profile_dir)
    return result


# Engine components for the cProfile breakdown: (label, file suffix, function name).
_COMPONENTS = [
    ("engine step (total)", "engine/llm_engine.py", "step"),
    ("model forward", "engine/model_runner.py", "execute"),
    ("  attention (paged, torch ref)", "expertmesh_kernels/attention.py", "paged_attention_ref"),
    ("  kv cache write", "expertmesh_kernels/attention.py", "write_kv_cache_ref"),
    ("  MoE experts (routing + MLPs + combine)", "layers/moe.py", "experts"),
    ("    expert MLPs", "expertmesh_kernels/moe.py", "expert_mlp_ref"),
    ("  router + top-k gating", "expertmesh_kernels/moe.py", "topk_gating_ref"),
    ("  RMSNorm", "expertmesh_kernels/norm_rope_ref.py", "rms_norm_ref"),
    ("  RoPE", "expertmesh_kernels/norm_rope_ref.py", "apply_rotary_ref"),
    ("sampler", "engine/sampler.py", "__call__"),
    ("scheduler.schedule (Rust)", "~", "<method 'schedule' of 'builtins.Scheduler' objects>"),
    ("scheduler.update (Rust)", "~", "<method 'update' of 'builtins.Scheduler' objects>"),
    ("detokenizer", "engine/detokenizer.py", "add_tokens"),
]


def _profile_engine(llm: Any, prompts: list[list[int]], params: Any, out_dir: Path) -> dict[str, Any]:
    """cProfile cumulative time per component, then torch.profiler's top ops (separate runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    components = {}
    for label, suffix, func in _COMPONENTS:
        cum = sum(v[3] for (file, _, name), v in stats.items() if name == func and file.endswith(suffix))
        components[label] = {"seconds": round(cum, 4), "share": round(cum / wall, 4)}
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    (out_dir / "cprofile.txt").write_text(text.getvalue())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        llm.generate(prompts, params, use_tqdm=False)
    table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out_dir / "torch_ops.txt").write_text(table + "\n")
    return {"profiled_wall_s": wall, "components": components, "cprofile": str(out_dir / "cprofile.txt"),
            "torch_ops": str(out_dir / "torch_ops.txt")}


def run_transformers(model: str, prompts: list[list[int]], output_len: int, dtype: torch.dtype,
                     repeats: int = 1) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: left padding adds nothing
    mask = torch.ones_like(ids)
    cfg = copy.deepcopy(hf.generation_config)
    cfg.update(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=output_len,
               min_new_tokens=output_len, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        warm = copy.deepcopy(cfg)
        warm.update(max_new_tokens=4, min_new_tokens=4)
        hf.generate(ids[:2], attention_mask=mask[:2], generation_config=warm)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = hf.generate(ids, attention_mask=mask, generation_config=cfg)
            times.append(time.perf_counter() - start)
    new = out[:, ids.shape[1]:]
    if new.shape[1] != output_len:
        raise RuntimeError(f"transformers generated {new.shape[1]} tokens per prompt, expected {output_len}")
    return {**_throughput(len(prompts), ids.shape[1], int(new.numel()), min(times)), "runs_s": times,
            "token_ids": new.tolist(),
            "attn_implementation": hf.config._attn_implementation,
            "experts_implementation": getattr(hf.config, "_experts_implementation", None)}


def run_offline(args: Any) -> dict[str, Any]:
    """The whole `bench offline` run; returns the result document's config and metrics."""
    from expertmesh.config import EngineConfig
    from expertmesh.models.loader import read_hf_config, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    engine_kwargs = {k: v for k, v in dict(max_num_seqs=args.max_num_seqs,
                                           max_num_batched_tokens=args.max_num_batched_tokens,
                                           max_model_len=args.max_model_len).items() if v is not None}
    model_path = EngineConfig(model=args.model).model_path
    hf_config = read_hf_config(model_path)
    prompts = workload(args.num_prompts, args.input_len, int(hf_config["vocab_size"]), args.seed)
    profile_dir = Path(args.profile_dir) if args.profile else None
    eng = run_engine(args.model, prompts, args.output_len, args.dtype, engine_kwargs, profile_dir, args.repeats)
    metrics: dict[str, Any] = {"expertmesh": {k: v for k, v in eng.items() if k != "token_ids"}}
    if args.baseline == "transformers":
        dtype = resolve_dtype(args.dtype, hf_config, torch.device("cpu"))
        hf = run_transformers(str(model_path), prompts, args.output_len, dtype, args.repeats)
        metrics["transformers"] = {k: v for k, v in hf.items() if k != "token_ids"}
        metrics["speedup_output_tokens_per_s"] = eng["output_tokens_per_s"] / hf["output_tokens_per_s"]
        same = sum(a == b for a, b in zip(eng["token_ids"], hf["token_ids"]))
        metrics["greedy_agreement"] = same / len(prompts)
    config = {"model": str(model_path), "model_config": {k: hf_config.get(k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "num_local_experts", "num_experts", "num_experts_per_tok", "vocab_size")},
              "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
              "dtype": eng["dtype"], "greedy": True, "ignore_eos": True, "seed": args.seed,
              "threads": torch.get_num_threads(), "baseline": args.baseline, "repeats": args.repeats,
              "engine_args": {"enable_prefix_caching": False, **engine_kwargs}}
    return {"config": config, "metrics": metrics}


def offline_table(doc: dict[str, Any]) -> str:
    m, c = doc["metrics"], doc["config"]
    rows = [f"{'':<14}{'elapsed s':>11}{'req/s':>10}{'out tok/s':>12}{'total tok/s':>13}"]
    for name in ("expertmesh", "transformers"):
        if name in m:
            r = m[name]
            rows.append(f"{name:<14}{r['elapsed_s']:>11.2f}{r['requests_per_s']:>10.2f}"
                        f"{r['output_tokens_per_s']:>12.1f}{r['total_tokens_per_s']:>13.1f}")
    head = (f"offline: {c['num_prompts']} prompts x {c['input_len']} in, {c['output_len']} out, greedy, ignore_eos, "
            f"{c['dtype']}, {c['threads']} threads\nmodel: {c['model']}")
    tail = []
    if "speedup_output_tokens_per_s" in m:
        tail.append(f"speedup (output tok/s, expertmesh / transformers): {m['speedup_output_tokens_per_s']:.2f}x; "
                    f"greedy agreement {m['greedy_agreement']:.0%}")
    prof = m["expertmesh"].get("profile")
    if prof:
        tail.append(f"where the time goes (cProfile, profiled run {prof['profiled_wall_s']:.2f} s):")
        tail += [f"  {label:<42}{v['seconds']:>8.2f} s {v['share']:>6.0%}" for label, v in prof["components"].items()]
    return "\n".join([head, *rows, *tail])
