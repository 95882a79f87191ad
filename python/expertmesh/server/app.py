"""The HTTP frontend (aiohttp): OpenAI-compatible routes, auth, drain and error bodies.

Handlers validate and tokenize here -- into request types whose every field was read through
its declaration (request_fields.py), checked against the engine's limits (vocabulary, context,
sequences per request) -- then hand token ids to the engine process (completions.py). The
event loop never runs model code, so /health and /metrics answer while the engine computes.

One error boundary: whatever a handler raises ends that request with an OpenAI-style JSON error
(4xx for the client's mistakes, 5xx for ours, logged), never a plain-text page or a dead
process; what the request held is released by the Generations' exits.

Open routes: /health and /openapi.json never need the API key (probes, fuzzers); /metrics
needs it only with --protect-metrics. The key is compared in constant time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from expertmesh.errors import InvalidRequestError
from expertmesh.limits import DEFAULT_MAX_SEQS_PER_REQUEST, RequestLimits
from expertmesh.server import completions, openapi
from expertmesh.server import request_fields as rf
from expertmesh.server.engine_client import EngineClient
from expertmesh.server.generation import Admission, AdmissionLimits
from expertmesh.server.metrics import CONTENT_TYPE, ServerMetrics
from expertmesh.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard
from expertmesh.server.validation import ErrorResponse, parse_json_object
from expertmesh.tokenizer import CheckpointTokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: CheckpointTokenizer
    model_name: str
    api_key: str | None = None
    admission_limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST
    protect_metrics: bool = False
    draining: bool = False
    in_flight: int = 0  # generation handlers running
    cut_off_requests: int = 0  # requests the drain timeout ended
    failed_by_engine: int = 0  # requests in flight when the engine died
    metrics: ServerMetrics = field(init=False)
    admission: Admission = field(init=False)
    limits: RequestLimits = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.admission = Admission(self.admission_limits)
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine.stats, self.admission)
        info = self.engine.info
        self.limits = RequestLimits(int(info["vocab_size"]), int(info["max_model_len"]), self.max_seqs_per_request)

    @property
    def role(self) -> str:
        """Its part in disaggregated serving, as the engine reported it: both, prefill or decode."""
        return self.engine.info.get("kv_transfer", {}).get("role", "both")

    def count_ended(self, error_codes: set[str | None]) -> None:
        """A request's engine parts ended with these error codes (None: no error)."""
        self.cut_off_requests += "shutting_down" in error_codes
        self.failed_by_engine += "engine_dead" in error_codes

    def needs_key(self, path: str) -> bool:
        if self.api_key is None or path in ("/health", "/openapi.json"):
            return False
        return path != "/metrics" or self.protect_metrics


STATE = web.AppKey("state", ServerState)


def _authorized(request: web.Request, key: str) -> bool:
    got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(got, f"Bearer {key}".encode())  # constant time: no key-guessing by timing


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
    state = request.app[STATE]
    try:
        if state.needs_key(request.path) and not _authorized(request, state.api_key or ""):
            raise ErrorResponse(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        return await handler(request)
    except ErrorResponse as exc:
        error = exc
    except InvalidRequestError as exc:
        error = ErrorResponse.from_invalid(exc)
    except web.HTTPRequestEntityTooLarge:
        size = request.headers.get("Content-Length", "more than the limit")
        error = ErrorResponse(413, f"request body is {size} bytes, over the limit of {request.client_max_size} bytes",
                              param="body", code="body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 names the methods
        error = ErrorResponse(exc.status, exc.reason or "error", code=None, headers=allow)
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away: nobody to answer
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug ends this request, not the server
        logger.exception("%s %s failed", request.method, request.path)
        error = ErrorResponse(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", code="internal_error")
    state.metrics.error(error.status, error.code)
    return web.json_response(error.body(), status=error.status, headers=error.headers)


async def _json_body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await request.read())


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ErrorResponse(404, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                            param="model", code="model_not_found")


def _check_serving(state: ServerState) -> None:
    if state.draining:
        raise ErrorResponse(503, "server is shutting down", code="shutting_down")
    if not state.engine.alive:
        raise ErrorResponse(503, f"engine is not running: {state.engine.dead_reason}", code="engine_dead")


def _wire(params) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}


async def _generate(request: web.Request, req, prompts: list[list[int]], logprobs: int | None,
                    chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    wires = []
    for p, ids in enumerate(prompts):
        max_tokens = state.limits.check_context(len(ids), req.max_tokens, "prompt" if len(prompts) == 1 else
                                                f"prompt[{p}]")
        wires.append(_wire(req.sampling_params(max_tokens, logprobs)))
    state.admission.check_admissible([len(ids) for ids in prompts], req.n)
    if req.kv_transfer_params is not None:
        _check_kv_transfer(state, req, len(prompts))
    state.in_flight += 1
    try:
        return await completions.run(request, state, req, prompts, wires, logprobs, chat)
    finally:
        state.in_flight -= 1


def _check_kv_transfer(state: ServerState, req, num_prompts: int) -> None:
    prefill = bool(req.kv_transfer_params.get("do_remote_decode"))
    flag, role = ("do_remote_decode", "prefill") if prefill else ("do_remote_prefill", "decode")
    if state.role != role:
        raise ErrorResponse(400, f"kv_transfer_params.{flag} needs a server started with --role {role}; this one "
                                 f"runs --role {state.role}", param="kv_transfer_params", code="invalid_value")
    if num_prompts != 1:
        raise ErrorResponse(400, f"kv_transfer_params takes one prompt, got a batch of {num_prompts}",
                            param="prompt", code="invalid_value")
    if prefill and req.stream:
        raise ErrorResponse(400, "kv_transfer_params.do_remote_decode needs stream false: the answer carries the "
                                 "params the decode server pulls with", param="stream", code="invalid_value")


async def completions_route(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_serving(state)
    req = CompletionRequest.from_body(await _json_body(request), state.limits)
    _check_model(state, req.model)
    ids = [state.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
    return await _generate(request, req, ids, req.logprobs, chat=False)


async def chat_completions_route(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_serving(state)
    req = ChatCompletionRequest.from_body(await _json_body(request), state.limits)
    _check_model(state, req.model)
    prompt = state.tokenizer.apply_chat_template(req.messages)
    return await _generate(request, req, [state.tokenizer.encode(prompt)], req.engine_logprobs, chat=True)


# ---- everything else ---------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = ModelCard(state.model_name, state.created, max_model_len=state.engine.info.get("max_model_len"))
    return web.json_response({"object": "list", "data": [card.__dict__]})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.engine.alive:
        return web.json_response({"status": "engine_dead", "reason": state.engine.dead_reason}, status=503)
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[STATE].limits))


def _read(body: dict[str, Any], fields: tuple, path: str, limits: RequestLimits) -> dict[str, Any]:
    rf.check_known(body, fields, path)
    return {f.name: f.read(body, limits) for f in fields}


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    values = _read(await _json_body(request), rf.TOKENIZE_FIELDS, "/tokenize", state.limits)
    _check_model(state, values["model"])
    if values["messages"] is not None:
        text = state.tokenizer.apply_chat_template(values["messages"])
    elif values["prompt"] is not None:
        text = values["prompt"]
    else:
        raise InvalidRequestError("prompt (a string) or messages is required", param="prompt", value=None)
    ids = state.tokenizer.encode(text)
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": state.limits.max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    values = _read(await _json_body(request), rf.DETOKENIZE_FIELDS, "/detokenize", state.limits)
    _check_model(state, values["model"])
    return web.json_response({"prompt": state.tokenizer.decode(values["tokens"])})


def build_app(state: ServerState, max_body_bytes: int = 8 << 20) -> web.Application:
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions_route)
    app.router.add_post("/v1/chat/completions", chat_completions_route)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app
