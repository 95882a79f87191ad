"""The OpenAI wire format, shared by the server and the SDK (expertmesh.sdk).

Requests: `CompletionRequest` and `ChatCompletionRequest` parse a JSON body (`from_body`,
raising InvalidRequestError naming the field) and build the body the SDK sends (`to_body`).
`sampling_params()` turns a request into the engine's SamplingParams, where the remaining
range checks live. Responses: small dataclasses with `to_dict` (server) and `from_dict` (SDK),
so both sides agree on every field by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from expertmesh.sampling_params import SamplingParams
from expertmesh.server.validation import _short, get_bool, get_int, get_number, get_str, invalid

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # and for chat `top_logprobs`
# vLLM extensions we accept too (same names and meaning).
_EXTRA_SAMPLING = ("top_k", "min_p", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                   "skip_special_tokens")
# Fields both endpoints implement (plus _EXTRA_SAMPLING); `user` is accepted and has no effect.
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
                  "user", *_EXTRA_SAMPLING}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# Keys of one chat message; tool calls and the like are refused rather than dropped.
_MESSAGE_FIELDS = {"role", "content", "name"}
_STREAM_OPTIONS = {"include_usage"}


def _is_neutral_number(value: Any, neutral: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral


# Fields OpenAI defines that this server does not implement: accepted only at their neutral
# value (what a client sends when the feature is off), else 400 naming the field.
_NEUTRAL = {
    "presence_penalty": ("0", lambda v, b: _is_neutral_number(v, 0)),
    "frequency_penalty": ("0", lambda v, b: _is_neutral_number(v, 0)),
    "repetition_penalty": ("1.0", lambda v, b: _is_neutral_number(v, 1)),
    "logit_bias": ("an empty object", lambda v, b: v == {}),
    "echo": ("false", lambda v, b: v is False),
    "suffix": ("an empty string", lambda v, b: v == ""),
    "best_of": ("equal to n", lambda v, b: _is_neutral_number(v, b.get("n") if b.get("n") is not None else 1)),
    "tools": ("an empty list", lambda v, b: v == []),
    "tool_choice": ('"none"', lambda v, b: v == "none"),
    "parallel_tool_calls": ("absent (no tools)", lambda v, b: False),
    "functions": ("an empty list", lambda v, b: v == []),
    "function_call": ('"none"', lambda v, b: v == "none"),
    "response_format": ('{"type": "text"}', lambda v, b: v == {"type": "text"}),
}
_NEUTRAL_FIELDS = {
    "completion": ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "echo", "suffix",
                   "best_of"),
    "chat": ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "tools", "tool_choice",
             "parallel_tool_calls", "functions", "function_call", "response_format"),
}


def check_supported(body: dict[str, Any], endpoint: str) -> None:
    """400 for any field this server would otherwise ignore: unknown names, and implemented-
    elsewhere features (penalties, logit_bias, echo, tools, ...) set to a non-neutral value."""
    known = _COMPLETION_FIELDS if endpoint == "completion" else _CHAT_FIELDS
    neutral = _NEUTRAL_FIELDS[endpoint]
    path = "/v1/completions" if endpoint == "completion" else "/v1/chat/completions"
    for name, value in body.items():
        if name in known or value is None:
            continue
        if name in neutral:
            what, ok = _NEUTRAL[name]
            if not ok(value, body):
                raise invalid(name, f"{name} is not supported by this server (only {what} is accepted), "
                                    f"got {_short(value)}", value)
            continue
        raise invalid(name, f"{name} is not supported: it is not a field of {path} on this server, "
                            f"got {_short(value)}", value)
    options = body.get("stream_options")
    if isinstance(options, dict):
        for name, value in options.items():
            if name not in _STREAM_OPTIONS and value is not None:
                raise invalid(f"stream_options.{name}", f"stream_options.{name} is not supported by this server "
                                                        f"(only include_usage is), got {_short(value)}", value)


@dataclass
class _Request:
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _common(cls, body: dict[str, Any], max_tokens_default: int | None) -> dict[str, Any]:
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("stream_options", f"stream_options must be an object, got {type(options).__name__}", options)
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, (str, list)):
            raise invalid("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}", stop)
        return dict(
            model=get_str(body, "model"),
            max_tokens=get_int(body, "max_tokens", max_tokens_default, lo=1),
            temperature=get_number(body, "temperature", 1.0),
            top_p=get_number(body, "top_p", 1.0),
            n=get_int(body, "n", 1, lo=1, hi=128),
            stop=stop,
            seed=get_int(body, "seed", None),
            stream=get_bool(body, "stream"),
            include_usage=get_bool(options or {}, "include_usage"),
            extra={k: body[k] for k in _EXTRA_SAMPLING if body.get(k) is not None},
        )

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "n": self.n, "stream": self.stream}
        if self.stop is not None:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stream and self.include_usage:
            body["stream_options"] = {"include_usage": True}
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
    def from_body(cls, body: dict[str, Any]) -> "CompletionRequest":
        check_supported(body, "completion")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            # A batch: several strings, or several lists of token ids (never mixed).
            kind = type(prompt[0])
            for i, p in enumerate(prompt):
                if type(p) is not kind:
                    raise invalid(f"prompt[{i}]", f"prompt[{i}] must be a {'string' if kind is str else 'list of token ids'}"
                                                  f" like prompt[0] (a batch cannot mix the two), got {type(p).__name__}",
                                  None)
                if len(p) == 0:
                    raise invalid(f"prompt[{i}]", f"prompt[{i}] must not be empty", p)
                if kind is list and not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    raise invalid(f"prompt[{i}]", f"prompt[{i}] must be a list of integer token ids", None)
        elif isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise invalid("prompt", "prompt must be a string, a list of token ids, or a list of several of one "
                                    "of those", None)
        if not isinstance(prompt, (str, list)):
            raise invalid("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", prompt)
        if len(prompt) == 0:
            raise invalid("prompt", "prompt must not be empty", prompt)
        return cls(prompt=prompt, logprobs=get_int(body, "logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS),
                   **cls._common(body, 16))

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
    def from_body(cls, body: dict[str, Any]) -> "ChatCompletionRequest":
        check_supported(body, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "messages must be a non-empty list of {role, content} objects", None)
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise invalid(f"messages[{i}]", f"messages[{i}] must be an object", None)
            unknown = sorted(k for k, v in message.items() if k not in _MESSAGE_FIELDS and v not in (None, [], ""))
            if unknown:
                raise invalid(f"messages[{i}].{unknown[0]}", f"messages[{i}].{unknown[0]} is not supported "
                                                             f"(supported message fields: {sorted(_MESSAGE_FIELDS)})", None)
            role = get_str(message, "role", required=True)
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text is supported
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                    raise invalid(f"messages[{i}].content", "only text content parts are supported", None)
                content = "".join(texts)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise invalid(f"messages[{i}].content", f"messages[{i}].content must be a string, got "
                                                        f"{type(content).__name__}", None)
            entry = {"role": role, "content": content}
            name = message.get("name")
            if name is not None:  # chat templates may render the speaker's name
                if not isinstance(name, str):
                    raise invalid(f"messages[{i}].name", f"messages[{i}].name must be a string, got "
                                                         f"{type(name).__name__}", name)
                entry["name"] = name
            clean.append(entry)
        common = cls._common(body, None)
        if body.get("max_completion_tokens") is not None:
            common["max_tokens"] = get_int(body, "max_completion_tokens", None, lo=1)
        logprobs = get_bool(body, "logprobs")
        top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs set to true", top)
        return cls(messages=clean, logprobs=logprobs, top_logprobs=top, **common)

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
