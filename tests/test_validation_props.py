"""Property tests of the request validator (hypothesis), in process.

1. The published schema and the validator agree: bodies generated from /openapi.json's request
   schemas are accepted, except by the cross-field rules the schema cannot state (best_of == n,
   prompts x n within the per-request limit), which the descriptions name.
2. Any JSON body at all is either accepted or refused with InvalidRequestError / a 400 naming
   what is wrong -- never another exception.
3. What the validator accepts, the engine link can encode and the Rust core accepts: the edge
   knows every limit the core has.
"""

from __future__ import annotations

import math
import os

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from expertmesh import fields
from expertmesh._core import Scheduler
from expertmesh.errors import InvalidRequestError
from expertmesh.limits import I64_MAX, I64_MIN, RequestLimits
from expertmesh.sampling_params import SamplingParams
from expertmesh.server import openapi
from expertmesh.server import request_fields as rf
from expertmesh.server.protocol import ChatCompletionRequest, CompletionRequest
from expertmesh.server.validation import ErrorResponse, check_json_value

LIMITS = RequestLimits(vocab_size=652, max_model_len=48, max_seqs_per_request=8)
# 400 examples per property in the suite; bench/reliability/run_fuzz.py runs many more.
FAST = settings(max_examples=int(os.environ.get("EXPERTMESH_HYPOTHESIS_EXAMPLES", 400)), deadline=None,
                suppress_health_check=list(HealthCheck), database=None)
ENDPOINTS = [("/v1/completions", CompletionRequest, rf.COMPLETION_FIELDS),
             ("/v1/chat/completions", ChatCompletionRequest, rf.CHAT_FIELDS)]
_SCHEMA = schemathesis.openapi.from_dict(openapi.document(LIMITS))


def _cross_field(exc: InvalidRequestError) -> bool:
    """The rules no JSON Schema keyword states, named in the fields' descriptions."""
    return (exc.param == "best_of" and "equal to n" in exc.message) or "per request" in exc.message


@pytest.mark.parametrize("path, cls, _", ENDPOINTS)
def test_bodies_generated_from_the_published_schema_are_accepted(path, cls, _):
    @FAST
    @given(_SCHEMA[path]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE))
    def check(case):
        try:
            cls.from_body(case.body, LIMITS)
        except InvalidRequestError as exc:
            assert _cross_field(exc), f"schema-valid body refused: {exc.param}: {exc} -- {case.body!r}"

    check()


_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
            | st.text(alphabet=st.characters(categories=["Cs"]), max_size=2))  # lone surrogates
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


# Integers at every edge the core, msgpack and the vocabulary have, and around them.
_INTS = (st.integers(min_value=-1, max_value=40)
         | st.sampled_from([651, 652, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]) | st.integers())
_BASES = {"/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}}


def _values(field) -> st.SearchStrategy:
    """Mostly values of the field's type (so that many bodies pass), sometimes anything."""
    typed = {fields.IntField: _INTS, fields.NumberField: st.floats(0, 1) | st.floats() | _INTS, fields.BoolField: st.booleans(),
             fields.StopField: st.lists(st.text(max_size=3), max_size=3) | st.text(max_size=3),
             fields.TokenIdsField: st.lists(_INTS, max_size=3)}
    for kind, strategy in typed.items():
        if isinstance(field, kind):
            return strategy | strategy | _JSON
    return _JSON


def _bodies(path, declared) -> st.SearchStrategy[dict]:
    """A valid body with a few fields overwritten (so that many are accepted and some are not)."""
    by_name = {f.name: f for f in declared if not f.required}
    overlay = st.lists(st.sampled_from(sorted(by_name)).flatmap(lambda name: st.tuples(st.just(name),
                                                                                       _values(by_name[name]))),
                       max_size=3, unique_by=lambda kv: kv[0]).map(dict)
    junk = st.dictionaries(st.text(max_size=4), st.none() | _JSON, max_size=1)
    return st.tuples(overlay, junk).map(lambda parts: {**_BASES[path], **parts[1], **parts[0]})


def _parse(cls, body: dict):
    """The server's parse of a body: the JSON checks, then the request fields."""
    try:
        check_json_value(body)
        return cls.from_body(body, LIMITS)
    except ErrorResponse as exc:
        assert exc.status == 400
    except InvalidRequestError as exc:
        assert exc.param is not None and exc.message, exc
    return None


@pytest.mark.parametrize("path, cls, declared", ENDPOINTS)
def test_any_json_body_is_accepted_or_refused_cleanly_and_accepted_ones_reach_the_core(path, cls, declared):
    core = Scheduler(num_blocks=1 << 16, block_size=16, max_num_seqs=256, max_num_batched_tokens=4096,
                     max_model_len=LIMITS.max_model_len)
    next_id = iter(range(1 << 62))
    reached = []

    @FAST
    @given(_bodies(path, declared))
    def check(body):
        req = _parse(cls, body)
        if req is None:
            return
        logprobs = req.logprobs if cls is CompletionRequest else req.engine_logprobs
        for prompt in (req.prompts if cls is CompletionRequest else [[1, 2]]):
            ids = prompt if isinstance(prompt, list) else [7] * min(len(prompt), 5)
            try:
                max_tokens = LIMITS.check_context(len(ids), req.max_tokens)
                params = req.sampling_params(max_tokens, logprobs)
            except InvalidRequestError as exc:
                assert exc.param is not None
                return
            # The engine link carries it (msgpack) and the engine rebuilds the same params from it.
            wire = msgpack.unpackb(msgpack.packb({k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in params.__dict__.items()}))
            assert SamplingParams(**wire) == params
            # The core takes it as the engine hands it over: no CoreError, no OverflowError.
            core.add_request(next(next_id), ids, max_tokens=max_tokens, stop_token_ids=list(params.stop_token_ids),
                             eos_token_id=0, ignore_eos=params.ignore_eos, priority=0)
            reached.append(body)

    check()
    assert len(reached) > 40, f"only {len(reached)} generated bodies reached the core: the property is not exercised"


@FAST
@given(st.lists(_INTS, min_size=1, max_size=4), st.lists(_INTS, max_size=4))
def test_token_ids_the_validator_accepts_are_token_ids_the_core_accepts(prompt, stop_ids):
    """Where the core's limit (31-bit ids) and the model's (the vocabulary) meet msgpack's (64-bit ints)."""
    core = Scheduler(num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                     max_model_len=LIMITS.max_model_len)
    req = _parse(CompletionRequest, {"prompt": prompt, "stop_token_ids": stop_ids, "max_tokens": 1})
    in_vocab = all(0 <= t < LIMITS.vocab_size for t in prompt + stop_ids)
    assert (req is not None) == in_vocab
    if req is not None:
        params = req.sampling_params(1, None)
        core.add_request(0, req.prompts[0], max_tokens=1, stop_token_ids=list(params.stop_token_ids))


def test_every_integer_field_is_bounded_within_what_the_engine_link_carries():
    """msgpack carries signed and unsigned 64-bit ints: an unbounded field would let a request
    through the validator that the link cannot encode (top_k once had no upper bound)."""
    for field in (*rf.COMPLETION_FIELDS, *rf.CHAT_FIELDS, *rf.DETOKENIZE_FIELDS):
        schema = field.value_schema(LIMITS)
        ints = [schema, *(s for s in schema.get("anyOf", [])), schema.get("items", {})]
        for part in ints:
            if part.get("type") == "integer":
                assert I64_MIN <= part["minimum"] and part["maximum"] <= I64_MAX, (field.name, part)


@FAST
@given(st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | st.booleans() | st.text(max_size=3))
def test_every_int_field_accepts_exactly_what_its_schema_admits(value):
    """Each field's check and its own schema agree value by value (ints, floats, bools, text)."""
    for field in (*rf.COMPLETION_FIELDS, *rf.CHAT_FIELDS):
        if not isinstance(field, fields.IntField) or isinstance(field, rf.BestOfField):
            continue
        schema = field.value_schema(LIMITS)
        is_int = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
        in_schema = is_int and schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
        try:
            field.check(value, LIMITS, from_json=True)
            accepted = True
        except InvalidRequestError as exc:
            accepted = False
            assert exc.param == field.name, exc
        assert accepted == in_schema, (field.name, value)
