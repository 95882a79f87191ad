"""How one request wants its tokens chosen and when it wants to stop: `SamplingParams`.

The fields and their meaning follow vLLM's SamplingParams (and so OpenAI's request fields),
so clients and scripts carry over. Everything is checked once, in __post_init__: a bad value
raises InvalidRequestError naming the field, the limit and the value, which the server turns
into HTTP 400. After construction the object is frozen: one instance is shared by the n
sequences of a request and by the sampler every step, so nobody may change it underneath.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from expertmesh.fields import BoolField, IntField, NumberField, StopField, TokenIdsField
from expertmesh.limits import I64_MAX, I64_MIN

# Below this temperature dividing the logits overflows fp32 and the result is argmax anyway,
# so such requests are treated as greedy (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP_STRINGS = 16

# Each field's check, declared once; the HTTP validator and the OpenAPI document use them too.
FIELDS = {f.name: f for f in (
    IntField("n", "number of completions to generate for each prompt", 1, lo=1),
    NumberField("temperature", "sampling temperature; 0 is greedy", 1.0, lo=0),
    NumberField("top_p", "nucleus sampling: keep the smallest set of tokens whose probability sums to top_p", 1.0,
                lo=0, lo_open=True, hi=1),
    IntField("top_k", "keep the k most likely tokens; -1 or 0: all", 0, lo=-1, hi=I64_MAX,
             limit=f"-1 or 0 (off) or in [1, {I64_MAX}]"),
    NumberField("min_p", "drop tokens less likely than min_p times the most likely one", 0.0, lo=0, hi=1),
    IntField("seed", "seed of this request's random draws (sequence i uses seed + i)", None, lo=I64_MIN, hi=I64_MAX),
    IntField("max_tokens", "most tokens to generate", 16, lo=1),
    StopField("stop", "strings that end generation (not included in the text)", None, max_items=MAX_STOP_STRINGS),
    TokenIdsField("stop_token_ids", "token ids that end generation", None),
    BoolField("ignore_eos", "keep generating after the end-of-sequence token", False),
    BoolField("include_stop_str_in_output", "include the matched stop string in the text", False),
    IntField("logprobs", "log-probabilities of this many most likely tokens per step (and the sampled one)", None,
             lo=0, hi=MAX_LOGPROBS),
    BoolField("skip_special_tokens", "leave special tokens out of the text", True),
)}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request (vLLM-compatible names and defaults).

    Normalisation done on construction: `stop` becomes a tuple of strings (a single string
    is one stop string), `stop_token_ids` a tuple of ints, `top_k` -1 becomes 0 (both mean
    "off"), numbers become float. Token ids are checked against the core's limit here and
    against the model's vocabulary when the engine takes the request.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: consider the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: as many as the context leaves room for
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n alternatives per step; the sampled token always comes too
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalised values are written once, here
        optional = {"seed", "max_tokens", "logprobs"}
        for name, spec in FIELDS.items():
            value = getattr(self, name)
            if name in ("stop", "stop_token_ids"):
                set_field(self, name, () if value is None else tuple(spec.check(value)))
            elif value is not None or name not in optional:
                set_field(self, name, spec.check(value))
        set_field(self, "top_k", max(self.top_k, 0))

    # ---- derived facts the sampler and detokenizer ask for ---------------------------------

    @property
    def greedy(self) -> bool:
        """True when the result is argmax whatever the noise: temperature ~0 or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` after normalisation (typed for callers; always a tuple)."""
        return self.stop  # type: ignore[return-value]

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)
