"""What a request gives back: `RequestOutput` holding one `CompletionOutput` per sequence (n).

Shapes follow vLLM's outputs so scripts written against it read the same fields. What a
step hands back depends on the request's `RequestOutputKind` (vLLM's three): everything so far
every step, only what is new every step (streaming), or only the finished output (LLM.generate).
`usage` counts tokens the way OpenAI bills them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, get_args

FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))


class RequestOutputKind(enum.IntEnum):
    """What each step's output of a request holds (vLLM's names and values)."""

    CUMULATIVE = 0  # every output: all tokens, text and logprobs so far (a copy: O(length) per step)
    DELTA = 1  # every output: only what is new since the previous one (streams; O(new) per step)
    FINAL_ONLY = 2  # no output until the request finishes, then the whole of it


@dataclass(frozen=True, slots=True)
class Logprob:
    """A token's log-probability under the model's raw distribution (before temperature and
    truncation), its 1-based rank in the vocabulary (ties share the better rank), and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob, the sampled token first, then the top-n.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    `finish_reason`: None while running; "stop" (eos, a stop token id or a stop string),
    "length" (max_tokens or the context is full), "abort" (cancelled) or "error".
    `stop_reason`: the stop string or stop token id that ended it, None otherwise (eos included,
    as in vLLM).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Text produced since this request's previous output (what a stream sends next). Held-back
    # text (a possible stop-string prefix, an unfinished character) arrives in a later delta.
    text_delta: str = ""

    def __post_init__(self) -> None:
        # A wrong reason here is an engine bug; fail where it is made, not in a client.
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASONS)} or None, got {self.finish_reason!r}")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a request, as OpenAI reports them (the prompt counts once for all n)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class RequestOutput:
    """The state of one request: prompt, the n completions so far, and whether all are done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=sum(len(o.token_ids) for o in self.outputs),
        )

    @property
    def finish_reasons(self) -> list[FinishReason | None]:
        return [o.finish_reason for o in self.outputs]
