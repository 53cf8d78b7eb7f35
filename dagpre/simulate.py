"""Synthetic nights of frames of one field, with the ground truth that made them.

:func:`night` draws a field of stars (some variable), a few transients, a camera (hot pixels,
optional SIP distortion) and ``n_frames`` exposures with their own seeing, sky, pointing,
transparency and defects, and renders each one through Poisson and read noise, cosmic rays,
saturation and bleed trails. Everything comes from one integer ``seed``: the same seed gives
bit-identical frames and tables, and frame ``k`` draws its conditions and noise from its own
child stream, so it does not change when ``n_frames`` does (only the transients' light curves,
which are scaled to the length of the night, do).

Conventions
-----------
* Arrays are indexed ``[y, x]``; positions are ``(x, y)`` pixel order with 0-based pixel
  centres (the centre of the first pixel is ``(0.0, 0.0)``), not NumPy ``(row, col)`` order.
* Fluxes in the tables are in ADU: ``sources["flux"]`` is the total ADU a source gives in a
  clear frame (transmission 1) of ``exptime`` seconds (for a variable star at its mean
  magnitude, for a transient at its peak); ``epochs["flux"]`` is the total ADU the source put
  into that frame before noise: light curve, transmission (clouds) and illumination (shutter
  shadow) at its position included. PSF stamps are normalised to it, so nothing is lost to
  their truncation; light falling beyond the image edge is not subtracted.
* The readout axis is ``y`` (array axis 0): charge above the full well (``saturate * gain``
  e-) of each saturated run in a column spills half up, half down that column, filling
  pixels to the full well in turn, so a bright star shows a saturated core with vertical
  spikes of pixels reading exactly ``saturate``, each ending in one partly filled pixel.
* Times are MJD (UTC) at the start of the exposure; light curves are evaluated there.

Examples
--------
>>> from dagpre import simulate
>>> sim = simulate.night(n_frames=2, shape=(64, 64), n_stars=20, seed=1)
>>> len(sim.frames), sim.frames[0].data.shape, sim.frames[0].data.dtype
(2, (64, 64), dtype('float32'))
>>> image = simulate.render_sources((32, 32), [15.3], [16.0], [1000.0], [3.0], psf="gaussian")
>>> round(float(image.sum()), 6)
1000.0
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagpre.backend import is_cupy_array, xp_of
from dagpre.types import Frame, InputError, MaskBit

__all__ = [
    "BAD_FRAME_KINDS",
    "PSF_KINDS",
    "SimulatedFrame",
    "SimulatedNight",
    "night",
    "read_truth",
    "render_sources",
    "source_flux",
]

#: PSF profiles :func:`render_sources` and :func:`night` can draw.
PSF_KINDS = ("gaussian", "moffat")
#: Kinds of bad frame :func:`night` can make (``bad_frames={index: kind}``).
BAD_FRAME_KINDS = ("cloud", "shutter", "defocus", "trailing")
#: Names of the truth tables, as written to ``<outdir>/truth/<name>.ecsv``.
TRUTH_TABLES = ("sources", "epochs", "frames", "transients")

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_DEFOCUS_FACTOR = 2.5
# Gauss-Legendre nodes (in pixels, about the pixel centre) and weights, 3 per axis.
_GL3_NODES = (-0.5 * math.sqrt(0.6), 0.0, 0.5 * math.sqrt(0.6))
_GL3_WEIGHTS = (5.0 / 18.0, 8.0 / 18.0, 5.0 / 18.0)
_CORE_RADIUS = 2  # Moffat core (|dx|, |dy| <= 2 px) integrated with 3x3 Gauss-Legendre
_MOFFAT_TAIL = 0.01  # a Moffat stamp reaches at least the radius holding 99 % of the flux


# =========================================================================== validation


def _as_int(name: str, value: Any, minimum: int | None = None, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(name, f"expected {what}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(name, f"expected {what}, got {value}")
    return value


def _as_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool):
        raise InputError(name, f"expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(name, f"expected a finite number, got {value!r}")
    bad_low = low is not None and (out <= low if low_open else out < low)
    bad_high = high is not None and (out >= high if high_open else out > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise InputError(name, f"expected a number in {interval}, got {value!r}")
    return out


def _as_range(
    name: str, value: Any, low: float | None = None, *, low_open: bool = False
) -> tuple[float, float]:
    """A ``(lo, hi)`` pair (a single number means ``(v, v)``) with ``lo <= hi``."""
    if np.ndim(value) == 0:
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        raise InputError(name, f"expected a number or a (low, high) pair, got {value!r}") from None
    if len(pair) != 2:
        raise InputError(name, f"expected a (low, high) pair, got {value!r}")
    lo = _as_float(name, pair[0], low, low_open=low_open)
    hi = _as_float(name, pair[1], low, low_open=low_open)
    if hi < lo:
        raise InputError(name, f"expected low <= high, got {value!r}")
    return lo, hi


def _as_shape(value: Any) -> tuple[int, int]:
    try:
        pair = tuple(value)
    except TypeError:
        raise InputError("shape", f"expected (ny, nx), got {value!r}") from None
    if len(pair) != 2:
        raise InputError("shape", f"expected (ny, nx), got {value!r}")
    ny = _as_int("shape", pair[0], 8, "(ny, nx) with each at least 8 pixels")
    nx = _as_int("shape", pair[1], 8, "(ny, nx) with each at least 8 pixels")
    return ny, nx


def _as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(name, f"expected one of {choices}, got {value!r}")
    return value


# =========================================================================== rendering


def _bucket_radius(radius: np.ndarray) -> np.ndarray:
    """Round stamp radii up onto a geometric ladder (ratio 1.15) so stars share a few sizes."""
    steps = np.ceil(np.log(np.maximum(radius, 2.0) / 2.0) / math.log(1.15) - 1e-9)
    return np.ceil(2.0 * 1.15**steps - 1e-9).astype(np.int64)


def _stamp_radius(
    flux: np.ndarray, fwhm: np.ndarray, psf: str, beta: float, floor: float, max_radius: int
) -> np.ndarray:
    """Radius (px) where the continuous profile falls below ``floor``, on the bucket ladder."""
    flux = np.abs(flux)
    if psf == "gaussian":
        sigma = fwhm / _FWHM_PER_SIGMA
        peak = flux / (2.0 * math.pi * sigma**2)
        ratio = np.maximum(peak / floor, 1.0)
        need = sigma * np.sqrt(2.0 * np.log(ratio))
    else:
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        peak = flux * (beta - 1.0) / (math.pi * alpha**2)
        ratio = np.maximum(peak / floor, 1.0)
        need = alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
        # and at least the radius enclosing 99 % of the flux: (1 + r^2/alpha^2)^(1-beta)
        # = 0.01 there, which keeps truncation's centroid bias below ~0.007 px
        need = np.maximum(need, alpha * math.sqrt(_MOFFAT_TAIL ** (1.0 / (1.0 - beta)) - 1.0))
    need = np.maximum(need, 2.0 * fwhm)
    return np.minimum(_bucket_radius(need), max(int(max_radius), 2))


def _neg_power(xp: Any, w: Any, beta: float) -> Any:
    """``w ** beta`` (0 < w <= 1), by multiplications where ``2 * beta`` is a small integer."""
    twice = 2.0 * beta
    if twice == round(twice) and 2 <= twice <= 16:
        whole, half = divmod(round(twice), 2)
        out = w * w if whole >= 2 else w.copy()
        for _ in range(whole - 2):
            out *= w
        if half:
            out = out * xp.sqrt(w) if whole else xp.sqrt(w)
        return out
    return w**beta


def _moffat_stamps(xp, dx, dy, fwhm, beta, radius, trail_offsets):
    """Unnormalised pixel-integrated Moffat stamps ``(n, S, S)`` about the integer centres.

    Pixels within ``_CORE_RADIUS`` of (each trail point of) the star are integrated with 3x3
    Gauss-Legendre; the rest are sampled at the pixel centre with the second-order
    (Laplacian / 24) pixel-integration correction, good to ~1e-3 of the value there.
    """
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    inv_a2 = 1.0 / (alpha * alpha)
    corr_scale = (beta / 6.0) * inv_a2  # (1/24) * 4 beta / alpha**2
    offs = xp.arange(-radius, radius + 1, dtype=xp.float64)
    stamp = None
    for ox, oy in trail_offsets:
        X = offs[None, :] - (dx + ox)[:, None]
        Y = offs[None, :] - (dy + oy)[:, None]
        x2 = X * X * inv_a2[:, None]
        y2 = Y * Y * inv_a2[:, None]
        w = 1.0 + y2[:, :, None] + x2[:, None, :]
        xp.reciprocal(w, out=w)
        f = _neg_power(xp, w, beta)
        # value = f * (1 + c w (beta - (beta + 1) w))
        corr = w * -(beta + 1.0)
        corr += beta
        corr *= w
        corr *= corr_scale[:, None, None]
        corr += 1.0
        f *= corr
        del w, corr
        sx, sy = round(ox), round(oy)
        rc = _CORE_RADIUS + (1 if (ox or oy) else 0)
        rc = min(rc, radius - max(abs(sx), abs(sy)))
        if rc >= 0:
            cx, cy = radius + sx, radius + sy
            # the core box is square and both centres share one slice per axis
            core = _moffat_core_xy(xp, X, Y, inv_a2, beta, cx, cy, rc)
            f[:, cy - rc : cy + rc + 1, cx - rc : cx + rc + 1] = core
        stamp = f if stamp is None else stamp + f
    return stamp


def _moffat_core_xy(xp, X, Y, inv_a2, beta, cx, cy, rc):
    nodes = xp.asarray(_GL3_NODES, dtype=X.dtype)
    weights = xp.asarray(_GL3_WEIGHTS, dtype=X.dtype)
    xg = X[:, cx - rc : cx + rc + 1, None] + nodes  # (n, C, 3)
    yg = Y[:, cy - rc : cy + rc + 1, None] + nodes
    xg2 = xg * xg * inv_a2[:, None, None]
    yg2 = yg * yg * inv_a2[:, None, None]
    u = 1.0 + yg2[:, :, :, None, None] + xg2[:, None, None, :, :]  # (n, C, 3, C, 3)
    f = _neg_power(xp, 1.0 / u, beta)
    f = f @ weights  # (n, C, 3, C)
    return (f * weights[None, None, :, None]).sum(axis=2)  # (n, C, C)


def _gaussian_stamps(xp, special, dx, dy, fwhm, radius, trail_offsets):
    """Exactly pixel-integrated Gaussian stamps ``(n, S, S)``, each summing to 1."""
    k = _FWHM_PER_SIGMA / (math.sqrt(2.0) * fwhm)  # 1 / (sqrt(2) sigma)
    edges = xp.arange(-radius - 0.5, radius + 1.0, dtype=xp.float64)  # S + 1 pixel edges
    stamp = None
    for ox, oy in trail_offsets:
        ex = xp.diff(special.erf((edges[None, :] - (dx + ox)[:, None]) * k[:, None]), axis=1)
        ey = xp.diff(special.erf((edges[None, :] - (dy + oy)[:, None]) * k[:, None]), axis=1)
        ex /= ex.sum(axis=1, keepdims=True)
        ey /= ey.sum(axis=1, keepdims=True)
        part = ey[:, :, None] * ex[:, None, :]
        stamp = part if stamp is None else stamp + part
    return stamp


def _scatter_add(xp, flat, index, values) -> None:
    if xp is np:
        np.add.at(flat, index, values)
    else:  # CuPy: atomic adds
        importlib.import_module("cupyx").scatter_add(flat, index, values)


def _render_into(xp, image, x, y, flux, fwhm, psf, beta, radii, trail_offsets, chunk_pixels, peaks):
    """Add every source's stamp into ``image`` (float64, C-contiguous); fill ``peaks``.

    ``radii`` (host int array) holds each source's stamp radius; sources are processed per
    radius bucket, sorted by position, in chunks of at most ``chunk_pixels`` stamp pixels.
    """
    ny, nx = image.shape
    flat = image.reshape(-1)
    special = importlib.import_module("cupyx.scipy.special" if xp is not np else "scipy.special")
    ix_all = xp.rint(x).astype(xp.int64)
    iy_all = xp.rint(y).astype(xp.int64)
    for radius in np.unique(radii):
        radius = int(radius)
        size = 2 * radius + 1
        members = np.flatnonzero(radii == radius)
        members_x = xp.asarray(members)
        ix_b, iy_b = ix_all[members_x], iy_all[members_x]
        overlap = (ix_b + radius >= 0) & (ix_b - radius < nx) & (iy_b + radius >= 0)
        overlap &= iy_b - radius < ny
        order = xp.argsort(iy_b * (nx + 2 * radius + 1) + ix_b)
        order = order[overlap[order]]
        members_x = members_x[order]
        per_chunk = max(1, chunk_pixels // (size * size))
        offs = xp.arange(-radius, radius + 1, dtype=xp.int64)
        box = (offs[:, None] * nx + offs[None, :]).reshape(1, size, size)
        for start in range(0, int(members_x.shape[0]), per_chunk):
            idx = members_x[start : start + per_chunk]
            ix, iy = ix_all[idx], iy_all[idx]
            dx, dy = x[idx] - ix, y[idx] - iy
            if psf == "gaussian":
                stamp = _gaussian_stamps(xp, special, dx, dy, fwhm[idx], radius, trail_offsets)
                stamp *= (flux[idx] / stamp.sum(axis=(1, 2)))[:, None, None]
            else:
                stamp = _moffat_stamps(xp, dx, dy, fwhm[idx], beta, radius, trail_offsets)
                stamp *= (flux[idx] / stamp.sum(axis=(1, 2)))[:, None, None]
            if peaks is not None:
                peaks[idx] = stamp.max(axis=(1, 2))
            inside = (
                bool(xp.all(ix - radius >= 0))
                and bool(xp.all(ix + radius < nx))
                and bool(xp.all(iy - radius >= 0))
                and bool(xp.all(iy + radius < ny))
            )
            if inside:
                index = (iy * nx + ix)[:, None, None] + box
            else:
                rows = iy[:, None] + offs
                cols = ix[:, None] + offs
                valid = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[
                    :, None, :
                ]
                stamp *= valid
                index = (
                    xp.clip(rows, 0, ny - 1)[:, :, None] * nx + xp.clip(cols, 0, nx - 1)[:, None, :]
                )
            _scatter_add(xp, flat, index.reshape(-1), stamp.reshape(-1))


def _trail_offsets(trail: Any) -> list[tuple[float, float]]:
    """Sub-positions (dx, dy) in px spread evenly along a trail centred on the source."""
    if trail is None:
        return [(0.0, 0.0)]
    length, angle = trail
    if length <= 0:
        return [(0.0, 0.0)]
    count = max(2, math.ceil(length) + 1)
    t = np.linspace(-0.5 * length, 0.5 * length, count)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(float(v * c), float(v * s)) for v in t]


def render_sources(
    shape: tuple[int, int],
    x: Any,
    y: Any,
    flux: Any,
    fwhm: Any,
    psf: str = "moffat",
    beta: float = 3.0,
    *,
    floor: float = 0.05,
    max_radius: int = 100,
    radius: int | None = None,
    trail: tuple[float, float] | None = None,
    out: Any = None,
    return_peak: bool = False,
    chunk_pixels: int = 1 << 16,
) -> Any:
    """Render point sources into an image, vectorised over sources (no loop over stars).

    Each source is drawn as a square stamp of ``2R + 1`` pixels about its nearest pixel,
    *pixel-integrated*: a Gaussian exactly (separable differences of ``erf``), a Moffat with
    3x3 Gauss-Legendre quadrature in the core (within 2 px of the centre) and centre
    sampling plus the second-order (Laplacian / 24) integration correction outside it
    (error ~1e-3 of the local value). Every stamp is normalised so that it sums to ``flux``:
    light beyond the stamp radius is *not* lost but redistributed (the profile is truncated
    at ``R``). Parts of stamps beyond the image edge are dropped, so sources at the edge put
    less than ``flux`` into the image.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the image, pixels.
    x, y : array_like, shape (n,)
        Source centres, (x, y) pixel order, 0-based pixel centres (not NumPy row/col order).
        NumPy or CuPy; the image is made on the same device.
    flux : array_like, shape (n,)
        Total flux of each source (any unit: ADU, e-); the image has the same unit per pixel.
    fwhm : array_like, shape (n,) or scalar
        Full width at half maximum of each source's continuous PSF, pixels.
    psf : {"moffat", "gaussian"}
        Profile. Moffat: ``(1 + r**2 / alpha**2) ** -beta``.
    beta : float
        Moffat index (> 1); ignored for the Gaussian.
    floor : float
        The stamp radius is where the continuous profile falls below ``floor`` (flux units
        per pixel; 0.05 e- in :func:`night`), at least ``2 * fwhm`` and, for the Moffat,
        the radius enclosing 99 % of the flux; rounded up on a ladder of sizes (ratio
        1.15) and capped at ``max_radius``. Beyond it the profile is truncated.
    max_radius : int
        Cap of the stamp radius, pixels.
    radius : int, optional
        One fixed stamp radius for every source (overrides ``floor`` and ``max_radius``).
    trail : (float, float), optional
        ``(length_px, angle_deg)``: smear every source uniformly along a segment of that
        length centred on ``(x, y)``, angle counter-clockwise from +x; drawn as
        ``ceil(length) + 1`` sub-positions sharing the flux equally. The stamp radius grows
        by half the length.
    out : ndarray, optional
        C-contiguous float64 image of ``shape`` to add into (and return) instead of zeros.
    return_peak : bool
        Also return each source's peak pixel value (its own stamp, before the image edge).
    chunk_pixels : int
        Stamp pixels per vectorised chunk; bounds memory (about 60 bytes each).

    Returns
    -------
    image : ndarray (ny, nx) float64
        Rendered sources, same device as ``x``.
    peak : ndarray (n,) float64
        Only with ``return_peak=True``: peak pixel of each source (0 for sources whose stamp
        misses the image).

    Examples
    --------
    >>> img = render_sources((41, 41), [20.2], [19.7], [500.0], [3.0], psf="moffat", beta=2.5)
    >>> img.shape, round(float(img.sum()), 6)
    ((41, 41), 500.0)
    >>> edge = render_sources((41, 41), [-0.5], [19.7], [500.0], [3.0])  # centred on the edge
    >>> round(float(edge.sum()))
    250
    """
    ny, nx = _as_shape(shape)
    psf = _as_choice("psf", psf, PSF_KINDS)
    if psf == "moffat":
        beta = _as_float("beta", beta, 1.0, low_open=True)
    floor = _as_float("floor", floor, 0.0, low_open=True)
    max_radius = _as_int("max_radius", max_radius, 1, "a positive integer")
    if radius is not None:
        radius = _as_int("radius", radius, 0, "a non-negative integer")
    chunk_pixels = _as_int("chunk_pixels", chunk_pixels, 1, "a positive integer")
    if trail is not None:
        try:
            length, angle = trail
        except (TypeError, ValueError):
            raise InputError("trail", f"expected (length_px, angle_deg), got {trail!r}") from None
        trail = (_as_float("trail", length, 0.0), _as_float("trail", angle))
    xp = xp_of(x, y, flux, fwhm, out)
    cols = {}
    for name, value in (("x", x), ("y", y), ("flux", flux), ("fwhm", fwhm)):
        arr = xp.asarray(value, dtype=xp.float64)
        if arr.ndim > 1:
            raise InputError(name, f"expected a 1-D array or a scalar, got ndim={arr.ndim}")
        cols[name] = arr
    n = max(int(a.size) for a in cols.values())
    for name, arr in cols.items():
        if arr.size not in (1, n):
            raise InputError(name, f"length {arr.size} differs from the other inputs ({n})")
        cols[name] = xp.broadcast_to(arr.reshape(-1), (n,)) if arr.size == 1 else arr
        if not bool(xp.all(xp.isfinite(cols[name]))):
            raise InputError(name, "expected finite values")
    if n and not bool(xp.all(cols["fwhm"] > 0)):
        raise InputError("fwhm", "expected positive widths (pixels)")
    if out is None:
        image = xp.zeros((ny, nx), dtype=xp.float64)
    else:
        if out.shape != (ny, nx) or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise InputError("out", f"expected a C-contiguous float64 array of shape {(ny, nx)}")
        image = out
    peaks = xp.zeros(n, dtype=xp.float64) if return_peak else None
    if n:
        offsets = _trail_offsets(trail)
        if radius is None:
            host = {k: _host(v) for k, v in cols.items()}
            radii = _stamp_radius(host["flux"], host["fwhm"], psf, beta, floor, max_radius)
        else:
            radii = np.full(n, max(radius, 0), dtype=np.int64)
        if trail is not None:
            radii = radii + math.ceil(0.5 * trail[0])
        _render_into(
            xp,
            image,
            cols["x"],
            cols["y"],
            cols["flux"],
            cols["fwhm"],
            psf,
            beta,
            radii,
            offsets,
            chunk_pixels,
            peaks,
        )
    return (image, peaks) if return_peak else image


def _host(a: Any) -> np.ndarray:
    return np.asarray(a.get() if is_cupy_array(a) else a)


# =========================================================================== light curves


def source_flux(sources: Any, mjd: float) -> np.ndarray:
    """Clear-sky flux of each source at time ``mjd``, from its light-curve parameters.

    Parameters
    ----------
    sources : astropy.table.Table
        Rows of :attr:`SimulatedNight.sources` (or the table read back by
        :func:`read_truth`), with columns ``kind, flux, period, amplitude, phase, t_peak,
        rise, decay``.
    mjd : float
        Time, MJD (UTC).

    Returns
    -------
    ndarray (n,) float64
        ADU in a clear frame of the night's exposure time. Stars: ``flux``. Variables
        (sinusoidal in magnitude): ``flux * 10 ** (-0.4 * amplitude * sin(2 pi (mjd / period
        + phase)))`` with ``period`` in days, ``amplitude`` the semi-amplitude in magnitudes
        and ``phase`` in cycles. Transients: ``flux * exp(-0.5 ((mjd - t_peak) / rise) ** 2)``
        before ``t_peak`` and ``flux * exp(-(mjd - t_peak) / decay)`` after (days).
    """
    kind = np.asarray(sources["kind"]).astype(str)
    flux = np.asarray(sources["flux"], dtype=np.float64).copy()
    var = kind == "variable"
    if var.any():
        period = np.asarray(sources["period"], dtype=np.float64)[var]
        amplitude = np.asarray(sources["amplitude"], dtype=np.float64)[var]
        phase = np.asarray(sources["phase"], dtype=np.float64)[var]
        dmag = amplitude * np.sin(2.0 * np.pi * (mjd / period + phase))
        flux[var] *= 10.0 ** (-0.4 * dmag)
    tra = kind == "transient"
    if tra.any():
        dt = mjd - np.asarray(sources["t_peak"], dtype=np.float64)[tra]
        rise = np.asarray(sources["rise"], dtype=np.float64)[tra]
        decay = np.asarray(sources["decay"], dtype=np.float64)[tra]
        shape = np.where(
            dt < 0, np.exp(-0.5 * (dt / rise) ** 2), np.exp(-np.maximum(dt, 0.0) / decay)
        )
        flux[tra] *= shape
    return flux


# =========================================================================== results


@dataclass(frozen=True, eq=False)
class SimulatedFrame:
    """One simulated exposure and its truth.

    Attributes
    ----------
    data : ndarray (ny, nx) float32
        Pixel values, ADU (NumPy). Saturated pixels read exactly ``saturate``.
    header : astropy.io.fits.Header
        WCS (TAN or TAN-SIP) and ``GAIN`` (e-/ADU), ``RDNOISE`` (e-), ``SATURATE`` (ADU),
        ``EXPTIME`` (s), ``MJD-OBS``, ``DATE-OBS``, ``FILTER``, ``SIMSEED``, ``SIMFRAME``.
    wcs : astropy.wcs.WCS
        The celestial WCS parsed from ``header``; true pixel positions are
        ``wcs.all_world2pix(ra, dec, 0)``.
    truth_mask : ndarray (ny, nx) uint8
        :class:`~dagpre.types.MaskBit` flags: ``SATURATED`` (charge from the pixel's own
        light reached the full well), ``BLEED`` (received charge spilled along its column),
        ``COSMIC`` (cosmic-ray deposit above 5 read noises), ``BAD`` (hot pixel).
    conditions : dict
        This frame's row of :attr:`SimulatedNight.frames_table` plus the PSF-width
        polynomial (``fwhm_coeffs``) and ``psf_variation``; see :meth:`fwhm_at`.
    """

    data: np.ndarray
    header: Any
    wcs: Any
    truth_mask: np.ndarray
    conditions: dict

    @property
    def index(self) -> int:
        """Position of the frame in the night (0-based)."""
        return int(self.conditions["frame"])

    def fwhm_at(self, x: Any, y: Any) -> np.ndarray:
        """PSF FWHM (pixels) at detector positions (x, y), 0-based pixel centres."""
        c = self.conditions
        return _fwhm_map(
            np.asarray(x, dtype=np.float64),
            np.asarray(y, dtype=np.float64),
            self.data.shape,
            c["seeing_fwhm"],
            c["psf_variation"],
            np.asarray(c["fwhm_coeffs"]),
        )

    def to_frame(self, *, truth_mask: bool = False):
        """This exposure as a :class:`dagpre.Frame` (the mask is zeros unless ``truth_mask``)."""
        header = self.header
        meta = {
            "mjd": float(header["MJD-OBS"]),
            "exptime": float(header["EXPTIME"]),
            "gain": float(header["GAIN"]),
            "rdnoise": float(header["RDNOISE"]),
            "saturate": float(header["SATURATE"]),
            "filter": str(header["FILTER"]),
        }
        mask = self.truth_mask.copy() if truth_mask else np.zeros_like(self.truth_mask)
        return Frame(data=self.data, mask=mask, header=self.header.copy(), wcs=self.wcs, meta=meta)


@dataclass(frozen=True, eq=False)
class SimulatedNight:
    """A simulated night: frames and truth tables (see :func:`night`).

    Attributes
    ----------
    frames : list of SimulatedFrame
        The exposures in time order.
    sources : astropy.table.Table
        One row per source: ``id, ra, dec`` (deg), ``flux`` (ADU in a clear frame of
        ``exptime``), ``kind`` ("star", "variable", "transient"), ``period`` (d),
        ``amplitude`` (mag), ``phase`` (cycles), ``t_peak`` (MJD), ``rise``, ``decay`` (d),
        NaN where not applicable, and ``saturated`` (its noise-free peak plus sky reached
        ``saturate`` in at least one frame).
    epochs : astropy.table.Table
        One row per (frame, source) whose true position lies on the frame: ``frame,
        source_id, x, y`` (true pixel position, 0-based), ``flux`` (true total ADU put into
        that frame), ``fwhm`` (px there), ``peak`` (ADU, the source's own brightest pixel,
        no sky), ``saturated``.
    frames_table : astropy.table.Table
        One row per frame: observing conditions, defects and the file name.
    params : dict
        The arguments :func:`night` was called with (after defaults).
    """

    frames: list
    sources: Any
    epochs: Any
    frames_table: Any
    params: dict

    @property
    def transients(self):
        """Rows of :attr:`sources` with ``kind == "transient"`` (a copy)."""
        return _natural_strings(self.sources[self.sources["kind"] == "transient"])

    def truth_tables(self) -> dict:
        """The four truth tables by the names :meth:`write` gives their files."""
        return {
            "sources": self.sources,
            "epochs": self.epochs,
            "frames": self.frames_table,
            "transients": self.transients,
        }

    def write(self, outdir: str | Path, overwrite: bool = False) -> dict:
        """Write the frames as FITS and the truth as ECSV tables and FITS masks.

        Layout: ``outdir/frame_000.fits`` ... (float32 primary HDU with the frame's header),
        ``outdir/truth/{sources,epochs,frames,transients}.ecsv`` and
        ``outdir/truth/truthmask_000.fits`` ... (uint8 :class:`~dagpre.types.MaskBit`).

        Parameters
        ----------
        outdir : str or Path
            Folder, made if missing.
        overwrite : bool
            Replace existing files. Without it, nothing is written when any target exists.

        Returns
        -------
        dict
            ``{"frames": [Path, ...], "truth": [Path, ...]}``.

        Raises
        ------
        InputError
            Naming the first target file that exists when ``overwrite`` is False.
        """
        from astropy.io import fits

        outdir = Path(outdir)
        truth_dir = outdir / "truth"
        names = list(self.frames_table["filename"])
        frame_paths = [outdir / name for name in names]
        mask_paths = [truth_dir / name.replace("frame_", "truthmask_", 1) for name in names]
        table_paths = {name: truth_dir / f"{name}.ecsv" for name in TRUTH_TABLES}
        targets = [*frame_paths, *table_paths.values(), *mask_paths]
        if not overwrite:
            for path in targets:
                if path.exists():
                    raise InputError(path, "exists; pass overwrite=True to replace it")
        if outdir.exists() and not outdir.is_dir():
            raise InputError(outdir, "exists and is not a folder")
        truth_dir.mkdir(parents=True, exist_ok=True)
        for frame, path in zip(self.frames, frame_paths, strict=True):
            fits.PrimaryHDU(data=frame.data, header=frame.header).writeto(path, overwrite=overwrite)
        for frame, path in zip(self.frames, mask_paths, strict=True):
            header = fits.Header()
            header["SIMSEED"] = (self.params["seed"], "dagpre.simulate seed")
            header["SIMFRAME"] = (frame.index, "frame index in the night")
            for bit in MaskBit:
                header[f"MASK_{bit.name[:3]}"] = (int(bit), f"MaskBit.{bit.name}")
            fits.PrimaryHDU(data=frame.truth_mask, header=header).writeto(path, overwrite=overwrite)
        for name, table in self.truth_tables().items():
            table.write(table_paths[name], format="ascii.ecsv", overwrite=overwrite)
        return {"frames": frame_paths, "truth": [*table_paths.values(), *mask_paths]}


def read_truth(outdir: str | Path) -> dict:
    """Read the truth tables written by :meth:`SimulatedNight.write`.

    Parameters
    ----------
    outdir : str or Path
        The folder given to ``write`` (or its ``truth`` sub-folder).

    Returns
    -------
    dict of astropy.table.Table
        ``{"sources", "epochs", "frames", "transients"}``, equal to the tables written
        (``"frames"`` is :attr:`SimulatedNight.frames_table`).
    """
    from astropy.table import Table

    folder = Path(outdir)
    if not (folder / "sources.ecsv").exists() and (folder / "truth").is_dir():
        folder = folder / "truth"
    out = {}
    for name in TRUTH_TABLES:
        path = folder / f"{name}.ecsv"
        if not path.exists():
            raise InputError(path, "no such truth table (write the night with .write first)")
        table = Table.read(path, format="ascii.ecsv")
        for col in table.colnames:  # empty strings come back masked
            if getattr(table[col], "mask", None) is not None and table[col].dtype.kind == "U":
                table[col] = table[col].filled("")
        out[name] = table
    return out


# =========================================================================== the night


def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one purpose (``key``) of one seed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _unit_poly(rng: np.random.Generator) -> np.ndarray:
    """Coefficients of ``c0 u + c1 v + c2 u^2 + c3 u v + c4 v^2`` with max |P| = 1 on [-1, 1]^2."""
    coeffs = rng.normal(size=5)
    u, v = np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 21))
    peak = np.abs(_poly(coeffs, u, v)).max()
    return coeffs / peak if peak > 0 else coeffs


def _poly(c: np.ndarray, u: Any, v: Any) -> Any:
    return c[0] * u + c[1] * v + c[2] * u * u + c[3] * u * v + c[4] * v * v


def _fwhm_map(x, y, shape, seeing, variation, coeffs) -> np.ndarray:
    """``seeing * (1 + variation * P(u, v))``; u, v = position scaled to [-1, 1] over the frame."""
    ny, nx = shape
    u = (x - 0.5 * (nx - 1)) / (0.5 * nx)
    v = (y - 0.5 * (ny - 1)) / (0.5 * ny)
    return seeing * np.maximum(1.0 + variation * _poly(coeffs, u, v), 0.2)


def _peak_fraction(fwhm: float, psf: str, beta: float) -> float:
    """Continuous peak surface brightness per unit flux (1/px^2) of the profile."""
    if psf == "gaussian":
        return 1.0 / (2.0 * math.pi * (fwhm / _FWHM_PER_SIGMA) ** 2)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (math.pi * alpha**2)


def _make_wcs(shape, center, pixel_scale, offset, rotation_deg, sip_coeffs):
    """The frame's TAN (or TAN-SIP) WCS, and its header (parsed back, so both agree)."""
    from astropy.io import fits
    from astropy.wcs import WCS, Sip

    ny, nx = shape
    wcs = WCS(naxis=2)
    suffix = "-SIP" if sip_coeffs is not None else ""
    wcs.wcs.ctype = [f"RA---TAN{suffix}", f"DEC--TAN{suffix}"]
    wcs.wcs.crval = [float(center[0]), float(center[1])]
    wcs.wcs.crpix = [0.5 * (nx + 1) + offset[0], 0.5 * (ny + 1) + offset[1]]
    theta = math.radians(rotation_deg)
    scale = pixel_scale / 3600.0
    wcs.wcs.cd = scale * np.array(
        [[-math.cos(theta), math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    )
    wcs.wcs.radesys = "ICRS"
    if sip_coeffs is not None:
        wcs.sip = Sip(sip_coeffs[0], sip_coeffs[1], None, None, wcs.wcs.crpix)
    header = wcs.to_header(relax=True)
    header = fits.Header.fromstring(header.tostring())
    return WCS(header), header


def _camera_sip(shape) -> tuple[np.ndarray, np.ndarray]:
    """Fixed order-3 SIP A/B: a quadratic tilt plus a cubic radial term, ~1.5 px at corners."""
    ny, nx = shape
    r = 0.5 * math.hypot(nx, ny)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 2] = 0.30 / r**2, -0.20 / r**2, 0.10 / r**2
    b[2, 0], b[1, 1], b[0, 2] = -0.10 / r**2, 0.25 / r**2, 0.20 / r**2
    k = 0.8 / r**3  # radial: (du, dv) = k (u, v) (u^2 + v^2)
    a[3, 0] = a[1, 2] = k
    b[2, 1] = b[0, 3] = k
    return a, b


def _log_uniform(rng, low, high, size):
    return np.exp(rng.uniform(math.log(low), math.log(high), size))


def _draw_sources(p: dict, margin: float, flux_lo: float, flux_hi: float):
    """Night-level sources in nominal pixel coordinates; returns a dict of columns."""
    ny, nx = p["shape"]
    rng = _stream(p["seed"], 0, 0)
    n_in = p["n_stars"]
    x = rng.uniform(-0.5, nx - 0.5, n_in)
    y = rng.uniform(-0.5, ny - 0.5, n_in)
    # margin stars at the same density, outside the nominal footprint
    area_in = nx * ny
    area_all = (nx + 2 * margin) * (ny + 2 * margin)
    n_out = round(n_in * (area_all - area_in) / area_in)
    xs, ys = [], []
    have = 0
    while have < n_out:
        m = int(1.3 * (n_out - have) * area_all / (area_all - area_in)) + 16
        cx = rng.uniform(-0.5 - margin, nx - 0.5 + margin, m)
        cy = rng.uniform(-0.5 - margin, ny - 0.5 + margin, m)
        keep = (cx < -0.5) | (cx >= nx - 0.5) | (cy < -0.5) | (cy >= ny - 0.5)
        xs.append(cx[keep])
        ys.append(cy[keep])
        have += int(keep.sum())
    x = np.concatenate([x, *xs])[: n_in + n_out]
    y = np.concatenate([y, *ys])[: n_in + n_out]
    n = x.size
    flux = _log_uniform(rng, flux_lo, flux_hi, n)
    # the bright ones: in the central half of the frame, peak 5-50 x saturation
    n_sat = p["n_saturated"]
    x[:n_sat] = rng.uniform(0.25 * (nx - 1), 0.75 * (nx - 1), n_sat)
    y[:n_sat] = rng.uniform(0.25 * (ny - 1), 0.75 * (ny - 1), n_sat)
    seeing_mid = 0.5 * sum(p["seeing_fwhm"])
    frac = _peak_fraction(seeing_mid, p["psf"], p["moffat_beta"])
    flux[:n_sat] = p["saturate"] * _log_uniform(rng, 5.0, 50.0, n_sat) / frac
    kind = np.full(n, "star", dtype="<U9")
    period = np.full(n, np.nan)
    amplitude = np.full(n, np.nan)
    phase = np.full(n, np.nan)
    n_var = round(p["variable_fraction"] * (n_in - n_sat))
    var = rng.choice(np.arange(n_sat, n_in), size=n_var, replace=False) if n_var else []
    var = np.sort(np.asarray(var, dtype=np.int64))
    kind[var] = "variable"
    period[var] = rng.uniform(0.02, 0.5, var.size)
    amplitude[var] = rng.uniform(0.1, 0.5, var.size)
    phase[var] = rng.uniform(0.0, 1.0, var.size)
    return {
        "x": x,
        "y": y,
        "flux": flux,
        "kind": kind,
        "period": period,
        "amplitude": amplitude,
        "phase": phase,
        "bright": np.arange(n) < n_sat,
    }


def _draw_transients(p: dict, stars: dict, edge: float, flux_lo: float, flux_hi: float, mjds):
    """Transients away from stars and bright columns, peaking inside the night."""
    from scipy.spatial import cKDTree

    ny, nx = p["shape"]
    rng = _stream(p["seed"], 0, 3)
    n_tr = p["n_transients"]
    n_cand = 64
    lo_x, hi_x = min(edge, 0.4 * nx), max(nx - 1 - edge, 0.6 * nx)
    lo_y, hi_y = min(edge, 0.4 * ny), max(ny - 1 - edge, 0.6 * ny)
    cand_x = rng.uniform(lo_x, hi_x, (n_tr, n_cand))
    cand_y = rng.uniform(lo_y, hi_y, (n_tr, n_cand))
    flux = _log_uniform(rng, flux_lo, flux_hi, n_tr)
    span = float(mjds[-1] - mjds[0]) + p["exptime"] / 86400.0
    t_peak = mjds[0] + span * rng.uniform(0.1, 0.9, n_tr)
    rise = span * rng.uniform(0.1, 0.5, n_tr)
    decay = span * rng.uniform(0.2, 1.0, n_tr)
    fwhm_hi = p["seeing_fwhm"][1] * (1.0 + p["psf_variation"])
    d_min = 3.0 * fwhm_hi
    bright_x = stars["x"][stars["bright"]]
    tx = np.empty(n_tr)
    ty = np.empty(n_tr)
    tree = cKDTree(np.column_stack([stars["x"], stars["y"]])) if stars["x"].size else None
    for i in range(n_tr):  # a handful: each checks its 64 candidates at once
        cand = np.column_stack([cand_x[i], cand_y[i]])
        dist = tree.query(cand)[0] if tree is not None else np.full(n_cand, np.inf)
        if i:  # keep away from the transients already placed too
            placed = np.hypot(cand_x[i][:, None] - tx[:i], cand_y[i][:, None] - ty[:i])
            dist = np.minimum(dist, placed.min(axis=1))
        clear_cols = np.ones(n_cand, dtype=bool)
        if bright_x.size:
            clear_cols = np.abs(cand[:, :1] - bright_x[None, :]).min(axis=1) > 2.0 * d_min
        good = np.flatnonzero((dist >= d_min) & clear_cols)
        pick = good[0] if good.size else int(np.argmax(dist + 1e6 * clear_cols))
        tx[i], ty[i] = cand[pick]
    return {"x": tx, "y": ty, "flux": flux, "t_peak": t_peak, "rise": rise, "decay": decay}


def _cosmic_rays(rng, shape, rate):
    """Short tracks (1-6 px, 500-5000 e- per pixel): flat indices and e- per pixel hit."""
    ny, nx = shape
    n = int(rng.poisson(rate * nx * ny / 1e6))
    x0 = rng.uniform(0, nx, n)
    y0 = rng.uniform(0, ny, n)
    length = rng.integers(1, 7, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    deposit = rng.uniform(500.0, 5000.0, (n, 6))
    steps = np.arange(6)
    xs = np.floor(x0[:, None] + steps * np.cos(angle)[:, None]).astype(np.int64)
    ys = np.floor(y0[:, None] + steps * np.sin(angle)[:, None]).astype(np.int64)
    keep = (steps < length[:, None]) & (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    flat = (ys * nx + xs)[keep]
    uniq, inverse = np.unique(flat, return_inverse=True)
    total = np.bincount(inverse, weights=deposit[keep], minlength=uniq.size)
    return n, uniq, total


def _spill(seg: np.ndarray, charge: float, full_well: float) -> None:
    """Fill ``seg`` (a view, in spill order) up to the full well with ``charge`` e-."""
    room = np.maximum(full_well - seg, 0.0)
    filled = np.cumsum(room)
    k = int(np.searchsorted(filled, charge))
    np.maximum(seg[:k], full_well, out=seg[:k])
    if k < seg.size:
        seg[k] += charge - (filled[k - 1] if k else 0.0)
    # else: the rest runs off the edge of the detector


def _bleed(charge: np.ndarray, full_well: float, saturated: np.ndarray):
    """Spill charge above the full well up and down each column (readout axis y).

    Each run of saturated pixels in a column keeps ``full_well`` per pixel; its excess goes
    half up, half down the column, filling pixels to the full well in turn (passing over
    other saturated pixels) until it is absorbed or leaves the detector.

    Returns flat indices of the pixels that received spilled charge, and of those left at
    the full well by it.
    """
    nx = charge.shape[1]
    got, full = [], []
    for c in np.flatnonzero(saturated.any(axis=0)):  # only columns with saturated pixels
        col = charge[:, c].astype(np.float64)
        before = col.copy()
        s = saturated[:, c]
        edges = np.diff(np.concatenate([[0], s.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for a, b in zip(starts, ends, strict=True):
            excess = float(col[a:b].sum() - full_well * (b - a))
            col[a:b] = full_well
            if excess > 0:
                _spill(col[b:], 0.5 * excess, full_well)
                _spill(col[:a][::-1], 0.5 * excess, full_well)
        rows = np.flatnonzero((col != before) & ~s)
        got.append(rows * nx + c)
        full.append(rows[col[rows] >= full_well] * nx + c)
        charge[:, c] = col
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(got) if got else empty), (np.concatenate(full) if full else empty)


def _render_frame(p, k, mjd, sources, coords, night_state):
    """Make frame ``k``: conditions, WCS, image, truth mask and epoch rows."""
    ny, nx = p["shape"]
    gain, rdnoise, saturate = p["gain"], p["rdnoise"], p["saturate"]
    full_well = saturate * gain
    cx, cy = 0.5 * (nx - 1), 0.5 * (ny - 1)
    rng = _stream(p["seed"], 1, k, 0)
    seeing = rng.uniform(*p["seeing_fwhm"])
    sky = rng.uniform(*p["sky"])
    grad_frac = rng.uniform(-p["sky_gradient"], p["sky_gradient"], 2)
    transmission = rng.uniform(*p["transmission"])
    offset = rng.uniform(-p["max_offset"], p["max_offset"], 2)
    rotation = rng.uniform(-p["max_rotation"], p["max_rotation"])
    frame_poly = _unit_poly(rng)
    # bad-frame parameters are always drawn, so a frame's other draws do not depend on them
    rng_bad = _stream(p["seed"], 1, k, 1)
    cloud_angle = rng_bad.uniform(0.0, 2.0 * np.pi)
    cloud_lo, cloud_hi = rng_bad.uniform(0.3, 0.45), rng_bad.uniform(0.8, 0.9)
    cloud_sky = rng_bad.uniform(1.3, 2.0)
    shutter_axis = "xy"[int(rng_bad.integers(0, 2))]
    shutter_edge = ("low", "high")[int(rng_bad.integers(0, 2))]
    shutter_min, shutter_width = rng_bad.uniform(0.55, 0.65), rng_bad.uniform(0.25, 0.35)
    trail_length, trail_angle = rng_bad.uniform(10.0, 20.0), rng_bad.uniform(0.0, 180.0)

    bad = p["bad_frames"].get(k, "")
    sky_grad_x = sky * grad_frac[0] / (0.5 * nx)
    sky_grad_y = sky * grad_frac[1] / (0.5 * ny)
    trans_grad = (0.0, 0.0)
    if bad == "cloud":
        extent = abs(math.cos(cloud_angle)) * (nx - 1) + abs(math.sin(cloud_angle)) * (ny - 1)
        slope = (cloud_hi - cloud_lo) / max(extent, 1.0)
        transmission = 0.5 * (cloud_lo + cloud_hi)
        trans_grad = (slope * math.cos(cloud_angle), slope * math.sin(cloud_angle))
        sky, sky_grad_x, sky_grad_y = (cloud_sky * v for v in (sky, sky_grad_x, sky_grad_y))
    defocus = _DEFOCUS_FACTOR if bad == "defocus" else 1.0
    seeing_eff = seeing * defocus
    coeffs = (night_state["psf_poly"] + 0.3 * frame_poly) / 1.3
    trail = (trail_length, trail_angle) if bad == "trailing" else None

    def ramp(pos, size, axis):
        """Shutter-shadow illumination factor along ``axis`` (1 elsewhere and when clear)."""
        pos = np.asarray(pos, dtype=np.float64)
        if bad != "shutter" or shutter_axis != axis:
            return np.ones_like(pos)
        s = pos / max(size - 1, 1)
        if shutter_edge == "high":
            s = 1.0 - s
        return shutter_min + (1.0 - shutter_min) * np.clip(s / shutter_width, 0.0, 1.0)

    sip = night_state["sip"]
    wcs, header = _make_wcs(p["shape"], p["center"], p["pixel_scale"], offset, rotation, sip)
    ra, dec = coords
    if sip is None:
        px, py = wcs.wcs_world2pix(ra, dec, 0)
    else:
        px, py = wcs.all_world2pix(ra, dec, 0, tolerance=1e-10, maxiter=100, quiet=True)
    fwhm = _fwhm_map(px, py, p["shape"], seeing_eff, p["psf_variation"], coeffs)
    clear = source_flux(sources, mjd)
    trans = transmission + trans_grad[0] * (px - cx) + trans_grad[1] * (py - cy)
    flux = clear * trans * ramp(px, nx, "x") * ramp(py, ny, "y")  # ADU
    # ---- expected electrons: sources, sky (x shutter), hot pixels
    lam, peaks = render_sources(
        p["shape"],
        px,
        py,
        flux * gain,
        fwhm,
        p["psf"],
        p["moffat_beta"],
        floor=0.05,
        max_radius=p["max_radius"],
        trail=trail,
        return_peak=True,
    )
    xs = np.arange(nx, dtype=np.float64)
    ys = np.arange(ny, dtype=np.float64)
    sky_x = gain * (sky + sky_grad_x * (xs - cx))
    sky_y = gain * sky_grad_y * (ys - cy)
    if bad == "shutter":
        sky_map = sky_x[None, :] + sky_y[:, None]
        sky_map *= ramp(xs, nx, "x")[None, :]
        sky_map *= ramp(ys, ny, "y")[:, None]
        lam += sky_map
        del sky_map
    else:
        lam += sky_x[None, :]
        lam += sky_y[:, None]
    hot_index, hot_dark = night_state["hot_index"], night_state["hot_dark"]
    lam.reshape(-1)[hot_index] += hot_dark
    # ---- Poisson, cosmic rays, saturation and bleeding, read noise, ADU
    rng_noise = _stream(p["seed"], 1, k, 2)
    charge = rng_noise.poisson(lam).astype(np.float32)
    del lam
    n_cosmic, cr_index, cr_charge = _cosmic_rays(
        _stream(p["seed"], 1, k, 3), p["shape"], p["cosmic_rate"]
    )
    flat = charge.reshape(-1)
    flat[cr_index] += cr_charge.astype(np.float32)
    saturated = charge >= full_well
    bleed_index, bleed_full = _bleed(charge, full_well, saturated)
    noise = rng_noise.standard_normal(p["shape"], dtype=np.float32)
    noise *= np.float32(rdnoise)
    charge += noise
    del noise
    data = np.divide(charge, np.float32(gain), out=charge)
    np.copyto(data, np.float32(saturate), where=saturated)
    data.reshape(-1)[bleed_full] = np.float32(saturate)
    np.minimum(data, np.float32(saturate), out=data)
    mask = np.zeros(p["shape"], dtype=np.uint8)
    np.copyto(mask, np.uint8(MaskBit.SATURATED), where=saturated)
    mask_flat = mask.reshape(-1)
    mask_flat[bleed_index] |= np.uint8(MaskBit.BLEED)
    mask_flat[cr_index[cr_charge > 5.0 * rdnoise]] |= np.uint8(MaskBit.COSMIC)
    mask_flat[hot_index] |= np.uint8(MaskBit.BAD)
    # ---- epochs
    peak_adu = peaks / gain
    on = (px >= -0.5) & (px < nx - 0.5) & (py >= -0.5) & (py < ny - 0.5)
    kinds = np.asarray(sources["kind"])
    on &= (kinds != "transient") | (clear >= 1e-6 * np.asarray(sources["flux"]))
    sky_at = sky + sky_grad_x * (px - cx) + sky_grad_y * (py - cy)
    sky_at *= ramp(px, nx, "x") * ramp(py, ny, "y")
    sel = np.flatnonzero(on)
    epochs = {
        "frame": np.full(sel.size, k, dtype=np.int64),
        "source_id": np.asarray(sources["id"])[sel],
        "x": px[sel],
        "y": py[sel],
        "flux": flux[sel],
        "fwhm": fwhm[sel],
        "peak": peak_adu[sel],
        "saturated": (peak_adu + sky_at >= saturate)[sel],
    }
    # ---- header and conditions
    from astropy.time import Time

    date = Time(mjd, format="mjd", scale="utc")
    date.precision = 3
    cards = [
        ("BUNIT", "adu", "pixel unit"),
        ("EXPTIME", p["exptime"], "[s] exposure time"),
        ("MJD-OBS", mjd, "[d] MJD (UTC) at the start of the exposure"),
        ("DATE-OBS", date.isot, "UTC at the start of the exposure"),
        ("FILTER", p["filter"], "filter name"),
        ("GAIN", gain, "[e-/adu] gain"),
        ("RDNOISE", rdnoise, "[e-] read noise"),
        ("SATURATE", saturate, "[adu] saturation level"),
        ("OBJECT", "dagpre-sim", "simulated field"),
        ("SIMSEED", p["seed"], "dagpre.simulate seed"),
        ("SIMFRAME", k, "frame index in the night"),
        ("SIMPSF", p["psf"], "PSF profile"),
        ("SIMFWHM", seeing_eff, "[px] PSF FWHM at the frame centre"),
        ("SIMBAD", bad, "bad-frame kind, empty if clear"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    digits = max(3, len(str(p["n_frames"] - 1)))
    row = {
        "frame": k,
        "filename": f"frame_{k:0{digits}d}.fits",
        "mjd": mjd,
        "date_obs": date.isot,
        "exptime": p["exptime"],
        "seeing_fwhm": seeing_eff,
        "psf": p["psf"],
        "beta": p["moffat_beta"] if p["psf"] == "moffat" else math.nan,
        "sky": sky,
        "sky_grad_x": sky_grad_x,
        "sky_grad_y": sky_grad_y,
        "transmission": transmission,
        "trans_grad_x": trans_grad[0],
        "trans_grad_y": trans_grad[1],
        "offset_x": float(offset[0]),
        "offset_y": float(offset[1]),
        "rotation_deg": rotation,
        "bad": bad,
        "shutter_axis": shutter_axis if bad == "shutter" else "",
        "shutter_edge": shutter_edge if bad == "shutter" else "",
        "shutter_min": shutter_min if bad == "shutter" else 1.0,
        "shutter_width": shutter_width if bad == "shutter" else 0.0,
        "defocus_factor": defocus,
        "trail_length": trail_length if trail else 0.0,
        "trail_angle_deg": trail_angle if trail else 0.0,
        "gain": gain,
        "rdnoise": rdnoise,
        "saturate": saturate,
        "n_cosmic": n_cosmic,
    }
    conditions = dict(row, fwhm_coeffs=[float(c) for c in coeffs], psf_variation=p["psf_variation"])
    frame = SimulatedFrame(
        data=data, header=header, wcs=wcs, truth_mask=mask, conditions=conditions
    )
    return frame, row, epochs


def _validate(args: dict) -> dict:
    """Check :func:`night`'s arguments; return them normalised (floats, tuples, dicts)."""
    p = dict(args)
    p["n_frames"] = _as_int("n_frames", p["n_frames"], 1, "a positive integer")
    p["shape"] = _as_shape(p["shape"])
    p["n_stars"] = _as_int("n_stars", p["n_stars"], 0, "a non-negative integer")
    p["seed"] = _as_int("seed", p["seed"], 0, "a non-negative integer")
    p["psf"] = _as_choice("psf", p["psf"], PSF_KINDS)
    p["moffat_beta"] = _as_float("moffat_beta", p["moffat_beta"], 1.0, low_open=True)
    p["seeing_fwhm"] = _as_range("seeing_fwhm", p["seeing_fwhm"], 0.0, low_open=True)
    p["psf_variation"] = _as_float("psf_variation", p["psf_variation"], 0.0, 0.5, high_open=True)
    p["pixel_scale"] = _as_float("pixel_scale", p["pixel_scale"], 0.0, low_open=True)
    p["sky"] = _as_range("sky", p["sky"], 0.0)
    p["sky_gradient"] = _as_float("sky_gradient", p["sky_gradient"], 0.0, 1.0, high_open=True)
    p["gain"] = _as_float("gain", p["gain"], 0.0, low_open=True)
    p["rdnoise"] = _as_float("rdnoise", p["rdnoise"], 0.0)
    p["saturate"] = _as_float("saturate", p["saturate"], 0.0, low_open=True)
    p["exptime"] = _as_float("exptime", p["exptime"], 0.0, low_open=True)
    p["cadence"] = _as_float("cadence", p["cadence"], 0.0)
    p["mjd0"] = _as_float("mjd0", p["mjd0"])
    if not isinstance(p["filter"], str):
        raise InputError("filter", f"expected a string, got {p['filter']!r}")
    try:
        ra, dec = p["center"]
    except (TypeError, ValueError):
        raise InputError("center", f"expected (ra, dec) in degrees, got {p['center']!r}") from None
    p["center"] = (
        _as_float("center", ra) % 360.0,
        _as_float("center", dec, -90.0, 90.0, low_open=True, high_open=True),
    )
    p["max_offset"] = _as_float("max_offset", p["max_offset"], 0.0)
    p["max_rotation"] = _as_float("max_rotation", p["max_rotation"], 0.0, 45.0)
    if not isinstance(p["sip"], (bool, np.bool_)):
        raise InputError("sip", f"expected True or False, got {p['sip']!r}")
    p["sip"] = bool(p["sip"])
    p["n_saturated"] = _as_int("n_saturated", p["n_saturated"], 0, "a non-negative integer")
    if p["n_saturated"] > p["n_stars"]:
        raise InputError(
            "n_saturated", f"expected at most n_stars={p['n_stars']}, got {p['n_saturated']}"
        )
    p["variable_fraction"] = _as_float("variable_fraction", p["variable_fraction"], 0.0, 1.0)
    p["n_transients"] = _as_int("n_transients", p["n_transients"], 0, "a non-negative integer")
    p["cosmic_rate"] = _as_float("cosmic_rate", p["cosmic_rate"], 0.0)
    ny, nx = p["shape"]
    if p["n_hot_pixels"] is None:
        p["n_hot_pixels"] = max(5, round(1e-5 * nx * ny))
    p["n_hot_pixels"] = _as_int("n_hot_pixels", p["n_hot_pixels"], 0, "a non-negative integer")
    if p["n_hot_pixels"] > nx * ny:
        raise InputError("n_hot_pixels", f"expected at most {nx * ny}, got {p['n_hot_pixels']}")
    bad = p["bad_frames"] or {}
    if not isinstance(bad, Mapping):
        raise InputError("bad_frames", f"expected a mapping index -> kind, got {bad!r}")
    checked = {}
    for key, kind in bad.items():
        index = _as_int("bad_frames", key, 0, f"frame indices in [0, {p['n_frames']})")
        if index >= p["n_frames"]:
            raise InputError("bad_frames", f"frame index {index} >= n_frames={p['n_frames']}")
        checked[index] = _as_choice("bad_frames", kind, BAD_FRAME_KINDS)
    p["bad_frames"] = checked
    p["transmission"] = _as_range("transmission", p["transmission"], 0.0, low_open=True)
    if p["transmission"][1] > 1.0:
        raise InputError("transmission", f"expected values in (0, 1], got {args['transmission']!r}")
    if p["flux_range"] is not None:
        p["flux_range"] = _as_range("flux_range", p["flux_range"], 0.0, low_open=True)
    p["max_radius"] = _as_int("max_radius", p["max_radius"], 2, "an integer >= 2")
    return p


def night(
    n_frames: int = 5,
    shape: tuple[int, int] = (512, 512),
    n_stars: int = 500,
    seed: int = 0,
    *,
    psf: str = "moffat",
    moffat_beta: float = 3.0,
    seeing_fwhm: tuple[float, float] = (2.5, 4.0),
    psf_variation: float = 0.1,
    pixel_scale: float = 0.4,
    sky: tuple[float, float] = (200.0, 400.0),
    sky_gradient: float = 0.05,
    gain: float = 2.0,
    rdnoise: float = 5.0,
    saturate: float = 50000.0,
    exptime: float = 60.0,
    cadence: float = 600.0,
    mjd0: float = 60000.1,
    filter: str = "r",
    center: tuple[float, float] = (150.0, -30.0),
    max_offset: float = 20.0,
    max_rotation: float = 0.2,
    sip: bool = False,
    n_saturated: int = 3,
    variable_fraction: float = 0.05,
    n_transients: int = 3,
    cosmic_rate: float = 20.0,
    n_hot_pixels: int | None = None,
    bad_frames: Mapping[int, str] | None = None,
    transmission: tuple[float, float] = (0.9, 1.0),
    flux_range: tuple[float, float] | None = None,
    max_radius: int = 100,
) -> SimulatedNight:
    """Simulate a night of ``n_frames`` exposures of one field, with ground truth.

    Parameters
    ----------
    n_frames : int
        Number of exposures.
    shape : (int, int)
        ``(ny, nx)`` of every frame, pixels.
    n_stars : int
        Stars whose nominal position lies on the frame footprint. The field extends
        beyond the footprint on every side by the largest pointing offset and rotation
        shift (plus 3 px with ``sip``) plus 10 px, filled with more stars at the same
        density (also in :attr:`~SimulatedNight.sources`), so that offsets never leave
        empty edges. Fluxes are log-uniform from about a 5-sigma
        detection to about 70 % of saturation at the best seeing (``flux_range`` overrides).
    seed : int
        Everything is drawn from ``numpy.random.SeedSequence(seed)`` children: same seed,
        bit-identical night.
    psf : {"moffat", "gaussian"}
        PSF profile, pixel-integrated (see :func:`render_sources`).
    moffat_beta : float
        Moffat index (> 1).
    seeing_fwhm : (float, float)
        Per-frame PSF FWHM at the frame centre, pixels, uniform in this range.
    psf_variation : float
        Fractional FWHM change across the frame: ``fwhm(x, y) = seeing * (1 + psf_variation
        * P(u, v))`` with ``P`` a linear + quadratic polynomial of the position scaled to
        [-1, 1], ``max |P| = 1``, fixed for the night plus a smaller per-frame part.
    pixel_scale : float
        Arcsec per pixel.
    sky : (float, float)
        Per-frame sky level at the frame centre, ADU per pixel, uniform in this range.
    sky_gradient : float
        Largest fractional sky change from the centre to an edge along each axis; each
        frame draws its linear gradient (``sky_grad_x``, ``sky_grad_y`` in ADU/px).
    gain, rdnoise, saturate : float
        e-/ADU, e- (Gaussian), ADU. The full well is ``saturate * gain`` e-.
    exptime, cadence : float
        Seconds; frame ``i`` starts at ``mjd0 + i * cadence / 86400``.
    mjd0 : float
        Start of the first exposure, MJD (UTC).
    filter : str
        Written to ``FILTER``.
    center : (float, float)
        Field centre (RA, Dec), degrees; the ``CRVAL`` of every frame.
    max_offset, max_rotation : float
        Pointing jitter of every frame (frame 0 too): offsets uniform in +-``max_offset``
        px along each axis (``CRPIX`` = image centre + offset, so the sky moves by + offset
        on the detector), rotation uniform in +-``max_rotation`` degrees.
    sip : bool
        Add a fixed camera distortion (SIP A/B order 3, about 1.5 px at the corners) to
        every frame's WCS.
    n_saturated : int
        Stars (among ``n_stars``) placed in the central half of the frame with a peak 5-50
        times the saturation level: saturated cores with bleed trails.
    variable_fraction : float
        Fraction of the other on-footprint stars that vary: sinusoidal in magnitude,
        period 0.02-0.5 d, semi-amplitude 0.1-0.5 mag (:func:`source_flux`).
    n_transients : int
        New point sources, not on top of stars nor in bright stars' columns, on the frame
        in every frame; Gaussian rise and exponential decay with the peak inside the night.
    cosmic_rate : float
        Cosmic-ray hits per megapixel per frame (Poisson); tracks of 1-6 px of
        500-5000 e- per pixel.
    n_hot_pixels : int, optional
        Hot pixels, fixed for the detector (same place and dark in every frame):
        20-500 e-/s. Default ``max(5, 1e-5 * nx * ny)``.
    bad_frames : mapping of int to str, optional
        ``{frame_index: kind}`` with kind one of ``"cloud"`` (transmission falling linearly
        across the frame from 0.8-0.9 to 0.3-0.45 in a random direction, sky 1.3-2 times
        brighter), ``"shutter"`` (illumination ramp from 0.55-0.65 at one edge to 1 at
        25-35 % of the frame along x or y, on sky and stars), ``"defocus"`` (FWHM x 2.5,
        same profile) or ``"trailing"`` (every star smeared along a 10-20 px line).
    transmission : (float, float)
        Transparency of clear frames, uniform in this range (multiplies every flux).
    flux_range : (float, float), optional
        ADU range of the log-uniform star fluxes, instead of the automatic one.
    max_radius : int
        Cap of the PSF stamp radius, pixels (see :func:`render_sources`).

    Returns
    -------
    SimulatedNight
        ``frames``, ``sources``, ``epochs``, ``frames_table``, ``transients`` and ``write``.

    Raises
    ------
    InputError
        Naming the parameter that is out of range.

    Notes
    -----
    Per frame: positions ``wcs.all_world2pix(ra, dec, 0)`` of the frame's WCS (as parsed
    back from its header), expected electrons = sources (``flux * gain``) + sky (x
    shutter ramp) + hot-pixel dark; then Poisson; cosmic rays added; charge above the full
    well spills along columns (:func:`_bleed`); Gaussian read noise; divided by the gain;
    saturated pixels set to exactly ``saturate`` and everything clipped there. The PSF
    stamp radius is where the profile drops below 0.05 e-, at most ``max_radius``.

    A 4096 x 4096 frame with 20,000 stars takes about 2 s on one CPU core
    (``benchmarks/bench_simulate.py``). Rendering a ``"trailing"`` frame costs about
    ``ceil(length) + 1`` times more, as each star is drawn at that many points (~11 s for
    that frame size).
    """
    p = _validate(dict(locals()))
    ny, nx = p["shape"]
    mjds = p["mjd0"] + np.arange(p["n_frames"]) * (p["cadence"] / 86400.0)
    # a corner moves by the chord 2 r sin(theta / 2) under a rotation theta about the centre
    rot_shift = math.hypot(nx, ny) * math.sin(math.radians(0.5 * p["max_rotation"]))
    sip_shift = 3.0 if p["sip"] else 0.0
    margin = p["max_offset"] + rot_shift + sip_shift + 10.0
    # ---- flux scale: from a 5-sigma detection to ~70 % of saturation at the best seeing
    seeing_mid = 0.5 * sum(p["seeing_fwhm"])
    if p["flux_range"] is None:
        noise_e = math.sqrt(p["gain"] * 0.5 * sum(p["sky"]) + p["rdnoise"] ** 2)
        flux_lo = 5.0 * math.sqrt(math.pi) * seeing_mid * noise_e / p["gain"]
        fwhm_min = p["seeing_fwhm"][0] * (1.0 - p["psf_variation"])
        headroom = max(p["saturate"] - p["sky"][1], 0.1 * p["saturate"])
        flux_hi = 0.7 * headroom / _peak_fraction(fwhm_min, p["psf"], p["moffat_beta"])
        flux_lo = min(flux_lo, 0.1 * flux_hi)
    else:
        flux_lo, flux_hi = p["flux_range"]
    stars = _draw_sources(p, margin, flux_lo, flux_hi)
    edge = margin + 3.0 * p["seeing_fwhm"][1] * (1.0 + p["psf_variation"])
    tr = _draw_transients(p, stars, edge, min(10.0 * flux_lo, 0.3 * flux_hi), 0.3 * flux_hi, mjds)
    # ---- sky positions through the nominal TAN projection (uniform in the tangent plane)
    nominal, _ = _make_wcs(p["shape"], p["center"], p["pixel_scale"], (0.0, 0.0), 0.0, None)
    n_st, n_tr = stars["x"].size, tr["x"].size
    ra, dec = nominal.wcs_pix2world(
        np.concatenate([stars["x"], tr["x"]]), np.concatenate([stars["y"], tr["y"]]), 0
    )
    sources = _sources_table(p, ra, dec, stars, tr)
    night_state = {
        "psf_poly": _unit_poly(_stream(p["seed"], 0, 2)),
        "sip": _camera_sip(p["shape"]) if p["sip"] else None,
    }
    rng_hot = _stream(p["seed"], 0, 1)
    night_state["hot_index"] = np.sort(
        rng_hot.choice(nx * ny, size=p["n_hot_pixels"], replace=False)
    ).astype(np.int64)
    night_state["hot_dark"] = _log_uniform(rng_hot, 20.0, 500.0, p["n_hot_pixels"]) * p["exptime"]
    frames, rows, epoch_parts = [], [], []
    for k, mjd in enumerate(mjds):
        frame, row, ep = _render_frame(p, k, float(mjd), sources, (ra, dec), night_state)
        frames.append(frame)
        rows.append(row)
        epoch_parts.append(ep)
    epochs = _epochs_table(p, epoch_parts)
    saturated = np.zeros(n_st + n_tr, dtype=bool)
    saturated[:n_st] |= stars["bright"]
    saturated[np.asarray(epochs["source_id"])[np.asarray(epochs["saturated"])]] = True
    sources["saturated"] = saturated
    frames_table = _frames_table(p, rows)
    for table in (sources, epochs, frames_table):
        _natural_strings(table)
    return SimulatedNight(
        frames=frames, sources=sources, epochs=epochs, frames_table=frames_table, params=p
    )


def _natural_strings(table):
    """Give string columns the width of their longest value (min 1), as ECSV reads them."""
    for name in table.colnames:
        if table[name].dtype.kind == "U":
            unit = table[name].unit
            table[name] = np.array([str(v) for v in table[name]], dtype=str).reshape(-1)
            table[name].unit = unit
    return table


def _table_meta(p: dict) -> dict:
    from dagpre._version import __version__

    return {"generator": "dagpre.simulate.night", "seed": p["seed"], "dagpre": __version__}


def _sources_table(p, ra, dec, stars, tr):
    from astropy.table import Table

    n_st, n_tr = stars["x"].size, tr["x"].size
    nan_tr = np.full(n_tr, np.nan)
    nan_st = np.full(n_st, np.nan)
    kind = [*stars["kind"].tolist(), *(["transient"] * n_tr)]
    table = Table(meta=_table_meta(p))
    table["id"] = np.arange(n_st + n_tr, dtype=np.int64)
    table["ra"] = np.asarray(ra, dtype=np.float64)
    table["dec"] = np.asarray(dec, dtype=np.float64)
    table["flux"] = np.concatenate([stars["flux"], tr["flux"]])
    table["kind"] = np.array(kind, dtype=str) if kind else np.zeros(0, dtype="<U4")
    table["period"] = np.concatenate([stars["period"], nan_tr])
    table["amplitude"] = np.concatenate([stars["amplitude"], nan_tr])
    table["phase"] = np.concatenate([stars["phase"], nan_tr])
    table["t_peak"] = np.concatenate([nan_st, tr["t_peak"]])
    table["rise"] = np.concatenate([nan_st, tr["rise"]])
    table["decay"] = np.concatenate([nan_st, tr["decay"]])
    table["saturated"] = np.zeros(n_st + n_tr, dtype=bool)
    units = {
        "ra": "deg",
        "dec": "deg",
        "flux": "adu",
        "period": "d",
        "amplitude": "mag",
        "phase": "cycle",
        "t_peak": "d",
        "rise": "d",
        "decay": "d",
    }
    for name, unit in units.items():
        table[name].unit = unit
    return table


def _epochs_table(p, parts):
    from astropy.table import Table

    names = ("frame", "source_id", "x", "y", "flux", "fwhm", "peak", "saturated")
    table = Table(meta=_table_meta(p))
    for name in names:
        table[name] = np.concatenate([part[name] for part in parts])
    for name, unit in {"x": "pix", "y": "pix", "flux": "adu", "fwhm": "pix", "peak": "adu"}.items():
        table[name].unit = unit
    return table


def _frames_table(p, rows):
    from astropy.table import Table

    table = Table(rows=rows, meta=_table_meta(p))
    for name in ("frame", "n_cosmic"):
        table[name] = table[name].astype(np.int64)
    units = {
        "mjd": "d",
        "exptime": "s",
        "seeing_fwhm": "pix",
        "sky": "adu",
        "sky_grad_x": "adu / pix",
        "sky_grad_y": "adu / pix",
        "trans_grad_x": "1 / pix",
        "trans_grad_y": "1 / pix",
        "offset_x": "pix",
        "offset_y": "pix",
        "rotation_deg": "deg",
        "trail_length": "pix",
        "trail_angle_deg": "deg",
        "gain": "electron / adu",
        "rdnoise": "electron",
        "saturate": "adu",
    }
    for name, unit in units.items():
        table[name].unit = unit
    return table
