"""`expertmesh router`: one OpenAI-compatible front for several replicas.

Routes: POST /v1/completions and /v1/chat/completions (routed by the policy, streamed through;
with prefill and decode tiers, through both: disagg.py),
GET /v1/models (from a healthy backend), /health (200 while any backend is healthy) and
/metrics (the router's own). The router parses the body only to find its prompt; validating it
is each backend's job, so its answers, errors included, reach the client as they are.

Auth: with --api-key the client must send it (compared in constant time) on every route but
/health (and /metrics unless --protect-metrics); each backend gets its own key. The default
address is 127.0.0.1.
"""

from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web

from expertmesh.router.disagg import forward_disaggregated
from expertmesh.router.metrics import RouterMetrics
from expertmesh.router.policies import Router
from expertmesh.router.proxy import ProxySettings, error_body, forward
from expertmesh.server.validation import ErrorResponse

logger = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterState:
    def __init__(self, router: Router, settings: ProxySettings, api_key: str | None = None,
                 protect_metrics: bool = False, disagg: tuple[Router, Router] | None = None) -> None:
        """disagg: (prefill, decode) routers over the pool's two tiers (disagg.py), if any."""
        self.router, self.pool, self.settings = router, router.pool, settings
        self.metrics = RouterMetrics(self.pool)
        self.api_key, self.protect_metrics = api_key, protect_metrics
        self.disagg = disagg


STATE = web.AppKey("router", RouterState)


@web.middleware
async def _auth_and_errors(request: web.Request, handler):
    state = request.app[STATE]
    open_path = request.path == "/health" or (request.path == "/metrics" and not state.protect_metrics)
    if state.api_key is not None and not open_path:
        got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(got, f"Bearer {state.api_key}".encode()):
            return web.json_response(error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                "invalid_api_key"), status=401)
    try:
        return await handler(request)
    except ErrorResponse as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(error_body(exc.status, exc.reason or "error", None), status=exc.status)


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    payload = await request.read()
    try:  # only the prompt and `stream` are read here: checking the body is the backend's job
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ErrorResponse(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ErrorResponse(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if state.disagg is not None:
        prefill, decode = state.disagg
        return await forward_disaggregated(request, state.pool, state.metrics, state.settings, prefill, decode,
                                           request.path, body)
    order = state.router.order(request.path, body)
    if not order:
        state.metrics.outcome("none", "failed")
        return web.json_response(error_body(503, "no healthy backend", "no_backend"), status=503)
    return await forward(request, state.pool, state.metrics, state.settings, order, request.path, payload,
                         stream=body.get("stream") is True)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    assert state.pool.session is not None
    for url in sorted(state.pool.healthy()):
        backend = state.pool.backends[url]
        try:
            async with state.pool.session.get(url + "/v1/models", headers=backend.headers()) as resp:
                if resp.status == 200:
                    return web.json_response(json.loads(await resp.read()))
        except (OSError, ValueError) as exc:
            state.pool.mark_down(url, f"/v1/models failed: {exc}")
    return web.json_response(error_body(503, "no healthy backend", "no_backend"), status=503)


async def health(request: web.Request) -> web.Response:
    pool = request.app[STATE].pool
    healthy = sorted(pool.healthy())
    return web.json_response({"status": "ok" if healthy else "no_backend", "healthy": healthy,
                              "backends": len(pool.backends)}, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def build_app(state: RouterState, max_body_bytes: int = 8 << 20) -> web.Application:
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def start(_app: web.Application) -> None:
        await state.pool.start()

    async def stop(_app: web.Application) -> None:
        await state.pool.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
