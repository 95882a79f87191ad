"""Workloads that need no download: random, prefix-repetition and a JSONL file of prompts.

Random prompts are token ids, so their lengths are exact on any server that accepts token-id
prompts on /v1/completions (expertmesh, vLLM, SGLang); `as_text` decodes them with a
tokenizer for servers that take only text (the server then re-tokenizes, and lengths can
drift a little, as in vLLM's random dataset).

Length ranges follow vLLM's current `--random-range-ratio r` convention: each length is drawn
uniformly from [floor(L * (1 - r)), ceil(L * (1 + r))], r in [0, 1); r = 0 means exactly L.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("random", "prefix-repetition", "jsonl")


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens; for a text prompt of unknown length, the server's usage fills it in
    output_len: int  # max_tokens to ask for


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float, lo_min: int) -> np.ndarray:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    lo = max(lo_min, math.floor(length * (1 - ratio)))
    hi = max(lo, math.ceil(length * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n)


def _ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    # Id 0 is skipped: it is a special token (eos / pad) in many vocabularies.
    return rng.integers(1, vocab_size, size=n).tolist()


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[SampleRequest]:
    """`num` prompts of random token ids with lengths around input_len / output_len."""
    if vocab_size < 2:
        raise ValueError(f"vocab size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num, input_len, range_ratio, 1)
    out_lens = _lengths(rng, num, output_len, range_ratio, 1)
    return [SampleRequest(_ids(rng, int(i), vocab_size), int(i), int(o)) for i, o in zip(in_lens, out_lens)]


def prefix_repetition_requests(num: int, prefix_len: int, suffix_len: int, num_prefixes: int, output_len: int,
                               vocab_size: int, seed: int = 0) -> list[SampleRequest]:
    """`num_prefixes` groups of prompts; a group shares a random prefix of prefix_len tokens and
    each prompt adds its own random suffix. Shuffled, so a prefix cache must find the shared
    blocks among interleaved groups (the prefix-cache study of vLLM's prefix_repetition)."""
    if num_prefixes < 1 or num < num_prefixes:
        raise ValueError(f"need 1 <= num_prefixes <= num prompts, got {num_prefixes} and {num}")
    rng = np.random.default_rng(seed)
    prefixes = [_ids(rng, prefix_len, vocab_size) for _ in range(num_prefixes)]
    out = [SampleRequest(prefixes[i % num_prefixes] + _ids(rng, suffix_len, vocab_size), prefix_len + suffix_len,
                         output_len) for i in range(num)]
    order = rng.permutation(num)
    return [out[i] for i in order]


def jsonl_requests(path: str | Path, num: int | None, output_len: int, tokenizer: Any | None = None
                   ) -> list[SampleRequest]:
    """One JSON object per line: {"prompt": text or token ids, "output_len": int (optional,
    also read as "max_tokens" / "output_tokens")}. Lines are used in order, cycled if fewer
    than `num`. prompt_len comes from the ids, the tokenizer, or (0) the server's usage."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt
                                                            and all(isinstance(t, int) for t in prompt)):
            raise ValueError(f"{path}:{lineno}: needs a non-empty \"prompt\" (text or a list of token ids)")
        out = next((obj[k] for k in ("output_len", "max_tokens", "output_tokens") if isinstance(obj.get(k), int)),
                   output_len)
        if isinstance(prompt, list):
            plen = len(prompt)
        elif tokenizer is not None:
            plen = len(tokenizer.encode(prompt).ids)
        else:
            plen = 0
        rows.append(SampleRequest(prompt, plen, int(out)))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    n = len(rows) if num is None else num
    return [replace(rows[i % len(rows)]) for i in range(n)]


def as_text(requests: list[SampleRequest], tokenizer: Any) -> list[SampleRequest]:
    """Token-id prompts decoded to text (a `tokenizers.Tokenizer`), for text-only servers."""
    return [replace(r, prompt=tokenizer.decode(r.prompt)) if isinstance(r.prompt, list) else r for r in requests]


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a checkpoint directory or a tokenizer.json file."""
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
