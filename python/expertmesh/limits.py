"""The limits a request must meet, and the checks that need more than one field.

Three sources of limits meet here: the Rust core's (token ids fit its 31-bit store:
`_core.MAX_TOKEN_ID`; priorities and seeds fit an i64), the model's (vocabulary, context
length) and the server's (sequences one request may fan out to). Every edge -- `LLM`, the
server's frontend, the engine process -- validates with these, so the core never receives a
value it would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh._core import MAX_TOKEN_ID
from expertmesh.errors import InvalidRequestError

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's limit on `n`
DEFAULT_MAX_SEQS_PER_REQUEST = 256  # prompts x n of one HTTP request


@dataclass(frozen=True)
class RequestLimits:
    """What one engine (and the server in front of it) accepts.

    vocab_size: token ids must be in [0, vocab_size). max_model_len: prompt + generated tokens.
    max_seqs_per_request: prompts x n of one request (each is a sequence in the scheduler).
    """

    vocab_size: int
    max_model_len: int
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST

    def __post_init__(self) -> None:
        if not 1 <= self.vocab_size <= MAX_TOKEN_ID + 1:
            raise InvalidRequestError(f"vocab_size must be in [1, {MAX_TOKEN_ID + 1}] (the core stores token ids "
                                      f"as 31-bit integers), got {self.vocab_size}", param="vocab_size",
                                      value=self.vocab_size)
        if self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be >= 2 (one prompt token and one generated token), "
                                      f"got {self.max_model_len}", param="max_model_len", value=self.max_model_len)
        if self.max_seqs_per_request < 1:
            raise InvalidRequestError(f"max_seqs_per_request must be >= 1, got {self.max_seqs_per_request}",
                                      param="max_num_seqs_per_request", value=self.max_seqs_per_request)

    @property
    def max_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def max_new_tokens(self) -> int:
        """The most tokens any request can generate: the context less one prompt token."""
        return self.max_model_len - 1

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str = "prompt") -> int:
        """The max_tokens to use (None: what the context leaves); InvalidRequestError when the
        prompt plus max_tokens does not fit the context. `param` names the prompt."""
        if prompt_len == 0:
            raise InvalidRequestError(f"{param} must contain at least one token", param=param, value=0)
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(f"{param} is {prompt_len} tokens, but the context (max_model_len) is "
                                      f"{self.max_model_len} and must leave room for one generated token",
                                      param=param, value=prompt_len)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise InvalidRequestError(f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                                      f"context of {self.max_model_len} tokens (at most {room} can be generated)",
                                      param="max_tokens", value=max_tokens)
        return max_tokens

    def check_num_seqs(self, num_prompts: int, n: int) -> None:
        """One request fans out to num_prompts x n sequences; refuse more than the limit."""
        seqs = num_prompts * n
        if seqs > self.max_seqs_per_request:
            what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
            raise InvalidRequestError(f"{what} is {seqs} sequences, over the limit of {self.max_seqs_per_request} "
                                      f"per request (--max-num-seqs-per-request); send fewer prompts or a lower n",
                                      param="n" if num_prompts == 1 else "prompt", value=seqs)


def check_priority(priority: object) -> int:
    """A request priority (lower is served first) as the core stores it: an i64."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not I64_MIN <= priority <= I64_MAX:
        raise InvalidRequestError(f"priority must be an integer in [{I64_MIN}, {I64_MAX}], got {priority!r}",
                                  param="priority", value=priority)
    return priority
