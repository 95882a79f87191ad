"""Request fields, each declared once: a `Field` checks a value and describes itself as JSON Schema.

SamplingParams checks its arguments with these, the HTTP validator (server/protocol.py) reads
request bodies with them, and the OpenAPI document (server/openapi.py) is built from the same
objects, so what the document promises and what the server accepts cannot drift (a test drives
the server with bodies generated from the document, and with bodies just outside it).

A bound may depend on the model or the server (the vocabulary, the context): it is then a
function of `RequestLimits`, resolved when a value is checked or the document is built; with
no limits known (SamplingParams on its own) it falls back to the core's limits. JSON `null`
means "absent" everywhere, so every field's schema admits it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertmesh._core import MAX_TOKEN_ID
from expertmesh.errors import InvalidRequestError
from expertmesh.limits import RequestLimits

Bound = int | float | Callable[[RequestLimits | None], int] | None


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut short: never echo a huge value back in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve(bound: Bound, limits: RequestLimits | None) -> int | float | None:
    return bound(limits) if callable(bound) else bound


def max_token_id(limits: RequestLimits | None) -> int:
    """The vocabulary's last id, or the core's limit when the model is not known yet."""
    return MAX_TOKEN_ID if limits is None else limits.max_token_id


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


@dataclass(frozen=True)
class Field:
    """One request field: its name, what it means and the value used when it is absent."""

    name: str
    doc: str
    default: Any = None
    required: bool = False  # absent or null is an error, not the default

    def check(self, value: Any, limits: RequestLimits | None = None, *, param: str | None = None,
              from_json: bool = False) -> Any:
        """The value, normalised; InvalidRequestError naming `param` (default: the name)."""
        raise NotImplementedError

    def value_schema(self, limits: RequestLimits | None) -> dict[str, Any]:
        """JSON Schema of a present (non-null) value."""
        raise NotImplementedError

    def schema(self, limits: RequestLimits | None) -> dict[str, Any]:
        out = self.value_schema(limits)
        if not self.required:
            out = _nullable(out)
        out["description"] = self.doc
        if self.default is not None:
            out["default"] = self.default
        return out

    def read(self, body: dict[str, Any], limits: RequestLimits | None = None) -> Any:
        """The field from a parsed JSON body; absent or null gives the default."""
        value = body.get(self.name)
        if value is None and self.required:
            raise self.fail(None, f"{self.name} is required", None)
        return self.default if value is None else self.check(value, limits, from_json=True)

    def fail(self, param: str | None, message: str, value: Any) -> InvalidRequestError:
        return InvalidRequestError(message, param=param or self.name, value=value)


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


@dataclass(frozen=True)
class IntField(Field):
    """An integer in [lo, hi]; from JSON an integral float (16.0) counts, as JSON Schema says."""

    lo: Bound = None
    hi: Bound = None
    limit: str | None = None  # the range in words, when plainer than "in [lo, hi]"

    def check(self, value, limits=None, *, param=None, from_json=False):
        param = param or self.name
        if from_json and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(param, f"{param} must be an integer, got {type(value).__name__} {short(value)}", value)
        lo, hi = _resolve(self.lo, limits), _resolve(self.hi, limits)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(param, f"{param} must be {self.limit or _range_text(lo, hi)}, got {value}", value)
        return value

    def value_schema(self, limits):
        out: dict[str, Any] = {"type": "integer"}
        lo, hi = _resolve(self.lo, limits), _resolve(self.hi, limits)
        if lo is not None:
            out["minimum"] = lo
        if hi is not None:
            out["maximum"] = hi
        return out


@dataclass(frozen=True)
class NumberField(Field):
    """A finite number in a range whose ends may be open; becomes a float."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value, limits=None, *, param=None, from_json=False):
        param = param or self.name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(param, f"{param} must be a number, got {type(value).__name__} {short(value)}", value)
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(param, f"{param} must be a finite number, got {number}", number)
        lo, hi = self.lo, self.hi
        if (lo is not None and (number <= lo if self.lo_open else number < lo)) or \
                (hi is not None and (number >= hi if self.hi_open else number > hi)):
            raise self.fail(param, f"{param} must be {_range_text(lo, hi, self.lo_open, self.hi_open)}, got {number}",
                            number)
        return number

    def value_schema(self, limits):
        out: dict[str, Any] = {"type": "number"}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return out


@dataclass(frozen=True)
class BoolField(Field):
    def check(self, value, limits=None, *, param=None, from_json=False):
        if not isinstance(value, bool):
            param = param or self.name
            raise self.fail(param, f"{param} must be true or false, got {type(value).__name__} {short(value)}", value)
        return value

    def value_schema(self, limits):
        return {"type": "boolean"}


@dataclass(frozen=True)
class StrField(Field):
    def check(self, value, limits=None, *, param=None, from_json=False):
        if not isinstance(value, str):
            param = param or self.name
            raise self.fail(param, f"{param} must be a string, got {type(value).__name__} {short(value)}", value)
        return value

    def value_schema(self, limits):
        return {"type": "string"}


@dataclass(frozen=True)
class StopField(Field):
    """Stop strings: one string, or a list of at most `max_items` non-empty ones; a tuple."""

    max_items: int = 16

    def check(self, value, limits=None, *, param=None, from_json=False):
        param = param or self.name
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise self.fail(param, f"{param} must be a string or a list of strings, got {type(value).__name__}", value)
        if len(value) > self.max_items:
            raise self.fail(param, f"{param} takes at most {self.max_items} strings, got {len(value)}", len(value))
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise self.fail(f"{param}[{i}]", f"{param}[{i}] must be a string, got {type(s).__name__} {short(s)}", s)
            if not s:
                raise self.fail(f"{param}[{i}]", f"{param}[{i}] must not be empty, got {s!r}", s)
        return tuple(value)

    def value_schema(self, limits):
        text = {"type": "string", "minLength": 1}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": self.max_items}]}


@dataclass(frozen=True)
class TokenIdsField(Field):
    """A list of token ids in [0, the vocabulary's last id]; a list of ints."""

    min_items: int = 0

    def check(self, value, limits=None, *, param=None, from_json=False):
        param = param or self.name
        if not isinstance(value, (list, tuple)):
            raise self.fail(param, f"{param} must be a list of token ids, got {type(value).__name__}", value)
        if len(value) < self.min_items:
            raise self.fail(param, f"{param} must hold at least {self.min_items} token id(s), got {len(value)}",
                            len(value))
        hi = max_token_id(limits)
        out = list(value)
        for i, token in enumerate(out):
            if from_json and isinstance(token, float) and token.is_integer():
                out[i] = token = int(token)  # JSON Schema's integer: 7.0 is 7
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= hi:
                raise self.fail(f"{param}[{i}]", f"{param}[{i}] must be a token id in [0, {hi}], got {short(token)}",
                                token)
        return out

    def value_schema(self, limits):
        out: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                           "maximum": max_token_id(limits)}}
        if self.min_items:
            out["minItems"] = self.min_items
        return out


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON means it: true is not 1, 0 equals 0.0, containers compare deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class NeutralField(Field):
    """A field this server does not implement: accepted only at the value a client sends when
    the feature is off (`allowed`, described by `off`), so it is refused rather than ignored."""

    allowed: tuple[Any, ...] = ()
    off: str = ""

    def check(self, value, limits=None, *, param=None, from_json=False):
        if not any(_json_equal(value, a) for a in self.allowed):
            raise self.fail(param, f"{self.name} is not supported by this server (only {self.off} is accepted), "
                                   f"got {short(value)}", value)
        return value

    def value_schema(self, limits):
        return {"enum": list(self.allowed)}
