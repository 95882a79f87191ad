"""The OpenAI wire format, shared by the server and the SDK (expertmesh.sdk).

Requests: `CompletionRequest` and `ChatCompletionRequest` parse a JSON body (`from_body`,
raising InvalidRequestError naming the field) and build the body the SDK sends (`to_body`).
Every field is read through its declaration in request_fields.py (the same objects the OpenAPI
document describes); `sampling_params()` turns a request into the engine's SamplingParams. Responses: small dataclasses with `to_dict` (server) and `from_dict` (SDK),
so both sides agree on every field by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from expertmesh.limits import RequestLimits
from expertmesh.sampling_params import SamplingParams
from expertmesh.server import request_fields as rf


@dataclass
class _Request:
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | tuple[str, ...] | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # vLLM's sampling extensions (top_k, ...)
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated serving (request_fields.KvTransferParamsField)

    @staticmethod
    def _read(body: dict[str, Any], fields: tuple[rf.Field, ...], path: str,
              limits: RequestLimits | None) -> dict[str, Any]:
        """Every field of the endpoint read from `body` (InvalidRequestError naming the first bad one)."""
        rf.check_known(body, fields, path)
        return {f.name: f.read(body, limits) for f in fields}

    @staticmethod
    def _common(values: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        options = values["stream_options"] or {}
        return dict(model=values["model"], max_tokens=values["max_tokens"], temperature=values["temperature"],
                    top_p=values["top_p"], n=values["n"], stop=values["stop"], seed=values["seed"],
                    stream=values["stream"], include_usage=bool(options.get("include_usage")),
                    extra={f.name: values[f.name] for f in rf.EXTRA_SAMPLING if body.get(f.name) is not None},
                    kv_transfer_params=values["kv_transfer_params"])

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "n": self.n, "stream": self.stream}
        if self.stop is not None:
            body["stop"] = self.stop if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stream and self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.kv_transfer_params is not None:
            body["kv_transfer_params"] = self.kv_transfer_params
        return {**body, **self.extra}

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises InvalidRequestError (with the field name) for anything out of range."""
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              max_tokens=max_tokens, stop=self.stop, logprobs=logprobs, **self.extra)


@dataclass
class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]] = ""
    logprobs: int | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], limits: RequestLimits | None = None) -> "CompletionRequest":
        values = cls._read(body, rf.COMPLETION_FIELDS, "/v1/completions", limits)
        prompts = values["prompt"]
        if limits is not None:
            limits.check_num_seqs(len(prompts), values["n"])
        return cls(prompt=prompts[0] if len(prompts) == 1 else prompts, logprobs=values["logprobs"],
                   **cls._common(values, body))

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one, or several for a batch."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]

    def to_body(self) -> dict[str, Any]:
        body = {"prompt": self.prompt, **self._body()}
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        return body


@dataclass
class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], limits: RequestLimits | None = None) -> "ChatCompletionRequest":
        values = cls._read(body, rf.CHAT_FIELDS, "/v1/chat/completions", limits)
        if values["max_completion_tokens"] is not None:
            values["max_tokens"] = values["max_completion_tokens"]
        rf.check_top_logprobs(values)
        if limits is not None:
            limits.check_num_seqs(1, values["n"])
        return cls(messages=values["messages"], logprobs=values["logprobs"], top_logprobs=values["top_logprobs"],
                   **cls._common(values, body))

    def to_body(self) -> dict[str, Any]:
        body = {"messages": self.messages, **self._body()}
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs is not None:
                body["top_logprobs"] = self.top_logprobs
        return body

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses -------------------------------------------------------------------------------


def _from_dict(cls: type, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # {tokens, token_logprobs, top_logprobs, text_offset}


@dataclass
class ChatMessage:
    role: str
    content: str | None


@dataclass
class ChatChoice:
    index: int
    message: ChatMessage | None = None  # full responses
    delta: dict[str, Any] | None = None  # stream chunks: {"role"?, "content"?}
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}


@dataclass
class Completion:
    """/v1/completions: a full response (object "text_completion") or one stream chunk."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Completion":
        out = _from_dict(cls, data)
        out.choices = [_from_dict(CompletionChoice, c) for c in data.get("choices", [])]
        out.usage = _from_dict(Usage, data["usage"]) if data.get("usage") else None
        return out


@dataclass
class ChatCompletion:
    """/v1/chat/completions: "chat.completion" (full) or "chat.completion.chunk" (stream)."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for choice in data["choices"]:  # a chunk has no message, a full response no delta
            choice.pop("delta" if self.object == "chat.completion" else "message")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatCompletion":
        out = _from_dict(cls, data)
        out.choices = []
        for c in data.get("choices", []):
            choice = _from_dict(ChatChoice, c)
            if c.get("message") is not None:
                choice.message = _from_dict(ChatMessage, c["message"])
            out.choices.append(choice)
        out.usage = _from_dict(Usage, data["usage"]) if data.get("usage") else None
        return out


@dataclass
class ModelCard:
    id: str
    created: int
    owned_by: str = "expertmesh"
    max_model_len: int | None = None
    object: str = "model"
