"""A checkpoint's tokenizer: tokenizer.json through `tokenizers`, plus what tokenizer_config.json,
generation_config.json and config.json say about special tokens and the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from expertmesh.errors import InvalidRequestError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _token_content(token: object) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as an AddedToken dict."""
    if isinstance(token, dict):
        content = token.get("content")
        return content if isinstance(content, str) else None
    return token if isinstance(token, str) else None


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


@dataclass
class CheckpointTokenizer:
    """The tokenizer plus the facts the engine needs: end-of-sequence ids and the chat template."""

    tokenizer: Tokenizer
    eos_token_ids: list[int]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None

    @classmethod
    def from_dir(cls, path: Path) -> "CheckpointTokenizer":
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise InvalidRequestError(
                f"checkpoint {str(path)!r} has no tokenizer.json (expertmesh needs a fast tokenizer file)",
                param="model",
                value=str(path),
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tok_config = _read_json(path / "tokenizer_config.json")
        eos_token = _token_content(tok_config.get("eos_token"))
        bos_token = _token_content(tok_config.get("bos_token"))
        # generation_config.json is what HF generate() stops on; config.json and the
        # tokenizer's eos token are the fallbacks, in that order.
        eos_ids = _as_ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        if not eos_ids:
            eos_ids = _as_ids(_read_json(path / "config.json").get("eos_token_id"))
        if not eos_ids and eos_token is not None:
            token_id = tokenizer.token_to_id(eos_token)
            eos_ids = [] if token_id is None else [token_id]
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tokenizer, eos_ids, bos_token, eos_token, template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages the way transformers does: jinja2 in a sandbox, trim_blocks and
        lstrip_blocks on, raise_exception available to the template."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template (tokenizer_config.json has no chat_template)",
                param="messages",
                value=None,
            )
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the messages: {exc}", param="messages", value=None) from exc
