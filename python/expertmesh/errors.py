"""The one exception hierarchy of expertmesh; every error it raises on purpose is an
`ExpertMeshError`.

    ExpertMeshError
    ├── InvalidRequestError   bad input (a ValueError): names the field, the limit and the value
    ├── CoreError             the Rust core refused a call (a ValueError; raised from rust/src/py/)
    ├── CollectiveError       a collective failed: a peer rank died or ranks left lockstep
    └── EngineDeadError       the engine (process) is gone; requests in flight cannot finish

The HTTP server answers with `expertmesh.server.validation.ErrorResponse` (an exception that
carries a status and OpenAI's error body) and the SDK raises `expertmesh.sdk.errors.APIError`
subclasses; both derive from ExpertMeshError and are named so they cannot be mistaken for each
other. Edge validation (expertmesh/limits.py) knows the core's limits, so a CoreError reaching a
user means a check is missing there.
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


class CoreError(ExpertMeshError, ValueError):
    """The Rust core (`expertmesh._core`) refused a call: an argument out of its range (the
    message names the limit and the value) or a call out of order (an engine bug)."""


class CollectiveError(ExpertMeshError, RuntimeError):
    """A collective failed or timed out: a peer rank died or the ranks fell out of lockstep."""


class EngineDeadError(ExpertMeshError, RuntimeError):
    """The engine is gone (its process died, stopped answering, or was shut down); requests in
    flight cannot finish."""


def _rebuild_invalid_request_error(
    cls: type[InvalidRequestError], message: str, param: str | None, value: Any
) -> InvalidRequestError:
    return cls(message, param=param, value=value)
