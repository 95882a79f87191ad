"""A real `expertmesh serve` process driven by the official `openai` client, the SDK and raw
HTTP: completions and chat (streamed and not), n, stop, usage, logprobs, 64 concurrent streams,
validation errors, auth, admission, body limit, disconnects, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from expertmesh.limits import RequestLimits
from expertmesh.sdk import AsyncClient, Client
from expertmesh.sdk import errors as sdk_errors
from expertmesh.server import openapi
from server_util import ServerProcess, http, metric, wait_until

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 256
MAX_WAITING_TOKENS = 2000


@pytest.fixture(scope="module")
def server(mixtral_dir, tmp_path_factory):
    srv = ServerProcess([
        "--model", str(mixtral_dir), "--served-model-name", "tiny", "--api-key", KEY,
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-blocks", "512", "--max-waiting-tokens",
        str(MAX_WAITING_TOKENS), "--max-body-bytes", "100000",
    ], tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sdk(server):
    return Client(server.url, api_key=KEY, timeout=60, max_retries=0)


def test_openai_completion_and_usage(oai):
    out = oai.completions.create(model="tiny", prompt="The experts of a mixture", max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6


def test_openai_streaming_matches_non_streaming(oai):
    kwargs = dict(model="tiny", prompt="Hello there", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kwargs).choices[0].text
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_chat_stream_and_n(oai):
    msgs = [{"role": "user", "content": "Say something"}]
    out = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=3, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 15 and out.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=2, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["length", "length"] and texts[0] == texts[1]  # greedy: both the same


def test_stop_string_ends_text(oai, sdk):
    base = sdk.completion("The experts", model="tiny", max_tokens=12, temperature=0, ignore_eos=True)
    text = base.choices[0].text
    stop = text[3:6]
    assert stop.strip(), text
    out = sdk.completion("The experts", model="tiny", max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == text[: text.index(stop)]
    streamed = oai.completions.create(model="tiny", prompt="The experts", max_tokens=12, temperature=0, stop=[stop],
                                      stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_logprobs_both_shapes(oai):
    out = oai.completions.create(model="tiny", prompt="Hello", max_tokens=4, logprobs=2, temperature=0,
                                 extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) == 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)


def test_sdk_stream_and_async_64_concurrent(server):
    async def one(client: AsyncClient, i: int) -> tuple[int, str | None, int]:
        stream = await client.completion(f"prompt number {i}", model="tiny", max_tokens=4 + i % 5, ignore_eos=True,
                                         stream=True, include_usage=True, temperature=0.8, seed=i)
        tokens, reason, usage = 0, None, None
        async for chunk in stream:
            for c in chunk.choices:
                reason = c.finish_reason or reason
            usage = chunk.usage or usage
        return usage.completion_tokens, reason, 4 + i % 5

    async def run():
        async with AsyncClient(server.url, api_key=KEY, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 60)

    for got, reason, want in asyncio.run(run()):
        assert (got, reason) == (want, "length")


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "top_p": float("inf")}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": [1, 2, 100000]}, "prompt[2]"),
    ({"prompt": [[1, 2], [3, 100000]]}, "prompt[1][1]"),
    ({"prompt": ["a", [1, 2]]}, "prompt[1]"),
    ({"prompt": ["a", ""]}, "prompt[1]"),
    ({"prompt": [[5, 6], [5] * 300]}, "prompt[1]"),  # the second prompt overflows the context
    ({"prompt": "hi", "stream": "yes"}, "stream"),
])
def test_validation_errors_are_400_naming_the_field(server, body, param):
    status, _, payload = http("POST", server.url + "/v1/completions", raw=json.dumps(body).encode(), headers=AUTH)
    assert status == 400, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 4}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"50": 100}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "suffix": " the end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),  # a chat field
    ("/v1/completions", {"prompt": "hi", "temprature": 0.5}, "temprature"),  # a typo is not ignored
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"presence_penalty": 1.0}, "presence_penalty"),
    ("/v1/chat/completions", {"logit_bias": {"7": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"echo": False}, "echo"),  # a completions field
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "",
                                            "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages[0].tool_calls"),
])
def test_unsupported_fields_are_400_not_ignored(server, path, body, param):
    if path.endswith("chat/completions") and "messages" not in body:
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    status, _, payload = http("POST", server.url + path, body, headers=AUTH)
    assert status == 400, payload
    err = payload["error"]
    assert err["param"] == param and "not supported" in err["message"] and param.split(".")[-1] in err["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(oai):
    out = oai.completions.create(model="tiny", prompt="hi", max_tokens=2, presence_penalty=0, frequency_penalty=0.0,
                                 echo=False, best_of=1, logit_bias={}, suffix="", user="me",
                                 extra_body={"repetition_penalty": 1.0})
    assert len(out.choices) == 1
    out = oai.completions.create(model="tiny", prompt="hi", max_tokens=2, n=2, best_of=2)
    assert len(out.choices) == 2
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       presence_penalty=0, frequency_penalty=0, logit_bias={}, tools=[],
                                       tool_choice="none", response_format={"type": "text"}, user="me")
    assert chat.choices[0].message.role == "assistant"


def test_batch_of_prompts_is_one_request_per_prompt(oai, sdk):
    kwargs = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    singles = [oai.completions.create(prompt=p, **kwargs) for p in ("The experts", "A mixture of", "Hello")]
    out = oai.completions.create(prompt=["The experts", "A mixture of", "Hello"], n=2, **kwargs)
    assert [c.index for c in out.choices] == list(range(6))
    for p, single in enumerate(singles):
        assert [out.choices[p * 2 + i].text for i in range(2)] == [single.choices[0].text] * 2
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert out.usage.completion_tokens == 3 * 2 * 4
    # token-id lists too, and streamed: every chunk's choice carries its index
    ids = [sdk.tokenize("The experts"), sdk.tokenize("Hello")]
    whole = oai.completions.create(prompt=ids, **kwargs)
    assert [c.text for c in whole.choices] == [singles[0].choices[0].text, singles[2].choices[0].text]
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in oai.completions.create(prompt=ids, stream=True, stream_options={"include_usage": True}, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices] and reasons == ["length", "length"]
    assert usage.completion_tokens == 8 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_malformed_json_unknown_model_body_limit_auth(server):
    status, _, payload = http("POST", server.url + "/v1/completions", raw=b"{not json", headers=AUTH)
    assert status == 400 and "JSON" in payload["error"]["message"]
    status, _, payload = http("POST", server.url + "/v1/completions", {"model": "gpt-9", "prompt": "x"}, headers=AUTH)
    assert status == 404 and payload["error"]["param"] == "model" and "gpt-9" in payload["error"]["message"]
    status, _, payload = http("POST", server.url + "/v1/completions", {"prompt": "x" * 200_000}, headers=AUTH)
    assert status == 413 and "100000" in payload["error"]["message"]
    status, _, payload = http("POST", server.url + "/v1/completions", {"prompt": "x"})
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    status, _, _ = http("POST", server.url + "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer no"})
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", server.url + "/health")[0] == 200  # probes need no key


def test_sdk_maps_errors_and_honours_retry_after(server, sdk):
    with pytest.raises(sdk_errors.BadRequestError) as info:
        sdk.completion("hi", model="tiny", temperature=-2)
    assert info.value.param == "temperature"
    with pytest.raises(sdk_errors.NotFoundError):
        sdk.completion("hi", model="nope")
    # One request whose prompt tokens x n alone exceed the waiting-token limit can never be
    # admitted: 400 naming the limit and the value, not a 429 that no retry would get past.
    prompt = list(range(5, 205))
    status, headers, payload = http("POST", server.url + "/v1/completions", {"prompt": prompt, "n": 11}, headers=AUTH)
    assert status == 400 and "Retry-After" not in headers, payload
    assert payload["error"]["param"] == "n" and payload["error"]["code"] == "request_too_large"
    assert str(MAX_WAITING_TOKENS) in payload["error"]["message"] and "2200" in payload["error"]["message"]
    with pytest.raises(sdk_errors.BadRequestError):
        Client(server.url, api_key=KEY, max_retries=3).completion(prompt, n=11)  # no retries on 400
    status, _, payload = http("POST", server.url + "/v1/completions", {"prompt": [prompt[:120], prompt[:120]], "n": 9},
                              headers=AUTH)
    assert status == 400 and "2160" in payload["error"]["message"], payload  # a batch counts all its prompts


def test_transient_overload_is_429_with_retry_after_then_succeeds(server):
    # Each request alone fits the waiting-token limit (1600 <= 2000), two waiting at once do not:
    # fired together, some are refused with 429 + Retry-After while others wait for their first token.
    body = {"prompt": list(range(5, 205)), "n": 8, "max_tokens": 2, "ignore_eos": True}

    async def one(session: aiohttp.ClientSession) -> tuple[int, str | None]:
        async with session.post(server.url + "/v1/completions", json=body, headers=AUTH) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")

    async def burst():
        async with aiohttp.ClientSession() as session:
            return await asyncio.wait_for(asyncio.gather(*(one(session, ) for _ in range(12))), 60)

    results = asyncio.run(burst())
    assert {s for s, _ in results} <= {200, 429} and (200, None) in results, results
    assert (429, "1") in results, results
    # Once the burst is over the same request is admitted, directly and through the SDK's retries.
    status, _, payload = http("POST", server.url + "/v1/completions", body, headers=AUTH)
    assert status == 200 and len(payload["choices"]) == 8, payload
    out = Client(server.url, api_key=KEY, max_retries=5, timeout=60).completion(**body)
    assert len(out.choices) == 8


def test_models_tokenize_detokenize(server, sdk):
    assert sdk.models() == ["tiny"]
    ids = sdk.tokenize("Hello world")
    assert ids and sdk.detokenize(ids).endswith("Hello world")
    status, _, payload = http("POST", server.url + "/detokenize", {"tokens": [-1]}, headers=AUTH)
    assert status == 400 and payload["error"]["param"] == "tokens[0]"


def _validate(schema: dict, value, doc: dict, where: str = "$") -> None:
    """A small JSON-schema check (type, enum, required, properties, items, oneOf, $ref)."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                return _validate(option, value, doc, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no oneOf option: {errors}")
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        py = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "null": type(None),
              "boolean": bool}
        assert any(isinstance(value, py[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                   for t in names), f"{where}: {value!r} is not {names}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _validate(sub, value[key], doc, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _validate(schema["items"], item, doc, f"{where}[{i}]")


def test_openapi_document_matches_real_responses(server, mixtral_dir):
    status, _, doc = http("GET", server.url + "/openapi.json")
    vocab = json.loads((mixtral_dir / "config.json").read_text())["vocab_size"]
    # The request schemas carry this server's limits: its vocabulary and context.
    assert status == 200 and doc == json.loads(json.dumps(openapi.document(RequestLimits(vocab, MAX_MODEL_LEN))))
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[1]["items"]["maximum"] == vocab - 1 and prompt[1]["maxItems"] == MAX_MODEL_LEN - 1

    def check(path: str, method: str, code: int, body) -> None:
        schema = doc["paths"][path][method]["responses"][str(code)]["content"]["application/json"]["schema"]
        _validate(schema, body, doc)

    for path, req in [("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 1}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]:
        status, _, body = http("POST", server.url + path, req, headers=AUTH)
        check(path, "post", status, body)
        status, _, body = http("POST", server.url + path, {**req, "max_tokens": -1}, headers=AUTH)
        check(path, "post", status, body)
        status, _, body = http("POST", server.url + path, req)
        check(path, "post", 401, body)
    check("/v1/models", "get", 200, http("GET", server.url + "/v1/models", headers=AUTH)[2])
    check("/health", "get", 200, http("GET", server.url + "/health")[2])
    check("/tokenize", "post", 200, http("POST", server.url + "/tokenize", {"prompt": "a b"}, headers=AUTH)[2])
    check("/detokenize", "post", 200, http("POST", server.url + "/detokenize", {"tokens": [5, 6]}, headers=AUTH)[2])
    # and every streamed chunk has the response's shape
    stream = Client(server.url, api_key=KEY).chat([{"role": "user", "content": "x"}], max_tokens=3, stream=True,
                                                  include_usage=True)
    for chunk in stream:
        _validate(doc["components"]["schemas"]["ChatCompletion"], chunk.__class__.to_dict(chunk), doc)


def _metrics(server) -> str:
    return http("GET", server.url + "/metrics")[2]


def test_metrics_move_and_disconnects_free_blocks(server):
    before = _metrics(server)
    out = Client(server.url, api_key=KEY).completion("count me", max_tokens=5, ignore_eos=True)
    assert out.usage.completion_tokens == 5
    after = wait_until(lambda: (t := _metrics(server)) and metric(t, "expertmesh:prefix_cache_queries_total") >
                       metric(before, "expertmesh:prefix_cache_queries_total") and t, 10, "engine stats to move")
    gen = "expertmesh:generation_tokens_total"
    assert metric(after, gen) - metric(before, gen) == 5
    for name in ("expertmesh:e2e_request_latency_seconds_count", "expertmesh:time_to_first_token_seconds_count",
                 "expertmesh:request_queue_time_seconds_count", "expertmesh:prompt_tokens_total"):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "expertmesh:inter_token_latency_seconds_count") - metric(
        before, "expertmesh:inter_token_latency_seconds_count") == 4
    experts = sum(metric(after, "expertmesh:expert_tokens_total", layer="0", expert=str(e)) for e in range(8))
    assert experts > sum(metric(before, "expertmesh:expert_tokens_total", layer="0", expert=str(e)) for e in range(8))

    # 24 streams that would each run 200 tokens; read one chunk, then hang up.
    async def hang_up(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"abort me {i}", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with session.post(server.url + "/v1/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            await resp.content.readline()

    async def run():
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(asyncio.gather(*(hang_up(session, i) for i in range(24))), 60)

    asyncio.run(run())

    def idle() -> str | None:
        t = _metrics(server)
        done = all(metric(t, m) == 0 for m in ("expertmesh:num_requests_running", "expertmesh:num_requests_waiting",
                                               "expertmesh:kv_cache_usage_perc"))
        return t if done else None

    final = wait_until(idle, 20, "aborted streams to free their requests and KV blocks")
    assert metric(final, gen) - metric(after, gen) < 24 * 200 / 2  # they were cut short, not run out


def test_chat_message_name_is_accepted(server):
    body = {"messages": [{"role": "user", "content": "hi", "name": "ada", "tool_calls": None}], "max_tokens": 2}
    status, _, payload = http("POST", server.url + "/v1/chat/completions", body, headers=AUTH)
    assert status == 200, payload
    status, _, payload = http("POST", server.url + "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi", "name": 3}]}, headers=AUTH)
    assert status == 400 and payload["error"]["param"] == "messages[0].name", payload
