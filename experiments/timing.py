"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() (which must block until the device is done) after warm-up calls
    (the first of which compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
