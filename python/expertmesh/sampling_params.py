"""How one request wants its tokens chosen and when it wants to stop: `SamplingParams`.

The fields and their meaning follow vLLM's SamplingParams (and so OpenAI's request fields),
so clients and scripts carry over. Everything is checked once, in __post_init__: a bad value
raises InvalidRequestError naming the field, the limit and the value, which the server turns
into HTTP 400. After construction the object is frozen: one instance is shared by the n
sequences of a request and by the sampler every step, so nobody may change it underneath.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from expertmesh.errors import InvalidRequestError

# Below this temperature dividing the logits overflows fp32 and the result is argmax anyway,
# so such requests are treated as greedy (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP_STRINGS = 16
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # torch.Generator.manual_seed takes this range (and more)


def _fail(param: str, message: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, value=value)


def _check_int(param: str, value: Any) -> int:
    # bool is an int subclass; `n=True` is a bug in the caller, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(param, f"{param} must be an integer, got {type(value).__name__} {value!r}", value)
    return value


def _check_float(param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(param, f"{param} must be a number, got {type(value).__name__} {value!r}", value)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(param, f"{param} must be a finite number, got {number}", number)
    return number


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request (vLLM-compatible names and defaults).

    Normalisation done on construction: `stop` becomes a tuple of strings (a single string
    is one stop string), `stop_token_ids` a tuple of ints, `top_k` -1 becomes 0 (both mean
    "off"), numbers become float.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: consider the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: as many as the context leaves room for
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n alternatives per step; the sampled token always comes too
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalised values are written once, here

        n = _check_int("n", self.n)
        if n < 1:
            raise _fail("n", f"n must be >= 1, got {n}", n)

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise _fail("temperature", f"temperature must be >= 0, got {temperature}", temperature)
        set_field(self, "temperature", temperature)

        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise _fail("top_p", f"top_p must be in (0, 1], got {top_p}", top_p)
        set_field(self, "top_p", top_p)

        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise _fail("top_k", f"top_k must be -1 or 0 (off) or >= 1, got {top_k}", top_k)
        set_field(self, "top_k", max(top_k, 0))

        min_p = _check_float("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise _fail("min_p", f"min_p must be in [0, 1], got {min_p}", min_p)
        set_field(self, "min_p", min_p)

        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not _INT64_MIN <= seed <= _INT64_MAX:
                raise _fail("seed", f"seed must be in [{_INT64_MIN}, {_INT64_MAX}], got {seed}", seed)

        if self.max_tokens is not None:
            max_tokens = _check_int("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise _fail("max_tokens", f"max_tokens must be >= 1, got {max_tokens}", max_tokens)

        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise _fail("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", logprobs)

        set_field(self, "stop", self._checked_stop(self.stop))
        set_field(self, "stop_token_ids", self._checked_stop_token_ids(self.stop_token_ids))

        for flag in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise _fail(flag, f"{flag} must be true or false, got {type(value).__name__} {value!r}", value)

    @staticmethod
    def _checked_stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _fail("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}", stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", len(stop))
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise _fail(f"stop[{i}]", f"stop[{i}] must be a string, got {type(s).__name__} {s!r}", s)
            if not s:
                raise _fail(f"stop[{i}]", f"stop[{i}] must not be empty, got {s!r}", s)
        return tuple(stop)

    @staticmethod
    def _checked_stop_token_ids(ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", f"stop_token_ids must be a list of integers, got {type(ids).__name__}", ids)
        for i, token in enumerate(ids):
            param = f"stop_token_ids[{i}]"
            _check_int(param, token)
            if token < 0:
                raise _fail(param, f"{param} must be >= 0, got {token}", token)
        return tuple(ids)

    # ---- derived facts the sampler and detokenizer ask for ---------------------------------

    @property
    def greedy(self) -> bool:
        """True when the result is argmax whatever the noise: temperature ~0 or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` after normalisation (typed for callers; always a tuple)."""
        return self.stop  # type: ignore[return-value]

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)
