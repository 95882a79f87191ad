"""The HTTP frontend (aiohttp): OpenAI-compatible routes, auth, drain and error bodies.

Handlers validate and tokenize here, then hand token ids to the engine process through
EngineClient and turn its per-step items into OpenAI responses or server-sent events. The
event loop never runs model code, so /health and /metrics answer while the engine computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from expertmesh.errors import InvalidRequestError
from expertmesh.server import openapi
from expertmesh.server.engine_client import EngineClient
from expertmesh.server.generation import Admission, AdmissionLimits, Generation
from expertmesh.server.metrics import CONTENT_TYPE, ServerMetrics
from expertmesh.server.protocol import (ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, Completion,
                                        CompletionChoice, CompletionRequest, ModelCard, Usage)
from expertmesh.server.validation import APIError, check_context, check_token_ids, parse_json_object
from expertmesh.tokenizer import CheckpointTokenizer

_OPEN_PATHS = {"/health", "/metrics", "/openapi.json"}  # no API key needed (probes, scrapers)


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: CheckpointTokenizer
    model_name: str
    api_key: str | None = None
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    draining: bool = False
    in_flight: int = 0
    metrics: ServerMetrics = field(init=False)
    admission: Admission = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine.stats)
        self.admission = Admission(self.limits)


STATE = web.AppKey("state", ServerState)


def _error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
    state = request.app[STATE]
    try:
        if state.api_key is not None and request.path not in _OPEN_PATHS:
            if request.headers.get("Authorization", "") != f"Bearer {state.api_key}":
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return await handler(request)
    except APIError as exc:
        return _error_response(exc)
    except InvalidRequestError as exc:
        return _error_response(APIError.from_invalid(exc))
    except web.HTTPRequestEntityTooLarge:
        size = request.headers.get("Content-Length", "more than the limit")
        return _error_response(APIError(413, f"request body is {size} bytes, over the limit of "
                                             f"{request.client_max_size} bytes", param="body", code="body_too_large"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(APIError(exc.status, exc.reason or "error", code=None))


async def _json_body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await request.read())


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _check_serving(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "server is shutting down", code="shutting_down")
    if not state.engine.alive:
        raise APIError(503, f"engine is not running: {state.engine.dead_reason}", code="engine_dead")


# ---- logprobs in the two OpenAI shapes ------------------------------------------------------


def _lp(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI uses -9999


def _completion_logprobs(entries: list[list[list[Any]]], k: int, offset: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        _, lp, _, text = entry[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(lp))
        out["top_logprobs"].append({t: _lp(v) for _, v, rank, t in entry if rank is not None and rank <= k})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_logprobs(entries: list[list[list[Any]]], k: int) -> dict[str, Any]:
    content = []
    for entry in entries:
        _, lp, _, text = entry[0]
        top = [{"token": t, "logprob": _lp(v), "bytes": list(t.encode())} for _, v, rank, t in entry
               if rank is not None and rank <= k]
        content.append({"token": text, "logprob": _lp(lp), "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


# ---- generation routes ------------------------------------------------------------------------


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _run(request: web.Request, req, prompts: list[list[int]], logprobs: int | None,
               chat: bool) -> web.StreamResponse:
    """Run one request: one prompt, or (completions) a batch, each prompt its own engine request
    with choices indexed prompt_index * n + i and usage summed, as OpenAI and vLLM do."""
    state = request.app[STATE]
    max_model_len = int(state.engine.info["max_model_len"])
    wires = []
    for p, ids in enumerate(prompts):
        try:
            max_tokens = check_context(len(ids), req.max_tokens, max_model_len)
        except InvalidRequestError as exc:
            if len(prompts) > 1 and exc.param == "prompt":
                exc.param, exc.message = f"prompt[{p}]", f"prompt[{p}]: {exc.message}"
            raise
        params = req.sampling_params(max_tokens, logprobs)
        wires.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in params.__dict__.items()})
    state.admission.check_admissible([len(ids) for ids in prompts], req.n)
    kind, obj = (ChatCompletion, "chat.completion") if chat else (Completion, "text_completion")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    n, k = req.n, logprobs or 0
    total = n * len(prompts)
    state.in_flight += 1
    try:
        async with contextlib.AsyncExitStack() as stack:
            gens = [await stack.enter_async_context(Generation(state.engine, state.admission, state.metrics, ids, wire))
                    for ids, wire in zip(prompts, wires)]
            if req.stream:
                return await _stream(request, req, gens, kind, obj + (".chunk" if chat else ""), rid, created, k, chat)
            texts, reasons = [""] * total, [None] * total
            lps: list[list[Any]] = [[] for _ in range(total)]
            async with contextlib.aclosing(_merge(gens)) as merged:
                async for p, item in merged:
                    for s in item["seqs"]:
                        i = p * n + s["index"]
                        texts[i] += s["text"]
                        lps[i] += s.get("logprobs") or []
                        reasons[i] = s["finish_reason"] or reasons[i]
            usage = Usage.of(sum(len(ids) for ids in prompts), sum(g.completion_tokens for g in gens))
            if chat:
                choices = [ChatChoice(i, ChatMessage("assistant", texts[i]), finish_reason=reasons[i],
                                      logprobs=_chat_logprobs(lps[i], k) if logprobs is not None else None)
                           for i in range(total)]
            else:
                choices = [CompletionChoice(i, texts[i], reasons[i],
                                            _completion_logprobs(lps[i], k, 0) if logprobs is not None else None)
                           for i in range(total)]
            return web.json_response(kind(rid, created, state.model_name, choices, usage, obj).to_dict())
    finally:
        state.in_flight -= 1


async def _merge(gens: list[Generation]):
    """(prompt index, item) from several generations as they arrive; one generation is read
    directly. An error in any of them is raised here; the rest are left to the exit stack."""
    if len(gens) == 1:
        async for item in gens[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(p: int, gen: Generation) -> None:
        try:
            async for item in gen:
                await queue.put((p, item))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            await queue.put((p, exc))
            return
        await queue.put((p, done))

    tasks = [asyncio.create_task(pump(p, g)) for p, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            p, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream(request, req, gens: list[Generation], kind, obj: str, rid: str, created: int, k: int, chat: bool):
    state = request.app[STATE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    want_lp = (req.engine_logprobs if chat else req.logprobs) is not None
    n = req.n
    offsets = [0] * (n * len(gens))

    def chunk(choices) -> bytes:
        usage = None
        data = kind(rid, created, state.model_name, choices, usage, obj).to_dict()
        if not req.include_usage:
            data.pop("usage")
        return _sse(data)

    try:
        if chat:  # OpenAI opens each choice with the assistant role
            await response.write(chunk([ChatChoice(i, delta={"role": "assistant", "content": ""}) for i in range(n)]))
        async with contextlib.aclosing(_merge(gens)) as merged:
            async for p, item in merged:
                choices = []
                for s in item["seqs"]:
                    i, text, entries = p * n + s["index"], s["text"], s.get("logprobs") or []
                    if not text and not s["finish_reason"] and not entries:
                        continue  # nothing to show yet (held-back text)
                    if chat:
                        choices.append(ChatChoice(i, delta={"content": text} if text else {}, finish_reason=s["finish_reason"],
                                                  logprobs=_chat_logprobs(entries, k) if want_lp else None))
                    else:
                        choices.append(CompletionChoice(i, text, s["finish_reason"],
                                                        _completion_logprobs(entries, k, offsets[i]) if want_lp else None))
                    offsets[i] += len(text)
                if choices:
                    await response.write(chunk(choices))
        if req.include_usage:
            usage = Usage.of(sum(len(g.prompt_ids) for g in gens), sum(g.completion_tokens for g in gens))
            await response.write(_sse(kind(rid, created, state.model_name, [], usage, obj).to_dict()))
    except APIError as exc:
        # Headers are sent: the error travels as a data chunk, as OpenAI does it.
        await response.write(_sse(exc.body()))
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_serving(state)
    req = CompletionRequest.from_body(await _json_body(request))
    _check_model(state, req.model)
    vocab = int(state.engine.info["vocab_size"])
    prompts = req.prompts
    param = (lambda p: "prompt") if len(prompts) == 1 else (lambda p: f"prompt[{p}]")
    ids = [state.tokenizer.encode(prompt) if isinstance(prompt, str) else check_token_ids(prompt, vocab, param(p))
           for p, prompt in enumerate(prompts)]
    return await _run(request, req, ids, req.logprobs, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _check_serving(state)
    req = ChatCompletionRequest.from_body(await _json_body(request))
    _check_model(state, req.model)
    prompt = state.tokenizer.apply_chat_template(req.messages)
    return await _run(request, req, [state.tokenizer.encode(prompt)], req.engine_logprobs, chat=True)


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
    return web.json_response(openapi.document())


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    _check_model(state, body.get("model"))
    if "messages" in body:
        text = state.tokenizer.apply_chat_template(ChatCompletionRequest.from_body(body).messages)
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt", value=None)
    ids = state.tokenizer.encode(text)
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": state.engine.info.get("max_model_len")})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    _check_model(state, body.get("model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise InvalidRequestError("tokens must be a list of token ids", param="tokens", value=None)
    check_token_ids(tokens, int(state.engine.info["vocab_size"]), "tokens")
    return web.json_response({"prompt": state.tokenizer.decode(tokens)})


def build_app(state: ServerState, max_body_bytes: int = 8 << 20) -> web.Application:
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app
