"""Gray-scale transforms for display and ML inputs: intervals, stretches, zscale, histeq.

The formulas and defaults are those of :mod:`astropy.visualization`, which is the oracle the
tests hold these functions to; what differs is that every function runs on NumPy or CuPy
input and returns on the device it was given.

* :func:`interval` (and :func:`zscale`) computes the display limits ``(vmin, vmax)`` of an
  image, as astropy's ``MinMaxInterval``, ``PercentileInterval``,
  ``AsymmetricPercentileInterval``, ``ZScaleInterval`` and ``ManualInterval`` do.
* :func:`stretch` normalises an image to ``[0, 1]`` with those limits and applies one of
  astropy's stretches (``LinearStretch``, ``SqrtStretch``, ``LogStretch``, ...).
* :func:`histeq` equalises the histogram with a binned CDF (astropy's ``HistEqStretch`` sorts
  the whole image and interpolates in it, which takes tens of seconds on a 4096² frame).
* :func:`quicklook_png` writes an 8-bit PNG for people to look at, origin at the bottom.

Non-finite pixels (NaN, ±inf) and pixels flagged in ``mask`` (non-zero means excluded, as in
dagpre's :class:`~dagpre.types.MaskBit` masks) never enter the limits or the histogram.
They are still transformed: NaN stays NaN in a float output and becomes 0 in an integer
output, ±inf go to the ends of the range, masked pixels are mapped like any other.

Arithmetic follows astropy's precision: a float32 image is normalised and stretched in
float32 (as ``np.subtract(values, float(vmin))`` keeps float32 in astropy), any other dtype
in float64; the float output is float32 in both cases.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.types import InputError

__all__ = [
    "INTERVALS",
    "OUTPUTS",
    "STRETCHES",
    "histeq",
    "interval",
    "quicklook_png",
    "stretch",
    "zscale",
]

#: Interval kinds accepted by :func:`interval` and by ``stretch(interval=...)``.
INTERVALS = ("minmax", "percentile", "asymmetric_percentile", "zscale", "manual")
#: Stretch kinds accepted by :func:`stretch` (``"exp"`` is astropy's ``PowerDistStretch``).
STRETCHES = ("linear", "sqrt", "log", "power", "asinh", "sinh", "exp", "powerdist", "squared")
#: Output encodings of :func:`stretch` and :func:`histeq`.
OUTPUTS = ("float", "uint8", "uint16")

_ZSCALE_DEFAULTS = {
    "n_samples": 1000,
    "contrast": 0.25,
    "max_reject": 0.5,
    "min_npixels": 5,
    "krej": 2.5,
    "max_iterations": 5,
}

# astropy's default ``a`` of each stretch; None: ``a`` is required; missing: ``a`` not used.
_STRETCH_A_DEFAULT = {
    "log": 1000.0,  # LogStretch
    "asinh": 0.1,  # AsinhStretch
    "sinh": 1.0 / 3.0,  # SinhStretch
    "power": None,  # PowerStretch(a) has no default
    "exp": 1000.0,  # PowerDistStretch
    "powerdist": 1000.0,  # PowerDistStretch
}


# --------------------------------------------------------------------------- validation


def _check_kind(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(name, f"expected one of {allowed}, got {value!r}")
    return value


def _prepare_image(image: Any, mask: Any = None) -> tuple[Any, Any, Any]:
    """Validate ``image`` and ``mask``; return ``(array, xp, mask_or_None)`` on one device.

    A masked array contributes its own mask. Non-native byte order (FITS data is big-endian)
    is converted, float16 is promoted to float32.
    """
    if isinstance(image, np.ma.MaskedArray):
        own = np.ma.getmaskarray(image)
        image = np.ma.getdata(image)
        mask = own if mask is None else (np.asarray(to_host(mask)) != 0) | own
    xp = xp_of(image)
    arr = xp.asarray(image)
    if arr.dtype.kind not in "iuf":
        raise InputError("image", f"expected a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError("image", f"the image is empty (shape {arr.shape})")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.shape != arr.shape:
            raise InputError("mask", f"shape {mask.shape} differs from image {arr.shape}")
        if mask.dtype.kind not in "biu":
            raise InputError("mask", f"expected a boolean or integer mask, got {mask.dtype}")
    return arr, xp, mask


def _valid_pixels(arr: Any, mask: Any, xp: Any) -> tuple[Any, Any]:
    """``(ok, n)``: usable pixels (finite and unmasked) and how many there are.

    On NumPy ``ok`` is ``None`` when every pixel is usable and ``n`` is a Python int; on
    CuPy ``ok`` is always an array and ``n`` a 0-d device array (no host round trip).
    """
    if arr.dtype.kind == "f":
        ok = xp.isfinite(arr)
        if mask is not None:
            ok &= mask == 0
    elif mask is not None:
        ok = mask == 0
    else:
        ok = None
    if xp is np:
        if ok is None or bool(ok.all()):
            return None, int(arr.size)
        return ok, int(np.count_nonzero(ok))
    if ok is None:
        ok = xp.ones(arr.shape, dtype=bool)
    return ok, xp.count_nonzero(ok)


def _min_max(arr: Any, ok: Any, n: Any, xp: Any) -> tuple[float, float, int]:
    """Smallest and largest usable pixel and their count, as host numbers (one transfer).

    Raises InputError when no pixel is usable.
    """
    if xp is np and n == 0:
        raise _no_valid(n)
    if ok is None:
        lo_d, hi_d = arr.min(), arr.max()
    elif xp is np:
        if arr.dtype.kind == "f":
            top, bottom = np.inf, -np.inf
        else:
            top, bottom = np.iinfo(arr.dtype).max, np.iinfo(arr.dtype).min
        lo_d = np.min(arr, where=ok, initial=top)
        hi_d = np.max(arr, where=ok, initial=bottom)
    else:  # no compaction on the device: fill the unusable pixels instead
        values = arr.astype(xp.float64) if arr.dtype.kind != "f" else arr
        lo_d = xp.where(ok, values, xp.asarray(np.inf, dtype=values.dtype)).min()
        hi_d = xp.where(ok, values, xp.asarray(-np.inf, dtype=values.dtype)).max()
    lo, hi, n = _to_host_floats(xp, lo_d, hi_d, n)
    if n == 0:
        raise _no_valid(n)
    return lo, hi, int(n)


def _work_dtype(arr: Any) -> Any:
    """astropy's arithmetic precision: float32 stays float32, anything else is float64."""
    return np.dtype(np.float32) if arr.dtype == np.float32 else np.dtype(np.float64)


def _to_host_floats(xp: Any, *values: Any) -> list[float]:
    """Python floats of device scalars, fetched in one transfer."""
    if xp is np:
        return [float(v) for v in values]
    packed = xp.stack([xp.asarray(v, dtype=xp.float64) for v in values])
    return [float(v) for v in to_host(packed)]


def _no_valid(n: float) -> InputError:
    return InputError("image", f"no finite, unmasked pixel to compute limits from (found {int(n)})")


# --------------------------------------------------------------------------- zscale


def _zscale_samples_compact(flat: Any, ok_flat: Any, n_samples: int) -> tuple[Any, int]:
    """astropy's sampling, literally: drop bad pixels, then a regular stride (host path)."""
    values = flat if ok_flat is None else flat[ok_flat]
    n = values.size
    stride = int(max(1.0, n / n_samples))
    samples = values[::stride][:n_samples]
    return samples, samples.size


def _zscale_samples_ranked(
    flat: Any, ok_flat: Any, n_samples: int, xp: Any
) -> tuple[Any, Any, Any]:
    """The same samples without compacting the image (no host synchronisation).

    The ``j``-th sample is the usable pixel of rank ``j * stride`` in C order; it is found
    with a cumulative count of usable pixels and a binary search. Returns the samples padded
    to ``n_samples`` (padding is arbitrary), the number of samples and the number of usable
    pixels, the last two as 0-d device arrays.
    """
    csum = xp.cumsum(ok_flat, dtype=xp.int64)
    n = csum[-1]
    # int(max(1.0, n / n_samples)): true division in float64, truncated
    stride = xp.maximum(xp.floor(n / float(n_samples)), 1.0).astype(xp.int64)
    npix = xp.minimum((n + stride - 1) // stride, n_samples)
    rank = xp.arange(n_samples, dtype=xp.int64) * stride + 1
    idx = xp.minimum(xp.searchsorted(csum, rank, side="left"), flat.size - 1)
    return xp.take(flat, idx), npix, n


def _zscale_fit(
    samples: Any,
    npix: Any,
    xp: Any,
    *,
    contrast: float,
    max_reject: float,
    min_npixels: int,
    krej: float,
    max_iterations: int,
) -> tuple[Any, Any]:
    """astropy's ZScaleInterval line fit on the first ``npix`` of ``samples`` (unsorted).

    Fixed-length arrays and an ``active`` flag replace astropy's ``break``: the iterations
    that astropy would skip are computed and discarded, so nothing is read back to the
    host. Returns ``(vmin, vmax)`` as 0-d arrays.
    """
    ns = samples.shape[0]
    sample_dtype = xp.float32 if samples.dtype == xp.float32 else xp.float64
    index = xp.arange(ns, dtype=xp.int64)
    npix = xp.asarray(npix, dtype=xp.int64)
    valid = index < npix
    # sort with the padding pushed to the end
    big = xp.asarray(np.inf, dtype=sample_dtype)
    s_native = xp.sort(xp.where(valid, samples.astype(sample_dtype), big))
    s = xp.where(valid, s_native.astype(xp.float64), 0.0)
    x = index.astype(xp.float64)

    npix_f = npix.astype(xp.float64)
    minpix = xp.maximum(xp.floor(npix_f * max_reject).astype(xp.int64), min_npixels)
    ngrow = xp.maximum(xp.floor(npix_f * 0.01).astype(xp.int64), 1)
    # np.convolve(bad, ones(ngrow), "same") ORs bad[i - ngrow//2 : i + (ngrow-1)//2 + 1]
    lo = xp.clip(index - ngrow // 2, 0, ns)
    hi = xp.clip(index + (ngrow - 1) // 2 + 1, 0, ns)

    bad = xp.zeros(ns, dtype=bool)
    ngood = npix
    last = npix + 1
    active = xp.asarray(True)
    slope = xp.asarray(0.0)
    zero = xp.zeros(1, dtype=xp.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(max_iterations):
            active = active & (ngood < last) & (ngood >= minpix)
            w = valid & ~bad
            count = xp.maximum(xp.count_nonzero(w), 1).astype(xp.float64)
            # weighted (0/1) least-squares line, as np.polyfit(x, s, 1, w=~bad) solves it
            xm = xp.sum(xp.where(w, x, 0.0)) / count
            ym = xp.sum(xp.where(w, s, 0.0)) / count
            dx = xp.where(w, x - xm, 0.0)
            sxx = xp.sum(dx * dx)
            fit_slope = xp.where(sxx > 0, xp.sum(dx * (s - ym)) / sxx, 0.0)
            intercept = ym - fit_slope * xm
            flat = s - (fit_slope * x + intercept)
            fm = xp.sum(xp.where(w, flat, 0.0)) / count
            sigma = xp.sqrt(xp.sum(xp.where(w, (flat - fm) ** 2, 0.0)) / count)
            threshold = krej * sigma
            rejected = ((flat < -threshold) | (flat > threshold)) & valid
            cum = xp.concatenate([zero, xp.cumsum(bad | rejected, dtype=xp.int64)])
            new_bad = ((xp.take(cum, hi) - xp.take(cum, lo)) > 0) & valid
            new_ngood = npix - xp.count_nonzero(new_bad)

            slope = xp.where(active, fit_slope, slope)
            bad = xp.where(active, new_bad, bad)
            last = xp.where(active, ngood, last)
            ngood = xp.where(active, new_ngood, ngood)

    first = s_native[0].astype(xp.float64)
    last_sample = xp.take(s_native, xp.maximum(npix - 1, 0)).astype(xp.float64)
    if contrast > 0:
        slope = slope / contrast
    center = (npix - 1) // 2
    # np.median of the samples, in their own precision (float32 for float32 images)
    median = (xp.take(s_native, center) + xp.take(s_native, npix // 2)) / sample_dtype(2)
    median = median.astype(xp.float64)
    vmin = xp.maximum(first, median - (center - 1).astype(xp.float64) * slope)
    vmax = xp.minimum(last_sample, median + (npix - center).astype(xp.float64) * slope)
    use_fit = ngood >= minpix
    return xp.where(use_fit, vmin, first), xp.where(use_fit, vmax, last_sample)


def _check_zscale_params(
    n_samples: Any,
    contrast: Any,
    max_reject: Any,
    min_npixels: Any,
    krej: Any,
    max_iterations: Any,
) -> None:
    def _is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not _is_int(n_samples) or n_samples < 1:
        raise InputError("n_samples", f"expected an integer >= 1, got {n_samples!r}")
    if not _is_int(min_npixels) or min_npixels < 1:
        raise InputError("min_npixels", f"expected an integer >= 1, got {min_npixels!r}")
    if not _is_int(max_iterations) or max_iterations < 1:
        # astropy raises UnboundLocalError for max_iterations=0 (the fit is never made)
        raise InputError("max_iterations", f"expected an integer >= 1, got {max_iterations!r}")
    for name, value in (("contrast", contrast), ("max_reject", max_reject), ("krej", krej)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise InputError(name, f"expected a finite number, got {value!r}")
    if not 0.0 <= max_reject <= 1.0:
        raise InputError("max_reject", f"expected a fraction in [0, 1], got {max_reject!r}")
    if krej <= 0:
        raise InputError("krej", f"expected a number of sigma > 0, got {krej!r}")


def _zscale_limits(
    arr: Any, mask: Any, xp: Any, params: dict[str, Any], gather: str | None = None
) -> tuple[float, float]:
    """zscale limits of a validated image. ``gather``: ``"compact"`` (astropy's own
    boolean indexing, the NumPy default) or ``"ranked"`` (no host synchronisation, the CuPy
    path; the tests also run it on NumPy)."""
    if gather is None:
        gather = "compact" if xp is np else "ranked"
    n_samples = params["n_samples"]
    fit_params = {k: v for k, v in params.items() if k != "n_samples"}
    flat = arr.ravel()
    if gather == "compact":
        ok, n = _valid_pixels(arr, mask, xp)
        if n == 0:
            raise _no_valid(n)
        samples, npix = _zscale_samples_compact(flat, None if ok is None else ok.ravel(), n_samples)
    else:
        ok, _ = _valid_pixels(arr, mask, xp)
        if ok is None:
            ok = xp.ones(arr.shape, dtype=bool)
        samples, npix, n = _zscale_samples_ranked(flat, ok.ravel(), n_samples, xp)
    if samples.dtype.kind != "f":
        samples = samples.astype(xp.float64)
    vmin, vmax = _zscale_fit(samples, npix, xp, **fit_params)
    vmin, vmax, n = _to_host_floats(xp, vmin, vmax, n)
    if n == 0:
        raise _no_valid(n)
    return vmin, vmax


def _zscale_limits_typed(
    arr: Any, mask: Any, xp: Any, params: dict[str, Any]
) -> tuple[float, float, tuple[str, str]]:
    """zscale limits with the scalar type astropy gives each (see :func:`_divisor`).

    astropy returns ``max(samples[0], median - ...)``: the sample (an image-dtype scalar)
    when the line-based value does not exceed it, else a float64; likewise for ``vmax``.
    A limit equal to a value representable in the image dtype is taken to be the sample.
    """
    lo, hi = _zscale_limits(arr, mask, xp, params)
    if arr.dtype.kind != "f":
        return lo, hi, ("f64", "f64")
    dt = arr.dtype.type
    return lo, hi, tuple("data" if float(dt(v)) == v else "f64" for v in (lo, hi))


def zscale(
    image: Any,
    n_samples: int = 1000,
    contrast: float = 0.25,
    max_reject: float = 0.5,
    min_npixels: int = 5,
    krej: float = 2.5,
    max_iterations: int = 5,
    mask: Any = None,
) -> tuple[float, float]:
    """Display limits by IRAF's zscale, exactly as astropy's ``ZScaleInterval`` computes them.

    Up to ``n_samples`` usable pixels are taken at a regular stride over the flattened
    image (C order), sorted, and a straight line is fitted to the sorted values with
    ``krej``-sigma rejection, each rejected sample growing by ``max(1, npix // 100)``
    samples, for at most ``max_iterations`` rounds. The limits are the median of the samples
    minus/plus the slope divided by ``contrast`` times half the sample count, bounded by the
    smallest and largest sample. When fewer than ``max(min_npixels, max_reject * npix)``
    samples survive the rejection, the limits are the smallest and largest sample.

    On CuPy input everything runs on the device; the two limits are the only values read
    back (one transfer).

    Parameters
    ----------
    image : ndarray
        Pixel values (NumPy or CuPy, any shape, integer or float). NaN and ±inf are ignored.
    n_samples : int, optional
        Largest number of pixels sampled (1000).
    contrast : float, optional
        Slope divisor (0.25); larger values narrow the range. A value <= 0 leaves the slope
        unchanged, as in astropy.
    max_reject : float, optional
        Largest fraction of samples that may be rejected before falling back to the sample
        extremes (0.5).
    min_npixels : int, optional
        Fewest samples that must survive the rejection (5).
    krej : float, optional
        Rejection threshold in standard deviations of the residuals (2.5).
    max_iterations : int, optional
        Most rejection rounds (5); must be >= 1.
    mask : ndarray of bool or int, optional
        Pixels to leave out where non-zero (same shape as ``image``, same device or host).

    Returns
    -------
    vmin, vmax : float
        Lower and upper display limits, in the image's units (e.g. ADU).

    Raises
    ------
    InputError
        For an empty image, one with no finite unmasked pixel, or a parameter out of range.

    Notes
    -----
    astropy (>= 6) also drops NaN and ±inf before sampling, so the two agree on images with
    NaNs as well; the tests hold the limits to astropy's within 1e-4 relative.

    The line is fitted in closed form (centred sums) where astropy calls ``np.polyfit``.
    They agree to rounding, with one exception: when every sample still in the fit has
    exactly the same value, ``np.polyfit`` leaves residuals of ~1e-16 whose 2.5-sigma
    threshold rejects samples at random, often all of them, and astropy then returns the
    sample extremes; here the residuals are exactly 0, nothing more is rejected and the
    limits collapse onto that value (``[0, 1, 1, ..., 1]`` gives ``(0, 1)`` in astropy,
    ``(1, 1)`` here).

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.ops.transforms import zscale
    >>> image = np.arange(10000, dtype=np.float32).reshape(100, 100)
    >>> zscale(image)  # samples every 10th pixel: 0, 10, ..., 9990
    (0.0, 9990.0)
    """
    _check_zscale_params(n_samples, contrast, max_reject, min_npixels, krej, max_iterations)
    arr, xp, mask = _prepare_image(image, mask)
    params = {
        "n_samples": int(n_samples),
        "contrast": float(contrast),
        "max_reject": float(max_reject),
        "min_npixels": int(min_npixels),
        "krej": float(krej),
        "max_iterations": int(max_iterations),
    }
    return _zscale_limits(arr, mask, xp, params)


# --------------------------------------------------------------------------- intervals


def _percentiles_sorted(arr: Any, ok: Any, n: Any, pcts: tuple[float, float], xp: Any) -> Any:
    """``np.percentile(arr[ok], pcts)`` (linear method) by a full device sort, no compaction.

    Unusable pixels are replaced by +inf so they sort after the ``n`` usable ones.
    Returns a 2-element float64 device array.
    """
    values = arr.ravel()
    if values.dtype.kind != "f":
        values = values.astype(xp.float64)
    if ok is not None:
        values = xp.where(ok.ravel(), values, xp.asarray(np.inf, dtype=values.dtype))
    s = xp.sort(values)
    n = xp.asarray(n, dtype=xp.int64)
    out = []
    for p in pcts:
        q = p / 100.0
        virtual = (n - 1).astype(xp.float64) * q
        prev = xp.floor(virtual)
        above = virtual >= (n - 1).astype(xp.float64)
        prev_i = xp.where(above, n - 1, prev.astype(xp.int64))
        next_i = xp.where(above, n - 1, prev.astype(xp.int64) + 1)
        gamma = virtual - prev
        a = xp.take(s, xp.maximum(prev_i, 0))
        b = xp.take(s, xp.maximum(next_i, 0))
        diff = b - a
        low = a + diff * gamma
        high = b - diff * (1.0 - gamma)
        out.append(xp.where(gamma >= 0.5, high, low))
    return xp.stack(out).astype(xp.float64)


def _check_percentile(name: str, value: Any) -> float:
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
        raise InputError(name, f"expected a number in [0, 100], got {value!r}")
    if not 0.0 <= float(value) <= 100.0:
        raise InputError(name, f"expected a number in [0, 100], got {value!r}")
    return float(value)


def _check_limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
        raise InputError(name, f"expected a finite number or None, got {value!r}")
    if not math.isfinite(float(value)):
        raise InputError(name, f"expected a finite number or None, got {value!r}")
    return float(value)


def _interval_limits(
    arr: Any,
    mask: Any,
    xp: Any,
    kind: str,
    percentile: Any,
    lower_percentile: Any,
    upper_percentile: Any,
    vmin: float | None,
    vmax: float | None,
    zscale_kwargs: dict[str, Any],
) -> tuple[float, float, tuple[str, str]]:
    """Limits of a validated image (see :func:`interval` for the parameters).

    Also returns what type of scalar astropy's interval would hold for each limit:
    ``"data"`` (the image's dtype: a pixel value), ``"f64"`` (computed in float64) or
    ``"py"`` (a Python float given by the user); :func:`_divisor` needs it.
    """
    if vmin is not None and vmax is not None:
        return vmin, vmax, ("py", "py")  # like ManualInterval: no pass over the data

    if kind == "zscale":
        lo, hi, kinds = _zscale_limits_typed(arr, mask, xp, zscale_kwargs)
    elif kind in ("minmax", "manual"):
        kinds = ("data", "data")
        ok, n = _valid_pixels(arr, mask, xp)
        lo, hi, _ = _min_max(arr, ok, n, xp)
    else:  # percentile kinds
        if kind == "percentile":
            p = _check_percentile("percentile", percentile)
            lower = (100 - p) * 0.5  # astropy's PercentileInterval
            upper = 100 - lower
        else:
            lower = 0.0 if lower_percentile is None else lower_percentile
            upper = 100.0 if upper_percentile is None else upper_percentile
            lower = _check_percentile("lower_percentile", lower)
            upper = _check_percentile("upper_percentile", upper)
        kinds = ("f64", "f64")
        ok, n = _valid_pixels(arr, mask, xp)
        if xp is np:
            if n == 0:
                raise _no_valid(n)
            values = arr.ravel() if ok is None else arr[ok]
            lo, hi = (float(v) for v in np.percentile(values, (lower, upper)))
        else:
            limits = _percentiles_sorted(arr, ok, n, (lower, upper), xp)
            lo, hi, n = _to_host_floats(xp, limits[0], limits[1], n)
            if n == 0:
                raise _no_valid(n)
    if vmin is not None:
        lo, kinds = vmin, ("py", kinds[1])
    if vmax is not None:
        hi, kinds = vmax, (kinds[0], "py")
    return lo, hi, kinds


def _divisor(lo: float, hi: float, kinds: tuple[str, str], work: Any) -> Any:
    """``vmax - vmin`` as the scalar astropy divides by, so the rounding matches.

    astropy normalises with ``np.true_divide(values, vmax - vmin)``: for a float32 image
    that division runs in float32 when ``vmax - vmin`` is a float32 or Python scalar
    (MinMaxInterval, ManualInterval) and in float64, rounded to float32, when it is a
    float64 (PercentileInterval, most ZScaleInterval limits). Matching this keeps the
    outputs equal to astropy's to the last bit or two instead of a few float32 ulps.
    """
    if work != np.float32:
        return np.float64(hi - lo)
    typed = {"data": np.float32, "f64": np.float64, "py": float}
    diff = typed[kinds[1]](hi) - typed[kinds[0]](lo)
    return np.float32(diff) if type(diff) is float else diff


def _check_interval_args(
    kind: str,
    percentile: Any,
    lower_percentile: Any,
    upper_percentile: Any,
    zscale_kwargs: dict[str, Any],
) -> dict[str, Any]:
    _check_kind("interval", kind, INTERVALS)
    if percentile is not None and kind != "percentile":
        raise InputError("percentile", f"applies to interval 'percentile' only, not {kind!r}")
    if (lower_percentile is not None or upper_percentile is not None) and (
        kind != "asymmetric_percentile"
    ):
        raise InputError(
            "lower_percentile/upper_percentile",
            f"apply to interval 'asymmetric_percentile' only, not {kind!r}",
        )
    if kind == "percentile" and percentile is None:
        raise InputError("percentile", "interval 'percentile' needs the percentile to keep")
    unknown = sorted(set(zscale_kwargs) - set(_ZSCALE_DEFAULTS))
    if unknown:
        raise InputError(
            ", ".join(unknown),
            f"unknown keyword; interval options are percentile, lower_percentile, "
            f"upper_percentile, vmin, vmax, mask and the zscale ones {tuple(_ZSCALE_DEFAULTS)}",
        )
    if zscale_kwargs and kind != "zscale":
        raise InputError(
            ", ".join(sorted(zscale_kwargs)), f"apply to interval 'zscale' only, not {kind!r}"
        )
    params = {**_ZSCALE_DEFAULTS, **zscale_kwargs}
    if kind == "zscale":
        _check_zscale_params(**params)
    return params


def interval(
    image: Any,
    kind: str = "minmax",
    *,
    percentile: float | None = None,
    lower_percentile: float | None = None,
    upper_percentile: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: Any = None,
    **zscale_kwargs: Any,
) -> tuple[float, float]:
    """Display limits ``(vmin, vmax)`` of an image, as astropy's interval classes give them.

    ============================  ===========================================================
    ``kind``                      astropy equivalent
    ============================  ===========================================================
    ``"minmax"``                  ``MinMaxInterval()``
    ``"percentile"``              ``PercentileInterval(percentile)``: keeps the central
                                  ``percentile`` %, limits at ``(100 - p) / 2`` and
                                  ``100 - (100 - p) / 2`` (``np.percentile``, linear)
    ``"asymmetric_percentile"``   ``AsymmetricPercentileInterval(lower, upper)``
                                  (defaults 0 and 100)
    ``"zscale"``                  ``ZScaleInterval(**zscale_kwargs)``, see :func:`zscale`
    ``"manual"``                  ``ManualInterval(vmin, vmax)``: a missing limit is the
                                  image minimum / maximum
    ============================  ===========================================================

    Parameters
    ----------
    image : ndarray
        Pixel values (NumPy or CuPy, any shape). NaN, ±inf and masked pixels are ignored.
    kind : str, optional
        One of :data:`INTERVALS` (``"minmax"``).
    percentile : float, optional
        Percentage of pixels kept, for ``kind="percentile"`` (required there).
    lower_percentile, upper_percentile : float, optional
        Percentiles (0-100) of the limits, for ``kind="asymmetric_percentile"``.
    vmin, vmax : float, optional
        Fixed limits, in image units. They replace the computed limit for every kind (for
        ``"manual"`` that is the whole point); when both are given the data is not read.
    mask : ndarray of bool or int, optional
        Pixels to leave out where non-zero.
    **zscale_kwargs
        ``n_samples``, ``contrast``, ``max_reject``, ``min_npixels``, ``krej``,
        ``max_iterations`` for ``kind="zscale"``.

    Returns
    -------
    vmin, vmax : float
        Limits in image units. ``vmin == vmax`` is possible (a constant image).

    Raises
    ------
    InputError
        Unknown ``kind``, an option that does not apply to ``kind``, a percentile outside
        [0, 100], an empty image or one with no finite unmasked pixel.

    Notes
    -----
    astropy's percentile intervals can subsample randomly (``n_samples``); this one always
    uses every pixel, so it is deterministic.

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.ops.transforms import interval
    >>> image = np.arange(101, dtype=np.float32)
    >>> interval(image, "percentile", percentile=90)
    (5.0, 95.0)
    >>> interval(image, "manual", vmax=50)
    (0.0, 50.0)
    """
    params = _check_interval_args(
        kind, percentile, lower_percentile, upper_percentile, zscale_kwargs
    )
    vmin = _check_limit("vmin", vmin)
    vmax = _check_limit("vmax", vmax)
    arr, xp, mask = _prepare_image(image, mask)
    lo, hi, _ = _interval_limits(
        arr, mask, xp, kind, percentile, lower_percentile, upper_percentile, vmin, vmax, params
    )
    return lo, hi


# --------------------------------------------------------------------------- stretches


def _check_stretch_a(kind: str, a: Any) -> float | None:
    if kind in ("exp", "powerdist", "log", "asinh", "sinh", "power"):
        if a is None:
            a = _STRETCH_A_DEFAULT[kind]
            if a is None:
                raise InputError("a", "stretch 'power' needs the exponent a (> 0)")
        if not isinstance(a, (int, float, np.number)) or isinstance(a, bool):
            raise InputError("a", f"expected a number, got {a!r}")
        a = float(a)
        if not math.isfinite(a) or a <= 0:
            raise InputError("a", f"stretch {kind!r} needs a > 0, got {a!r}")
        if kind in ("exp", "powerdist") and a == 1:
            raise InputError("a", f"stretch {kind!r} needs a != 1 (a singularity)")
        return a
    if a is not None:
        raise InputError("a", f"does not apply to stretch {kind!r}")
    return None


def _apply_stretch(
    values: Any, kind: str, a: float | None, slope: float, intercept: float, clip: bool, xp: Any
) -> Any:
    """astropy's stretch formula on normalised ``values`` (modified in place and returned).

    Scalars carry astropy's types: Python floats (cast to the array's dtype) where astropy
    passes ``self.a``, float64 where it passes ``np.log(...)``, ``np.arcsinh(...)``, ...
    """
    dt = values.dtype.type
    if kind == "linear":
        if slope != 1:
            xp.multiply(values, dt(slope), out=values)
        if intercept != 0:
            xp.add(values, dt(intercept), out=values)
        if clip:
            xp.clip(values, 0.0, 1.0, out=values)
    elif kind == "sqrt":
        xp.sqrt(values, out=values)
    elif kind == "squared":
        xp.power(values, dt(2), out=values)
    elif kind == "power":
        xp.power(values, dt(a), out=values)
    elif kind in ("exp", "powerdist"):
        # (a**x - 1) / (a - 1)
        xp.power(dt(a), values, out=values)
        xp.subtract(values, dt(1), out=values)
        xp.true_divide(values, dt(a - 1.0), out=values)
    elif kind == "log":
        # log(a x + 1) / log(a + 1)
        xp.multiply(values, dt(a), out=values)
        xp.add(values, dt(1), out=values)
        xp.log(values, out=values)
        xp.true_divide(values, np.float64(math.log(a + 1.0)), out=values)
    elif kind == "asinh":
        # asinh(x / a) / asinh(1 / a)
        xp.true_divide(values, dt(a), out=values)
        xp.arcsinh(values, out=values)
        xp.true_divide(values, np.float64(math.asinh(1.0 / a)), out=values)
    elif kind == "sinh":
        # sinh(x / a) / sinh(1 / a)
        xp.true_divide(values, dt(a), out=values)
        xp.sinh(values, out=values)
        xp.true_divide(values, np.float64(math.sinh(1.0 / a)), out=values)
    return values


def _encode(values: Any, out: str, xp: Any) -> Any:
    """float32, or uint8/uint16 full scale with rounding (NaN -> 0, clipped to [0, 1])."""
    if out == "float":
        return values.astype(xp.float32, copy=False)
    top = 255.0 if out == "uint8" else 65535.0
    scaled = xp.nan_to_num(xp.clip(values, 0.0, 1.0), nan=0.0) * values.dtype.type(top)
    return xp.rint(scaled).astype(xp.uint8 if out == "uint8" else xp.uint16)


def stretch(
    image: Any,
    kind: str = "linear",
    a: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    interval: str = "minmax",
    clip: bool = True,
    out: str = "float",
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    mask: Any = None,
    **interval_kwargs: Any,
) -> Any:
    """Normalise an image to [0, 1] with an interval, then apply one of astropy's stretches.

    The normalisation is astropy's ``BaseInterval.__call__``: ``(x - vmin) / (vmax - vmin)``
    (no division when ``vmax == vmin``, so a constant image maps to 0), clipped to [0, 1]
    when ``clip``. The stretch is then, with ``x`` the normalised value:

    =========================  ===================================  ==================
    ``kind``                   formula                              astropy class
    =========================  ===================================  ==================
    ``"linear"``               ``slope * x + intercept``            ``LinearStretch``
    ``"sqrt"``                 ``sqrt(x)``                          ``SqrtStretch``
    ``"squared"``              ``x ** 2``                           ``SquaredStretch``
    ``"power"``                ``x ** a`` (``a`` required)          ``PowerStretch``
    ``"exp"``, ``"powerdist"``  ``(a ** x - 1) / (a - 1)``, a=1000   ``PowerDistStretch``
    ``"log"``                  ``log(a x + 1) / log(a + 1)``, a=1000  ``LogStretch``
    ``"asinh"``                ``asinh(x / a) / asinh(1 / a)``, a=0.1  ``AsinhStretch``
    ``"sinh"``                 ``sinh(x / a) / sinh(1 / a)``, a=1/3  ``SinhStretch``
    =========================  ===================================  ==================

    Parameters
    ----------
    image : ndarray
        Pixel values (NumPy or CuPy, any shape).
    kind : str, optional
        One of :data:`STRETCHES` (``"linear"``).
    a : float, optional
        The stretch parameter; astropy's default when ``None``.
    vmin, vmax : float, optional
        Fixed limits in image units; each replaces the interval's limit.
    interval : str, optional
        How the limits are computed, one of :data:`INTERVALS` (``"minmax"``), see
        :func:`interval`.
    clip : bool, optional
        Clip the normalised and the stretched values to [0, 1] (``True``), as astropy does.
    out : {"float", "uint8", "uint16"}, optional
        float32 in [0, 1] (NaN stays NaN), or rounded to 0..255 / 0..65535 for ML inputs
        (NaN becomes 0).
    slope, intercept : float, optional
        Parameters of the ``"linear"`` stretch (1 and 0).
    mask : ndarray of bool or int, optional
        Pixels left out of the limits where non-zero (still stretched).
    **interval_kwargs
        Passed to :func:`interval`: ``percentile``, ``lower_percentile``,
        ``upper_percentile``, zscale options.

    Returns
    -------
    ndarray
        Same shape and device as ``image``; float32, uint8 or uint16 per ``out``.

    Raises
    ------
    InputError
        Unknown ``kind``, ``interval`` or ``out``, a bad ``a``, an empty image or one with no
        finite unmasked pixel (when the limits come from the data).

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.ops.transforms import stretch
    >>> image = np.array([[0.0, 25.0], [64.0, 100.0]])
    >>> stretch(image, "sqrt")
    array([[0. , 0.5],
           [0.8, 1. ]], dtype=float32)
    >>> stretch(image, "linear", out="uint8")
    array([[  0,  64],
           [163, 255]], dtype=uint8)
    """
    _check_kind("kind", kind, STRETCHES)
    _check_kind("out", out, OUTPUTS)
    a = _check_stretch_a(kind, a)
    if kind != "linear" and (slope != 1.0 or intercept != 0.0):
        raise InputError("slope/intercept", f"apply to stretch 'linear' only, not {kind!r}")
    for name, value in (("slope", slope), ("intercept", intercept)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise InputError(name, f"expected a finite number, got {value!r}")
    percentile = interval_kwargs.pop("percentile", None)
    lower_percentile = interval_kwargs.pop("lower_percentile", None)
    upper_percentile = interval_kwargs.pop("upper_percentile", None)
    params = _check_interval_args(
        interval, percentile, lower_percentile, upper_percentile, interval_kwargs
    )
    vmin = _check_limit("vmin", vmin)
    vmax = _check_limit("vmax", vmax)
    arr, xp, mask = _prepare_image(image, mask)
    lo, hi, kinds = _interval_limits(
        arr, mask, xp, interval, percentile, lower_percentile, upper_percentile, vmin, vmax, params
    )
    values = _normalise_stretch(arr, lo, hi, kinds, kind, a, slope, intercept, clip, xp)
    return _encode(values, out, xp)


def _normalise_stretch(
    arr: Any,
    lo: float,
    hi: float,
    kinds: tuple[str, str],
    kind: str,
    a: float | None,
    slope: float,
    intercept: float,
    clip: bool,
    xp: Any,
) -> Any:
    """astropy's ``BaseInterval.__call__`` then the stretch, in the work precision."""
    work = _work_dtype(arr)
    dt = work.type
    values = arr.astype(work, copy=True)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        divisor = _divisor(lo, hi, kinds, work)
        xp.subtract(values, dt(lo), out=values)
        if divisor != 0:  # astropy skips the division for vmax == vmin
            xp.true_divide(values, divisor, out=values)
        if clip:
            xp.clip(values, 0.0, 1.0, out=values)
        return _apply_stretch(values, kind, a, float(slope), float(intercept), clip, xp)


_stretch_image = stretch  # quicklook_png's ``stretch`` argument shadows the function


# --------------------------------------------------------------------------- histeq


def histeq(image: Any, nbins: int = 65536, mask: Any = None, out: str = "float") -> Any:
    """Histogram equalisation by a binned CDF (no sort), astropy's ``HistEqStretch`` on a grid.

    The ``N`` usable pixels (finite, unmasked) are counted in ``nbins`` equal bins spanning
    their minimum to maximum (one bincount pass). With ``C[k]`` pixels below bin ``k`` and
    ``count[k]`` in it, a pixel of bin ``k`` is mapped by linear interpolation across the
    bin (position from the bin's lower to its upper edge) from ``C[k] / (N - 1)`` to
    ``(C[k] + count[k] - 1) / (N - 1)``: the rank fractions of the first and last pixel the
    bin holds. The lowest pixel maps to 0, the highest to 1, a pixel alone in its bin to
    its exact rank fraction.

    astropy's ``HistEqStretch(image)(MinMaxInterval()(image))`` maps a pixel to its rank
    fraction ``(#{pixels <= x} - 1) / (N - 1)``, which lies in the same range, so the two
    differ per pixel by at most ``(count[k] - 1) / (N - 1)``: the share of the pixels in
    that pixel's bin (about ``1 / nbins`` for a flat histogram, more in the few bins of a
    peaked sky). The tests hold it to exactly that bound.

    Parameters
    ----------
    image : ndarray
        Pixel values (NumPy or CuPy, any shape).
    nbins : int, optional
        Number of histogram bins (65536).
    mask : ndarray of bool or int, optional
        Pixels left out of the histogram where non-zero; they are still mapped (values beyond
        the unmasked range go to 0 or 1).
    out : {"float", "uint8", "uint16"}, optional
        float32 in [0, 1] (NaN stays NaN), or rounded to 0..255 / 0..65535 (NaN becomes 0).

    Returns
    -------
    ndarray
        Equalised image, same shape and device as ``image``. A constant image maps to 0.

    Raises
    ------
    InputError
        An empty image, one with no finite unmasked pixel, a bad ``nbins`` or ``out``.

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.ops.transforms import histeq
    >>> image = np.array([[1.0, 10.0], [100.0, 1000.0]])
    >>> histeq(image, nbins=1024)
    array([[0.        , 0.33333334],
           [0.6666667 , 1.        ]], dtype=float32)
    """
    if not isinstance(nbins, (int, np.integer)) or isinstance(nbins, bool) or nbins < 1:
        raise InputError("nbins", f"expected an integer >= 1, got {nbins!r}")
    nbins = int(nbins)
    _check_kind("out", out, OUTPUTS)
    arr, xp, mask = _prepare_image(image, mask)
    return _encode(_histeq(arr, mask, xp, nbins), out, xp)


def _histeq(arr: Any, mask: Any, xp: Any, nbins: int) -> Any:
    """Binned-CDF equalisation of a validated image, in the work precision."""
    ok, n = _valid_pixels(arr, mask, xp)
    lo, hi, n = _min_max(arr, ok, n, xp)
    work = _work_dtype(arr)
    dt = work.type
    # bin coordinate t in [0, nbins]; pixel of bin k has k <= t < k + 1 (top edge in last bin)
    t = arr.astype(work, copy=True)
    with np.errstate(invalid="ignore", over="ignore"):
        xp.subtract(t, dt(lo), out=t)
        if hi > lo:
            scale = nbins / (hi - lo)
            if scale < np.finfo(work).max:
                xp.multiply(t, dt(scale), out=t)
            else:  # a range of a few subnormals: 1 / range overflows, divide instead
                xp.true_divide(t, dt(hi - lo), out=t)
                xp.multiply(t, dt(nbins), out=t)
        xp.clip(t, 0.0, float(nbins), out=t)
    nan = None
    if arr.dtype.kind == "f" and (xp is not np or ok is not None):
        nan = xp.isnan(t)
        xp.copyto(t, 0.0, where=nan)
    k = t.astype(xp.intp)
    xp.minimum(k, nbins - 1, out=k)
    frac = t
    xp.subtract(t, k.astype(work), out=frac)

    counted = k if ok is None else xp.where(ok, k, nbins)
    counts = xp.bincount(counted.ravel(), minlength=nbins + 1)[:nbins]
    del counted
    below = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts, dtype=xp.int64)])
    # across bin k, from the rank fraction of its first pixel to that of its last
    start = (below[:-1].astype(xp.float64) / max(n - 1, 1)).astype(work)
    step = (xp.maximum(counts - 1, 0).astype(xp.float64) / max(n - 1, 1)).astype(work)

    result = xp.take(start, k)
    frac *= xp.take(step, k)
    result += frac
    del frac, k
    if nan is not None:
        xp.copyto(result, math.nan, where=nan)
    return result


# --------------------------------------------------------------------------- quicklook


def quicklook_png(
    image: Any,
    path: str | os.PathLike,
    interval: str = "zscale",
    stretch: str = "linear",
    **kw: Any,
) -> Path:
    """Write an 8-bit grayscale PNG of an image for people to look at (no matplotlib).

    The image is turned into uint8 by :func:`stretch` (or :func:`histeq` when
    ``stretch="histeq"``) and written with Pillow, origin at the bottom: row 0 of the array
    is the bottom row of the picture, as FITS images are displayed (y increases upward).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Pixel values, NumPy or CuPy (copied to the host for writing).
    path : str or PathLike
        File to write (PNG whatever its suffix); its folder must exist.
    interval : str, optional
        One of :data:`INTERVALS` (``"zscale"``); ignored for ``stretch="histeq"``.
    stretch : str, optional
        One of :data:`STRETCHES` or ``"histeq"`` (``"linear"``).
    **kw
        More options for :func:`stretch` (``a``, ``vmin``, ``vmax``, ``clip``, ``mask``,
        interval options) or :func:`histeq` (``nbins``, ``mask``).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    InputError
        Pillow missing, an image that is not 2-D, a folder that does not exist, or any
        error of :func:`stretch` / :func:`histeq`.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from dagpre.ops.transforms import quicklook_png
    >>> image = np.random.default_rng(0).normal(100.0, 5.0, (64, 64))
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> quicklook_png(image, folder / "frame.png").name
    'frame.png'
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is installed where the tests run
        raise InputError(
            "quicklook_png", "writing PNG files needs Pillow: pip install pillow"
        ) from None
    ndim = getattr(image, "ndim", np.ndim(image))
    if ndim != 2:
        raise InputError("image", f"a quick-look PNG needs a 2-D image, got ndim={ndim}")
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(target, f"folder {target.parent} does not exist")
    if "out" in kw:
        raise InputError("out", "quicklook_png always writes 8 bits (uint8)")
    if stretch == "histeq":
        pixels = histeq(image, out="uint8", **kw)
    else:
        _check_kind("stretch", stretch, (*STRETCHES, "histeq"))
        pixels = _stretch_image(image, stretch, interval=interval, out="uint8", **kw)
    pixels = np.ascontiguousarray(to_host(pixels)[::-1])
    Image.fromarray(pixels).save(target, format="PNG")
    return target
