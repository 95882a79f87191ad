"""Exceptions the SDK raises, one per HTTP status family, built from the server's OpenAI error
body ({"error": {"message", "type", "param", "code"}}). They are the client's view of the
server's `expertmesh.server.validation.ErrorResponse`, and part of the one hierarchy under
`expertmesh.errors.ExpertMeshError`."""

from __future__ import annotations

from typing import Any

from expertmesh.errors import ExpertMeshError


class APIError(ExpertMeshError):
    """An error answer from the server (or an error chunk inside a stream)."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None,
                 code: str | None = None, type: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.type = message, param, code, type
        self.retry_after = retry_after
        if status is not None:
            self.status = status


class BadRequestError(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401


class NotFoundError(APIError):
    status = 404


class RequestTooLargeError(APIError):
    status = 413


class RateLimitError(APIError):
    """429: the server's admission limits are reached; `retry_after` says when to come back."""

    status = 429


class ServiceUnavailableError(APIError):
    """503: the server is draining or its engine is down."""

    status = 503


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""


_BY_STATUS = {cls.status: cls for cls in (BadRequestError, AuthenticationError, NotFoundError, RequestTooLargeError,
                                          RateLimitError, ServiceUnavailableError)}
RETRYABLE = {429, 503}


def from_response(status: int, body: Any, retry_after: str | None = None) -> APIError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": f"HTTP {status}: {str(body)[:200]}"}
    cls = _BY_STATUS.get(status, APIError)
    try:
        after = float(retry_after) if retry_after is not None else None
    except ValueError:
        after = None
    return cls(str(error.get("message")), status=status, param=error.get("param"), code=error.get("code"),
               type=error.get("type"), retry_after=after)
