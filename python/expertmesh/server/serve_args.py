"""`expertmesh serve`'s options. Apart from serve.py so that building the command line (for any
subcommand: `expertmesh router` too) imports neither torch nor the engine."""

from __future__ import annotations

import argparse
import os

from expertmesh.limits import DEFAULT_MAX_SEQS_PER_REQUEST
from expertmesh.server.engine_client import DEFAULT_ENGINE_TIMEOUT_S

ROLES = ("both", "prefill", "decode")  # disaggregated serving (engine_kv.py)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /openapi.json "
                        "(and /metrics, unless --protect-metrics) (default: $EXPERTMESH_API_KEY)")
    g.add_argument("--protect-metrics", action="store_true", help="with --api-key, /metrics needs the key too")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    g.add_argument("--max-waiting-seqs", "--max-waiting-requests", dest="max_waiting_seqs", type=int, default=512,
                   help="sequences (prompts x n) waiting for their first token; past this, 429 with Retry-After")
    g.add_argument("--max-waiting-tokens", type=int, default=1 << 20,
                   help="waiting prompt tokens (x n); past this, 429")
    g.add_argument("--max-num-seqs-per-request", type=int, default=DEFAULT_MAX_SEQS_PER_REQUEST,
                   help="prompts x n one request may ask for; more is a 400")
    g.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    d = parser.add_argument_group("disaggregated serving (a router with --prefill and --decode in front)")
    d.add_argument("--role", choices=ROLES, default="both",
                   help="prefill: compute prompts and keep their KV for decode servers to pull; decode: pull a "
                        "prompt's KV from the prefill server that computed it, then generate; both: neither")
    d.add_argument("--disaggregation-mode", dest="role", choices=ROLES, default=argparse.SUPPRESS,
                   type=lambda v: "both" if v == "null" else v, help="SGLang's spelling of --role (null: both)")
    d.add_argument("--kv-transfer-host", default="127.0.0.1",
                   help="--role prefill: the address decode servers pull KV blocks from")
    d.add_argument("--kv-transfer-port", type=int, default=0, help="--role prefill: its port (0: any free one)")
    d.add_argument("--kv-pin-timeout", type=float, default=60.0,
                   help="--role prefill: seconds a finished prompt's KV waits for its pull before it is let go")
    d.add_argument("--kv-transfer-timeout", type=float, default=30.0,
                   help="--role decode: seconds a pull may stay silent before the request computes its prompt")
    g.add_argument("--engine-timeout", type=float, default=DEFAULT_ENGINE_TIMEOUT_S,
                   help="seconds a busy engine may stay silent (it reports after every step) before it is "
                        "declared dead")
