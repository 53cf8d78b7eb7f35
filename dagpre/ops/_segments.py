"""Reductions over segments of a pixel list, on NumPy or CuPy.

A *segment* is the set of entries of a 1-D array that share an integer id in ``[0, n)``.
Sums come from ``bincount`` with weights, minima and maxima from the scatter reductions
``minimum.at`` / ``maximum.at`` (both backends have them; a sort would cost far more), and
arg-extrema from a second scatter over the entries equal to the extremum. No Python loop
over segments.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def segment_sum(xp, ids: Any, n: int, weights: Any = None) -> Any:
    """Sum of ``weights`` (or the count of entries) per segment, float64 (int64 for counts)."""
    if weights is None:
        return xp.bincount(ids, minlength=n)[:n]
    return xp.bincount(ids, weights=weights.astype(xp.float64, copy=False), minlength=n)[:n]


def _extreme(xp, ids, n, values, largest: bool):
    info = np.finfo if np.dtype(values.dtype).kind == "f" else np.iinfo
    start = info(values.dtype).min if largest else info(values.dtype).max
    out = xp.full(n, start, dtype=values.dtype)
    (xp.maximum if largest else xp.minimum).at(out, ids, values)
    return out


def segment_max(xp, ids: Any, n: int, values: Any, empty: float = 0.0) -> Any:
    """Largest value per segment (``empty`` where a segment has no entries)."""
    out = _extreme(xp, ids, n, values, largest=True)
    counts = xp.bincount(ids, minlength=n)[:n]
    return xp.where(counts > 0, out, xp.asarray(empty, dtype=values.dtype))


def segment_min(xp, ids: Any, n: int, values: Any, empty: float = 0.0) -> Any:
    """Smallest value per segment (``empty`` where a segment has no entries)."""
    out = _extreme(xp, ids, n, values, largest=False)
    counts = xp.bincount(ids, minlength=n)[:n]
    return xp.where(counts > 0, out, xp.asarray(empty, dtype=values.dtype))


def _arg_extreme(xp, ids, n, values, largest: bool):
    ext = _extreme(xp, ids, n, values, largest)
    hit = xp.flatnonzero(values == ext[ids])
    big = ids.size
    out = xp.full(n, big, dtype=xp.int64)
    xp.minimum.at(out, ids[hit], hit.astype(xp.int64))
    return xp.where(out == big, -1, out)


def segment_argmax(xp, ids: Any, n: int, values: Any) -> Any:
    """Index of the first largest value of each segment (-1 for an empty segment).

    "First" is in input order, which for a pixel list in scan order is SExtractor's choice
    (it keeps a peak only when a later pixel is strictly higher).
    """
    return _arg_extreme(xp, ids, n, values, largest=True)


def segment_argmin(xp, ids: Any, n: int, values: Any) -> Any:
    """Index of the first smallest value of each segment (-1 for an empty segment)."""
    return _arg_extreme(xp, ids, n, values, largest=False)


def segment_kth_largest(xp, ids: Any, n: int, values: Any, k: int, empty: float = 0.0) -> Any:
    """The ``k``-th largest value per segment (1-based); ``empty`` where fewer than ``k``.

    Small ``k`` (SExtractor's ``minarea``) peels off the largest value ``k - 1`` times with
    scatter reductions; larger ``k`` sorts.
    """
    counts = xp.bincount(ids, minlength=n)[:n]
    if k <= 16 and np.dtype(values.dtype).kind == "f":
        rest_ids, rest = ids, values
        for _ in range(k - 1):
            top = segment_argmax(xp, rest_ids, n, rest)
            drop = xp.ones(rest.shape, dtype=bool)
            drop[top[top >= 0]] = False
            rest_ids, rest = rest_ids[drop], rest[drop]
        out = segment_max(xp, rest_ids, n, rest, empty=empty)
        return xp.where(counts >= k, out, xp.asarray(empty, dtype=values.dtype))
    by_value = xp.argsort(-values, kind="stable")
    order = by_value[xp.argsort(ids[by_value], kind="stable")]
    starts = xp.cumsum(counts) - counts
    out = xp.full(n, empty, dtype=values.dtype)
    have = counts >= k
    out[have] = values[order[starts[have] + (k - 1)]]
    return out
