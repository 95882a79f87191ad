"""One request's life in the frontend: admission, the engine queue, metrics, and abort on exit.

`Generation` is an async iterator of the engine's per-step items for one prompt (n sequences).
Whatever ends it -- the last item, a client disconnect cancelling the handler, a failed write,
an engine error, the drain -- its exit releases the admission slot it held and aborts the
request in the engine, which frees the request's KV blocks; that is the only cleanup path.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from expertmesh.errors import EngineDeadError
from expertmesh.server.engine_client import EngineClient, EngineRejected, RequestCutOff
from expertmesh.server.metrics import ServerMetrics
from expertmesh.server.validation import ErrorResponse


@dataclass
class AdmissionLimits:
    """Sequences (prompts x n) and prompt tokens (x n) sent to the engine that have not
    produced a token yet."""

    max_waiting_seqs: int = 512
    max_waiting_tokens: int = 1 << 20
    retry_after_s: int = 1


class Admission:
    """Counts what waits in the engine for its first token. Past a limit a new request gets 429
    with Retry-After instead of queueing forever; one that would exceed a limit on its own gets
    400 (`check_admissible`), as retrying is futile."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.waiting_seqs = 0
        self.waiting_tokens = 0

    def check_admissible(self, prompt_lens: list[int], n: int) -> None:
        """400 (not 429) for a request that could never be admitted, even on an idle server.
        `prompt_lens`: one entry per prompt of the request; each prompt runs n sequences."""
        lim = self.limits
        seqs = len(prompt_lens) * n
        if seqs > lim.max_waiting_seqs:
            raise ErrorResponse(400, f"the request is {seqs} sequences ({len(prompt_lens)} prompt(s) x n={n}), over "
                                     f"the server's limit of {lim.max_waiting_seqs} waiting sequences "
                                     f"(--max-waiting-seqs); send fewer prompts or a lower n",
                                param="n" if len(prompt_lens) == 1 else "prompt", code="request_too_large")
        cost = sum(prompt_lens) * n
        if cost > lim.max_waiting_tokens:
            what = (f"{prompt_lens[0]} prompt tokens" if len(prompt_lens) == 1
                    else f"{sum(prompt_lens)} prompt tokens over {len(prompt_lens)} prompts")
            raise ErrorResponse(400, f"{what} x n={n} is {cost} waiting tokens, over the server's limit of "
                                     f"{lim.max_waiting_tokens} (--max-waiting-tokens); this request can never be "
                                     f"admitted: shorten the prompt or lower n", param="prompt" if n == 1 else "n",
                                code="request_too_large")

    def admit(self, seqs: int, tokens: int) -> None:
        lim = self.limits
        headers = {"Retry-After": str(lim.retry_after_s)}
        if self.waiting_seqs + seqs > lim.max_waiting_seqs:
            raise ErrorResponse(429, f"too many waiting sequences: {self.waiting_seqs} waiting plus {seqs} exceeds "
                                     f"the limit of {lim.max_waiting_seqs}; retry later",
                                code="too_many_waiting_requests", headers=headers)
        if self.waiting_tokens + tokens > lim.max_waiting_tokens:
            raise ErrorResponse(429, f"too many waiting prompt tokens: {self.waiting_tokens} waiting plus {tokens} "
                                     f"exceeds the limit of {lim.max_waiting_tokens}; retry later",
                                code="too_many_waiting_tokens", headers=headers)
        self.waiting_seqs += seqs
        self.waiting_tokens += tokens

    def started(self, seqs: int, tokens: int) -> None:
        self.waiting_seqs -= seqs
        self.waiting_tokens -= tokens


class Generation:
    def __init__(self, engine: EngineClient, admission: Admission, metrics: ServerMetrics,
                 prompt_ids: list[int], params: dict[str, Any], kv: dict[str, Any] | None = None) -> None:
        self.engine, self.admission, self.metrics = engine, admission, metrics
        self.prompt_ids, self.params, self.kv = prompt_ids, params, kv
        self.kv_transfer_params: dict[str, Any] | None = None  # what a prefill engine says to pull its KV with
        self.request_id = uuid.uuid4().hex
        self.arrival = time.monotonic()
        self.completion_tokens = 0
        self.error_code: str | None = None  # how the engine side ended, if not normally
        self._seqs = int(params["n"])
        self._cost = len(prompt_ids) * self._seqs
        self._queue: asyncio.Queue | None = None
        self._waiting = False
        self._finished = False
        self._last_token_at: float | None = None

    async def __aenter__(self) -> Generation:
        self.admission.admit(self._seqs, self._cost)
        self._waiting = True
        try:
            self._queue = await self.engine.add(self.request_id, self.prompt_ids, self.params, kv=self.kv)
        except EngineDeadError as exc:
            self._leave_waiting()
            raise ErrorResponse(503, f"engine is not running: {exc}", code="engine_dead") from None
        except ValueError as exc:  # the link could not encode it: a gap in validation, not the client's fault
            self._leave_waiting()
            raise ErrorResponse(500, str(exc), code="internal_error") from None
        except BaseException:
            self._leave_waiting()
            raise
        return self

    def _leave_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self.admission.started(self._seqs, self._cost)

    async def __aexit__(self, *exc: object) -> None:
        self._leave_waiting()
        if not self._finished:
            # Cancelled (client gone), failed, or drained: free the engine's KV blocks now.
            await self.engine.abort(self.request_id)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._finished:
            raise StopAsyncIteration
        assert self._queue is not None
        item = await self._queue.get()
        if isinstance(item, Exception):
            self._finished = True  # the engine holds nothing of it any more
            error = self._error(item)
            self.error_code = error.code
            raise error
        if any(s["finish_reason"] == "error" for s in item["seqs"]):
            # The engine failed while running this request (it freed its blocks already).
            self._finished = True
            self.error_code = "engine_error"
            raise ErrorResponse(500, "the engine failed while running this request", code="engine_error")
        now = time.monotonic()
        if self._waiting:
            self._leave_waiting()
            self.metrics.first_token(now - self.arrival, item.get("queue_time"))
        new = sum(len(s["token_ids"]) for s in item["seqs"])
        gap = None if self._last_token_at is None else now - self._last_token_at
        self.metrics.tokens(new, gap)
        self._last_token_at = now
        self.completion_tokens += new
        if item["finished"]:
            self._finished = True
            self.kv_transfer_params = item.get("kv_transfer_params")
            reasons = [s["finish_reason"] for s in item["seqs"] if s["finish_reason"]]
            self.metrics.finished(len(self.prompt_ids), now - self.arrival, reasons[0] if reasons else "stop")
        return item

    def _error(self, item: Exception) -> ErrorResponse:
        if isinstance(item, EngineRejected):
            code = "invalid_value" if item.status < 500 else "engine_error"
            return ErrorResponse(item.status, item.message, param=item.param, code=code)
        if isinstance(item, RequestCutOff):
            return ErrorResponse(503, f"the server stopped this request before it finished: {item}",
                                 code="shutting_down")
        if isinstance(item, EngineDeadError):
            return ErrorResponse(503, f"engine process died: {item}", code="engine_dead")
        return ErrorResponse(500, f"{type(item).__name__}: {item}", code="internal_error")
