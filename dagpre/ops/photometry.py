"""Aperture, elliptical, Kron (AUTO) and isophotal photometry, Kron and flux radii, windowed
positions: SExtractor / SEP semantics, every source at once, on NumPy or CuPy.

Each function is held to SEP (``sep.sum_circle``, ``sum_ellipse``, ``kron_radius``,
``flux_radius``, ``winpos``), whose C code is SExtractor's, in ``tests/test_photometry.py``;
the sums, flags, mask corrections and error terms below are SEP's, line for line.

Conventions
-----------
* Arrays are indexed ``[y, x]`` (row, column). Positions are ``(x, y)`` pixel order with
  0-based pixel centres (the centre of the first pixel is ``(0.0, 0.0)``), not NumPy
  ``(row, col)`` axis order. Pixel ``(ix, iy)`` covers ``[ix - 0.5, ix + 0.5] x
  [iy - 0.5, iy + 0.5]``. SExtractor and FITS count from 1: subtract 1 from their positions.
* Fluxes are in the image's units (ADU) summed over pixels; radii and areas are in pixels
  and pixels**2; angles in radians, counter-clockwise from the +x axis to the major axis.
* ``err`` is the 1-sigma noise of one pixel (a scalar or a map); ``gain`` is in e-/ADU and
  adds the Poisson term ``flux / gain`` where the flux is positive (SExtractor's
  ``FLUXERR = sqrt(sum sigma_i**2 + flux / gain)``); ``None`` or 0 leaves it out.
* ``mask``: any non-zero value marks a pixel as masked (so a :class:`~dagpre.types.MaskBit`
  mask can be passed as is). NaN and infinite pixels count as masked too (SEP would carry
  them into the sums). As in SEP, the sum over the unmasked part of an aperture is scaled
  by ``area / unmasked area`` (each masked pixel is replaced by the aperture's mean), and the
  variance with it.
* Flags are SEP's bit values: :data:`APER_TRUNC` (the aperture's box runs off the image),
  :data:`APER_HASMASKED`, :data:`APER_ALLMASKED` (SEP returns NaN without a flag; here the
  flux is NaN and the flag says why), :data:`APER_NONPOSITIVE` (Kron radius undefined).

How it runs without a loop over sources
---------------------------------------
Every source gets a stamp: the pixels of SEP's box around it (``boxextent``, clipped to
the image). Sources with boxes of the same shape, taken in position order, are stacked
into ``(rows, cols, n)`` arrays of a few hundred to a few thousand sources (source axis
last, so NumPy's inner loops run along it), and the work is array operations over sources
and pixels; the chunks bound memory, and ``threads=N`` runs the CPU chunks on N threads.

The exact overlap of a pixel with a circle (``subpix=0``) is taken from the *corners*:
with ``H(X, Y)`` the area of the disc with ``x < X, y < Y`` (closed form, odd in each
coordinate), a pixel's overlap is ``H(x1, y1) - H(x0, y1) - H(x1, y0) + H(x0, y0)``, and
``H`` needs its arcsines only along the stamp's rows and columns, so the per-pixel work is
a few multiplications. Ellipses use an exact polygon-disc intersection (the pixel mapped to
the ellipse's unit-circle frame) on the partial pixels only. ``subpix=N`` reproduces SEP's
``N x N`` sub-pixel grid, same sample positions, on the partial pixels only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.ops._checks import check_image, check_threads
from dagpre.types import Catalog, InputError

__all__ = [
    "APER_ALLMASKED",
    "APER_HASMASKED",
    "APER_NONPOSITIVE",
    "APER_TRUNC",
    "FluxRadius",
    "IsophotalPhotometry",
    "KronPhotometry",
    "KronRadius",
    "Photometry",
    "WindowedPosition",
    "aperture_photometry",
    "ellipse_photometry",
    "flux_radius",
    "isophotal_photometry",
    "kron_photometry",
    "kron_radius",
    "winpos",
]

#: The aperture's box runs off the image edge (SEP ``APER_TRUNC``).
APER_TRUNC = 16
#: Some pixels in the aperture are masked or non-finite (SEP ``APER_HASMASKED``).
APER_HASMASKED = 32
#: Every pixel in the aperture is masked: the flux is NaN (SEP ``APER_ALLMASKED``).
APER_ALLMASKED = 64
#: Kron radius undefined: the first moment or the flux is not positive (SEP
#: ``APER_NONPOSITIVE``).
APER_NONPOSITIVE = 128

# SEP constants (src/aperture.c), named here, never settings.
_HALF_DIAGONAL = 0.7072  # margin (px) inside which a pixel may be partly in an aperture
_BOX_HI = 1.4999999  # boxextent(): xmax = (int)(x + r + 1.4999999)
_WINPOS_NSIG = 4.0  # windowed positions integrate out to 4 sigma
_WINPOS_FAC = 2.0  # centroid offset factor (2 for a Gaussian)
_WINPOS_STEPMIN = 1e-4  # px: iteration stops when the shift is smaller
_WINPOS_NITERMAX = 16
_FLUX_RADIUS_BINS = 64  # annuli out to rmax in sep_flux_radius
# Stamp pixels per chunk (sources x pixels); a CPU chunk's temporaries stay in cache.
_CHUNK_CPU = 1 << 16
_CHUNK_GPU = 1 << 24


# =========================================================================== results


@dataclass(frozen=True, eq=False)
class Photometry:
    """Fluxes from :func:`aperture_photometry`, :func:`ellipse_photometry`.

    Unpacks like SEP's ``sum_circle``: ``flux, fluxerr, flag = aperture_photometry(...)``.
    Arrays have the broadcast shape of the position and aperture arguments and live on the
    image's device.

    Attributes
    ----------
    flux : ndarray float64
        Sum over the aperture in image units (ADU), masked pixels corrected for, minus
        ``bkg * area`` when a background annulus was given. NaN where every pixel is masked.
    fluxerr : ndarray float64
        1-sigma error of ``flux``: ``sqrt(sum err_i**2 + flux / gain)`` (plus the annulus
        term), 0 when neither ``err`` nor ``gain`` was given.
    flag : ndarray int16
        :data:`APER_TRUNC`, :data:`APER_HASMASKED`, :data:`APER_ALLMASKED` bits.
    area : ndarray float64
        Aperture area on the image in pixels**2 (masked pixels included, off-image parts
        not): SEP's ``area``.
    bkg : ndarray float64 or None
        Local background per pixel (ADU) from the annulus, ``None`` without ``bkgann``.
    bkg_area : ndarray float64 or None
        Number (or summed overlap) of annulus pixels behind ``bkg``.
    """

    flux: Any
    fluxerr: Any
    flag: Any
    area: Any
    bkg: Any = None
    bkg_area: Any = None

    def __iter__(self):
        return iter((self.flux, self.fluxerr, self.flag))

    def to_catalog(self, prefix: str = "") -> Catalog:
        """The non-``None`` fields as a :class:`~dagpre.types.Catalog` (1-D results only).

        Column names are the field names with ``prefix`` in front (``"aper_"`` gives
        ``aper_flux``, ...).
        """
        columns = {
            prefix + f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return Catalog(columns)


@dataclass(frozen=True, eq=False)
class KronPhotometry(Photometry):
    """AUTO fluxes from :func:`kron_photometry` (unpacks as ``flux, fluxerr, flag``).

    Attributes
    ----------
    kron_radius : ndarray float64
        SEP's Kron radius (first moment ``sum r_i I_i / sum I_i`` inside ``kron_nsig``
        ellipses, in units of ``a`` and ``b``); 0 where undefined (see ``flag``).
    kron_factor : ndarray float64
        The ellipse scale actually used, ``max(k * kron_radius, min_kron)``: SExtractor's
        ``KRON_RADIUS`` column. 0 where the circular fallback was used or the flux is not
        positive, as in SExtractor.
    circular : ndarray bool
        Where the circle of radius ``r_min`` replaced the ellipse.
    """

    kron_radius: Any = None
    kron_factor: Any = None
    circular: Any = None


@dataclass(frozen=True, eq=False)
class IsophotalPhotometry(Photometry):
    """Isophotal fluxes from :func:`isophotal_photometry` (unpacks as ``flux, fluxerr, flag``).

    Attributes
    ----------
    label : ndarray int64
        Segment label of each row.
    area : ndarray float64
        Number of unmasked pixels summed (SExtractor's ``ISOAREA`` when nothing is masked).
    """

    label: Any = None


class KronRadius(NamedTuple):
    """:func:`kron_radius` result: Kron radius in units of ``a`` and ``b``, and SEP flags."""

    radius: Any
    flag: Any


class FluxRadius(NamedTuple):
    """:func:`flux_radius` result: radii in pixels (``x.shape + frac.shape``), SEP flags."""

    radius: Any
    flag: Any


class WindowedPosition(NamedTuple):
    """:func:`winpos` result: ``(x, y)`` pixel order, 0-based pixel centres; SEP flags."""

    x: Any
    y: Any
    flag: Any


# =========================================================================== validation


def _on(xp, value: Any):
    """``value`` as an array on ``xp``'s device (host arrays go up, device arrays come down)."""
    if xp is np:
        return np.asarray(to_host(value))
    return xp.asarray(value)


def _float_array(xp, value: Any, name: str):
    try:
        arr = _on(xp, value)
        if np.dtype(arr.dtype).kind not in "biuf":
            raise TypeError
        return arr.astype(xp.float64)
    except (TypeError, ValueError):
        raise InputError(name, f"expected real numbers, got {value!r}") from None


def _broadcast(xp, named: dict[str, Any]) -> tuple[tuple[int, ...], list]:
    """Broadcast the named arrays together; return the shape and flat float64 copies."""
    arrays = [_float_array(xp, v, k) for k, v in named.items()]
    try:
        out = xp.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(named, arrays, strict=True))
        raise InputError(", ".join(named), f"shapes do not broadcast: {shapes}") from None
    shape = tuple(out[0].shape)
    return shape, [xp.ascontiguousarray(a).reshape(-1) for a in out]


def _check_finite(xp, arr, name: str) -> None:
    if arr.size and not bool(xp.isfinite(arr).all()):
        raise InputError(name, "holds NaN or infinite values")


def _check_min(xp, arr, name: str, minimum: float = 0.0, strict: bool = False) -> None:
    if not arr.size:
        return
    low = float(arr.min())
    if low < minimum or (strict and low == minimum):
        word = ">" if strict else ">="
        raise InputError(name, f"expected values {word} {minimum:g}, got {low:g}")


def _check_subpix(subpix: Any, name: str = "subpix", minimum: int = 0) -> int:
    if isinstance(subpix, bool) or not isinstance(subpix, numbers.Integral) or subpix < minimum:
        raise InputError(name, f"expected an integer >= {minimum}, got {subpix!r}")
    return int(subpix)


def _check_gain(gain: Any) -> float:
    if gain is None:
        return 0.0
    try:
        value = float(gain)
    except (TypeError, ValueError):
        raise InputError("gain", f"expected a number (e-/ADU) or None, got {gain!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError("gain", f"expected a finite number >= 0 (e-/ADU), got {gain!r}")
    return value


@dataclass(frozen=True)
class _Pixels:
    """The image (and its noise and mask) flattened for gathering stamps."""

    xp: Any
    shape: tuple[int, int]
    data: Any
    err: Any  # flat per-pixel sigma, or None
    var: float  # scalar variance when err is a scalar (0 without err)
    mask: Any  # flat mask (non-zero = masked), or None
    threads: int


def _pixels(image, err=None, mask=None, threads=None) -> _Pixels:
    """Validate ``image``, ``err`` and ``mask`` and flatten them for stamp gathering."""
    check_image(image)
    xp = xp_of(image)
    shape = tuple(int(n) for n in image.shape)
    data = xp.ascontiguousarray(image).reshape(-1)
    err_flat, var = None, 0.0
    if err is not None:
        if getattr(err, "ndim", 0) == 0:
            try:
                sigma = float(err)
            except (TypeError, ValueError):
                raise InputError("err", f"expected a number or an array, got {err!r}") from None
            if not math.isfinite(sigma) or sigma < 0:
                raise InputError("err", f"expected a finite sigma >= 0, got {err!r}")
            var = sigma * sigma
        else:
            if tuple(err.shape) != shape:
                raise InputError("err", f"shape {tuple(err.shape)} differs from image {shape}")
            err_flat = xp.ascontiguousarray(_on(xp, err)).reshape(-1)
    mask_flat = None
    if mask is not None:
        if tuple(getattr(mask, "shape", ())) != shape:
            raise InputError(
                "mask", f"shape {tuple(getattr(mask, 'shape', ()))} differs from image {shape}"
            )
        mask_flat = xp.ascontiguousarray(_on(xp, mask)).reshape(-1)
    threads = check_threads(threads)
    n_threads = 1 if xp is not np else threads or 1
    return _Pixels(xp, shape, data, err_flat, var, mask_flat, n_threads)


# =========================================================================== stamps
#
# A chunk of stamps is laid out source-last: ``(rows, cols, n)`` pixels, ``(cols, n)`` and
# ``(rows, n)`` axes. NumPy's inner loops then run along the sources (long, contiguous)
# rather than along a stamp row of a dozen pixels, which is several times faster; and a
# chunk's temporaries of ~1e5 elements stay in cache.


def _c_int(xp, v):
    """C's ``(int)`` cast: truncation toward zero (SEP's boxes depend on it at the edges)."""
    return xp.trunc(v).astype(xp.int64)


@dataclass(frozen=True)
class _Boxes:
    """SEP's ``boxextent`` for every source, clipped to the image, and its TRUNC flag."""

    xlo: Any
    ylo: Any
    trunc: Any
    wx: np.ndarray  # host: box width and height after clipping (0 when off the image)
    wy: np.ndarray
    order: np.ndarray  # host: sources sorted by position, for cache locality
    room_x: np.ndarray  # host: columns and rows from the box's start to the image edge
    room_y: np.ndarray


def _boxes(px: _Pixels, x, y, hx, hy) -> _Boxes:
    xp = px.xp
    ny, nx = px.shape
    xlo = _c_int(xp, x - hx + 0.5)
    xhi = _c_int(xp, x + hx + _BOX_HI)
    ylo = _c_int(xp, y - hy + 0.5)
    yhi = _c_int(xp, y + hy + _BOX_HI)
    trunc = (xlo < 0) | (xhi > nx) | (ylo < 0) | (yhi > ny)
    xlo, xhi = xp.clip(xlo, 0, nx), xp.clip(xhi, 0, nx)
    ylo, yhi = xp.clip(ylo, 0, ny), xp.clip(yhi, 0, ny)
    wx = np.asarray(to_host(xp.maximum(xhi - xlo, 0)))
    wy = np.asarray(to_host(xp.maximum(yhi - ylo, 0)))
    xlo_h, ylo_h = np.asarray(to_host(xlo)), np.asarray(to_host(ylo))
    order = np.argsort(ylo_h * (nx + 1) + xlo_h, kind="stable")
    return _Boxes(xlo, ylo, trunc, wx, wy, order, nx - xlo_h, ny - ylo_h)


@dataclass(frozen=True)
class _Chunk:
    idx: np.ndarray  # host indices of the sources
    wy: int  # stamp shape (every source in a chunk has exactly this box)
    wx: int


#: Stamp sides up to 16 px are exact; larger ones are rounded up to this ladder (~12% steps).
_SIDES = np.unique(
    np.concatenate([np.arange(17), np.ceil(16 * 1.125 ** np.arange(1, 80)).astype(np.int64)])
)


def _padded_sides(w: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Box sides rounded up to :data:`_SIDES` where the image has room, else unchanged."""
    up = _SIDES[np.minimum(np.searchsorted(_SIDES, w), _SIDES.size - 1)]
    return np.where((up >= w) & (up <= room), up, w)


def _plan(boxes: _Boxes, budget: int, cost: int = 1) -> list[_Chunk]:
    """Group sources by stamp shape (in position order) and cut groups to about ``budget``.

    Stamps are SEP's boxes grown to the next side on a ~12% ladder (within the image), so
    sources of similar size share one vectorised chunk instead of one chunk per exact box
    shape. Every step masks its pixels by the aperture's own geometry, so the added pixels
    contribute nothing; the TRUNC flag comes from the unpadded box.
    """
    wy = _padded_sides(boxes.wy, boxes.room_y)[boxes.order]
    wx = _padded_sides(boxes.wx, boxes.room_x)[boxes.order]
    key = wy.astype(np.int64) * (int(wx.max(initial=0)) + 1) + wx
    chunks = []
    for kval in np.unique(key):
        sel = np.flatnonzero(key == kval)
        idx = boxes.order[sel]
        h, w = int(wy[sel[0]]), int(wx[sel[0]])
        step = max(1, budget // max(1, h * w * cost))
        chunks.extend(_Chunk(idx[s : s + step], h, w) for s in range(0, idx.size, step))
    return chunks


def _run(px: _Pixels, fn: Callable, chunks: list[_Chunk]) -> list:
    """``[fn(sel, chunk) for chunk in chunks]`` (empty boxes skipped), threaded on the CPU.

    Returns one entry per chunk: ``fn``'s result, or ``None`` for a chunk of empty boxes
    (sources wholly off the image), whose sums are all zero.
    """
    xp = px.xp

    def one(chunk):
        if chunk.wx == 0 or chunk.wy == 0:
            return None
        return fn(xp.asarray(chunk.idx), chunk)

    if px.threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(min(px.threads, len(chunks))) as pool:
            return list(pool.map(one, chunks))
    return [one(c) for c in chunks]


def _scatter(xp, n: int, chunks: list[_Chunk], parts: list, dtypes: tuple) -> list:
    """Assemble per-chunk result tuples into full per-source arrays (zeros for ``None``)."""
    outs = [xp.zeros(n, dtype=dt) for dt in dtypes]
    for chunk, part in zip(chunks, parts, strict=True):
        if part is None:
            continue
        sel = xp.asarray(chunk.idx)
        for out, values in zip(outs, part, strict=True):
            out[sel] = values
    return outs


@dataclass(frozen=True)
class _Stamp:
    """One chunk of stamps, source-last."""

    cols: Any  # (wx, n) int: pixel columns
    rows: Any  # (wy, n) int: pixel rows
    dx: Any  # (wx, n) float: column centre - x
    dy: Any  # (wy, n) float: row centre - y
    flat: Any  # (wy, wx, n) int: flat image index
    x: Any  # (n,) source positions
    y: Any

    @property
    def X(self):  # column offsets broadcast over a stamp
        return self.dx[None, :, :]

    @property
    def Y(self):  # row offsets broadcast over a stamp
        return self.dy[:, None, :]


def _stamp(px: _Pixels, boxes: _Boxes, sel, chunk: _Chunk, x, y) -> _Stamp:
    xp = px.xp
    nx = px.shape[1]
    cols = boxes.xlo[sel][None, :] + xp.arange(chunk.wx)[:, None]
    rows = boxes.ylo[sel][None, :] + xp.arange(chunk.wy)[:, None]
    flat = (rows * nx)[:, None, :] + cols[None, :, :]
    xs, ys = x[sel], y[sel]
    return _Stamp(cols, rows, cols - xs[None, :], rows - ys[None, :], flat, xs, ys)


def _gather(px: _Pixels, st: _Stamp):
    """Pixel values of a stamp, and which are masked or non-finite.

    Returns ``(pix, bad)``: ``pix`` with bad pixels set to 0, and ``bad`` (bool, stamp
    shape) or ``None`` when the chunk has no bad pixel.
    """
    xp = px.xp
    pix = xp.take(px.data, st.flat)
    bad = None
    if np.dtype(pix.dtype).kind == "f":
        nonfinite = ~xp.isfinite(pix)
        if bool(nonfinite.any()):
            bad = nonfinite
    if px.mask is not None:
        masked = xp.take(px.mask, st.flat) != 0
        if bool(masked.any()):
            bad = masked if bad is None else bad | masked
    if bad is not None:
        pix = xp.where(bad, 0.0, pix)
    return pix, bad


def _variance(px: _Pixels, st: _Stamp, bad):
    """Per-pixel variance (0 at bad pixels), or the scalar variance."""
    if px.err is None:
        return px.var
    xp = px.xp
    e = xp.take(px.err, st.flat).astype(xp.float64)
    var = e * e
    return var if bad is None else xp.where(bad, 0.0, var)


def _sum(a):
    """Sum over a stamp's pixels: ``(wy, wx, n) -> (n,)``."""
    return a.sum(axis=(0, 1))


# =========================================================================== geometry


@dataclass(frozen=True)
class _Geometry:
    """Per-source aperture shape: a circle of radius ``r`` or SEP's scaled ellipse.

    ``rpix2`` is SEP's squared distance (``dx*dx + dy*dy`` or ``cxx dx^2 + cyy dy^2 +
    cxy dx dy``, in units of the scale ``r``); a pixel whose centre has ``rpix2 < r_out2``
    may overlap the aperture, one with ``rpix2 <= r_in2`` lies wholly inside.
    """

    kind: str  # "circle" or "ellipse"
    r: Any  # radius (circle) or scale of a, b (ellipse)
    r2: Any
    r_in2: Any
    r_out2: Any
    hx: Any  # box half-widths
    hy: Any
    cxx: Any = None
    cyy: Any = None
    cxy: Any = None
    a: Any = None  # a * r, b * r: the ellipse's actual semi-axes
    b: Any = None
    theta: Any = None

    def take(self, sel) -> _Geometry:
        values = {
            f.name: (getattr(self, f.name)[sel] if f.name != "kind" else self.kind)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return _Geometry(**values)

    def rpix2(self, st: _Stamp):
        X, Y = st.X, st.Y
        if self.kind == "circle":
            return X * X + Y * Y
        return self.cxx * X * X + self.cyy * Y * Y + self.cxy * X * Y


def _circle(xp, r) -> _Geometry:
    r_in = r - _HALF_DIAGONAL
    r_out = r + _HALF_DIAGONAL
    return _Geometry("circle", r, r * r, xp.where(r_in > 0, r_in * r_in, 0.0), r_out * r_out, r, r)


def _ellipse_coeffs(xp, a, b, theta):
    """SEP's ``sep_ellipse_coeffs``: ``cxx x^2 + cyy y^2 + cxy x y = 1`` for (a, b, theta)."""
    c, s = xp.cos(theta), xp.sin(theta)
    cxx = c * c / (a * a) + s * s / (b * b)
    cyy = s * s / (a * a) + c * c / (b * b)
    cxy = 2.0 * c * s * (1.0 / (a * a) - 1.0 / (b * b))
    return cxx, cyy, cxy


def _ellipse(xp, a, b, theta, r) -> _Geometry:
    cxx, cyy, cxy = _ellipse_coeffs(xp, a, b, theta)
    margin = _HALF_DIAGONAL / xp.minimum(a, b)  # SEP: 0.7072 / b, with a >= b required
    r_in = r - margin
    r_out = r + margin
    # boxextent_ellipse(): half-widths of the ellipse's bounding box
    dx = cxx - cxy * cxy / (4.0 * cyy)
    dy = cyy - cxy * cxy / (4.0 * cxx)
    hx = xp.where(dx > 0, r / xp.sqrt(xp.where(dx > 0, dx, 1.0)), 0.0)
    hy = xp.where(dy > 0, r / xp.sqrt(xp.where(dy > 0, dy, 1.0)), 0.0)
    return _Geometry(
        "ellipse",
        r,
        r * r,
        xp.where(r_in > 0, r_in * r_in, 0.0),
        r_out * r_out,
        hx,
        hy,
        cxx,
        cyy,
        cxy,
        a * r,
        b * r,
        theta,
    )


# --------------------------------------------------------------------------- overlaps


def _circle_corners(xp, st: _Stamp, r):
    """``H`` at every pixel corner of a stamp, ``(wy + 1, wx + 1, n)``, for the exact overlap.

    ``H(X, Y) = sx sy r^2 h(|X|/r, |Y|/r)`` is the signed area of the disc between the
    axes and the corner ``(X, Y)`` (relative to the centre); for ``0 <= u, v <= 1``
    (clamped) ``h = u v`` when ``(u, v)`` lies inside the unit disc, else
    ``v c + F(u) - F(c)`` with ``c = sqrt(1 - v^2)`` and ``F(t) = (t sqrt(1 - t^2) +
    asin t) / 2``. A pixel's overlap is the double difference of ``H`` over its corners;
    everything transcendental depends on one coordinate only.
    """
    pos = r > 0
    rs = xp.where(pos, r, 1.0)
    r2 = xp.where(pos, r * r, 0.0)
    cu = (st.cols[:1] + (xp.arange(st.cols.shape[0] + 1)[:, None] - 0.5)) - st.x
    cv = (st.rows[:1] + (xp.arange(st.rows.shape[0] + 1)[:, None] - 0.5)) - st.y
    u = xp.clip(cu / rs, -1.0, 1.0)
    v = xp.clip(cv / rs, -1.0, 1.0)
    au, av = xp.abs(u), xp.abs(v)
    c = xp.sqrt(1.0 - av * av)  # where the disc's edge crosses height |v|
    q = xp.sign(u) * (0.5 * r2) * (au * xp.sqrt(1.0 - au * au) + xp.arcsin(au))
    p = xp.sign(v) * r2 * (av * c - 0.5 * (c * av + xp.arcsin(c)))
    inside = au[None, :, :] < c[:, None, :]
    uv = (u * rs * pos)[None, :, :] * (v * rs)[:, None, :]
    alt = xp.sign(u)[None, :, :] * p[:, None, :] + xp.sign(v)[:, None, :] * q[None, :, :]
    return xp.where(inside, uv, alt)


def _ddiff(h):
    """Pixel values from corner values: ``h[1:, 1:] - h[1:, :-1] - h[:-1, 1:] + h[:-1, :-1]``."""
    return h[1:, 1:] - h[1:, :-1] - h[:-1, 1:] + h[:-1, :-1]


def _disc_triangle(xp, ax, ay, a2, ex, ey, e2):
    """Signed area of the triangle (origin, A, A + E) intersected with the unit disc.

    ``a2 = |A|^2``, ``e2 = |E|^2 > 0``. The edge is clipped to the disc (``t1 <= t2`` in
    ``[0, 1]``): the part inside adds a triangle, the parts outside add circular sectors.
    """
    proj = ax * ex + ay * ey
    disc = proj * proj - e2 * (a2 - 1.0)
    hit = disc > 0
    root = xp.sqrt(xp.where(hit, disc, 0.0))
    t1 = xp.where(hit, xp.clip((-proj - root) / e2, 0.0, 1.0), 0.0)
    t2 = xp.where(hit, xp.clip((-proj + root) / e2, 0.0, 1.0), 0.0)
    p1x, p1y = ax + t1 * ex, ay + t1 * ey
    p2x, p2y = ax + t2 * ex, ay + t2 * ey
    bx, by = ax + ex, ay + ey
    # the sectors A->p1 and p2->B: one angle, the argument of (conj(A) p1)(conj(p2) B); A,
    # p1, p2, B lie in order on a line, so the two angles share a sign and sum below pi
    d1, c1 = ax * p1x + ay * p1y, ax * p1y - ay * p1x
    d2, c2 = p2x * bx + p2y * by, p2x * by - p2y * bx
    sectors = xp.arctan2(d1 * c2 + c1 * d2, d1 * d2 - c1 * c2)
    return 0.5 * (sectors + (p1x * p2y - p1y * p2x))


def _ellipse_exact(xp, dx, dy, a, b, cos_t, sin_t):
    """Exact overlap of pixels (centre offsets ``dx, dy``) with ellipses (a, b, theta).

    The pixel is mapped into the frame where the ellipse is the unit disc (a
    parallelogram there); the area is the sum over its four edges of the signed areas of
    (origin, edge) triangles intersected with the disc, times ``a b``.
    """
    ok = (a > 0) & (b > 0)
    as_, bs = xp.where(ok, a, 1.0), xp.where(ok, b, 1.0)
    ca, sa, cb, sb = cos_t / as_, sin_t / as_, cos_t / bs, sin_t / bs
    # a step of +1 in x moves (ca, -sb) in the disc frame, +1 in y moves (sa, cb)
    u = dx * ca + dy * sa - 0.5 * (ca + sa)  # the corner (dx - 0.5, dy - 0.5)
    v = dy * cb - dx * sb - 0.5 * (cb - sb)
    ex2, ey2 = ca * ca + sb * sb, sa * sa + cb * cb
    area = 0.0
    for ex, ey, e2 in ((ca, -sb, ex2), (sa, cb, ey2), (-ca, sb, ex2), (-sa, -cb, ey2)):
        area = area + _disc_triangle(xp, u, v, u * u + v * v, ex, ey, e2)
        u, v = u + ex, v + ey
    return xp.where(ok, area * as_ * bs, 0.0)


def _subpix_offsets(xp, d, subpix: int, axis: int):
    """SEP's sub-pixel sample offsets (accumulated as SEP does), stacked along ``axis``."""
    scale = 1.0 / subpix
    shape = list(d.shape)
    shape.insert(axis, subpix)
    out = xp.empty(shape)
    index = [slice(None)] * len(shape)
    v = d + 0.5 * (scale - 1.0)
    for k in range(subpix):
        index[axis] = k
        out[tuple(index)] = v
        v = v + scale
    return out


def _subpix_overlap(xp, g: _Geometry, src, dx, dy, subpix: int):
    """SEP's ``subpix x subpix`` sampled overlap of pixels (centre offsets dx, dy)."""
    sx = _subpix_offsets(xp, dx, subpix, 0)[None, :, :]  # (1, s, m)
    sy = _subpix_offsets(xp, dy, subpix, 0)[:, None, :]  # (s, 1, m)
    if g.kind == "circle":
        q = sx * sx + sy * sy
    else:
        q = g.cxx[src] * sx * sx + g.cyy[src] * (sy * sy) + g.cxy[src] * sx * sy
    scale = 1.0 / subpix
    return _sum(q < g.r2[src]) * (scale * scale)


def _partial_overlap(xp, g: _Geometry, st: _Stamp, rpix2, subpix: int):
    """Overlap SEP's way for ellipses and sub-pixel sampling: 1 inside, 0 outside, the
    partial pixels (``r_in2 < rpix2 < r_out2``) computed one by one."""
    near = rpix2 < g.r_out2
    full = near & (rpix2 <= g.r_in2)
    ov = full.astype(xp.float64)
    iy, ix, src = xp.nonzero(near & ~full)
    if src.size:
        dxb, dyb = st.dx[ix, src], st.dy[iy, src]
        if subpix == 0:
            c, s = xp.cos(g.theta), xp.sin(g.theta)
            part = _ellipse_exact(xp, dxb, dyb, g.a[src], g.b[src], c[src], s[src])
        else:
            part = _subpix_overlap(xp, g, src, dxb, dyb, subpix)
        ov[iy, ix, src] = part
    return ov


def _overlap(xp, g: _Geometry, st: _Stamp, subpix: int):
    """``(ov, area, rpix2)``: per-pixel overlap, its sum, and SEP's ``rpix2`` (or None)."""
    if g.kind == "circle" and subpix == 0:
        h = _circle_corners(xp, st, g.r)
        return _ddiff(h), h[-1, -1] - h[-1, 0] - h[0, -1] + h[0, 0], None
    rpix2 = g.rpix2(st)
    ov = _partial_overlap(xp, g, st, rpix2, subpix)
    return ov, _sum(ov), rpix2


# =========================================================================== aperture sums


def _aperture_sums(px: _Pixels, x, y, g: _Geometry, subpix: int):
    """SEP's aperture body (aperbody.c.inc) for every source.

    Returns per-source ``tv`` (sum over unmasked pixels), ``sigtv`` (their variance sum),
    ``area`` (total overlap), ``maskarea`` (overlap of masked pixels) and flags.
    """
    xp = px.xp
    n = x.shape[0]
    boxes = _boxes(px, x, y, g.hx, g.hy)
    # partial pixels cost subpix**2 samples, or ~200 operations for an exact ellipse: keep
    # those chunks small enough that their temporaries stay in cache
    cost = 1 + subpix * subpix // 16 if subpix else (4 if g.kind == "ellipse" else 1)
    chunks = _plan(boxes, _CHUNK_CPU if xp is np else _CHUNK_GPU, cost=cost)

    def work(sel, chunk):
        st = _stamp(px, boxes, sel, chunk, x, y)
        gs = g.take(sel)
        ov, area, rpix2 = _overlap(xp, gs, st, subpix)
        pix, bad = _gather(px, st)
        tv = _sum(ov * pix)
        var = _variance(px, st, bad)
        if bad is None:
            sigtv = _sum(ov * var) if px.err is not None else area * var
            return tv, sigtv, area, xp.zeros_like(area), xp.zeros(area.shape, dtype=bool)
        ovm = xp.where(bad, ov, 0.0)
        maskarea = _sum(ovm)
        sigtv = _sum(ov * var) if px.err is not None else (area - maskarea) * var
        if rpix2 is None:
            rpix2 = gs.rpix2(st)
        hasmasked = (bad & (rpix2 < gs.r_out2)).any(axis=(0, 1))
        return tv, sigtv, area, maskarea, hasmasked

    parts = _run(px, work, chunks)
    f8 = xp.float64
    tv, sigtv, area, maskarea, hasmasked = _scatter(xp, n, chunks, parts, (f8, f8, f8, f8, bool))
    flag = xp.where(boxes.trunc, APER_TRUNC, 0) | xp.where(hasmasked, APER_HASMASKED, 0)
    return tv, sigtv, area, maskarea, flag.astype(xp.int16)


def _finish(xp, tv, sigtv, area, maskarea, flag, gain: float):
    """SEP's mask correction and Poisson term; NaN and APER_ALLMASKED where all is masked."""
    unmasked = area - maskarea
    allmasked = (maskarea > 0) & (unmasked <= 1e-9 * area)
    fix = (maskarea > 0) & ~allmasked
    corr = xp.where(fix, area / xp.where(fix, unmasked, 1.0), 1.0)
    tv = tv * corr
    sigtv = sigtv * corr
    if gain > 0:
        sigtv = sigtv + xp.where(tv > 0, tv / gain, 0.0)
    tv = xp.where(allmasked, xp.nan, tv)
    # overlaps carry rounding of ~1e-16 px^2, which can leave an empty sum just below 0
    sigtv = xp.where(allmasked, xp.nan, xp.maximum(sigtv, 0.0))
    flag = flag | xp.where(allmasked, APER_ALLMASKED, 0).astype(xp.int16)
    return tv, sigtv, flag


# --------------------------------------------------------------------------- local background


def _annulus_values(px: _Pixels, x, y, g: _Geometry, rin2, gain, sigma, maxiters):
    """Background per pixel from the annulus pixels (centres in ``rin2 < rpix2 < r2``).

    Returns ``bkg`` (per-pixel background), ``bvar`` (variance sum of the pixels used plus
    their Poisson term) and ``npix`` (pixels used). ``sigma=None``: the plain mean of the
    unmasked pixels (SEP's circular ``bkgann``); else their sigma-clipped median.
    """
    xp = px.xp
    n = x.shape[0]
    boxes = _boxes(px, x, y, g.hx, g.hy)
    chunks = _plan(boxes, _CHUNK_CPU if xp is np else _CHUNK_GPU, cost=4)

    def work(sel, chunk):
        st = _stamp(px, boxes, sel, chunk, x, y)
        gs = g.take(sel)
        rpix2 = gs.rpix2(st)
        pix, bad = _gather(px, st)
        good = (rpix2 > rin2[sel]) & (rpix2 < gs.r2)
        if bad is not None:
            good = good & ~bad
        var = _variance(px, st, bad)
        m = st.x.shape[0]
        pix = pix.astype(xp.float64).reshape(-1, m).T
        good = good.reshape(-1, m).T
        var = var.reshape(-1, m).T if px.err is not None else None
        if sigma is None:
            nn = good.sum(axis=1).astype(xp.float64)
            total = xp.where(good, pix, 0.0).sum(axis=1)
            vsum = xp.where(good, var, 0.0).sum(axis=1) if var is not None else nn * px.var
            bkg = total / xp.where(nn > 0, nn, xp.nan)
        else:
            bkg, nn, total, vsum = _clipped_median(xp, pix, good, var, px.var, sigma, maxiters)
        if gain > 0:
            vsum = vsum + xp.where(total > 0, total / gain, 0.0)
        return bkg, vsum, nn

    parts = _run(px, work, chunks)
    f8 = xp.float64
    bkg, vsum, nn = _scatter(xp, n, chunks, parts, (f8, f8, f8))
    return xp.where(nn > 0, bkg, xp.nan), vsum, nn


def _clipped_median(xp, values, good, var, var_scalar, sigma, maxiters):
    """Per-row sigma-clipped median (astropy ``sigma_clip`` semantics, ``std`` ddof=0).

    Rows are sorted once; clipping only trims the ends of the sorted valid values, so each
    iteration is a pair of counts and prefix-sum differences.
    """
    m, p = values.shape
    v = xp.where(good, values, xp.inf)
    order = xp.argsort(v, axis=1)
    v = xp.take_along_axis(v, order, axis=1)
    lo = xp.zeros(m, dtype=xp.int64)
    hi = good.sum(axis=1).astype(xp.int64)
    rows = xp.arange(m)

    def median(lo, hi):
        cnt = hi - lo
        i1 = xp.clip(lo + (cnt - 1) // 2, 0, p - 1)
        i2 = xp.clip(lo + cnt // 2, 0, p - 1)
        return xp.where(cnt > 0, 0.5 * (v[rows, i1] + v[rows, i2]), 0.0)

    ref = median(lo, hi)
    dv = v - ref[:, None]  # invalid entries stay +inf
    d = xp.where(xp.isfinite(dv), dv, 0.0)
    zero = xp.zeros((m, 1))
    c1 = xp.concatenate([zero, xp.cumsum(d, axis=1)], axis=1)
    c2 = xp.concatenate([zero, xp.cumsum(d * d, axis=1)], axis=1)
    for _ in range(maxiters):
        cnt = xp.maximum(hi - lo, 1).astype(xp.float64)
        mean = (c1[rows, hi] - c1[rows, lo]) / cnt
        std = xp.sqrt(xp.maximum((c2[rows, hi] - c2[rows, lo]) / cnt - mean * mean, 0.0))
        med = median(lo, hi) - ref
        new_lo = xp.maximum(lo, (dv < (med - sigma * std)[:, None]).sum(axis=1))
        new_hi = xp.minimum(hi, (dv <= (med + sigma * std)[:, None]).sum(axis=1))
        new_hi = xp.maximum(new_hi, new_lo)
        done = bool(((new_lo == lo) & (new_hi == hi)).all())
        lo, hi = new_lo, new_hi
        if done:
            break
    cnt = hi - lo
    total = c1[rows, hi] - c1[rows, lo] + ref * cnt
    if var is None:
        vsum = cnt * var_scalar
    else:
        vs = xp.take_along_axis(xp.where(good, var, 0.0), order, axis=1)
        cv = xp.concatenate([zero, xp.cumsum(vs, axis=1)], axis=1)
        vsum = cv[rows, hi] - cv[rows, lo]
    return median(lo, hi), cnt.astype(xp.float64), total, vsum


def _check_bkgann(bkgann, bkg_sigma, bkg_maxiters):
    if bkgann is None:
        return None
    try:
        rin, rout = bkgann
    except (TypeError, ValueError):
        raise InputError("bkgann", f"expected a pair (rin, rout), got {bkgann!r}") from None
    if bkg_sigma is not None:
        try:
            ok = math.isfinite(float(bkg_sigma)) and float(bkg_sigma) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError("bkg_sigma", f"expected a positive number or None, got {bkg_sigma!r}")
    _check_subpix(bkg_maxiters, "bkg_maxiters", minimum=1)
    return rin, rout


def _check_annulus(xp, rin, rout) -> None:
    _check_finite(xp, rin, "bkgann")
    _check_finite(xp, rout, "bkgann")
    _check_min(xp, rin, "bkgann")
    if rin.size and bool((rout <= rin).any()):
        raise InputError("bkgann", "expected rout > rin >= 0 for every source")


def _subtract_background(px, x, y, shape_args, area, tv, sigtv, rin, rout, gain, opts):
    """Local background from the annulus, subtracted as SEP does (``flux -= bkg * area``).

    ``shape_args`` is ``None`` for circles, ``(a, b, theta)`` for ellipses; ``opts`` is
    ``(bkg_sigma, bkg_maxiters, subpix)``.
    """
    xp = px.xp
    bkg_sigma, bkg_maxiters, subpix = opts
    if shape_args is not None and bkg_sigma is None:
        # SEP's sum_ellipse: sum_ellipann with the same subpix, masked pixels corrected for.
        a, b, theta = shape_args
        outer = _aperture_sums(px, x, y, _ellipse(xp, a, b, theta, rout), subpix)
        inner = _aperture_sums(px, x, y, _ellipse(xp, a, b, theta, rin), subpix)
        t, s, btot, bmask = (o - i for o, i in zip(outer[:4], inner[:4], strict=True))
        ok = btot > bmask
        corr = xp.where(ok, btot / xp.where(ok, btot - bmask, 1.0), xp.nan)
        bflux = t * corr
        bvar = s * corr
        if gain > 0:
            bvar = bvar + xp.where(bflux > 0, bflux / gain, 0.0)
        bnorm = btot
        bkg = bflux / xp.where(btot > 0, btot, xp.nan)
    else:
        g = _circle(xp, rout) if shape_args is None else _ellipse(xp, *shape_args, rout)
        bkg, bvar, bnorm = _annulus_values(px, x, y, g, rin * rin, gain, bkg_sigma, bkg_maxiters)
    has = area > 0
    flux = xp.where(has, tv - bkg * area, tv)
    berr = xp.sqrt(bvar) / xp.where(bnorm > 0, bnorm, xp.nan) * area
    fluxerr = xp.where(has, xp.sqrt(sigtv + berr * berr), xp.sqrt(sigtv))
    return flux, fluxerr, bkg, bnorm


# =========================================================================== public API


def aperture_photometry(
    image: Any,
    x: Any,
    y: Any,
    r: Any,
    err: Any = None,
    mask: Any = None,
    gain: float | None = None,
    *,
    subpix: int = 0,
    bkgann: tuple[Any, Any] | None = None,
    bkg_sigma: float | None = 3.0,
    bkg_maxiters: int = 5,
    threads: int | None = None,
) -> Photometry:
    """Sum an image in circular apertures (SEP ``sum_circle``, SExtractor ``FLUX_APER``).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values (ADU), NumPy or CuPy.
    x, y : float or array_like
        Aperture centres, (x, y) pixel order, 0-based pixel centres, not NumPy (row, col)
        axis order. ``x``, ``y`` and ``r`` broadcast together (e.g. ``x[:, None]`` with
        several radii gives a ``(n, n_radii)`` result).
    r : float or array_like
        Radius in pixels, >= 0; may differ per source.
    err : float or ndarray (ny, nx), optional
        Per-pixel 1-sigma noise (ADU): a scalar or a map such as a background RMS map.
    mask : ndarray (ny, nx), optional
        Non-zero marks masked pixels; they are left out and the sum is scaled by
        ``area / unmasked area`` (SEP's default).
    gain : float, optional
        e-/ADU; adds the Poisson variance ``flux / gain`` where the flux is positive.
        ``None`` or 0: no Poisson term (background-dominated or already in ``err``).
    subpix : int
        0 (default): exact geometric overlap of each pixel with the circle. ``N >= 1``:
        SEP's ``N x N`` sub-pixel sampling of partial pixels (SEP's default is 5,
        SExtractor's ``FLUX_APER`` uses 5).
    bkgann : (rin, rout), optional
        Local-background annulus radii (pixels; broadcast with ``x``, ``y``, ``r``). The
        per-pixel background of the annulus pixels whose centres lie within ``rin < d <
        rout`` is subtracted, times ``area``; its error is propagated as SEP does.
    bkg_sigma : float or None
        Annulus estimator: the median of the pixels left after iterative
        ``bkg_sigma``-sigma clipping about the median (astropy ``sigma_clip``), robust to
        neighbours. ``None``: the plain mean of the unmasked annulus pixels, exactly SEP's
        ``bkgann``.
    bkg_maxiters : int
        Maximum clipping iterations.
    threads : int, optional
        CPU threads over chunks of sources (default 1: a Dask worker already runs one
        task per thread); ignored on the GPU.

    Returns
    -------
    Photometry
        ``flux``, ``fluxerr`` (ADU), ``flag`` (int16, SEP's APER_* bits), ``area``
        (pixels**2), and ``bkg`` / ``bkg_area`` with an annulus; float64 arrays of the
        broadcast shape on the image's device. Unpacks as ``flux, fluxerr, flag``.

    Raises
    ------
    InputError
        A non-2-D image; ``err`` or ``mask`` of another shape; arguments that do not
        broadcast; non-finite positions; negative radii; ``rout <= rin``; bad ``subpix``,
        ``gain`` or ``bkg_sigma``.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.ones((32, 32), dtype=np.float32)
    >>> flux, fluxerr, flag = aperture_photometry(image, [10.0, 15.3], [12.0, 0.2], 3.0)
    >>> np.round(flux, 6).tolist(), flag.tolist()  # 9 pi, then a circle cut by the edge
    ([28.274334, 18.298738], [0, 16])
    """
    px = _pixels(image, err, mask, threads)
    xp = px.xp
    subpix = _check_subpix(subpix)
    gain = _check_gain(gain)
    ann = _check_bkgann(bkgann, bkg_sigma, bkg_maxiters)
    named = {"x": x, "y": y, "r": r}
    if ann is not None:
        named.update(rin=ann[0], rout=ann[1])
    shape, arrays = _broadcast(xp, named)
    x_, y_, r_ = arrays[:3]
    _check_finite(xp, x_, "x")
    _check_finite(xp, y_, "y")
    _check_finite(xp, r_, "r")
    _check_min(xp, r_, "r")
    tv, sigtv, area, maskarea, flag = _aperture_sums(px, x_, y_, _circle(xp, r_), subpix)
    tv, sigtv, flag = _finish(xp, tv, sigtv, area, maskarea, flag, gain)
    bkg = bkg_area = None
    if ann is None:
        flux, fluxerr = tv, xp.sqrt(sigtv)
    else:
        rin, rout = arrays[3:]
        _check_annulus(xp, rin, rout)
        flux, fluxerr, bkg, bkg_area = _subtract_background(
            px, x_, y_, None, area, tv, sigtv, rin, rout, gain, (bkg_sigma, bkg_maxiters, subpix)
        )
    return _photometry(shape, flux, fluxerr, flag, area, bkg, bkg_area)


def _photometry(shape, flux, fluxerr, flag, area, bkg=None, bkg_area=None, cls=Photometry, **extra):
    def rs(a):
        return None if a is None else a.reshape(shape)

    return cls(
        flux=rs(flux),
        fluxerr=rs(fluxerr),
        flag=rs(flag),
        area=rs(area),
        bkg=rs(bkg),
        bkg_area=rs(bkg_area),
        **{k: rs(v) for k, v in extra.items()},
    )


def _ellipse_args(xp, named: dict) -> tuple[tuple[int, ...], list]:
    shape, arrays = _broadcast(xp, named)
    for name, arr in zip(named, arrays, strict=True):
        _check_finite(xp, arr, name)
    for name in ("a", "b"):
        arr = arrays[list(named).index(name)]
        _check_min(xp, arr, name, 0.0, strict=True)
    return shape, arrays


def ellipse_photometry(
    image: Any,
    x: Any,
    y: Any,
    a: Any,
    b: Any,
    theta: Any,
    r: Any = 1.0,
    err: Any = None,
    mask: Any = None,
    gain: float | None = None,
    *,
    subpix: int = 0,
    bkgann: tuple[Any, Any] | None = None,
    bkg_sigma: float | None = 3.0,
    bkg_maxiters: int = 5,
    threads: int | None = None,
) -> Photometry:
    """Sum an image in elliptical apertures (SEP ``sum_ellipse``).

    The aperture is the ellipse with semi-axes ``a * r`` and ``b * r`` at angle ``theta``:
    the pixels with ``cxx dx^2 + cyy dy^2 + cxy dx dy < r^2``.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values (ADU), NumPy or CuPy.
    x, y : float or array_like
        Centres, (x, y) pixel order, 0-based pixel centres, not NumPy (row, col) axis
        order.
    a, b : float or array_like
        Semi-major and semi-minor axes in pixels (> 0), e.g. ``detect_sources``' ``a``, ``b``
        (SEP requires ``a >= b``; here either order describes the same ellipse).
    theta : float or array_like
        Angle in radians, counter-clockwise from +x to the ``a`` axis (any value).
    r : float or array_like
        Scale of both axes, >= 0 (2.5 x the Kron radius for AUTO photometry).
    err, mask, gain, subpix, bkg_sigma, bkg_maxiters, threads
        As in :func:`aperture_photometry`.
    bkgann : (rin, rout), optional
        Elliptical annulus between scales ``rin`` and ``rout`` of ``(a, b)``. With
        ``bkg_sigma=None`` the background is SEP's exactly: the overlap-weighted mean of
        the unmasked annulus (same ``subpix``); otherwise the clipped median of the pixels
        whose centres lie in the annulus.

    Returns
    -------
    Photometry
        As :func:`aperture_photometry`.

    Raises
    ------
    InputError
        As :func:`aperture_photometry`; also for ``a`` or ``b`` <= 0 or non-finite
        ``theta``.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.ones((40, 40))
    >>> res = ellipse_photometry(image, 20.0, 20.0, 4.0, 2.0, 0.5)
    >>> round(float(res.flux), 6), round(float(res.area), 6)  # 8 pi
    (25.132741, 25.132741)
    """
    px = _pixels(image, err, mask, threads)
    xp = px.xp
    subpix = _check_subpix(subpix)
    gain = _check_gain(gain)
    ann = _check_bkgann(bkgann, bkg_sigma, bkg_maxiters)
    named = {"x": x, "y": y, "a": a, "b": b, "theta": theta, "r": r}
    if ann is not None:
        named.update(rin=ann[0], rout=ann[1])
    shape, arrays = _ellipse_args(xp, named)
    x_, y_, a_, b_, t_, r_ = arrays[:6]
    _check_min(xp, r_, "r")
    g = _ellipse(xp, a_, b_, t_, r_)
    tv, sigtv, area, maskarea, flag = _aperture_sums(px, x_, y_, g, subpix)
    tv, sigtv, flag = _finish(xp, tv, sigtv, area, maskarea, flag, gain)
    bkg = bkg_area = None
    if ann is None:
        flux, fluxerr = tv, xp.sqrt(sigtv)
    else:
        rin, rout = arrays[6:]
        _check_annulus(xp, rin, rout)
        flux, fluxerr, bkg, bkg_area = _subtract_background(
            px,
            x_,
            y_,
            (a_, b_, t_),
            area,
            tv,
            sigtv,
            rin,
            rout,
            gain,
            (bkg_sigma, bkg_maxiters, subpix),
        )
    return _photometry(shape, flux, fluxerr, flag, area, bkg, bkg_area)


# --------------------------------------------------------------------------- Kron radius


def kron_radius(
    image: Any,
    x: Any,
    y: Any,
    a: Any,
    b: Any,
    theta: Any,
    r: Any = 6.0,
    mask: Any = None,
    *,
    threads: int | None = None,
) -> KronRadius:
    """Kron radius ``sum r_i I_i / sum I_i`` inside an ellipse (SEP ``kron_radius``).

    ``r_i`` is the pixel centre's elliptical radius in units of ``a`` and ``b`` (SEP's
    ``sqrt(cxx dx^2 + cyy dy^2 + cxy dx dy)``); the sum runs over the unmasked pixels whose
    centres lie within ``r`` such radii (SExtractor uses 6).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values, NumPy or CuPy.
    x, y : float or array_like
        Centres, (x, y) pixel order, 0-based pixel centres, not NumPy (row, col) axis
        order.
    a, b, theta : float or array_like
        Ellipse from the object's second moments (pixels, radians; a, b > 0).
    r : float or array_like
        Integration limit in units of ``a`` and ``b`` (default 6, SExtractor's).
    mask : ndarray (ny, nx), optional
        Non-zero marks pixels to leave out (flagged APER_HASMASKED; no correction).
    threads : int, optional
        CPU threads over chunks of sources (default 1).

    Returns
    -------
    KronRadius
        ``(radius, flag)``: float64 radius (0 with APER_ALLMASKED when no pixel is usable,
        0 with APER_NONPOSITIVE when the first moment or the flux is <= 0) and int16 flags,
        on the image's device.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = np.exp(-((xx - 30.0) ** 2 + (yy - 31.0) ** 2) / (2 * 2.0**2))
    >>> kr, flag = kron_radius(image, 30.0, 31.0, 2.0, 2.0, 0.0)
    >>> round(float(kr), 3), int(flag)  # sqrt(pi / 2) = 1.253 for a smooth Gaussian
    (1.249, 0)
    """
    px = _pixels(image, None, mask, threads)
    xp = px.xp
    shape, (x_, y_, a_, b_, t_, r_) = _ellipse_args(
        xp, {"x": x, "y": y, "a": a, "b": b, "theta": theta, "r": r}
    )
    _check_min(xp, r_, "r")
    g = _ellipse(xp, a_, b_, t_, r_)
    boxes = _boxes(px, x_, y_, g.hx, g.hy)
    chunks = _plan(boxes, _CHUNK_CPU if xp is np else _CHUNK_GPU)

    def work(sel, chunk):
        st = _stamp(px, boxes, sel, chunk, x_, y_)
        gs = g.take(sel)
        rpix2 = gs.rpix2(st)
        inside = rpix2 <= gs.r2
        pix, bad = _gather(px, st)
        good = inside if bad is None else inside & ~bad
        pix = xp.where(good, pix, 0.0)
        r1 = _sum(xp.sqrt(rpix2) * pix)
        v1 = _sum(pix.astype(xp.float64))
        npix = _sum(good)
        if bad is None:
            return r1, v1, npix, xp.zeros(npix.shape, dtype=bool)
        return r1, v1, npix, (bad & inside).any(axis=(0, 1))

    parts = _run(px, work, chunks)
    f8 = xp.float64
    r1, v1, npix, hasmasked = _scatter(xp, x_.shape[0], chunks, parts, (f8, f8, xp.int64, bool))
    none = npix == 0
    nonpos = ~none & ((r1 <= 0) | (v1 <= 0))
    kr = xp.where(none | nonpos, 0.0, r1 / xp.where(v1 != 0, v1, 1.0))
    flag = (
        xp.where(boxes.trunc, APER_TRUNC, 0)
        | xp.where(hasmasked, APER_HASMASKED, 0)
        | xp.where(none, APER_ALLMASKED, 0)
        | xp.where(nonpos, APER_NONPOSITIVE, 0)
    ).astype(xp.int16)
    return KronRadius(kr.reshape(shape), flag.reshape(shape))


def _columns(catalog: Any, names: tuple[str, ...]) -> list:
    """Columns of a mapping (Catalog, dict) or a NumPy structured array (sep.extract)."""
    out = []
    for name in names:
        try:
            out.append(catalog[name])
        except (KeyError, ValueError, IndexError, TypeError):
            raise InputError(
                "catalog", f"has no column {name!r} (needs x, y, a, b, theta)"
            ) from None
    return out


def kron_photometry(
    image: Any,
    catalog: Any,
    y: Any = None,
    a: Any = None,
    b: Any = None,
    theta: Any = None,
    *,
    k: float = 2.5,
    min_kron: float = 3.5,
    r_min: float = 1.75,
    kron_nsig: float = 6.0,
    err: Any = None,
    mask: Any = None,
    gain: float | None = None,
    subpix: int = 1,
    threads: int | None = None,
) -> KronPhotometry:
    """AUTO photometry: flux in a Kron-scaled ellipse (SExtractor ``FLUX_AUTO``).

    SExtractor's recipe with SEP's primitives: ``kron_radius`` within ``kron_nsig``
    ellipses; the ellipse scale ``max(k * kron_radius, min_kron)`` (``min_kron`` also where
    the Kron radius is undefined); where that ellipse is small, ``scale * sqrt(a b) <=
    r_min``, a circle of radius ``r_min`` instead; the sum with ``subpix`` (1: pixel centres
    in or out, as SExtractor).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values (ADU), NumPy or CuPy.
    catalog : Catalog, mapping, structured array, or array_like
        Objects with columns ``x``, ``y``, ``a``, ``b``, ``theta`` (a
        :class:`~dagpre.types.Catalog` from detection, a dict, or ``sep.extract``'s record
        array). Or the ``x`` positions, with ``y``, ``a``, ``b``, ``theta`` given next.
        (x, y) pixel order, 0-based pixel centres, not NumPy (row, col) axis order.
    y, a, b, theta : array_like, optional
        Explicit columns when ``catalog`` holds ``x``.
    k : float
        Kron factor (SExtractor ``PHOT_AUTOPARAMS`` first value, 2.5).
    min_kron : float
        Smallest ellipse scale in units of ``a``, ``b`` (``PHOT_AUTOPARAMS`` second value,
        SExtractor's default 3.5).
    r_min : float
        Radius (pixels) of the circular fallback (``PHOT_AUTOAPERS[1] / 2``; SEP's
        documentation recipe uses 1.75, a 3.5 px diameter). 0 disables it.
    kron_nsig : float
        Ellipse scale within which the Kron radius is measured (SExtractor: 6).
    err, mask, gain, threads
        As in :func:`aperture_photometry`.
    subpix : int
        Pixel overlap for the sum: 1 (default, SExtractor's AUTO), N sub-pixels, 0 exact.

    Returns
    -------
    KronPhotometry
        ``flux``, ``fluxerr``, ``flag`` (aperture flags OR Kron-radius flags), ``area``,
        ``kron_radius``, ``kron_factor`` (SExtractor's ``KRON_RADIUS``), ``circular``.

    Notes
    -----
    To reproduce a SExtractor catalog, use its ``PHOT_AUTOPARAMS`` and ``PHOT_AUTOAPERS``:
    SEP's test image was made with ``2.5, 0.0`` and ``0.0, 0.0``, i.e. ``min_kron=0,
    r_min=0``. Masked pixels are corrected for as in SEP's ``sum_ellipse`` (SExtractor
    with ``MASK_TYPE CORRECT`` copies the pixel opposite the centre instead).

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = 1000.0 * np.exp(-((xx - 30.0) ** 2 + (yy - 31.0) ** 2) / (2 * 2.0**2))
    >>> cat = {"x": np.array([30.0]), "y": np.array([31.0]), "a": np.array([2.0]),
    ...        "b": np.array([2.0]), "theta": np.array([0.0])}
    >>> auto = kron_photometry(image, cat)
    >>> round(float(auto.kron_factor[0]), 2), round(float(auto.flux[0] / (8e3 * np.pi)), 3)
    (3.5, 0.997)
    """
    if y is None and a is None and b is None and theta is None:
        x, y, a, b, theta = _columns(catalog, ("x", "y", "a", "b", "theta"))
    elif any(v is None for v in (y, a, b, theta)):
        raise InputError("y, a, b, theta", "give all four with explicit x, or a catalog alone")
    else:
        x = catalog
    for name, value in (("k", k), ("min_kron", min_kron), ("r_min", r_min)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise InputError(name, f"expected a finite number >= 0, got {value!r}")
    kr, kflag = kron_radius(image, x, y, a, b, theta, kron_nsig, mask, threads=threads)
    xp = xp_of(image)
    shape = kr.shape
    x_, y_, a_, b_, t_ = (
        xp.broadcast_to(_float_array(xp, v, n), shape).reshape(-1)
        for v, n in ((x, "x"), (y, "y"), (a, "a"), (b, "b"), (theta, "theta"))
    )
    kr1, kflag1 = kr.reshape(-1), kflag.reshape(-1)
    undefined = (kflag1 & (APER_NONPOSITIVE | APER_ALLMASKED)) != 0
    factor = xp.where(undefined, min_kron, xp.maximum(k * kr1, min_kron))
    circular = factor * xp.sqrt(a_ * b_) <= r_min
    ell = ellipse_photometry(
        image,
        x_,
        y_,
        a_,
        b_,
        t_,
        xp.where(circular, 0.0, factor),
        err,
        mask,
        gain,
        subpix=subpix,
        threads=threads,
    )
    flux, fluxerr, flag, area = ell.flux, ell.fluxerr, ell.flag, ell.area
    if bool(circular.any()):
        idx = xp.nonzero(circular)[0]
        circ = aperture_photometry(
            image, x_[idx], y_[idx], r_min, err, mask, gain, subpix=subpix, threads=threads
        )
        flux, fluxerr, flag, area = (o.copy() for o in (flux, fluxerr, flag, area))
        flux[idx], fluxerr[idx], flag[idx], area[idx] = (
            circ.flux,
            circ.fluxerr,
            circ.flag,
            circ.area,
        )
    flag = flag | kflag1
    kron_factor = xp.where(circular | ~(flux > 0), 0.0, factor)
    return _photometry(
        shape,
        flux,
        fluxerr,
        flag,
        area,
        cls=KronPhotometry,
        kron_radius=kr1,
        kron_factor=kron_factor,
        circular=circular,
    )


# --------------------------------------------------------------------------- flux radius


def flux_radius(
    image: Any,
    x: Any,
    y: Any,
    rmax: Any,
    frac: Any,
    normflux: Any = None,
    subpix: int = 5,
    mask: Any = None,
    *,
    threads: int | None = None,
) -> FluxRadius:
    """Radius of the circle holding a fraction of the flux (SEP ``flux_radius``).

    SExtractor's ``FLUX_RADIUS``: the flux in 64 annuli out to ``rmax`` (pixels near an
    annulus edge split into ``subpix x subpix`` sub-pixels), accumulated, and the radius
    where the curve reaches ``frac * normflux`` found by linear interpolation.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values, NumPy or CuPy.
    x, y : array_like
        Centres, (x, y) pixel order, 0-based pixel centres, not NumPy (row, col) axis
        order; same shape as ``rmax``.
    rmax : float or array_like
        Largest radius considered (pixels, > 0), e.g. ``6 * a``.
    frac : float or array_like
        Fraction(s) of the flux, e.g. ``0.5`` for the half-light radius. An array adds its
        shape at the end of the result's.
    normflux : array_like, optional
        Total flux per source (e.g. the AUTO flux); default: the flux within ``rmax``.
    subpix : int
        Sub-pixel sampling (>= 1; SEP and SExtractor use 5).
    mask : ndarray (ny, nx), optional
        Non-zero marks masked pixels; each annulus is scaled by its area / unmasked area.
    threads : int, optional
        CPU threads over chunks of sources (default 1).

    Returns
    -------
    FluxRadius
        ``(radius, flag)``: float64 radii of shape ``x.shape + frac.shape`` (pixels), int16
        flags of shape ``x.shape``, on the image's device.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = np.exp(-((xx - 30.0) ** 2 + (yy - 31.0) ** 2) / (2 * 2.0**2))
    >>> radius, flag = flux_radius(image, [30.0], [31.0], [20.0], 0.5)
    >>> round(float(radius[0]), 2)  # sqrt(2 ln 2 (sigma^2 + 1/12)) for a sampled Gaussian
    2.38
    """
    px = _pixels(image, None, mask, threads)
    xp = px.xp
    subpix = _check_subpix(subpix, minimum=1)
    named = {"x": x, "y": y, "rmax": rmax}
    if normflux is not None:
        named["normflux"] = normflux
    shape, arrays = _broadcast(xp, named)
    x_, y_, rmax_ = arrays[:3]
    for name, arr in zip(named, arrays, strict=True):
        _check_finite(xp, arr, name)
    _check_min(xp, rmax_, "rmax", 0.0, strict=True)
    frac_ = _float_array(xp, frac, "frac")
    _check_finite(xp, frac_, "frac")
    fshape = tuple(frac_.shape)
    fr = frac_.reshape(-1)
    nbin = _FLUX_RADIUS_BINS
    step = rmax_ / nbin
    r_out = rmax_ + 1.5
    boxes = _boxes(px, x_, y_, r_out, r_out)
    chunks = _plan(boxes, _CHUNK_CPU if xp is np else _CHUNK_GPU, cost=subpix * subpix)
    scale2 = (1.0 / subpix) ** 2

    def work(sel, chunk):
        st = _stamp(px, boxes, sel, chunk, x_, y_)
        m = st.x.shape[0]
        X, Y = st.X, st.Y
        rpix2 = X * X + Y * Y
        ro = r_out[sel]
        region = rpix2 < ro * ro
        pix, bad = _gather(px, st)
        stp = step[sel]
        dens = 1.0 / stp
        rpix = xp.sqrt(rpix2)
        d = xp.fmod(rpix, stp)
        near = (d < _HALF_DIAGONAL) | (d > stp - _HALF_DIAGONAL)
        # bin of every sub-pixel (SEP's sample positions): (wy, s, wx, s, m); a pixel far
        # from a bin edge goes whole into its centre's bin
        sx = _subpix_offsets(xp, st.dx, subpix, 1)[None, None, :, :, :]
        sy = _subpix_offsets(xp, st.dy, subpix, 1)[:, :, None, None, :]
        jsub = _c_int(xp, xp.sqrt(sx * sx + sy * sy) * dens)
        jpix = _c_int(xp, rpix * dens)[:, None, :, None, :]
        j = xp.where(near[:, None, :, None, :], jsub, jpix)
        use = region[:, None, :, None, :] & (j < nbin)
        key = (j + xp.arange(m) * nbin)[use]
        wgt = xp.broadcast_to((pix * scale2)[:, None, :, None, :], j.shape)[use]
        total = xp.bincount(key, weights=wgt, minlength=m * nbin).reshape(m, nbin)
        if bad is None:
            return total, xp.zeros(m, dtype=bool)
        badw = xp.broadcast_to(bad[:, None, :, None, :], j.shape)[use]
        area = xp.bincount(key, minlength=m * nbin).reshape(m, nbin)
        marea = xp.bincount(key, weights=badw * 1.0, minlength=m * nbin).reshape(m, nbin)
        full = area == marea
        corr = xp.where(full, 0.0, area / xp.where(full, 1.0, area - marea))
        return total * corr, (bad & region).any(axis=(0, 1))

    parts = _run(px, work, chunks)
    n = x_.shape[0]
    sums = xp.zeros((n, nbin))
    hasmasked = xp.zeros(n, dtype=bool)
    for chunk, part in zip(chunks, parts, strict=True):
        if part is not None:
            sel = xp.asarray(chunk.idx)
            sums[sel], hasmasked[sel] = part
    cum = xp.cumsum(sums, axis=1)
    ftot = arrays[3] if normflux is not None else cum[:, -1]
    target = fr[None, :] * ftot[:, None]  # (n, nf)
    reached = cum[:, None, :] >= target[:, :, None]  # (n, nf, nbin)
    i = xp.where(reached.any(axis=2), xp.argmax(reached.astype(xp.int8), axis=2), nbin)
    st = step[:, None]
    y0 = cum[:, :1]
    first = xp.where((target <= 0) | (y0 == 0), 0.0, st * target / xp.where(y0 == 0, 1.0, y0))
    ic = xp.clip(i, 1, nbin - 1)
    ylo = xp.take_along_axis(cum, ic - 1, axis=1)
    yhi = xp.take_along_axis(cum, ic, axis=1)
    mid = st * (ic + (target - ylo) / xp.where(yhi == ylo, 1.0, yhi - ylo))
    radius = xp.where(i == 0, first, xp.where(i >= nbin, rmax_[:, None], mid))
    flag = (xp.where(boxes.trunc, APER_TRUNC, 0) | xp.where(hasmasked, APER_HASMASKED, 0)).astype(
        xp.int16
    )
    return FluxRadius(radius.reshape(shape + fshape), flag.reshape(shape))


# --------------------------------------------------------------------------- windowed position


def winpos(
    image: Any,
    x: Any,
    y: Any,
    sig: Any,
    mask: Any = None,
    subpix: int = 11,
    minsig: float = 2.0 / 2.35 * 0.5,
    *,
    threads: int | None = None,
) -> WindowedPosition:
    """Windowed centroids, SExtractor's ``XWIN_IMAGE, YWIN_IMAGE`` (SEP ``winpos``).

    From the starting position, repeat up to 16 times: the Gaussian-weighted (sigma
    ``sig``) centroid of the pixels within ``4 sig``, moved by twice its offset, until
    the offset is below 1e-4 px.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values, NumPy or CuPy.
    x, y : float or array_like
        Starting positions (e.g. isophotal centroids), (x, y) pixel order, 0-based pixel
        centres, not NumPy (row, col) axis order.
    sig : float or array_like
        Window sigma in pixels; SExtractor uses ``2 / 2.35 * r_half`` (the half-light
        radius from :func:`flux_radius`).
    mask : ndarray (ny, nx), optional
        Non-zero marks masked pixels; they count at the unmasked mean (SEP's correction).
    subpix : int
        Sub-pixel sampling of partial pixels at the ``4 sig`` edge (SExtractor 11; 0 exact).
    minsig : float
        Smallest window sigma (SExtractor: a half-light radius of 0.5 px).
    threads : int, optional
        CPU threads over chunks of sources (default 1).

    Returns
    -------
    WindowedPosition
        ``(x, y, flag)``: float64 windowed positions, (x, y) pixel order, 0-based pixel
        centres, and int16 flags (OR over the iterations), on the image's device.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:48, :48]
    >>> image = np.exp(-((xx - 20.3) ** 2 + (yy - 25.6) ** 2) / (2 * 1.5**2))
    >>> xw, yw, flag = winpos(image, 21.0, 25.0, 1.5)
    >>> round(float(xw), 4), round(float(yw), 4)
    (20.3, 25.6)
    """
    px = _pixels(image, None, mask, threads)
    xp = px.xp
    subpix = _check_subpix(subpix)
    shape, (x_, y_, sig_) = _broadcast(xp, {"x": x, "y": y, "sig": sig})
    for name, arr in (("x", x_), ("y", y_), ("sig", sig_)):
        _check_finite(xp, arr, name)
    _check_min(xp, sig_, "sig")
    sig_ = xp.maximum(sig_, float(minsig))
    n = x_.shape[0]
    xc, yc = x_.copy(), y_.copy()
    flag = xp.zeros(n, dtype=xp.int16)
    active = xp.arange(n)
    inv2s2 = 1.0 / (2.0 * sig_ * sig_)
    rad = _WINPOS_NSIG * sig_
    for _ in range(_WINPOS_NITERMAX):
        if active.size == 0:
            break
        xa, ya = xc[active], yc[active]
        g = _circle(xp, rad[active])
        boxes = _boxes(px, xa, ya, g.r, g.r)
        chunks = _plan(
            boxes, _CHUNK_CPU if xp is np else _CHUNK_GPU, cost=1 + subpix * subpix // 16
        )
        ia = inv2s2[active]

        def work(sel, chunk, xa=xa, ya=ya, g=g, boxes=boxes, ia=ia):
            st = _stamp(px, boxes, sel, chunk, xa, ya)
            gs = g.take(sel)
            X, Y = st.X, st.Y
            rpix2 = X * X + Y * Y
            ov = _partial_overlap(xp, gs, st, rpix2, subpix) if subpix else None
            if ov is None:
                ov = xp.where(rpix2 < gs.r_out2, _ddiff(_circle_corners(xp, st, gs.r)), 0.0)
            pix, bad = _gather(px, st)
            wgt = xp.exp(-rpix2 * ia[sel])
            wpix = pix * ov * wgt
            out = [_sum(pix * ov), _sum(wpix), _sum(wpix * X), _sum(wpix * Y), _sum(ov)]
            if bad is None:
                zero = xp.zeros(out[0].shape)
                return (*out, zero, zero, zero, zero, xp.zeros(zero.shape, dtype=bool))
            ovm = xp.where(bad, ov, 0.0)
            mw = ovm * wgt
            hasm = (bad & (rpix2 < gs.r_out2)).any(axis=(0, 1))
            return (*out, _sum(ovm), _sum(mw), _sum(mw * X), _sum(mw * Y), hasm)

        parts = _run(px, work, chunks)
        f8 = xp.float64
        tv, twv, dxp, dyp, tot, marea, mw, mdx, mdy, hasm = _scatter(
            xp, active.size, chunks, parts, (f8,) * 9 + (bool,)
        )
        flag[active] |= (
            xp.where(boxes.trunc, APER_TRUNC, 0) | xp.where(hasm, APER_HASMASKED, 0)
        ).astype(xp.int16)
        corrected = marea > 0
        mean = xp.where(corrected, tv / xp.where(tot > marea, tot - marea, xp.nan), 0.0)
        twv = twv + mean * mw
        dxp = dxp + mean * mdx
        dyp = dyp + mean * mdy
        moving = twv > 0
        sx = xp.where(moving, dxp / xp.where(moving, twv, 1.0), 0.0)
        sy = xp.where(moving, dyp / xp.where(moving, twv, 1.0), 0.0)
        xc[active] = xa + sx * _WINPOS_FAC
        yc[active] = ya + sy * _WINPOS_FAC
        go_on = moving & (sx * sx + sy * sy >= _WINPOS_STEPMIN * _WINPOS_STEPMIN)
        active = active[go_on]
    return WindowedPosition(xc.reshape(shape), yc.reshape(shape), flag.reshape(shape))


# --------------------------------------------------------------------------- isophotal


def isophotal_photometry(
    image: Any,
    segmap: Any,
    labels: Any = None,
    err: Any = None,
    mask: Any = None,
    gain: float | None = None,
) -> IsophotalPhotometry:
    """Sum an image over the pixels of each segment (SExtractor ``FLUX_ISO``).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted pixel values (ADU), NumPy or CuPy.
    segmap : ndarray (ny, nx) of int
        Segmentation map: 0 (or negative) is sky, ``k > 0`` the pixels of object ``k`` (as
        ``sep.extract(..., segmentation_map=True)`` or ``detect_sources`` return).
    labels : array_like of int, optional
        Which segments, in which order; default: every label present, ascending. A label
        with no pixels gets flux 0 and area 0.
    err : float or ndarray (ny, nx), optional
        Per-pixel 1-sigma noise (ADU).
    mask : ndarray (ny, nx), optional
        Non-zero marks pixels to leave out (no area correction: an isophote is the set of
        pixels that were detected); such segments get APER_HASMASKED, and APER_ALLMASKED
        with NaN flux when nothing is left.
    gain : float, optional
        e-/ADU for the Poisson term ``flux / gain`` (positive fluxes only).

    Returns
    -------
    IsophotalPhotometry
        ``flux``, ``fluxerr`` (ADU), ``flag``, ``area`` (pixels summed) and ``label``, 1-D
        on the image's device.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(16.0).reshape(4, 4)
    >>> seg = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 3]])
    >>> res = isophotal_photometry(image, seg, err=1.0)
    >>> res.label.tolist(), res.flux.tolist(), res.fluxerr.tolist()
    ([1, 2, 3], [8.0, 17.0, 15.0], [1.7320508075688772, 1.4142135623730951, 1.0])
    """
    px = _pixels(image, err, mask)
    xp = px.xp
    gain = _check_gain(gain)
    if tuple(getattr(segmap, "shape", ())) != px.shape:
        raise InputError(
            "segmap", f"shape {tuple(getattr(segmap, 'shape', ()))} differs from image {px.shape}"
        )
    seg = xp.ascontiguousarray(_on(xp, segmap)).reshape(-1)
    if np.dtype(seg.dtype).kind not in "biu":
        raise InputError("segmap", f"expected integer labels, got dtype {seg.dtype}")
    seg = xp.where(seg > 0, seg, 0).astype(xp.int64)
    if labels is None:
        lab = xp.unique(seg)
        lab = lab[lab > 0]
    else:
        lab = _on(xp, labels)
        if np.dtype(lab.dtype).kind not in "biu" or lab.ndim != 1:
            raise InputError("labels", f"expected a 1-D array of integer labels, got {labels!r}")
        lab = lab.astype(xp.int64)
        if lab.size and bool((lab <= 0).any()):
            raise InputError("labels", "expected positive labels (0 is the sky)")
    top = int(lab.max()) + 1 if lab.size else 1
    data = px.data.astype(xp.float64)
    bad = ~xp.isfinite(data)
    if px.mask is not None:
        bad = bad | (px.mask != 0)
    keep = (seg < top) & (seg > 0)
    good = keep & ~bad
    ids = xp.where(good, seg, 0)
    flux = xp.bincount(ids, weights=xp.where(good, data, 0.0), minlength=top)[lab]
    npix = xp.bincount(ids, minlength=top)[lab]
    nbad = xp.bincount(xp.where(keep & bad, seg, 0), minlength=top)[lab]
    if px.err is not None:
        e = px.err.astype(xp.float64)
        var = xp.bincount(ids, weights=xp.where(good, e * e, 0.0), minlength=top)[lab]
    else:
        var = npix * px.var
    if gain > 0:
        var = var + xp.where(flux > 0, flux / gain, 0.0)
    allmasked = (npix == 0) & (nbad > 0)
    flag = (xp.where(nbad > 0, APER_HASMASKED, 0) | xp.where(allmasked, APER_ALLMASKED, 0)).astype(
        xp.int16
    )
    flux = xp.where(allmasked, xp.nan, flux)
    fluxerr = xp.where(allmasked, xp.nan, xp.sqrt(var))
    return IsophotalPhotometry(
        flux=flux, fluxerr=fluxerr, flag=flag, area=npix.astype(xp.float64), label=lab
    )
