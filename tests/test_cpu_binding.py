"""Cores and threads per CPU rank (parallel/cpu_binding.py)."""

from __future__ import annotations

import os

import pytest
import torch

from expertmesh.config import EngineConfig
from expertmesh.errors import InvalidRequestError
from expertmesh.parallel.cpu_binding import bind_rank, parse_cpu_bind, rank_cores


@pytest.mark.parametrize(("cores", "ranks", "expected"), [
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1], [2, 3, 4]]),
    ([0, 1], 2, [[0], [1]]),
    ([0, 1], 4, [[0], [1], [0], [1]]),  # more ranks than cores: they share, one thread each
    ([4, 6, 8], 3, [[4], [6], [8]]),  # a restricted affinity (taskset) is what gets split
])
def test_auto_splits_the_allowed_cores(cores, ranks, expected):
    assert [rank_cores("auto", r, ranks, cores) for r in range(ranks)] == expected


def test_one_rank_and_nobind_leave_the_process_alone():
    assert rank_cores("auto", 0, 1, [0, 1]) is None
    assert rank_cores("nobind", 1, 2, [0, 1]) is None


def test_explicit_lists_in_vllm_spelling():
    assert parse_cpu_bind("0-3|4,6-7") == [[0, 1, 2, 3], [4, 6, 7]]
    assert rank_cores("0|1", 1, 2, [0, 1]) == [1]


@pytest.mark.parametrize(("spec", "words"), [
    ("", "cpu_bind must be"),
    ("0-x|1", "bad part '0-x'"),
    ("3-1", "bad part '3-1'"),
])
def test_bad_specs_name_the_part(spec, words):
    with pytest.raises(InvalidRequestError, match=words) as info:
        EngineConfig(cpu_bind=spec)
    assert info.value.param == "cpu_bind"


def test_lists_must_match_the_ranks_and_the_allowed_cores():
    with pytest.raises(InvalidRequestError, match="cores for 2 ranks, but 4 ranks"):
        rank_cores("0|1", 0, 4, [0, 1])
    with pytest.raises(InvalidRequestError, match=r"cores \[5\] this process may not run on"):
        rank_cores("0|5", 1, 2, [0, 1])


def test_bind_pins_every_thread_and_restores():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    last = max(before)
    binding = bind_rank(f"{last}|{last}", 1, 2)
    try:
        assert binding is not None and binding.cores == [last]
        assert torch.get_num_threads() == 1
        for tid in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(tid)) == {last}
    finally:
        binding.restore()
    assert os.sched_getaffinity(0) == before and torch.get_num_threads() == threads
