"""What the server answers when it cannot serve a request: `ErrorResponse` (an HTTP status plus
OpenAI's error body), and the parsing of a request body into a JSON object that every later
step can handle (valid UTF-8 throughout, bounded nesting). Field checks live in
expertmesh/fields.py and request_fields.py; every message names the field, the limit and the
value."""

from __future__ import annotations

import json
from typing import Any

from expertmesh.errors import ExpertMeshError, InvalidRequestError

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
MAX_JSON_DEPTH = 64  # request bodies nest 4 deep; deeper is an attack or a bug, not a request


class ErrorResponse(ExpertMeshError):
    """An error the server answers with: a status and {"error": {"message", "type", "param",
    "code"}}. (The SDK's client-side counterpart is expertmesh.sdk.errors.APIError.)"""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_invalid(cls, exc: InvalidRequestError) -> ErrorResponse:
        return cls(400, exc.message, param=exc.param, code="invalid_value")

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def check_json_value(body: Any) -> None:
    """400 unless every string (keys too) is valid Unicode -- JSON's \\ud800 escapes can carry
    lone surrogates, which no tokenizer, encoder or socket frame accepts -- and nesting is
    bounded. Iterative, so a deep body cannot exhaust the stack."""
    stack: list[tuple[str, Any, int]] = [("", body, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ErrorResponse(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels (at {path[:200]})",
                                code="invalid_json")
        if isinstance(value, str):
            _check_text(value, path, f"{path or 'body'} must be valid Unicode text")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, None, f"every key of {path or 'the body'} must be valid Unicode text")
                stack.append((_path(path, key), item, depth + 1))
        elif isinstance(value, list):
            stack.extend((_path(path, i), item, depth + 1) for i, item in enumerate(value))


def _check_text(text: str, param: str | None, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ErrorResponse(400, f"{what}: it holds a lone surrogate {text[exc.start]!r} at character {exc.start}",
                            param=param or None, code="invalid_value") from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also ints over 4,300 digits
        raise ErrorResponse(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ErrorResponse(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    check_json_value(body)
    return body
