"""Argument checks shared by the steps: one-line :class:`InputError` naming the parameter."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from dagpre.types import InputError


def check_image(image: Any, name: str = "image", kinds: str = "biuf") -> None:
    """Raise unless ``image`` is a non-empty 2-D array of a dtype kind in ``kinds``."""
    ndim = getattr(image, "ndim", None)
    if ndim != 2:
        raise InputError(name, f"expected a 2-D array (ny, nx), got ndim={ndim}")
    if image.size == 0:
        raise InputError(name, f"expected a non-empty image, got shape {image.shape}")
    if np.dtype(image.dtype).kind not in kinds:
        raise InputError(name, f"expected real numbers, got dtype {image.dtype}")


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or an error unless it is an integer >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(name, f"expected a positive integer, got {value!r}")
    return int(value)


def check_threads(threads: Any) -> int | None:
    """A CPU thread count: None (the step's default) or an integer >= 1 (bools refused)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise InputError("threads", f"expected a positive integer or None, got {threads!r}")
    return int(threads)


def check_shape(shape: Any, name: str) -> tuple[int, int]:
    """``shape`` as ``(ny, nx)``, or an error unless it is two positive integers."""
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(name, f"expected (ny, nx), got {shape!r}") from None
    if ny < 1 or nx < 1 or (ny, nx) != tuple(shape):
        raise InputError(name, f"expected two positive integers (ny, nx), got {shape!r}")
    return ny, nx


def usable_pixels(xp: Any, image: Any, variance: Any = None, mask: Any = None) -> tuple:
    """``(data, var, usable)``: float64 copies and where a pixel may be fitted.

    A pixel is usable when its value is finite, its variance (if given) finite and
    positive, and its mask (if given) 0. ``var`` is None without ``variance``.
    """
    data = xp.asarray(image, dtype=xp.float64)
    usable = xp.isfinite(data)
    var = None
    if variance is not None:
        var = xp.asarray(variance, dtype=xp.float64)
        usable &= xp.isfinite(var) & (var > 0)
    if mask is not None:
        usable &= xp.asarray(mask) == 0
    return data, var, usable
