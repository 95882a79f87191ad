"""`expertmesh serve`: start the engine process, serve HTTP, drain on SIGTERM, exit when the
engine dies.

Drain: on SIGTERM (or SIGINT) new requests get 503 and /health turns 503 while requests in
flight run to the end; after --drain-timeout seconds the rest are cut off (each gets a 503
error, in its stream if it has one, and its engine request is aborted), then the engine is
asked to exit. The whole shutdown takes about --drain-timeout plus a second or two, and the
log says how many requests ran to the end and how many were cut off.

Engine death (its process exits, it stops answering for --engine-timeout while requests wait,
or it sends a frame the link cannot use): every request in flight gets an error at once, and
the server exits with status 3 (EXIT_ENGINE_DIED) so that its supervisor -- systemd,
Kubernetes, a shell loop -- restarts it. We do not restart the engine in-process: a crash that
repeats would loop silently, and the supervisor owns backoff and alerting (vLLM's API server
exits the same way).
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

EXIT_ENGINE_DIED = 3
_HANDLER_GRACE_S = 2.0  # for cut-off or failed handlers to write their last chunk


async def _wait_handlers(state: ServerState, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while state.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def _serve(args: argparse.Namespace, config: EngineConfig) -> int:
    engine = EngineClient(engine_timeout_s=args.engine_timeout)
    engine_config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    engine_config["show_progress"] = False
    kv_transfer = {"role": args.role, "host": args.kv_transfer_host, "port": args.kv_transfer_port,
                   "pin_timeout_s": args.kv_pin_timeout, "timeout_s": args.kv_transfer_timeout}
    await engine.start(engine_config, kv_transfer=kv_transfer)
    from expertmesh import default_model

    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else default_model.NAME)
    state = ServerState(engine, CheckpointTokenizer.from_dir(config.model_path), name, args.api_key,
                        AdmissionLimits(args.max_waiting_seqs, args.max_waiting_tokens), args.max_num_seqs_per_request,
                        args.protect_metrics)
    app = build_app(state, args.max_body_bytes)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    # A short shutdown_timeout: the drain below already waited for the handlers.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=_HANDLER_GRACE_S)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"expertmesh: serving {name!r} on http://{args.host}:{args.port} (engine pid {engine.process.pid})",
          flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(engine.dead.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    state.draining = True

    if stop.is_set() and engine.alive:
        draining = state.in_flight
        print(f"expertmesh: draining {draining} request(s), up to {args.drain_timeout:g} s", flush=True)
        deadline = time.monotonic() + args.drain_timeout
        while state.in_flight and time.monotonic() < deadline and engine.alive:
            await asyncio.sleep(0.05)
        if state.in_flight and engine.alive:
            await engine.cut_off(f"the shutdown drain timeout ({args.drain_timeout:g} s) ran out")
    await _wait_handlers(state, _HANDLER_GRACE_S)
    await runner.cleanup()
    died = engine.dead.is_set()
    await engine.close()
    if died:
        print(f"expertmesh: exiting with status {EXIT_ENGINE_DIED} after the engine died ({engine.dead_reason}); "
              f"{state.failed_by_engine} request(s) in flight got an error", file=sys.stderr, flush=True)
        return EXIT_ENGINE_DIED
    print(f"expertmesh: stopped: {draining - state.cut_off_requests} request(s) ended during the drain, "
          f"{state.cut_off_requests} cut off by the drain timeout", flush=True)
    return 0


def serve_main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    config = EngineConfig(model=args.model, **engine_kwargs)  # validates; makes the built-in model if needed
    if args.role != "both" and config.parallel.world_size > 1:
        print(f"expertmesh: error: --role {args.role} runs on one rank for now; got tensor_parallel_size="
              f"{config.tensor_parallel_size} x context_parallel_size={config.context_parallel_size} x "
              f"data_parallel_size={config.data_parallel_size}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args, config))
    except RuntimeError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 1
