"""The fields of each HTTP request body, declared once (expertmesh/fields.py): protocol.py reads
bodies with them and openapi.py describes the same objects as the request schemas.

Sampling fields are SamplingParams' own declarations, tightened where HTTP has a limit of its
own (n <= 128, completions' logprobs <= 5, max_tokens within the context). Fields OpenAI
defines that this server does not implement are NeutralFields: accepted only at their "off"
value, refused otherwise, never silently ignored. Any other name is refused unless null.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from expertmesh.fields import BoolField, Field, IntField, NeutralField, StrField, TokenIdsField, short
from expertmesh.limits import MAX_N, RequestLimits
from expertmesh.sampling_params import FIELDS as SAMPLING

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # and for chat `top_logprobs`
_MESSAGE_FIELDS = ("role", "content", "name")


def _context_bound(limits: RequestLimits | None) -> int | None:
    return None if limits is None else limits.max_new_tokens


def _batch_bound(limits: RequestLimits | None) -> int | None:
    return None if limits is None else limits.max_seqs_per_request


@dataclass(frozen=True)
class PromptField(Field):
    """/v1/completions `prompt`: a string, a list of token ids, or a batch (a list of several
    strings, or of several token-id lists, never mixed). Always a list of prompts once read."""

    def check(self, value, limits=None, *, param=None, from_json=False):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            kind = type(value[0])
            batch = _batch_bound(limits)
            if batch is not None and len(value) > batch:
                raise self.fail("prompt", f"prompt holds {len(value)} prompts, over the limit of {batch} sequences "
                                          f"per request (--max-num-seqs-per-request)", len(value))
            for i, p in enumerate(value):
                if type(p) is not kind:
                    what = "string" if kind is str else "list of token ids"
                    raise self.fail(f"prompt[{i}]", f"prompt[{i}] must be a {what} like prompt[0] (a batch cannot mix "
                                                    f"the two), got {type(p).__name__}", None)
            return [self._one(p, limits, f"prompt[{i}]" if len(value) > 1 else "prompt") for i, p in enumerate(value)]
        if not isinstance(value, (str, list)):
            raise self.fail("prompt", f"prompt must be a string, a list of token ids, or a list of several of one of "
                                      f"those, got {type(value).__name__} {short(value)}", None)
        return [self._one(value, limits, "prompt")]

    def _one(self, prompt: str | list, limits: RequestLimits | None, param: str) -> str | list[int]:
        if len(prompt) == 0:
            raise self.fail(param, f"{param} must not be empty", prompt)
        if isinstance(prompt, list):
            return TokenIdsField(param, "").check(prompt, limits, from_json=True)
        return prompt

    def value_schema(self, limits):
        text = {"type": "string", "minLength": 1}
        ids = TokenIdsField("prompt", "", min_items=1).value_schema(limits)
        if limits is not None:
            ids["maxItems"] = limits.max_new_tokens  # one token must be left to generate
        batch = {"minItems": 1, **({} if limits is None else {"maxItems": limits.max_seqs_per_request})}
        return {"anyOf": [text, ids, {"type": "array", "items": text, **batch},
                          {"type": "array", "items": ids, **batch}]}


@dataclass(frozen=True)
class MessagesField(Field):
    """Chat `messages`: objects with a role and text content (a string, or text parts, which
    are joined); `name` goes to the template. Other keys are refused unless empty."""

    def check(self, value, limits=None, *, param=None, from_json=False):
        if not isinstance(value, list) or not value:
            raise self.fail("messages", "messages must be a non-empty list of {role, content} objects", None)
        return [self._message(i, m) for i, m in enumerate(value)]

    def _message(self, i: int, message: Any) -> dict[str, str]:
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise self.fail(at, f"{at} must be an object", None)
        unknown = sorted(k for k, v in message.items() if k not in _MESSAGE_FIELDS and v not in (None, [], ""))
        if unknown:
            raise self.fail(f"{at}.{unknown[0]}", f"{at}.{unknown[0]} is not supported (supported message fields: "
                                                  f"{sorted(_MESSAGE_FIELDS)})", None)
        role = message.get("role")
        if not isinstance(role, str):
            raise self.fail(f"{at}.role", f"{at}.role is required and must be a string, got {short(role)}", role)
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise self.fail(f"{at}.content", "only text content parts are supported", None)
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise self.fail(f"{at}.content", f"{at}.content must be a string, got {type(content).__name__}", None)
        entry = {"role": role, "content": content}
        name = message.get("name")
        if name is not None:  # chat templates may render the speaker's name
            entry["name"] = StrField(f"{at}.name", "").check(name)
        return entry

    def value_schema(self, limits):
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
        message = {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string"},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}, {"type": "null"}]},
            "name": {"type": ["string", "null"]},
        }, "additionalProperties": {"enum": [None, [], ""]}}
        return {"type": "array", "items": message, "minItems": 1}


@dataclass(frozen=True)
class StreamOptionsField(Field):
    """`stream_options`: only include_usage is implemented; other keys are refused unless null."""

    def check(self, value, limits=None, *, param=None, from_json=False):
        if not isinstance(value, dict):
            raise self.fail("stream_options", f"stream_options must be an object, got {type(value).__name__}", value)
        for name, v in value.items():
            if name != "include_usage" and v is not None:
                raise self.fail(f"stream_options.{name}", f"stream_options.{name} is not supported by this server "
                                                          f"(only include_usage is), got {short(v)}", v)
        return {"include_usage": INCLUDE_USAGE.read(value)}

    def value_schema(self, limits):
        return {"type": "object", "properties": {"include_usage": INCLUDE_USAGE.schema(limits)},
                "additionalProperties": {"type": "null"}}


_KV_INTS = {"transfer_id": (0, (1 << 63) - 1), "remote_port": (1, 65535), "num_blocks": (0, 1 << 31)}
_KV_LAYOUT_INTS = ("num_layers", "block_size", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class KvTransferParamsField(Field):
    """`kv_transfer_params` (vLLM's name), for disaggregated serving: {"do_remote_decode": true}
    asks a prefill server to keep the prompt's KV for a decode server, and its answer carries the
    params to pull it with; a decode server gets those params back ({"do_remote_prefill": true,
    "transfer_id", "remote_host", "remote_port", "num_blocks", "layout"}). Which one a server
    accepts depends on its --role (checked by the route)."""

    def check(self, value, limits=None, *, param=None, from_json=False):
        name = self.name
        if not isinstance(value, dict):
            raise self.fail(name, f"{name} must be an object, got {type(value).__name__} {short(value)}", value)
        decode, prefill = value.get("do_remote_decode") is True, value.get("do_remote_prefill") is True
        if decode == prefill:
            raise self.fail(name, f"{name} needs exactly one of do_remote_decode or do_remote_prefill set to true, "
                                  f"got {short(value)}", value)
        if decode:
            extra = sorted(set(value) - {"do_remote_decode"})
            if extra:
                raise self.fail(f"{name}.{extra[0]}", f"{name}.{extra[0]} is not supported with do_remote_decode",
                                value[extra[0]])
            return {"do_remote_decode": True}
        out: dict[str, Any] = {"do_remote_prefill": True}
        for key, (lo, hi) in _KV_INTS.items():
            out[key] = IntField(key, "", lo=lo, hi=hi).check(value.get(key), param=f"{name}.{key}", from_json=True)
        out["remote_host"] = StrField("remote_host", "").check(value.get("remote_host"), param=f"{name}.remote_host")
        layout = value.get("layout")
        if not isinstance(layout, dict):
            raise self.fail(f"{name}.layout", f"{name}.layout must be an object, got {short(layout)}", layout)
        out["layout"] = {k: IntField(k, "", lo=1, hi=1 << 20).check(layout.get(k), param=f"{name}.layout.{k}",
                                                                    from_json=True) for k in _KV_LAYOUT_INTS}
        out["layout"]["dtype"] = StrField("dtype", "").check(layout.get("dtype"), param=f"{name}.layout.dtype")
        return out

    def value_schema(self, limits):
        ints = {k: {"type": "integer", "minimum": lo, "maximum": hi} for k, (lo, hi) in _KV_INTS.items()}
        layout = {"type": "object", "required": [*_KV_LAYOUT_INTS, "dtype"],
                  "properties": {**{k: {"type": "integer", "minimum": 1, "maximum": 1 << 20} for k in _KV_LAYOUT_INTS},
                                 "dtype": {"type": "string"}}}
        remote_decode = {"type": "object", "required": ["do_remote_decode"], "additionalProperties": False,
                         "properties": {"do_remote_decode": {"const": True}}}
        remote_prefill = {"type": "object", "required": ["do_remote_prefill", *_KV_INTS, "remote_host", "layout"],
                          "properties": {"do_remote_prefill": {"const": True}, **ints,
                                         "remote_host": {"type": "string"}, "layout": layout},
                          "not": {"required": ["do_remote_decode"], "properties": {"do_remote_decode": {"const": True}}}}
        return {"oneOf": [remote_decode, remote_prefill]}


@dataclass(frozen=True)
class BestOfField(IntField):
    """`best_of` is not implemented: only best_of == n (what clients send when it is off)."""

    def read(self, body, limits=None):
        value = body.get(self.name)
        n = body.get("n") if body.get("n") is not None else 1
        if value is not None and not (type(value) in (int, float) and value == n):
            raise self.fail(None, f"best_of is not supported by this server (only equal to n is accepted), "
                                  f"got {short(value)}", value)
        return value


INCLUDE_USAGE = BoolField("include_usage", "send a last chunk with the token usage", False)
MODEL = StrField("model", "the served model's id (see /v1/models); absent: the one served")
STREAM = BoolField("stream", "answer with server-sent events ending in [DONE]", False)
STREAM_OPTIONS = StreamOptionsField("stream_options", "options of a streamed answer")
USER = StrField("user", "an end-user id; accepted, has no effect")
N = replace(SAMPLING["n"], hi=lambda limits: MAX_N if limits is None else min(MAX_N, limits.max_seqs_per_request))
MAX_TOKENS = replace(SAMPLING["max_tokens"], hi=_context_bound,
                     doc="most tokens to generate; prompt plus max_tokens must fit the context")
CHAT_MAX_TOKENS = replace(MAX_TOKENS, default=None, doc="most tokens to generate; absent: what the context leaves")
MAX_COMPLETION_TOKENS = replace(CHAT_MAX_TOKENS, name="max_completion_tokens", doc="OpenAI's newer name of max_tokens")
# vLLM's sampling extensions, accepted with the same names and meaning.
EXTRA_SAMPLING = tuple(SAMPLING[k] for k in ("top_k", "min_p", "ignore_eos", "stop_token_ids",
                                             "include_stop_str_in_output", "skip_special_tokens"))
KV_TRANSFER_PARAMS = KvTransferParamsField("kv_transfer_params", "disaggregated serving: what the prefill and "
                                                                   "decode servers hand each other")
COMMON = (MODEL, MAX_TOKENS, SAMPLING["temperature"], SAMPLING["top_p"], N, SAMPLING["stop"], SAMPLING["seed"],
          STREAM, STREAM_OPTIONS, USER, *EXTRA_SAMPLING, KV_TRANSFER_PARAMS)
PROMPT = PromptField("prompt", "a string, a list of token ids, or a batch of several of one of those", required=True)
COMPLETION_LOGPROBS = replace(SAMPLING["logprobs"], hi=MAX_COMPLETION_LOGPROBS)
MESSAGES = MessagesField("messages", "the conversation, rendered with the model's chat template", required=True)
CHAT_LOGPROBS = BoolField("logprobs", "return the sampled tokens' log-probabilities", False)
TOP_LOGPROBS = IntField("top_logprobs", "with logprobs: also this many most likely tokens per step", None, lo=0,
                        hi=MAX_TOP_LOGPROBS)


def _neutral(name: str, off: str, *allowed: Any) -> NeutralField:
    return NeutralField(name, f"not supported: only {off} is accepted", allowed=allowed, off=off)


_PENALTIES = (_neutral("presence_penalty", "0", 0), _neutral("frequency_penalty", "0", 0),
              _neutral("repetition_penalty", "1.0", 1), _neutral("logit_bias", "an empty object", {}))
COMPLETION_FIELDS: tuple[Field, ...] = (
    PROMPT, *COMMON, COMPLETION_LOGPROBS, *_PENALTIES, _neutral("echo", "false", False),
    _neutral("suffix", "an empty string", ""),
    BestOfField("best_of", "not supported: only equal to n is accepted", None, lo=1, hi=MAX_N),
)
CHAT_FIELDS: tuple[Field, ...] = (
    MESSAGES, *(f for f in COMMON if f is not MAX_TOKENS), CHAT_MAX_TOKENS, MAX_COMPLETION_TOKENS, CHAT_LOGPROBS,
    TOP_LOGPROBS, *_PENALTIES, _neutral("tools", "an empty list", []), _neutral("tool_choice", '"none"', "none"),
    _neutral("parallel_tool_calls", "absent (no tools)"), _neutral("functions", "an empty list", []),
    _neutral("function_call", '"none"', "none"), _neutral("response_format", '{"type": "text"}', {"type": "text"}),
)
TOKENIZE_FIELDS: tuple[Field, ...] = (MODEL, StrField("prompt", "text to tokenize (or give messages)"),
                                      replace(MESSAGES, doc="a conversation to render and tokenize (or give prompt)",
                                              required=False))
# Chat: top_logprobs needs logprobs set to true; checked by check_top_logprobs, published as:
TOP_LOGPROBS_RULE = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                     "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


def check_top_logprobs(values: dict[str, Any]) -> None:
    if values["top_logprobs"] is not None and not values["logprobs"]:
        raise TOP_LOGPROBS.fail(None, "top_logprobs needs logprobs set to true", values["top_logprobs"])


# /tokenize needs one of the two (checked by the route): the schema says so too.
TOKENIZE_ONE_OF = [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                   {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]
DETOKENIZE_FIELDS: tuple[Field, ...] = (MODEL, TokenIdsField("tokens", "token ids to turn into text", required=True))


def check_known(body: dict[str, Any], fields: tuple[Field, ...], path: str) -> None:
    """400 for a non-null field this endpoint does not define (a typo is not ignored)."""
    known = {f.name for f in fields}
    for name, value in body.items():
        if name not in known and value is not None:
            raise Field(name, "").fail(name, f"{name} is not supported: it is not a field of {path} on this server, "
                                             f"got {short(value)}", value)


def body_schema(fields: tuple[Field, ...], limits: RequestLimits | None) -> dict[str, Any]:
    """The JSON Schema of a request body made of `fields` (what /openapi.json publishes)."""
    return {"type": "object", "required": [f.name for f in fields if f.required],
            "properties": {f.name: f.schema(limits) for f in fields},
            "additionalProperties": {"type": "null"}}

