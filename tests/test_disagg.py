"""Disaggregated prefill and decode, as a user runs it: `expertmesh serve --role prefill`,
`expertmesh serve --role decode` and `expertmesh router --prefill URL --decode URL`, on
loopback, the built-in model, against a colocated server (--role both).

Through the router, the official openai client gets the colocated server's greedy outputs
(completions and chat, stream and not, concurrent requests, a shared prefix); the KV really
moves (the prefill server serves pulls, the decode server installs them and computes only what
they do not cover; a shared prefix's blocks travel once); a decode server whose pull fails
computes the prompt itself and still answers right; wrong uses get 400s naming the field; and
afterwards neither tier holds a block or a pin.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest

from server_util import ServerProcess, http, metric, wait_until
from test_router import RouterProcess

GREEDY = dict(model="expertmesh-tiny-moe", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
PREFIX = "The experts of a mixture route every token to a few of their number, " * 4  # several KV blocks


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("disagg")
    prefill = ServerProcess(["--role", "prefill", "--kv-cache-blocks", "256"], root / "prefill.log")
    decode = ServerProcess(["--disaggregation-mode", "decode", "--kv-cache-blocks", "256", "--kv-transfer-timeout",
                            "3"], root / "decode.log")
    colocated = ServerProcess(["--kv-cache-blocks", "256"], root / "colocated.log")
    router = RouterProcess(["--prefill", prefill.url, "--decode", decode.url, "--health-interval", "0.5"],
                           root / "router.log")
    yield prefill, decode, colocated, router
    router.stop()
    for s in (prefill, decode, colocated):
        s.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _metrics(server) -> str:
    return http("GET", server.url + "/metrics")[2]


def _m(server, name: str) -> float:
    return metric(_metrics(server), f"expertmesh:{name}")


def _settled(*servers) -> bool:
    return all(_m(s, "kv_cache_usage_perc") == 0 and _m(s, "num_requests_running") == 0
               and _m(s, "kv_transfer_pinned") == 0 for s in servers)


def test_through_both_tiers_the_client_gets_the_colocated_answer(tiers):
    prefill, decode, colocated, router = tiers
    pulls0, hits0 = _m(prefill, "kv_transfer_pulls_total"), _m(decode, "prefix_cache_hits_total")
    prompt = PREFIX + "Which experts?"
    want = _client(colocated.url).completions.create(prompt=prompt, **GREEDY).choices[0].text
    assert _client(router.url).completions.create(prompt=prompt, **GREEDY).choices[0].text == want
    chunks = list(_client(router.url).completions.create(prompt=prompt, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    messages = [{"role": "user", "content": PREFIX + "Say something."}]
    chat = _client(colocated.url).chat.completions.create(messages=messages, **GREEDY).choices[0].message.content
    stream = _client(router.url).chat.completions.create(messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat
    # The KV moved (the repeat may find it cached) and the decode side used it; stats frames trail
    # the answers, so wait for them.
    wait_until(lambda: _m(prefill, "kv_transfer_pulls_total") - pulls0 >= 2, 10, "the prefill side's pulls")
    wait_until(lambda: _m(decode, "prefix_cache_hits_total") - hits0 >= 16 * 3, 10, "the decode side's prefix hits")
    wait_until(lambda: _settled(prefill, decode), 10, "both tiers to hold no block and no pin")


def test_concurrent_requests_sharing_a_prefix_move_its_blocks_once(tiers):
    prefill, decode, colocated, router = tiers
    skipped0 = _m(decode, "kv_transfer_blocks_skipped_total")
    prompts = [PREFIX + f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    want = [c.text for c in sorted(_client(colocated.url).completions.create(prompt=prompts, **GREEDY).choices,
                                   key=lambda c: c.index)]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = _client(router.url).completions.create(prompt=prompts[i], **GREEDY).choices[0].text

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    first.join(60)  # the first puts the prefix in the decode server's cache...
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(6)] == want
    wait_until(lambda: _m(decode, "kv_transfer_blocks_skipped_total") - skipped0 >= 5 * 3, 10,
               "the others to skip the prefix's blocks")
    wait_until(lambda: _settled(prefill, decode), 10, "both tiers to hold no block and no pin")


def test_a_failed_pull_computes_the_prompt_and_wrong_uses_get_clear_errors(tiers):
    prefill, decode, colocated, router = tiers
    prompt = "A prompt no tier has seen, about pulls and pins. " * 5  # so the decode side needs its blocks
    status, _, answer = http("POST", prefill.url + "/v1/completions",
                             {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 200, answer
    params = answer["kv_transfer_params"]
    failures0 = _m(decode, "kv_transfer_failures_total")
    bogus = {**params, "transfer_id": params["transfer_id"] ^ 1}  # a transfer the prefill server never made
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "kv_transfer_params": bogus}
    status, _, answer = http("POST", decode.url + "/v1/completions", body)
    want = _client(colocated.url).completions.create(prompt=prompt, **GREEDY).choices[0].text
    assert status == 200 and answer["choices"][0]["text"] == want
    wait_until(lambda: _m(decode, "kv_transfer_failures_total") == failures0 + 1, 10, "the failed pull's count")
    # The real transfer is still pinned; it is let go at its timeout, or pulled now:
    body["kv_transfer_params"] = params
    assert http("POST", decode.url + "/v1/completions", body)[2]["choices"][0]["text"] == want
    wait_until(lambda: _settled(prefill, decode), 10, "both tiers to hold no block and no pin")

    for server, kv, param in ((decode, {"do_remote_decode": True}, "kv_transfer_params"),
                              (colocated, {"do_remote_decode": True}, "kv_transfer_params"),
                              (prefill, {"do_remote_decode": True, "transfer_id": 1}, "kv_transfer_params.transfer_id"),
                              (decode, {**params, "remote_port": 0}, "kv_transfer_params.remote_port"),
                              (decode, {"do_remote_prefill": True}, "kv_transfer_params.transfer_id")):
        status, _, answer = http("POST", server.url + "/v1/completions", {"prompt": "x", "kv_transfer_params": kv})
        assert status == 400 and answer["error"]["param"] == param, (server.url, kv, answer)
    status, _, answer = http("POST", prefill.url + "/v1/completions",
                             {"prompt": "x", "stream": True, "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 400 and answer["error"]["param"] == "stream"


def test_a_client_leaving_during_the_pull_leaves_nothing_behind(tiers):
    """The decode server waits on a prefill side that never answers; the client gives up; the
    pull times out; the request is gone and no block is held on either side."""
    prefill, decode, _, _ = tiers
    status, _, answer = http("POST", prefill.url + "/v1/completions",
                             {"prompt": "Yet another unseen prompt. " * 8, "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": True}})
    params = answer["kv_transfer_params"]
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        stalled = {**params, "remote_port": silent.getsockname()[1]}
        failures0 = _m(decode, "kv_transfer_failures_total")
        body = {"prompt": "Yet another unseen prompt. " * 8, "max_tokens": 8, "kv_transfer_params": stalled}
        raw = json.dumps(body).encode()
        client = socket.create_connection(("127.0.0.1", decode.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        wait_until(lambda: _m(decode, "kv_transfer_waiting") == 1, 10, "the request to wait for its KV")
        client.close()  # the client leaves while the KV travels
        wait_until(lambda: _m(decode, "kv_transfer_failures_total") == failures0 + 1, 15, "the pull to time out")
        wait_until(lambda: _m(decode, "kv_transfer_waiting") == 0 and _settled(decode), 10, "the decode side to settle")
        time.sleep(0.3)
        assert _m(decode, "num_requests_running") == 0 and _m(decode, "num_requests_waiting") == 0
    finally:
        silent.close()
    # The real transfer was never pulled: the prefill side lets it go at --kv-pin-timeout; pull it now.
    assert http("POST", decode.url + "/v1/completions", {**body, "kv_transfer_params": params})[0] == 200
    wait_until(lambda: _settled(prefill, decode), 10, "both tiers to hold no block and no pin")
