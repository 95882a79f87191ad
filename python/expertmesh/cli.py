"""The `expertmesh` command: `expertmesh serve ...` (the HTTP server), `expertmesh generate ...`,
`expertmesh router ...` (replicas behind one front) and `expertmesh bench serve|offline ...`
(benchmarks, expertmesh/bench/)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from expertmesh.errors import InvalidRequestError

DEFAULT_PROMPTS = ["The experts of a mixture", "Hello, world! How are you today?"]


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny MoE)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--quantization", "-q", default=None, choices=["int8", "fp8"],
                   help="weight-only quantization at load: int8 (per output channel) or fp8 (e4m3, 128x128 "
                        "blocks); an FP8 checkpoint is served as fp8 without it")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of the device's memory (GPU, or RAM on the CPU) for weights + KV cache; the KV "
                        "cache gets what the weights leave (default: a fixed 2 GiB KV budget)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-prefix-caching", action="store_true")
    par = parser.add_argument_group("parallelism (vLLM's spellings; the rank processes are started here)")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="split every layer over N ranks")
    par.add_argument("--context-parallel-size", "-cp", type=int, default=1,
                     help="split sequences longer than --cp-min-tokens over N ranks (ring attention)")
    par.add_argument("--cp-min-tokens", type=int, default=1024,
                     help="sequences (context + new tokens) longer than this use context parallelism")
    par.add_argument("--cp-variant", default="auto", choices=["auto", "pass-kv", "pass-q"],
                     help="ring attention: auto = pass-KV when new/(new+cached) >= 2 NKV/NH, else pass-Q")
    par.add_argument("--cp-transport", default="auto", choices=["auto", "shm", "torch"],
                     help="CP ring: auto = shared memory for CPU ranks on one host, else torch.distributed")
    par.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                     help="replicas of the TP ranks, each with its own requests (needs --enable-expert-parallel)")
    par.add_argument("--enable-expert-parallel", action="store_true",
                     help="split the experts over all TP x DP ranks instead of splitting each expert over TP")
    par.add_argument("--ep", type=int, default=1,
                     help="short for --data-parallel-size EP --enable-expert-parallel")
    par.add_argument("--allreduce", default="auto", choices=["auto", "shm", "torch"],
                     help="TP allreduce: auto = shared memory (DDA) for CPU ranks on one host, else torch.distributed")
    par.add_argument("--ep-transport", default="auto", choices=["auto", "shm", "torch"],
                     help="EP all-to-all: auto = shared memory for CPU ranks on one host, else torch.distributed")
    par.add_argument("--ep-max-tokens-per-rank", type=int, default=None,
                     help="tokens per rank per all-to-all call (bigger steps are split)")
    par.add_argument("--cpu-bind", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                     help="cores per CPU rank: auto = split this host's cores evenly (one thread per core), "
                          "nobind = torch's defaults, or lists per local rank like 0-3|4-7 "
                          "(default: $VLLM_CPU_OMP_THREADS_BIND, else auto)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_blocks=args.kv_cache_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        context_parallel_size=args.context_parallel_size,
        cp_min_tokens=args.cp_min_tokens,
        cp_variant=args.cp_variant,
        cp_transport=args.cp_transport,
        enable_expert_parallel=args.enable_expert_parallel,
        expert_parallel_size=args.ep,
        allreduce=args.allreduce,
        ep_transport=args.ep_transport,
        ep_max_tokens_per_rank=args.ep_max_tokens_per_rank,
        cpu_bind=args.cpu_bind,
    )


def _generate(args: argparse.Namespace) -> int:
    from expertmesh import LLM, SamplingParams

    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.model, **_engine_kwargs(args))
    try:
        return _run_generate(llm, args, params)
    finally:
        llm.close()


def _run_generate(llm, args: argparse.Namespace, params) -> int:
    prompts = args.prompt or DEFAULT_PROMPTS
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = 0
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            generated += len(completion.token_ids)
            print(f"prompt: {prompt!r}")
            print(f"output[{completion.index}]: {completion.text!r}  ({completion.finish_reason})")
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s ({generated / elapsed:.1f} tok/s)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from expertmesh.server.serve import serve_main

    return serve_main(args, _engine_kwargs(args))


def _router(args: argparse.Namespace) -> int:
    from expertmesh.router.main import router_main

    return router_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Serve mixture-of-experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (default: the built-in model on 127.0.0.1:8000)")
    _add_engine_args(serve)
    from expertmesh.server.serve_args import add_serve_args

    add_serve_args(serve)
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate completions offline, in this process")
    _add_engine_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    s.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="a stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)
    router = sub.add_parser("router", help="one OpenAI-compatible front for several replicas (prefix-affine routing)")
    from expertmesh.router.main import add_router_args

    add_router_args(router)
    router.set_defaults(func=_router)
    from expertmesh.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InvalidRequestError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
