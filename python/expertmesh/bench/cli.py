"""`expertmesh bench serve ...` and `expertmesh bench offline ...`: arguments and the two runs.

Option names follow vLLM's `vllm bench serve` where one exists (--request-rate, --burstiness,
--max-concurrency, --num-prompts, --random-input-len, --random-output-len,
--random-range-ratio, --goodput, --save-result, --seed), so commands carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from pathlib import Path


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark a server (serve) or the engine in-process (offline)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("serve", help="load-test any OpenAI-compatible server (expertmesh, vLLM, SGLang, TGI)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    s.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    s.add_argument("--api-key", default=None)
    s.add_argument("--dataset", choices=("random", "prefix-repetition", "jsonl"), default="random")
    s.add_argument("--dataset-path", default=None, help="the JSONL file for --dataset jsonl")
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--random-input-len", type=int, default=128)
    s.add_argument("--random-output-len", type=int, default=128)
    s.add_argument("--random-range-ratio", type=float, default=0.0)
    s.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition: shared prefix tokens")
    s.add_argument("--suffix-len", type=int, default=64, help="prefix-repetition: per-prompt suffix tokens")
    s.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: number of prefix groups")
    s.add_argument("--output-len", type=int, default=128, help="prefix-repetition / jsonl: max_tokens")
    s.add_argument("--tokenizer", default=None, help="checkpoint dir or tokenizer.json: vocab size, and text prompts")
    s.add_argument("--vocab-size", type=int, default=None, help="random ids below this (else from --tokenizer)")
    s.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="send random prompts as token ids (exact lengths) or decoded text (needs --tokenizer)")
    s.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf = all at once")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--num-warmups", type=int, default=1)
    s.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at eos")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    s.add_argument("--percentiles", default="50,90,99")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--timeout", type=float, default=6 * 3600.0, help="per-request timeout in seconds")
    s.add_argument("--save-result", default=None, metavar="JSON", help="write metrics and per-request data here")
    s.add_argument("--plot", default=None, metavar="PNG", help="latency distributions and throughput over time")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=serve_main)

    o = bsub.add_parser("offline", help="the engine in this process vs transformers generate() on one workload")
    o.add_argument("--model", default=None, help="checkpoint dir (default: the built-in tiny MoE)")
    o.add_argument("--dtype", default="auto")
    o.add_argument("--num-prompts", type=int, default=64)
    o.add_argument("--input-len", type=int, default=128)
    o.add_argument("--output-len", type=int, default=128)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    o.add_argument("--baseline", choices=("none", "transformers"), default="none")
    o.add_argument("--repeats", type=int, default=1, help="timed runs per side; the fastest counts")
    o.add_argument("--max-num-seqs", type=int, default=None)
    o.add_argument("--max-num-batched-tokens", type=int, default=None)
    o.add_argument("--max-model-len", type=int, default=None)
    o.add_argument("--profile", action="store_true", help="add a profiled engine run: where the time goes")
    o.add_argument("--profile-dir", default="bench-profile")
    o.add_argument("--save-result", default=None, metavar="JSON")
    o.set_defaults(func=offline_main)


def _first_model(base_url: str, api_key: str | None) -> str:
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def build_requests(args: argparse.Namespace):
    from expertmesh.bench import datasets

    tok = datasets.load_tokenizer(args.tokenizer) if args.tokenizer else None
    vocab = args.vocab_size or (tok.get_vocab_size() if tok is not None else None)
    n_total = args.num_prompts + args.num_warmups
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        reqs = datasets.jsonl_requests(args.dataset_path, n_total, args.output_len, tok)
    else:
        if vocab is None:
            raise ValueError(f"--dataset {args.dataset} draws random token ids: pass --tokenizer or --vocab-size")
        if args.dataset == "random":
            reqs = datasets.random_requests(n_total, args.random_input_len, args.random_output_len, vocab,
                                            args.random_range_ratio, args.seed)
        else:
            reqs = datasets.prefix_repetition_requests(n_total, args.prefix_len, args.suffix_len, args.num_prefixes,
                                                       args.output_len, vocab, args.seed)
    if args.prompt_format == "text" or args.endpoint.endswith("chat/completions"):
        if tok is None and any(isinstance(r.prompt, list) for r in reqs):
            raise ValueError("text prompts (--prompt-format text or the chat endpoint) need --tokenizer")
        reqs = datasets.as_text(reqs, tok)
    # Warm-ups come from the same distribution but are never measured.
    return reqs[args.num_warmups:], reqs[:args.num_warmups]


def serve_main(args: argparse.Namespace) -> int:
    from expertmesh.bench import report
    from expertmesh.bench.load_generator import LoadConfig, run_load
    from expertmesh.bench.metrics import compute_metrics, parse_goodput

    try:
        slos = parse_goodput(args.goodput)
        percentiles = tuple(float(p) for p in args.percentiles.split(","))
        requests, warmups = build_requests(args)
    except ValueError as exc:
        print(f"expertmesh bench serve: error: {exc}", file=sys.stderr)
        return 2
    model = args.model or _first_model(args.base_url, args.api_key)
    cfg = LoadConfig(base_url=args.base_url, model=model, endpoint=args.endpoint, request_rate=args.request_rate,
                     burstiness=args.burstiness, max_concurrency=args.max_concurrency, num_warmups=args.num_warmups,
                     ignore_eos=not args.no_ignore_eos, temperature=args.temperature, api_key=args.api_key,
                     timeout_s=args.timeout, seed=args.seed)
    print(f"{len(requests)} {args.dataset} requests to {args.base_url}{args.endpoint} ({model}); "
          f"rate {args.request_rate}, burstiness {args.burstiness}, max concurrency {args.max_concurrency}",
          flush=True)
    results, duration, warm = asyncio.run(run_load(cfg, requests, warmups, progress=not args.no_progress))
    bad_warm = [w for w in warm if not w.success]
    if bad_warm:
        print(f"warning: {len(bad_warm)} warm-up request(s) failed: {bad_warm[0].error_kind}: {bad_warm[0].error}",
              file=sys.stderr)
    metrics = compute_metrics(results, duration, slos, percentiles, num_requested=len(requests))
    config = {"base_url": args.base_url, "endpoint": args.endpoint, "model": model, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "random_input_len": args.random_input_len,
              "random_output_len": args.random_output_len, "random_range_ratio": args.random_range_ratio,
              "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "num_prefixes": args.num_prefixes,
              "output_len": args.output_len, "prompt_format": args.prompt_format,
              "request_rate": args.request_rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "num_warmups": args.num_warmups,
              "ignore_eos": not args.no_ignore_eos, "temperature": args.temperature, "seed": args.seed,
              "percentiles": list(percentiles)}
    print(report.serve_table(metrics, percentiles))
    for r in [r for r in results if not r.success][:5]:
        print(f"error (request {r.index}): {r.error_kind}: {r.error[:200]}", file=sys.stderr)
    doc = report.result_document("serve", config, metrics, results)
    if args.save_result:
        print(f"saved {report.save_json(doc, args.save_result)}")
    if args.plot:
        print(f"saved {report.plot_serve(doc, args.plot)}")
    return 0 if metrics["failed"] == 0 and metrics["lost"] == 0 else 1


def offline_main(args: argparse.Namespace) -> int:
    from expertmesh.bench import report
    from expertmesh.bench.offline import offline_table, run_offline

    out = run_offline(args)
    doc = report.result_document("offline", out["config"], out["metrics"])
    print(offline_table(doc))
    if args.save_result:
        print(f"saved {report.save_json(doc, Path(args.save_result))}")
    return 0
