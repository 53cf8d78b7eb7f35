"""Shared timing for the benchmark scripts: median wall time after a warm-up.

The scripts run as ``python benchmarks/bench_<name>.py``, so this folder is on ``sys.path``
and they import it as ``from _timing import median_seconds``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(
    fn: Callable[[], object],
    repeat: int,
    sync: Callable[[], object] | None = None,
    warm_up: bool = True,
) -> float:
    """Median wall-clock seconds of ``repeat`` calls of ``fn``.

    Parameters
    ----------
    fn : callable
        The work to time, called with no arguments.
    repeat : int
        Number of timed calls.
    sync : callable, optional
        Called after each call before the clock stops (``cupy.cuda.Device().synchronize``
        for GPU work, whose kernels return before they finish).
    warm_up : bool
        Make one untimed call first (plans, caches, first-touch allocation).
    """
    if warm_up:
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
