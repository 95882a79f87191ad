"""Turning a sequence's tokens into text as they arrive, and ending it on stop strings:
`IncrementalDetokenizer`.

Decoding token by token is wrong in general: byte-level BPE splits one character over several
tokens (each alone decodes to U+FFFD), and SentencePiece-style decoders drop the leading space
of whatever they decode first. So, as in Hugging Face TGI and vLLM, each step decodes a small
window twice, starting at `prefix_offset`:

    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted
    new_text    = decode(ids[prefix_offset:])              # emitted + new
    delta       = new_text[len(prefix_text):]              # both saw the same window start

and emits `delta` only when `new_text` does not end in U+FFFD (an unfinished character may
still be completed by the next token); the window then slides forward. SentencePiece byte
fallback (<0xNN> tokens, Llama / Mixtral) needs one more rule: its decoder turns a whole run of
byte tokens into U+FFFDs when the run ends in an invalid sequence, so text is also held while
the sequence ends in a byte token (e.g. "\n" is <0x0A>: shown one token late). Held text is
released by `flush()` when the sequence ends, so the final text equals one full decode.

The window starts a few tokens into the prompt, as in vLLM, so the first generated token is
decoded in context: "Once upon a" + "▁time" gives " time", not "time". For byte-level BPE
(GPT-2 style) this changes nothing: the output text equals `tokenizer.decode(output_ids)`
exactly. For SentencePiece-style decoders it keeps the first token's leading space, which
decode(output_ids) alone would strip. The context never ends in a byte token (trailing ones are
dropped) or inside a character (then there is none), so output bytes never merge into it.
Pass prompt_context_tokens=0 to decode outputs alone.

Stop strings are searched in the decoded text, so they match across token boundaries. Text is
cut before the earliest stop string (or after it with include_stop_str_in_output). A tail of
the text that is the beginning of some stop string is held back from the deltas: streaming
never shows text that a later stop string would cut.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tokenizers import Tokenizer

from expertmesh.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) a character
# Prompt tokens decoded before the output, enough to settle spaces and merges (vLLM uses 5).
DEFAULT_PROMPT_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class TokenizerFacts:
    """What the detokenizer must know about a tokenizer's ids, found once per tokenizer."""

    byte_fallback_ids: frozenset[int]  # <0xNN> tokens that a ByteFallback decoder turns into bytes
    special_ids: frozenset[int]  # ids that skip_special_tokens leaves out


_FACTS: weakref.WeakKeyDictionary[Tokenizer, TokenizerFacts] = weakref.WeakKeyDictionary()


def tokenizer_facts(tokenizer: Tokenizer) -> TokenizerFacts:
    facts = _FACTS.get(tokenizer)
    if facts is None:
        special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        byte_ids = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)}
        found = {b: i for b, i in byte_ids.items() if i is not None}
        # The tokens exist in every SentencePiece vocabulary; they are bytes only when the
        # decoder says so (ByteFallback), which decoding one of them shows.
        if found:
            b, i = next(iter(found.items()))
            if tokenizer.decode([i], skip_special_tokens=False) == f"<0x{b:02X}>":
                found = {}
        facts = TokenizerFacts(frozenset(found.values()), special)
        _FACTS[tokenizer] = facts
    return facts


class DetokenizerDelta(NamedTuple):
    text: str  # new text the client may see now; never retracted later
    stop_str: str | None  # the stop string that just ended the sequence, else None


class IncrementalDetokenizer:
    """Detokenizer and stop-string checker of one sequence; feed it every generated token."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt_context_tokens: int = DEFAULT_PROMPT_CONTEXT_TOKENS,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stop_strings = params.stop_strings
        self._max_stop_len = params.max_stop_len
        self._include_stop = params.include_stop_str_in_output

        self._facts = tokenizer_facts(tokenizer)

        context = list(prompt_token_ids[-prompt_context_tokens:]) if prompt_context_tokens > 0 else []
        # Output bytes must not merge into the context's text: drop a trailing run of
        # byte-fallback tokens, and give up on context that ends inside a character.
        while context and self._byte_group_open(context):
            context.pop()
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            context, context_text = [], ""
        self._ids: list[int] = context  # [context..., decoded output...]
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = context_text  # decode(ids[prefix:read]); None = stale

        self.token_ids: list[int] = []  # every generated token, stop tokens included
        self._text = ""  # decoded output so far (settled characters only), cut at a stop string
        self._emitted = 0  # characters of _text already handed out
        self.finished = False
        self.stop_reason: str | None = None  # the stop string found, if any

    @property
    def output_text(self) -> str:
        """Text handed out so far (the concatenated deltas); the final text once finished."""
        return self._text[: self._emitted]

    # ---- feeding ---------------------------------------------------------------------------

    def add_tokens(self, new_token_ids: Sequence[int], *, stop_terminated: bool = False) -> DetokenizerDelta:
        """Add generated tokens; returns the text delta and the stop string that hit, if any.

        stop_terminated=True says the last token is an eos / stop token id that ended the
        sequence: its text is left out (unless include_stop_str_in_output), as vLLM does, and
        held text is flushed. After a stop string or the end, the detokenizer takes no tokens.
        """
        if self.finished:
            raise RuntimeError(
                f"sequence already finished (stop reason {self.stop_reason!r}); got tokens {list(new_token_ids)}"
            )
        new_token_ids = list(new_token_ids)
        self.token_ids.extend(new_token_ids)
        if stop_terminated and new_token_ids and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        self._ids.extend(new_token_ids)
        stop_str = self._append_text(self._decode_new(final=stop_terminated))
        if stop_terminated:
            self.finished = True
        return DetokenizerDelta(self._take_delta(), stop_str)

    def flush(self) -> str:
        """End the sequence (length, eos, abort, ...): release all held text, return its delta.

        Bytes that never completed a character come out as U+FFFD, as in a full decode. A stop
        string found in that last text still cuts it (see `stop_reason`)."""
        if not self.finished:
            self._append_text(self._decode_new(final=True))
            self.finished = True
        return self._take_delta()

    # ---- decoding --------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        """The newly settled text of ids[read_offset:], sliding the window when there is some."""
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token: nothing to show, keep waiting
        if not final and (new_text.endswith(REPLACEMENT_CHAR) or self._byte_group_open(self._ids)):
            # The last character may still be completed by the next token; and a ByteFallback
            # decoder turns a whole run of byte tokens into U+FFFDs if the run ends invalid,
            # so text from an open run may still change.
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None  # recomputed lazily: only needed if another step comes
        return delta

    def _byte_group_open(self, ids: Sequence[int]) -> bool:
        """Whether ids end in a byte-fallback token (ignoring special tokens being skipped)."""
        byte_ids = self._facts.byte_fallback_ids
        if not byte_ids:
            return False
        for token in reversed(ids):
            if self._skip_special_tokens and token in self._facts.special_ids:
                continue
            return token in byte_ids
        return False

    # ---- stop strings ----------------------------------------------------------------------

    def _append_text(self, delta: str) -> str | None:
        """Append settled text; on a stop string cut the text there, finish, return it."""
        if not delta:
            return None
        old_len = len(self._text)
        self._text += delta
        if not self._stop_strings:
            return None
        # A match ending in the old text would have been found last time; begin where a match
        # could first reach into the new text.
        search_from = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stop_strings:
            at = self._text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        cut = at + len(stop) if self._include_stop else at
        # Held-back tails guarantee nothing past `cut` was handed out already.
        assert self._emitted <= cut, (self._emitted, cut, self._text, stop)
        self._text = self._text[:cut]
        self.finished = True
        self.stop_reason = stop
        return stop

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string could still start with."""
        if self._include_stop or self.finished:
            # Included stop strings are shown anyway, so a partial one is safe to show.
            return 0
        text = self._text
        longest = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _take_delta(self) -> str:
        end = len(self._text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
