"""Disaggregated prefill and decode behind one OpenAI endpoint (`expertmesh router --prefill URL
--decode URL`).

A request goes first to a prefill server, as itself but with max_tokens 1, one sequence, no
stream and kv_transfer_params {"do_remote_decode": true}: it computes the prompt's KV and keeps
the blocks for a pull, and its answer names them. The request then goes, as the client sent it
plus those kv_transfer_params, to a decode server, which pulls the blocks its own prefix cache
lacks and generates; its answer -- a stream or not -- is what the client gets, passed through
as with any backend (proxy.py). The prefill server's token is not used: the decode server
computes the prompt's last token itself and samples every output token, so the client sees one
ordinary answer.

Failover: a prefill server that fails before answering is replaced by the next in the policy's
order; a prefill answer that is not a 200 (a 400 for a bad body, say) is the client's answer. The
decode leg fails over like any proxied request; a decode server that cannot pull the KV computes
the prompt itself, so a lost prefill server costs time, never the request.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from expertmesh.router.backends import BackendPool
from expertmesh.router.metrics import RouterMetrics
from expertmesh.router.policies import Router
from expertmesh.router.proxy import ProxySettings, error_body, forward


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """What the prefill server is asked: the prompt's KV and one token, kept for the decode side."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_completion_tokens", "n",
                                                       "best_of")}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    return out


async def forward_disaggregated(request: web.Request, pool: BackendPool, metrics: RouterMetrics,
                                settings: ProxySettings, prefill: Router, decode: Router, path: str,
                                body: dict[str, Any]) -> web.StreamResponse:
    order = prefill.order(path, body)
    if not order:
        metrics.outcome("none", "failed")
        return web.json_response(error_body(503, "no healthy prefill server", "no_backend"), status=503)
    # The prefill leg is an ordinary non-streaming request, failover included; its answer is
    # read whole, so a non-200 (the client's 400, or no server left) is the client's answer.
    answer = await forward(request, pool, metrics, settings, order, path, json.dumps(prefill_body(body)).encode(),
                           stream=False)
    if answer.status != 200 or not isinstance(answer, web.Response):
        return answer
    try:
        params = json.loads(answer.body)["kv_transfer_params"]
    except (ValueError, KeyError, TypeError):
        return web.json_response(error_body(502, "the prefill server's answer has no kv_transfer_params: is it "
                                                 "running with --role prefill?", "backend_failed"), status=502)
    decode_order = decode.order(path, body)
    if not decode_order:
        metrics.outcome("none", "failed")
        return web.json_response(error_body(503, "no healthy decode server", "no_backend"), status=503)
    payload = json.dumps({**body, "kv_transfer_params": params}).encode()
    return await forward(request, pool, metrics, settings, decode_order, path, payload,
                         stream=body.get("stream") is True)
