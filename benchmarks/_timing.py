"""Shared pieces of the benchmark scripts: median wall time after a warm-up, a test frame,
the machine line and the markdown table they print.

The scripts run as ``python benchmarks/bench_<name>.py``, so this folder is on ``sys.path``
and they import it as ``from _timing import median_seconds``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


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


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeat: int, sync: Callable[[], object] | None = None
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that a busy spell of a shared
    machine slows every contender alike (one untimed warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def noisy_frame(size: int, sky: float = 0.0, seed: int = 0) -> np.ndarray:
    """``size`` x ``size`` float32: Gaussian sky (``sky`` +- 15) plus a Pareto spray of sources."""
    rng = np.random.default_rng(seed)
    image = rng.normal(sky, 15.0, (size, size)).astype(np.float32)
    n = size * size // 5000
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    image[ys, xs] += rng.pareto(1.5, n).astype(np.float32) * 500.0
    return image


def machine() -> str:
    """The machine and NumPy version, for the line above each table."""
    return (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}"
    )


def print_table(description: str, header: str, rows: Sequence[tuple]) -> None:
    """Print ``machine: ...; description`` and a markdown table of median times.

    Each row is ``(name, seconds)`` or ``(name, seconds, reference_seconds)``; with a
    reference the table gets a ratio column headed ``header``.
    """
    print(f"machine: {machine()}; {description}")
    ratios = any(len(row) > 2 for row in rows)
    print("| step | median time (ms) |" + (f" {header} |" if ratios else ""))
    print("| --- | ---: |" + (" ---: |" if ratios else ""))
    for name, seconds, *ref in rows:
        ratio = f" {seconds / ref[0]:.2f} |" if ref else (" |" if ratios else "")
        print(f"| {name} | {seconds * 1e3:.1f} |{ratio}")
