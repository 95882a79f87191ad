"""Exclusive time per section (step_profile.py), on a fake clock."""

from __future__ import annotations

import pytest

from expertmesh import step_profile
from expertmesh.step_profile import StepProfile


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(step_profile.time, "perf_counter", lambda: now[0])
    return now


def test_sections_are_exclusive_and_add_up_to_the_step(clock):
    prof = StepProfile(enabled=True)
    with prof.step():
        clock[0] += 1  # other
        with prof.section("experts"):
            clock[0] += 2
            with prof.section("all_to_all"):
                clock[0] += 3
                with prof.section("wait"):
                    clock[0] += 4
            clock[0] += 5  # experts again
        with prof.step():  # a nested step is part of the outer one
            clock[0] += 6
    snap = prof.snapshot()
    assert snap["steps"] == 1
    assert snap["ms_per_step"] == {"attention": 0.0, "experts": 7000.0, "all_to_all": 3000.0, "wait": 4000.0,
                                   "control": 0.0, "other": 7000.0}
    assert sum(snap["ms_per_step"].values()) == 21000.0


def test_sections_outside_a_step_and_a_disabled_profile_count_nothing(clock):
    prof = StepProfile(enabled=True)
    with prof.section("wait"):
        clock[0] += 1
    assert prof.snapshot()["ms_per_step"]["wait"] == 0.0
    off = StepProfile()
    with off.step(), off.section("wait"):
        clock[0] += 1
    assert off.snapshot() == {} and off.steps == 0


def test_an_exception_closes_the_step(clock):
    prof = StepProfile(enabled=True)
    with pytest.raises(RuntimeError), prof.step(), prof.section("experts"):
        clock[0] += 1
        raise RuntimeError("boom")
    with prof.step():
        clock[0] += 1
    assert prof.steps == 2 and prof.seconds["experts"] == 1.0 and prof.seconds["other"] == 1.0
