"""What the engine remembers about a request between steps: its sequences (n of them), their
detokenizers, generators and logprobs. The Rust scheduler holds tokens and KV blocks; this side
holds what only Python needs, and turns it into RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertmesh.engine.detokenizer import IncrementalDetokenizer
from expertmesh.outputs import CompletionOutput, Logprob, RequestOutput, RequestOutputKind
from expertmesh.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """A request the engine validated (`LLMEngine.check_request`): the only kind it queues.
    Every value is within the core's and the model's limits, so adding it cannot fail."""

    prompt: str | None  # the text, when it came as text
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never None, and prompt + max_tokens fits the context
    priority: int = 0


@dataclass
class SequenceState:
    """One of the n completions of a request; `core_id` names it in the Rust scheduler."""

    core_id: int
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Text produced since the last output was taken (for streaming).
    pending_delta: str = ""
    # Tokens (and logprob entries) handed out in earlier outputs, for DELTA outputs.
    sent: int = 0
    # Context-parallel variants its steps have used (each counted once in the engine's stats).
    cp_variants: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self, kind: RequestOutputKind) -> CompletionOutput:
        """The sequence so far (DELTA: only what is new since the last call); hands over (and
        clears) the text produced since the last call as text_delta either way."""
        delta, self.pending_delta = self.pending_delta, ""
        start, self.sent = self.sent, len(self.token_ids)
        if kind == RequestOutputKind.DELTA:
            text, token_ids = delta, self.token_ids[start:]
            logprobs = None if self.logprobs is None else self.logprobs[start:]
        else:
            text, token_ids, logprobs = self.detokenizer.output_text, list(self.token_ids), self.logprobs
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=self.cumulative_logprob,
            text_delta=delta,
        )


@dataclass
class RequestState:
    """A user's request: its prompt and the sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[SequenceState]
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)

    def to_output(self) -> RequestOutput | None:
        """This step's output in the request's kind; None for FINAL_ONLY until it finishes."""
        finished = self.finished
        if self.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.to_output(self.output_kind) for seq in self.seqs],
            finished=finished,
        )
