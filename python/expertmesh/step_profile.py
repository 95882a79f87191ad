"""Where one rank's step time goes: exclusive seconds per section, counted only when asked.

Sections nest: time spent in an inner section is not counted again in the one around it, so
the sections of a rank add up to its step time. What opens them:
  step        the engine step itself (its own time: scheduling, embeddings, norms, logits,
              sampling, detokenizing -- everything no other section claims; reported as "other")
  attention   the attention blocks (projections, rotary, paged attention)
  experts     the MoE layers (router, local expert GEMMs, dispatch plans)
  all_to_all  dispatch and combine, less their waits (rows written to and read from peers)
  wait        waiting for peers' rows in the shared-memory all-to-all
  control     rank 0's command broadcast and output gather (leaders: receiving and replying)

Off (the default) every call returns at once. `EngineConfig(step_breakdown=True)` turns it on;
the engine's stats() then carry `step_breakdown` (per rank under a data-parallel layout).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

SECTIONS = ("attention", "experts", "all_to_all", "wait", "control", "other")


@dataclass
class StepProfile:
    """Exclusive time per section of one rank's steps."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SECTIONS, 0.0))  # exclusive totals
    steps: int = 0  # outermost steps profiled
    _stack: list[str] = field(default_factory=list)  # open sections, innermost last
    _mark: float = 0.0  # when the innermost open section last started counting

    def push(self, name: str) -> None:
        """Open section `name` (only inside a step; outside one nothing is counted)."""
        if not self._stack:
            return
        now = time.perf_counter()
        self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = now

    def pop(self) -> None:
        if len(self._stack) < 2:  # the step itself closes through step()
            return
        now = time.perf_counter()
        self.seconds[self._stack.pop()] += now - self._mark
        self._mark = now

    def move(self, source: str, dest: str, seconds: float) -> None:
        """Reassign time already counted in `source` to `dest` (a wait measured inside a call
        that was timed as a whole)."""
        if self.enabled and self._stack and seconds > 0:
            self.seconds[source] -= seconds
            self.seconds[dest] += seconds

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    @contextmanager
    def step(self):
        """One engine step (re-entrant: a step inside a step is part of it)."""
        if not self.enabled or self._stack:
            with self.section("other"):
                yield
            return
        self._stack, self._mark = ["other"], time.perf_counter()
        try:
            yield
        finally:
            # Sections an exception left open were counted up to their last inner push; the rest goes to "other".
            self.seconds["other"] += time.perf_counter() - self._mark
            self._stack = []
            self.steps += 1

    def snapshot(self) -> dict[str, object]:
        """{"steps": n, "ms_per_step": {section: ms}} (empty dict when off)."""
        if not self.enabled:
            return {}
        per = 1e3 / max(self.steps, 1)
        return {"steps": self.steps, "ms_per_step": {k: round(v * per, 4) for k, v in self.seconds.items()}}
