"""An OpenAI-shaped backend that answers at once (one chunk, then usage and [DONE]): what is
left of TTFT through it is the HTTP path itself, so router vs direct shows the router's own cost.

    .venv/bin/python bench/router/instant_backend.py PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

_CHUNK = {"id": "x", "object": "text_completion", "created": 0, "model": "instant",
          "choices": [{"index": 0, "text": "a", "finish_reason": "length", "logprobs": None}]}
_USAGE = {**_CHUNK, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response({**_CHUNK, "usage": _USAGE["usage"]})
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for event in (_CHUNK, _USAGE):
        await out.write(f"data: {json.dumps(event)}\n\n".encode())
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "object": "list", "data": [{"id": "instant", "object": "model"}]})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", ok)
    app.router.add_get("/v1/models", ok)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
