"""SamplingParams: defaults, normalisation, and a clear InvalidRequestError for every bad value."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from expertmesh.errors import InvalidRequestError
from expertmesh.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.logprobs) == (None, 16, None)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy


def test_normalisation():
    p = SamplingParams(temperature=1, top_p=1, stop="###", stop_token_ids=[7, 9], top_k=-1, max_tokens=None)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.stop == ("###",) and p.stop_strings == ("###",) and p.max_stop_len == 3
    assert p.stop_token_ids == (7, 9)
    assert p.top_k == 0  # -1 and 0 both mean "off"
    assert p.max_tokens is None
    assert SamplingParams(stop=["a", "bcd"]).max_stop_len == 3


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy  # below fp32's safe range for dividing
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy


def test_frozen_and_replace_revalidates():
    p = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 2.0  # type: ignore[misc]
    assert dataclasses.replace(p, stop=("x",)).stop == ("x",)
    with pytest.raises(InvalidRequestError):
        dataclasses.replace(p, top_p=0.0)


def test_accepts_boundaries():
    SamplingParams(top_p=1e-9, top_k=1, min_p=1.0, max_tokens=1, logprobs=0, seed=-(2**63), n=1)
    SamplingParams(min_p=0.0, logprobs=MAX_LOGPROBS, seed=2**63 - 1, stop=["x"] * MAX_STOP_STRINGS)


BAD_VALUES = [
    # (kwargs, param, fragment of the message)
    ({"n": 0}, "n", "n must be >= 1, got 0"),
    ({"n": 1.0}, "n", "n must be an integer"),
    ({"n": True}, "n", "n must be an integer"),
    ({"temperature": -1.0}, "temperature", "temperature must be >= 0, got -1.0"),
    ({"temperature": math.nan}, "temperature", "temperature must be a finite number, got nan"),
    ({"temperature": math.inf}, "temperature", "finite"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number, got str 'hot'"),
    ({"temperature": None}, "temperature", "must be a number"),
    ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"top_p": -0.1}, "top_p", "(0, 1]"),
    ({"top_p": math.nan}, "top_p", "finite"),
    ({"top_k": -2}, "top_k", "top_k must be -1 or 0 (off) or in [1, 9223372036854775807], got -2"),
    ({"top_k": 2.5}, "top_k", "top_k must be an integer"),
    ({"top_k": 2**63}, "top_k", "got 9223372036854775808"),  # the engine link carries 64-bit ints
    ({"min_p": -0.5}, "min_p", "min_p must be in [0, 1], got -0.5"),
    ({"min_p": 1.01}, "min_p", "[0, 1]"),
    ({"min_p": math.inf}, "min_p", "finite"),
    ({"seed": 1.5}, "seed", "seed must be an integer, got float 1.5"),
    ({"seed": "42"}, "seed", "seed must be an integer"),
    ({"seed": 2**64}, "seed", "seed must be in"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"max_tokens": -5}, "max_tokens", ">= 1"),
    ({"max_tokens": 3.0}, "max_tokens", "max_tokens must be an integer"),
    ({"logprobs": -1}, "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got -1"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"got {MAX_LOGPROBS + 1}"),
    ({"logprobs": True}, "logprobs", "must be an integer"),
    ({"stop": ""}, "stop[0]", "stop[0] must not be empty"),
    ({"stop": ["ok", ""]}, "stop[1]", "stop[1] must not be empty"),
    ({"stop": ["ok", 3]}, "stop[1]", "stop[1] must be a string, got int 3"),
    ({"stop": 5}, "stop", "stop must be a string or a list of strings, got int"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS} strings, got 17"),
    ({"stop_token_ids": 5}, "stop_token_ids", "must be a list of token ids"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids[1]", "stop_token_ids[1] must be a token id in [0, 2147483647], got -1"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids[1]", "must be a token id"),
    # The core stores token ids in 31 bits: bigger ones are refused here, before the core sees them.
    ({"stop_token_ids": [3_000_000_000]}, "stop_token_ids[0]", "in [0, 2147483647], got 3000000000"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids[0]", "got 9223372036854775808"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false, got int 1"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "true or false"),
    ({"skip_special_tokens": None}, "skip_special_tokens", "true or false"),
]


@pytest.mark.parametrize(("kwargs", "param", "fragment"), BAD_VALUES, ids=[str(b[0])[:40] for b in BAD_VALUES])
def test_rejects_bad_values(kwargs, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    err = info.value
    assert isinstance(err, ValueError)  # plain callers can catch the usual type
    assert err.param == param
    assert fragment in str(err), str(err)


def test_error_carries_value_and_pickles():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=-3)
    assert info.value.value == -3.0
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.param, copy.value, str(copy)) == ("temperature", -3.0, "temperature must be >= 0, got -3.0")
    assert copy.to_dict()["param"] == "temperature"
