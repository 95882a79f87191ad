"""Turning bad input into OpenAI-style errors: `APIError` (status + error body) and the field
checks the request parsers use. Every message names the field, the limit and the value."""

from __future__ import annotations

import json
import math
from typing import Any

from expertmesh.errors import InvalidRequestError

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


class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_invalid(cls, exc: InvalidRequestError) -> "APIError":
        return cls(400, exc.message, param=exc.param, code="invalid_value")

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _short(value: Any, limit: int = 80) -> str:
    # Never echo a huge value back (a 1 MB prompt in an error message helps nobody).
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def invalid(param: str, message: str, value: Any = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, value=value)


def get_str(body: dict[str, Any], name: str, *, required: bool = False, default: str | None = None) -> str | None:
    value = body.get(name, default)
    if value is None:
        if required:
            raise invalid(name, f"{name} is required")
        return None
    if not isinstance(value, str):
        raise invalid(name, f"{name} must be a string, got {type(value).__name__} {_short(value)}", value)
    return value


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {type(value).__name__} {_short(value)}", value)
    return value


def get_int(body: dict[str, Any], name: str, default: int | None, *, lo: int | None = None,
            hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)  # 16.0 is 16 (some clients serialise ints as floats)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"{name} must be an integer, got {type(value).__name__} {_short(value)}", value)
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise invalid(name, f"{name} must be in {bounds}, got {value}", value)
    return value


def get_number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"{name} must be a number, got {type(value).__name__} {_short(value)}", value)
    if not math.isfinite(value):
        raise invalid(name, f"{name} must be a finite number, got {value}", value)
    return float(value)


def check_token_ids(ids: list[Any], vocab_size: int, param: str = "prompt") -> list[int]:
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise invalid(f"{param}[{i}]", f"{param}[{i}] must be a token id in [0, {vocab_size}), got {_short(token)}", token)
    return ids


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The max_tokens to use; 400 when the prompt plus max_tokens does not fit the context."""
    if prompt_len == 0:
        raise invalid("prompt", "prompt must contain at least one token", 0)
    room = max_model_len - prompt_len
    if room < 1:
        raise invalid("prompt", f"prompt is {prompt_len} tokens, but the context (max_model_len) is "
                                f"{max_model_len} and must leave room for one generated token", prompt_len)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise invalid("max_tokens", f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                                    f"context of {max_model_len} tokens (at most {room} can be generated)", max_tokens)
    return max_tokens
