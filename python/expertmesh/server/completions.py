"""Running a validated completion or chat request on the engine and shaping what comes back:
one JSON response, or server-sent events ending in [DONE].

A request is one or several prompts (a /v1/completions batch), each its own engine request
(`Generation`) with choices indexed prompt_index * n + i and usage summed, as OpenAI and vLLM
do. Once a stream's headers are sent an error can only travel as a data chunk, so every
failure inside a stream -- the engine's, the drain's, a bug -- becomes one error chunk followed
by [DONE]; the Generations' exits free what they held in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import Any

from aiohttp import web

from expertmesh.server.generation import Generation
from expertmesh.server.protocol import ChatChoice, ChatCompletion, ChatMessage, Completion, CompletionChoice, Usage
from expertmesh.server.validation import ErrorResponse

logger = logging.getLogger(__name__)


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


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def run(request: web.Request, state, req, prompts: list[list[int]], wires: list[dict[str, Any]],
              logprobs: int | None, chat: bool) -> web.StreamResponse:
    """Run one validated request: `prompts` (token ids) with their engine sampling fields."""
    kind, obj = (ChatCompletion, "chat.completion") if chat else (Completion, "text_completion")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    n, k = req.n, logprobs or 0
    total = n * len(prompts)
    gens: list[Generation] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for ids, wire in zip(prompts, wires):
                gens.append(await stack.enter_async_context(Generation(state.engine, state.admission, state.metrics,
                                                                       ids, wire, req.kv_transfer_params)))
            if req.stream:
                return await _stream(request, state, req, gens, kind, obj + (".chunk" if chat else ""), rid, created,
                                     k, chat)
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
            body = kind(rid, created, state.model_name, choices, usage, obj).to_dict()
            if gens[0].kv_transfer_params is not None:  # a prefill server's answer: where the decode side pulls from
                body["kv_transfer_params"] = gens[0].kv_transfer_params
            return web.json_response(body)
    finally:
        state.count_ended({g.error_code for g in gens})


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


async def _stream(request, state, req, gens: list[Generation], kind, obj: str, rid: str, created: int, k: int,
                  chat: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    want_lp = (req.engine_logprobs if chat else req.logprobs) is not None
    n = req.n
    offsets = [0] * (n * len(gens))

    def chunk(choices) -> bytes:
        data = kind(rid, created, state.model_name, choices, None, obj).to_dict()
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
                        choices.append(ChatChoice(i, delta={"content": text} if text else {},
                                                  finish_reason=s["finish_reason"],
                                                  logprobs=_chat_logprobs(entries, k) if want_lp else None))
                    else:
                        choices.append(CompletionChoice(i, text, s["finish_reason"],
                                                        _completion_logprobs(entries, k, offsets[i]) if want_lp
                                                        else None))
                    offsets[i] += len(text)
                if choices:
                    await response.write(chunk(choices))
        if req.include_usage:
            usage = Usage.of(sum(len(g.prompt_ids) for g in gens), sum(g.completion_tokens for g in gens))
            await response.write(_sse(kind(rid, created, state.model_name, [], usage, obj).to_dict()))
    except ErrorResponse as exc:
        # Headers are sent: the error travels as a data chunk, as OpenAI does it.
        state.metrics.error(exc.status, exc.code)
        await response.write(_sse(exc.body()))
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client is gone: nobody to tell; the Generations' exits abort the requests
    except Exception as exc:  # noqa: BLE001 - a bug must still end the stream cleanly
        logger.exception("stream failed")
        error = ErrorResponse(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        state.metrics.error(error.status, error.code)
        await response.write(_sse(error.body()))
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response
