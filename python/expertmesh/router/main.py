"""`expertmesh router` arguments, the config file, and running it until SIGTERM.

Backends come from `--backend URL` (repeatable; `--backend-api-key` is the key sent to those),
or for disaggregated serving `--prefill URL` and `--decode URL` (disagg.py), and/or a config
file (`--config FILE`, TOML or JSON) that lists them with their own keys:

    policy = "prefix-hash"          # any command-line option, with _ for -
    [[backends]]
    url = "http://10.0.0.1:8000"
    api_key = "key-of-replica-1"
    role = "prefill"                # disaggregated serving only: prefill or decode (else --backend)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tomllib
from pathlib import Path

from aiohttp import web

from expertmesh.router.app import RouterState, build_app
from expertmesh.router.backends import Backend, BackendPool
from expertmesh.router.policies import POLICIES, PrefixKeyer, Router
from expertmesh.router.proxy import ProxySettings


def add_router_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", default=[], metavar="URL",
                        help="an OpenAI-compatible server (repeat for each replica)")
    parser.add_argument("--prefill", action="append", default=[], metavar="URL",
                        help="a server run with --role prefill (disaggregated serving; give --decode too)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL",
                        help="a server run with --role decode")
    parser.add_argument("--backend-api-key", default=None, help="the key sent to the --backend servers")
    parser.add_argument("--config", default=None, help="TOML or JSON file: backends with their keys, options")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    parser.add_argument("--protect-metrics", action="store_true", help="with --api-key, /metrics needs it too")
    parser.add_argument("--policy", default="prefix-hash", choices=POLICIES)
    parser.add_argument("--load-factor", type=float, default=1.25,
                        help="prefix-hash: a replica past this x the average load passes requests on")
    parser.add_argument("--balance-abs-threshold", type=int, default=8,
                        help="prefix-hash: a replica with fewer requests in flight than this is never overloaded")
    parser.add_argument("--vnodes", type=int, default=160, help="prefix-hash: ring points per replica")
    parser.add_argument("--tokenizer", default=None,
                        help="the served model's checkpoint dir (tokenizer.json, chat template) for prefix keys; "
                             "default: the built-in model's")
    parser.add_argument("--block-size", type=int, default=16, help="the replicas' KV block size")
    parser.add_argument("--prefix-blocks", type=int, default=4, help="leading KV blocks that make a request's key")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    parser.add_argument("--read-timeout", type=float, default=120.0,
                        help="seconds a backend may stay silent before the request moves on or ends")
    parser.add_argument("--max-attempts", type=int, default=3, help="backends tried per request")


def _load_config(args: argparse.Namespace) -> list[Backend]:
    backends = [Backend(url.rstrip("/"), args.backend_api_key, role=role) for role, urls in
                (("both", args.backend), ("prefill", args.prefill), ("decode", args.decode)) for url in urls]
    if args.config:
        path = Path(args.config)
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        for entry in data.pop("backends", []):
            backends.append(Backend(str(entry["url"]).rstrip("/"), entry.get("api_key"),
                                    role=entry.get("role", "both")))
        for key, value in data.items():
            if not hasattr(args, key):
                raise SystemExit(f"expertmesh router: unknown option {key!r} in {path}")
            setattr(args, key, value)
    if not backends:
        raise SystemExit("expertmesh router: give at least one --backend URL (or a --config file listing them)")
    roles = {b.role for b in backends}
    if roles - {"both", "prefill", "decode"}:
        raise SystemExit(f"expertmesh router: a backend's role must be both, prefill or decode, got {sorted(roles)}")
    if roles & {"prefill", "decode"} and roles != {"prefill", "decode"}:
        raise SystemExit("expertmesh router: disaggregated serving needs --prefill and --decode servers and no "
                         f"--backend ones; got roles {sorted(roles)}")
    return backends


def build_state(args: argparse.Namespace) -> RouterState:
    from expertmesh.tokenizer import CheckpointTokenizer

    backends = _load_config(args)
    if args.tokenizer is None:
        from expertmesh.default_model import default_model_path

        args.tokenizer = str(default_model_path())
    tokenizer = CheckpointTokenizer.from_dir(Path(args.tokenizer))
    pool = BackendPool(backends, interval_s=args.health_interval)
    keyer = PrefixKeyer(tokenizer, args.block_size, args.prefix_blocks)

    def router(members: set[str] | None = None) -> Router:
        return Router(args.policy, pool, keyer, args.load_factor, args.vnodes, args.balance_abs_threshold, members)

    disagg = None
    if any(b.role == "prefill" for b in backends):  # one policy per tier: each keeps its own prefix caches warm
        disagg = (router({b.url for b in backends if b.role == "prefill"}),
                  router({b.url for b in backends if b.role == "decode"}))
    settings = ProxySettings(read_timeout_s=args.read_timeout, max_attempts=args.max_attempts)
    return RouterState(router(), settings, args.api_key, args.protect_metrics, disagg)


async def _run(args: argparse.Namespace) -> int:
    state = build_state(args)
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"expertmesh router: {args.policy} over {len(state.pool.backends)} backend(s) on "
          f"http://{args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def router_main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (OSError, ValueError) as exc:
        print(f"expertmesh router: error: {exc}", file=sys.stderr)
        return 1
