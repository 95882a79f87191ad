"""The OpenAPI 3.1 document served at /openapi.json, written by hand to match protocol.py.
tests/test_server_api.py validates real responses against these schemas, so they cannot drift."""

from __future__ import annotations

from typing import Any

_NULLABLE_STR = {"type": ["string", "null"]}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "abort", "error", None]}
_LOGPROBS_OBJ = {"type": ["object", "null"]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": _NULLABLE_STR, "code": _NULLABLE_STR}}},
    },
    "Usage": _USAGE,
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "finish_reason"],
                                                   "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                                                  "finish_reason": _FINISH, "logprobs": _LOGPROBS_OBJ}}},
            "usage": {"oneOf": [_USAGE, {"type": "null"}]},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion", "chat.completion.chunk"]},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"], "properties": {
                "index": {"type": "integer"}, "finish_reason": _FINISH, "logprobs": _LOGPROBS_OBJ,
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"type": "string"}, "content": _NULLABLE_STR}},
                "delta": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}}},
            "usage": {"oneOf": [_USAGE, {"type": "null"}]},
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}}}}},
    },
    "Tokenized": {"type": "object", "required": ["tokens", "count"],
                  "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"}}},
    "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_ERRORS = {str(code): _json("Error", text) for code, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body over the size limit"), (429, "admission limit reached (see Retry-After)"),
    (503, "draining or engine down"))}


def _generate(name: str, summary: str) -> dict[str, Any]:
    ok = _json(name, "the response, or with stream=true server-sent events of the same shape ending in [DONE]")
    ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object"}}}}, "responses": {"200": ok, **_ERRORS}}}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "expertmesh", "version": "1", "description": "OpenAI-compatible MoE inference server"},
        "paths": {
            "/v1/completions": _generate("Completion", "text completion"),
            "/v1/chat/completions": _generate("ChatCompletion", "chat completion with the model's chat template"),
            "/v1/models": {"get": {"responses": {"200": _json("ModelList", "served models")}}},
            "/health": {"get": {"responses": {"200": _json("Health", "ready"), "503": _json("Health", "not ready")}}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/tokenize": {"post": {"responses": {"200": _json("Tokenized", "token ids"), **_ERRORS}}},
            "/detokenize": {"post": {"responses": {"200": _json("Detokenized", "text"), **_ERRORS}}},
        },
        "components": {"schemas": SCHEMAS},
    }
