"""`expertmesh serve`: start the engine process, serve HTTP, drain on SIGTERM.

Drain: on SIGTERM (or SIGINT) new requests get 503 and /health turns 503 while requests in
flight run to the end; after --drain-timeout seconds the rest are cancelled (their streams end,
their engine requests are aborted). Then the engine process is asked to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import time

from aiohttp import web

from expertmesh.config import EngineConfig
from expertmesh.server.app import ServerState, build_app
from expertmesh.server.engine_client import EngineClient
from expertmesh.server.generation import AdmissionLimits
from expertmesh.tokenizer import CheckpointTokenizer


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on API routes (default: $EXPERTMESH_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    g.add_argument("--max-waiting-requests", type=int, default=512, help="past this, 429 with Retry-After")
    g.add_argument("--max-waiting-tokens", type=int, default=1 << 20, help="waiting prompt tokens; past this, 429")
    g.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")


async def _serve(args: argparse.Namespace, config: EngineConfig) -> int:
    engine = EngineClient()
    engine_config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    engine_config["show_progress"] = False
    await engine.start(engine_config)
    from expertmesh import default_model

    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else default_model.NAME)
    limits = AdmissionLimits(args.max_waiting_requests, args.max_waiting_tokens)
    state = ServerState(engine, CheckpointTokenizer.from_dir(config.model_path), name, args.api_key, limits)
    app = build_app(state, args.max_body_bytes)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"expertmesh: serving {name!r} on http://{args.host}:{args.port} (engine pid {engine.process.pid})",
          flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    state.draining = True
    deadline = time.monotonic() + args.drain_timeout
    print(f"expertmesh: draining {state.in_flight} request(s), up to {args.drain_timeout:.0f} s", flush=True)
    while state.in_flight and time.monotonic() < deadline and engine.alive:
        await asyncio.sleep(0.05)
    left = state.in_flight
    await runner.cleanup()  # cancels what is left: each cancelled handler aborts its request
    await engine.close()
    print(f"expertmesh: stopped ({left} request(s) cut off by the drain timeout)", flush=True)
    return 0


def serve_main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    config = EngineConfig(model=args.model, **engine_kwargs)  # validates; makes the built-in model if needed
    try:
        return asyncio.run(_serve(args, config))
    except RuntimeError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 1
