"""The data-parallel control plane: frames (engine/dp_frames.py) and the channels that move
them (parallel/control_channel.py) on several CPU processes."""

from __future__ import annotations

import os
import time

import pytest

from expertmesh.engine.dp_frames import OutputMirror, decode_add, encode_add, encode_outputs, pack, unpack
from expertmesh.engine.request_state import EngineRequest
from expertmesh.errors import CollectiveError
from expertmesh.outputs import CompletionOutput, Logprob, RequestOutput, RequestOutputKind
from expertmesh.sampling_params import SamplingParams

from ep_util import run_ranks


def test_add_round_trip():
    req = EngineRequest("hi", [5, 6, 7], SamplingParams(n=2, temperature=0.5, stop=["x"], seed=3, logprobs=2),
                        max_tokens=9, priority=-4)
    back, request_id = decode_add(unpack(pack(encode_add(req, "r1"))))
    assert request_id == "r1" and back == req


def _steps():
    """Three steps of a request with n=2 and logprobs, as a leader's engine makes them."""
    lp = [{7: Logprob(-0.1, 1, "a"), 3: Logprob(-2.0, 2, "b")}, {8: Logprob(-0.2, 1, "c")}, {9: Logprob(-0.3, 1, None)}]
    steps = []
    for t in range(1, 4):
        outs = [CompletionOutput(0, "abc"[:t], [7, 8, 9][:t], -0.1 * t, lp[:t], "length" if t == 3 else None,
                                 None, "abc"[t - 1]),
                CompletionOutput(1, "xy"[: min(t, 2)], [1, 2][: min(t, 2)], None, None,
                                 "stop" if t >= 2 else None, 2 if t >= 2 else None, "y" if t == 2 else "x" * (t == 1))]
        steps.append(RequestOutput("r1", "hi", [5, 6], outs, finished=t == 3))
    return steps


def _as_delta(steps):
    """The same steps as a leader's DELTA outputs: only what each step added."""
    sent, out = [0, 0], []
    for step in steps:
        seqs = []
        for seq in step.outputs:
            start, sent[seq.index] = sent[seq.index], len(seq.token_ids)
            seqs.append(CompletionOutput(seq.index, seq.text_delta, seq.token_ids[start:], seq.cumulative_logprob,
                                         None if seq.logprobs is None else seq.logprobs[start:], seq.finish_reason,
                                         seq.stop_reason, seq.text_delta))
        out.append(RequestOutput(step.request_id, step.prompt, step.prompt_token_ids, seqs, step.finished))
    return out


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_the_mirror_rebuilds_each_output_kind_from_deltas(kind):
    mirror = OutputMirror()
    mirror.expect(EngineRequest("hi", [5, 6], SamplingParams(n=2, logprobs=1), 3), "r1", kind)
    cumulative, deltas = _steps(), _as_delta(_steps())
    got = []
    for delta in deltas:
        got += mirror.decode(encode_outputs([delta]))
    want = {RequestOutputKind.CUMULATIVE: cumulative, RequestOutputKind.DELTA: deltas,
            RequestOutputKind.FINAL_ONLY: cumulative[-1:]}[kind]
    assert got == want
    assert not mirror._requests  # a finished request is forgotten
    assert mirror.decode(encode_outputs(deltas[:1])) == []  # unknown (aborted) requests are dropped


def _channel_rank(rank, world, groups, kind, capacity):
    from expertmesh.parallel.control_channel import ShmControlChannel, TorchControlChannel

    channel = ShmControlChannel(groups.control, rank, world, capacity) if kind == "shm" else \
        TorchControlChannel(groups.control, rank, world)
    seen = []
    for step, size in enumerate([0, 10, 5000, 3, 70000, 1]):  # several sizes over the mailbox's capacity
        command = channel.broadcast(bytes([step]) * size if rank == 0 else None)
        assert command == bytes([step]) * size
        reply = bytes([rank]) * (size * rank % 9000)  # replies of other sizes, some oversized
        got = channel.gather(reply)
        if rank == 0:
            seen.append(got == [bytes([r]) * (size * r % 9000) for r in range(world)])
    channel.close()
    return seen


@pytest.mark.parametrize("kind", ["shm", "torch"])
def test_channels_move_frames_of_any_size(kind):
    results = run_ranks(_channel_rank, 3, kind, 4096)
    assert results[0] == [True] * 6


def _dies(rank, world, port, queue):
    import torch

    from expertmesh.parallel.control_channel import ShmControlChannel
    from expertmesh.parallel.groups import RankInfo, init_groups

    groups = init_groups(RankInfo(rank, world, "127.0.0.1", port), torch.device("cpu"), timeout_s=60)
    channel = ShmControlChannel(groups.control, rank, world)
    channel.broadcast(b"go" if rank == 0 else None)
    if rank == 1:
        os._exit(0)  # a leader vanishes before replying
    start = time.monotonic()
    try:
        channel.gather(b"")
        queue.put(("no error", 0.0))
    except CollectiveError as exc:
        queue.put((str(exc), time.monotonic() - start))


def test_a_dead_leader_fails_rank_0_within_seconds():
    import torch.multiprocessing as mp

    from expertmesh.parallel.groups import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dies, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        message, waited = queue.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert "leader rank 1 of the control channel died" in message
    assert waited < 5
