"""Timing shared by the comm benches."""

from __future__ import annotations

import statistics
import time


def median_time(fn, iters: int) -> float:
    """Median seconds per call over `iters` calls after 3 warm-up calls: the median, because on
    a shared 2-core VM single calls are sometimes descheduled for milliseconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
