"""The engine's error boundary, in process: a failure that belongs to one request -- its draw,
its detokenization, its add, its outputs' encoding -- ends that request with an error and leaves
the others' tokens and the engine untouched; values the core would refuse never reach it; the
frontend's link reader and watchdog fail requests visibly instead of dying silently."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import pytest

from expertmesh import LLM, InvalidRequestError, SamplingParams
from expertmesh.engine.dp_engine import _add_or_fail
from expertmesh.errors import CoreError, EngineDeadError
from expertmesh.server.engine_client import EngineClient
from expertmesh.server.engine_process import EngineLoop
from expertmesh.server.link import encode, recv_frame

GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7], "b": [8, 9, 10, 11], "c": [12, 13]}


@pytest.fixture(scope="module")
def llm(mixtral_dir):
    return LLM(str(mixtral_dir), kv_cache_blocks=128, show_progress=False)


@pytest.fixture(scope="module")
def clean(llm):
    """Each prompt's greedy tokens when nothing fails."""
    outs = llm.generate(list(PROMPTS.values()), SamplingParams(**GREEDY), use_tqdm=False)
    return {name: out.outputs[0].token_ids for name, out in zip(PROMPTS, outs)}


def _run(llm, params: dict[str, SamplingParams]) -> dict:
    engine = llm.engine
    for name, prompt in PROMPTS.items():
        engine.add_request(prompt, params.get(name, SamplingParams(**GREEDY)), request_id=name)
    return engine.run_to_completion(list(PROMPTS))


def _assert_idle(llm) -> None:
    sched = llm.engine.scheduler
    assert not sched.has_unfinished() and not llm.engine.has_unfinished_requests()
    assert sched.num_free_blocks == sched.num_blocks


def test_a_failing_detokenizer_ends_only_its_request(llm, clean, monkeypatch):
    engine = llm.engine
    real_add = engine.add

    def add(req, request_id=None, *kind):
        rid = real_add(req, request_id, *kind)
        if rid == "b":
            seq = engine._requests[rid].seqs[0]
            calls = {"n": 0}
            real = seq.detokenizer.add_tokens

            def add_tokens(tokens, **kw):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("detokenizer exploded")
                return real(tokens, **kw)
            seq.detokenizer.add_tokens = add_tokens
        return rid

    monkeypatch.setattr(engine, "add", add)
    done = _run(llm, {})
    assert done["b"].outputs[0].finish_reason == "error" and len(done["b"].outputs[0].token_ids) == 3
    assert done["a"].outputs[0].token_ids == clean["a"] and done["c"].outputs[0].token_ids == clean["c"]
    _assert_idle(llm)


def test_a_failing_draw_ends_only_its_request(llm, clean, monkeypatch):
    real = llm.engine.sampler

    def sampler(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("poisoned row")
        return real(logits, params, generators)

    monkeypatch.setattr(llm.engine, "sampler", sampler)
    done = _run(llm, {"b": SamplingParams(**GREEDY, seed=666)})
    assert done["b"].outputs[0].finish_reason == "error"
    assert done["a"].outputs[0].token_ids == clean["a"] and done["c"].outputs[0].token_ids == clean["c"]
    _assert_idle(llm)


class _FlakyScheduler:
    """The real scheduler, except that the `fail_at`-th add_request raises."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.adds = inner, fail_at, 0

    def add_request(self, *args, **kwargs):
        self.adds += 1
        if self.adds == self.fail_at:
            raise CoreError("injected")
        return self.inner.add_request(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_add_is_all_or_nothing(llm, monkeypatch):
    flaky = _FlakyScheduler(llm.engine.scheduler, fail_at=2)
    monkeypatch.setattr(llm.engine, "scheduler", flaky)
    with pytest.raises(CoreError):
        llm.engine.add_request([5, 6], SamplingParams(n=3, **GREEDY), request_id="half")
    assert flaky.inner.num_waiting == 0 and not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([[5, 6]], SamplingParams(n=2, **GREEDY), use_tqdm=False)
    assert [o.finish_reason for o in out.outputs] == ["length", "length"]
    _assert_idle(llm)


@pytest.mark.parametrize("prompt, params, priority, param", [
    ([5, 6], SamplingParams(stop_token_ids=[3_000_000]), 0, "stop_token_ids[0]"),  # a valid i32, not in the vocab
    ([5, 2**31], SamplingParams(), 0, "prompt[1]"),
    ([5, 6], SamplingParams(), 2**63, "priority"),
    ([5, 6], SamplingParams(), True, "priority"),
])
def test_values_the_core_would_refuse_never_reach_it(llm, monkeypatch, prompt, params, priority, param):
    counting = _FlakyScheduler(llm.engine.scheduler, fail_at=0)
    monkeypatch.setattr(llm.engine, "scheduler", counting)
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request(prompt, params, priority=priority)
    assert info.value.param == param and counting.adds == 0


def _frames(sock: socket.socket, count: int) -> list[dict]:
    sock.settimeout(10)
    return [recv_frame(sock) for _ in range(count)]


def test_engine_loop_turns_add_failures_into_error_frames(llm, monkeypatch):
    ours, theirs = socket.socketpair()
    loop = EngineLoop(llm.engine, ours)
    add = {"type": "add", "prompt_ids": [5, 6], "params": {"max_tokens": 2}, "priority": 0}
    for exc, status in ((CoreError("stop_token_ids[0] must be in [0, 2147483647], got 3000000000"), 400),
                        (RuntimeError("bug"), 500)):
        def boom(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(llm.engine, "add", boom)  # what the loop calls once a request is checked
        assert loop._handle({**add, "id": f"x{status}"}) is True  # the loop goes on
        (frame,) = _frames(theirs, 1)
        assert frame["type"] == "error" and frame["id"] == f"x{status}" and frame["error"]["status"] == status
    monkeypatch.undo()
    assert loop._handle({**add, "id": "ok"})
    outputs = llm.engine.step()
    assert [o.request_id for o in outputs] == ["ok"]
    good = loop._outputs_frame(outputs, time.monotonic())["outputs"][0]
    bad = {**good, "id": "unsendable", "seqs": [{**good["seqs"][0], "text": "\ud800"}]}
    loop._send_outputs({"type": "outputs", "outputs": [good, bad]})
    first, second = _frames(theirs, 2)
    assert first == {"type": "error", "id": "unsendable", "error": {
        "message": first["error"]["message"], "param": None, "status": 500}}
    assert second["type"] == "outputs" and [o["id"] for o in second["outputs"]] == ["ok"]
    llm.engine.abort_request("ok")
    _assert_idle(llm)


def test_worker_rank_that_cannot_add_reports_an_error_output(llm):
    req = llm.engine.check_request([5, 6], SamplingParams(n=2, **GREEDY))

    class Broken:
        def add(self, req, request_id):
            raise RuntimeError("rank-local bug")

    out = _add_or_fail(Broken(), req, "r1")
    assert out.finished and [o.finish_reason for o in out.outputs] == ["error", "error"]
    assert _add_or_fail(llm.engine, req, "r2") is None
    llm.engine.abort_request("r2")
    _assert_idle(llm)


# ---- the frontend's side of the link ------------------------------------------------------------


def _client(timeout_s: float = 60.0) -> EngineClient:
    client = EngineClient(engine_timeout_s=timeout_s)
    client.process = subprocess.Popen(["sleep", "60"])  # stands in for the engine process
    return client


def test_a_frame_the_reader_cannot_use_kills_the_engine_visibly():
    async def main():
        client, reader = _client(), asyncio.StreamReader()
        q: asyncio.Queue = asyncio.Queue()
        client._queues["r"] = q
        reader.feed_data(encode({"type": "outputs", "outputs": [{"no_id": 1}]}))
        await asyncio.wait_for(client._read_loop(reader), 5)
        assert isinstance(q.get_nowait(), EngineDeadError) and client.dead.is_set()
        assert "reader failed" in client.dead_reason and "KeyError" in client.dead_reason
        assert client.process.wait(5) is not None  # killed: a confused engine does not linger
    asyncio.run(main())


def test_a_failing_stats_callback_does_not_stop_the_reader():
    async def main():
        client, reader = _client(), asyncio.StreamReader()
        q: asyncio.Queue = asyncio.Queue()
        client._queues["r"] = q
        client.on_stats = lambda frame: 1 / 0
        reader.feed_data(encode({"type": "stats", "num_running": 1}))
        reader.feed_data(encode({"type": "outputs", "outputs": [{"id": "r", "finished": True, "seqs": []}]}))
        reader.feed_eof()
        await asyncio.wait_for(client._read_loop(reader), 5)
        assert q.get_nowait()["id"] == "r" and client.stats["num_running"] == 1
        assert "exited" in client.dead_reason  # only the closed link ended it
        client.process.kill()
    asyncio.run(main())


def test_a_silent_engine_is_declared_dead_after_the_timeout():
    async def main():
        client = _client(timeout_s=0.3)
        q: asyncio.Queue = asyncio.Queue()
        client._queues["r"] = q
        client._busy_since = client._last_frame_at = time.monotonic()
        watchdog = asyncio.create_task(client._watchdog())
        item = await asyncio.wait_for(q.get(), 5)
        assert isinstance(item, EngineDeadError) and "sent nothing" in str(item)
        await asyncio.wait_for(watchdog, 5)
        assert client.process.wait(5) is not None
    asyncio.run(main())


def test_an_unencodable_add_registers_nothing():
    async def main():
        client = _client()
        with pytest.raises(ValueError, match="cannot be sent"):
            await client.add("r", [1], {"n": 2**64})
        assert client.num_in_flight == 0
        client.process.kill()
    asyncio.run(main())
