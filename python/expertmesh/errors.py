"""The errors expertmesh raises for bad input, shared by the engine, the server and the SDK.

`InvalidRequestError` is what every validator raises: it names the offending field (`param`)
and keeps the value received, so the server can answer HTTP 400 with OpenAI's
`{"error": {"message", "type": "invalid_request_error", "param"}}` body without parsing
messages. It subclasses ValueError so plain Python callers can catch the usual type.
"""

from __future__ import annotations

from typing import Any


class ExpertMeshError(Exception):
    """Base class of every error expertmesh raises on purpose."""


class InvalidRequestError(ExpertMeshError, ValueError):
    """A request (or an engine option) is invalid; the message names the field, limit and value.

    `param` is the field's name as the user wrote it (e.g. "temperature", "stop[2]");
    `value` is what was received (kept as-is, for logs; never echo huge values back).
    """

    def __init__(self, message: str, *, param: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.value = value

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling (errors cross process boundaries to the frontend).
        return (_rebuild_invalid_request_error, (type(self), self.message, self.param, self.value))

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body's inner object."""
        return {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": None}


def _rebuild_invalid_request_error(
    cls: type[InvalidRequestError], message: str, param: str | None, value: Any
) -> InvalidRequestError:
    return cls(message, param=param, value=value)
