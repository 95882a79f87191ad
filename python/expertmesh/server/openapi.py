"""The OpenAPI 3.1 document served at /openapi.json.

Request bodies are generated from the field declarations the validator reads
(request_fields.py), with this server's limits filled in (vocabulary, context, sequences per
request), so they cannot drift from what is accepted; tests/test_fuzz_server.py drives the
server with bodies generated from this document and with bodies just outside it. Response
schemas are written here to match protocol.py; tests validate real responses against them.
"""

from __future__ import annotations

from typing import Any

from expertmesh.limits import RequestLimits
from expertmesh.server import request_fields as rf

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
    (400, "invalid request: the body names the field, the limit and the value"), (401, "missing or wrong API key"),
    (404, "unknown model"), (413, "body over the size limit"), (429, "admission limit reached (see Retry-After)"),
    (503, "draining or engine down"))}
_SECURED = [{"bearer": []}]


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _generate(request: str, response: str, summary: str) -> dict[str, Any]:
    ok = _json(response, "the response, or with stream=true server-sent events of the same shape ending in [DONE]")
    # OpenAPI 3.1 reads an event stream's schema as one event's (3.2's itemSchema).
    ok["content"]["text/event-stream"] = {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": f"a JSON chunk of {response}'s shape, an Error body, or [DONE]"}}}}
    return {"post": {"summary": summary, "requestBody": _body(request), "security": _SECURED,
                     "responses": {"200": ok, **_ERRORS}}}


def request_schemas(limits: RequestLimits | None) -> dict[str, dict[str, Any]]:
    """The request bodies' schemas, from the declarations the validator reads."""
    return {
        "CompletionRequest": rf.body_schema(rf.COMPLETION_FIELDS, limits),
        "ChatCompletionRequest": {**rf.body_schema(rf.CHAT_FIELDS, limits), **rf.TOP_LOGPROBS_RULE},
        "TokenizeRequest": {**rf.body_schema(rf.TOKENIZE_FIELDS, limits), "anyOf": rf.TOKENIZE_ONE_OF},
        "DetokenizeRequest": rf.body_schema(rf.DETOKENIZE_FIELDS, limits),
    }


def document(limits: RequestLimits | None = None) -> dict[str, Any]:
    """The whole document; `limits` fills in this server's bounds (None: the core's)."""
    secured = {"security": _SECURED}
    return {
        "openapi": "3.1.0",
        "info": {"title": "expertmesh", "version": "1", "description": "OpenAI-compatible MoE inference server"},
        "paths": {
            "/v1/completions": _generate("CompletionRequest", "Completion", "text completion"),
            "/v1/chat/completions": _generate("ChatCompletionRequest", "ChatCompletion",
                                              "chat completion with the model's chat template"),
            "/v1/models": {"get": {**secured, "responses": {"200": _json("ModelList", "served models"),
                                                            "401": _ERRORS["401"]}}},
            "/health": {"get": {"responses": {"200": _json("Health", "ready"), "503": _json("Health", "not ready")}}},
            "/metrics": {"get": {"description": "open unless the server runs with --protect-metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": _ERRORS["401"]}}},
            "/tokenize": {"post": {**secured, "requestBody": _body("TokenizeRequest"),
                                   "responses": {"200": _json("Tokenized", "token ids"), **_ERRORS}}},
            "/detokenize": {"post": {**secured, "requestBody": _body("DetokenizeRequest"),
                                     "responses": {"200": _json("Detokenized", "text"), **_ERRORS}}},
        },
        "components": {"schemas": {**SCHEMAS, **request_schemas(limits)},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "required when the server runs with --api-key"}}},
    }
