"""The Rust core seen from Python: the schedule/update loop, array dtypes and shapes, errors,
panics, route() against a numpy reference, and the GIL being released during real work.

Legend: N scheduled requests, T tokens, S sampling requests, E experts, k top-k, R ranks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from expertmesh import _core
from expertmesh._core import CoreError, Scheduler


def make_scheduler(**overrides: int | bool) -> Scheduler:
    kwargs: dict[str, int | bool] = dict(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128
    )
    kwargs.update(overrides)
    return Scheduler(**kwargs)  # type: ignore[arg-type]


def fake_model(out: _core.SchedulerOutput, rng: np.random.Generator) -> np.ndarray:
    """Returns one random token per sampling request, checking the batch on the way."""
    t = out.input_ids.shape[0]
    n = out.request_ids.shape[0]
    assert out.positions.shape == (t,) and out.slot_mapping.shape == (t,)
    assert out.query_start_loc.shape == (n + 1,) and out.query_start_loc[-1] == t
    assert out.seq_lens.shape == (n,)
    assert out.block_tables.ndim == 2 and out.block_tables.shape[0] == n
    assert out.logits_indices.shape == out.sample_request_ids.shape
    assert out.num_prefill_tokens + out.num_decode_tokens == t
    assert out.is_empty == (t == 0)
    return np.asarray(rng.integers(0, 50, size=out.sample_request_ids.shape[0]), dtype=np.int64)  # [S]


def test_schedule_update_loop_finishes_everything() -> None:
    sched = make_scheduler(num_blocks=24)
    rng = np.random.default_rng(0)
    prompts = {i: rng.integers(0, 50, size=int(rng.integers(1, 30))).tolist() for i in range(12)}
    for rid, prompt in prompts.items():
        sched.add_request(rid, prompt, max_tokens=int(rng.integers(1, 20)), eos_token_id=3, priority=rid % 2)
    finished: dict[int, str] = {}
    for _ in range(1000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        for rid, reason in sched.update(fake_model(out, rng)):
            assert reason in ("stop", "length")
            assert 1 <= len(sched.output_token_ids(rid))
            finished[rid] = reason
    assert sorted(finished) == sorted(prompts)
    assert sched.num_free_blocks == sched.num_blocks == 24
    assert sched.num_waiting == sched.num_running == 0
    stats = sched.stats()
    assert set(stats) == {
        "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "num_free_blocks", "num_cached_blocks"
    }
    assert all(isinstance(v, int) for v in stats.values())


def test_output_arrays_dtypes_shapes_and_values() -> None:
    sched = make_scheduler()
    sched.add_request(7, np.arange(6, dtype=np.int64), max_tokens=2)
    sched.add_request(8, [1, 2, 3], max_tokens=2)
    out = sched.schedule()
    expected = {
        "request_ids": np.uint64, "input_ids": np.int32, "positions": np.int32, "slot_mapping": np.int64,
        "query_start_loc": np.int32, "seq_lens": np.int32, "block_tables": np.int32,
        "sample_request_ids": np.uint64, "logits_indices": np.int32,
    }
    for name, dtype in expected.items():
        assert getattr(out, name).dtype == dtype, name
    np.testing.assert_array_equal(out.request_ids, [7, 8])
    np.testing.assert_array_equal(out.input_ids, [0, 1, 2, 3, 4, 5, 1, 2, 3])
    np.testing.assert_array_equal(out.positions, [0, 1, 2, 3, 4, 5, 0, 1, 2])
    np.testing.assert_array_equal(out.query_start_loc, [0, 6, 9])
    np.testing.assert_array_equal(out.seq_lens, [6, 3])
    np.testing.assert_array_equal(out.logits_indices, [5, 8])
    assert out.block_tables.shape == (2, 2)
    assert out.block_tables[1, 1] == 0  # padding
    bt = out.block_tables
    slots = [bt[0, p // 4] * 4 + p % 4 for p in range(6)] + [bt[1, 0] * 4 + p for p in range(3)]
    np.testing.assert_array_equal(out.slot_mapping, slots)
    assert out.block_tables.flags.c_contiguous
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (9, 0)
    assert sched.update(np.array([11, 12], dtype=np.int32)) == []
    out = sched.schedule()
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (0, 2)
    np.testing.assert_array_equal(out.input_ids, [11, 12])
    assert sorted(sched.update([5, 6])) == [(7, "length"), (8, "length")]
    assert sched.output_token_ids(7) == [11, 5]


def test_empty_schedule() -> None:
    out = make_scheduler().schedule()
    assert out.is_empty
    assert out.block_tables.shape == (0, 0)
    assert out.query_start_loc.tolist() == [0]


def test_prefix_cache_and_abort() -> None:
    sched = make_scheduler()
    prompt = list(range(9))
    sched.add_request(1, prompt, max_tokens=1)
    sched.schedule()
    assert sched.update([0]) == [(1, "length")]
    sched.add_request(2, prompt, max_tokens=4)
    out = sched.schedule()
    np.testing.assert_array_equal(out.positions, [8])  # 2 cached blocks of 4, 1 token computed
    assert sched.stats()["prefix_cache_hits"] == 8
    assert sched.abort(2) is True
    assert sched.abort(2) is False
    assert sched.update([1]) == []  # the aborted request's token is dropped
    assert sched.num_free_blocks == 64
    sched.add_request(3, [1], max_tokens=3)
    assert sched.finish_request(3, "error") is True
    assert not sched.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": [], "max_tokens": 1}, "len(prompt_token_ids) must be >= 1, got 0"),
        ({"prompt": [1], "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"prompt": [1] * 100, "max_tokens": 29}, "max_model_len (128), got 100 + 29 = 129"),
        ({"prompt": [1, -2], "max_tokens": 1}, "prompt_token_ids[1] must be in [0, 2147483647], got -2"),
        ({"prompt": [1] * 10, "max_tokens": 10}, "needs up to 5 KV blocks"),
    ],
)
def test_add_request_errors(kwargs: dict, message: str) -> None:
    sched = make_scheduler(num_blocks=4)
    with pytest.raises(CoreError) as info:
        sched.add_request(1, kwargs["prompt"], max_tokens=kwargs["max_tokens"])
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_other_errors() -> None:
    with pytest.raises(CoreError, match="block_size must be >= 1, got 0"):
        make_scheduler(block_size=0)
    with pytest.raises(CoreError, match="num_blocks must be >= 0, got -1"):
        make_scheduler(num_blocks=-1)
    sched = make_scheduler()
    sched.add_request(1, [1, 2], max_tokens=2)
    with pytest.raises(CoreError, match="request_id 1 is already in use"):
        sched.add_request(1, [1], max_tokens=1)
    sched.schedule()
    with pytest.raises(CoreError, match=r"one entry per sample_request_id \(1\), got 2"):
        sched.update([1, 2])
    with pytest.raises(CoreError, match="update\\(\\) must follow"):
        sched.schedule()
    with pytest.raises(CoreError, match=r"reason must be one of .*got \"length\""):
        sched.finish_request(1, "length")
    with pytest.raises(CoreError, match="unknown request_id 99"):
        sched.output_token_ids(99)
    with pytest.raises(TypeError, match="prompt_token_ids must be a sequence of ints"):
        sched.add_request(2, "abc", max_tokens=1)  # type: ignore[arg-type]
    assert sched.update([4]) == []
    assert sched.finish_request(1, "stop") is True


def route_reference(topk_ids: np.ndarray, num_experts: int, num_ranks: int) -> dict[str, np.ndarray]:
    flat = topk_ids.reshape(-1)  # [T*k]
    order = np.argsort(flat, kind="stable")
    positions = np.empty_like(order)
    positions[order] = np.arange(flat.size)
    counts = np.bincount(flat, minlength=num_experts)
    per_rank = num_experts // num_ranks
    ranks = topk_ids // per_rank  # [T, k]
    sends = np.array([(ranks == r).any(axis=1).sum() for r in range(num_ranks)])
    return {
        "sorted_pair_ids": order,
        "pair_positions": positions,
        "tokens_per_expert": counts,
        "expert_offsets": np.concatenate([[0], np.cumsum(counts)]),
        "rank_send_counts": sends,
    }


@pytest.mark.parametrize(("t", "k", "e", "r"), [(0, 2, 4, 2), (1, 1, 1, 1), (37, 2, 8, 4), (500, 4, 64, 8)])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_route_matches_numpy(t: int, k: int, e: int, r: int, dtype: type) -> None:
    ids: np.ndarray = np.random.default_rng(t).integers(0, e, size=(t, k)).astype(dtype)
    plan = _core.route(ids, e, r)
    for name, want in route_reference(ids, e, r).items():
        got = getattr(plan, name)
        assert got.dtype == np.int64, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_route_errors() -> None:
    with pytest.raises(CoreError, match=r"topk_ids\[1, 0\] must be in \[0, num_experts=4\), got 4"):
        _core.route(np.array([[0], [4]], dtype=np.int32), 4)
    with pytest.raises(CoreError, match="num_experts must be a multiple of num_ranks"):
        _core.route(np.zeros((2, 2), dtype=np.int32), 6, 4)
    with pytest.raises(TypeError, match="2-D int32 or int64"):
        _core.route(np.zeros(4, dtype=np.int32), 4)  # type: ignore[arg-type]
    # Non-contiguous input is fine.
    ids = np.arange(16, dtype=np.int32).reshape(4, 4) % 4
    np.testing.assert_array_equal(_core.route(ids.T, 4).tokens_per_expert, [4, 4, 4, 4])


def test_panic_becomes_python_exception() -> None:
    with pytest.raises(BaseException, match="boom from rust") as info:
        _core._panic_for_tests("boom from rust")
    assert type(info.value).__name__ == "PanicException"
    # The interpreter and the GIL are fine afterwards.
    sched = make_scheduler()
    sched.add_request(1, [1], max_tokens=1)
    assert sched.schedule().request_ids.tolist() == [1]


def test_gil_released_during_route() -> None:
    """While route() works on a large input, another Python thread keeps running."""
    ids = np.random.default_rng(0).integers(0, 64, size=(1 << 20, 4), dtype=np.int32)
    ticks: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.01)
        for _ in range(5):
            start = time.perf_counter()
            _core.route(ids, 64, 8)
            end = time.perf_counter()
            margin = (end - start) * 0.25
            inside = [x for x in ticks if start + margin < x < end - margin]
            if inside:
                break
    finally:
        stop.set()
        thread.join()
    assert inside, f"no Python progress during a {end - start:.3f}s route() call"


def test_schedule_from_another_thread() -> None:
    sched = make_scheduler()
    sched.add_request(1, [1, 2, 3], max_tokens=1)
    result: list[_core.SchedulerOutput] = []
    thread = threading.Thread(target=lambda: result.append(sched.schedule()))
    thread.start()
    thread.join()
    assert result[0].request_ids.tolist() == [1]
    assert sched.update([0]) == [(1, "length")]
