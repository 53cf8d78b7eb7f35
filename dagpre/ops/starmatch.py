"""Star matching: the transform between two star fields, from star lists or from images.

:func:`find_transform` works as astroalign does (Beroiz, Cabral & Sanchez 2020) in its
first half and differs in the second:

1. **Stars.** In an image, stars are found by :func:`find_stars`: background
   (:func:`~dagpre.ops.background.estimate_background`) and detection
   (:func:`~dagpre.ops.detect.detect_sources`, 5 sigma, no deblending) on the image binned
   to at most half a megapixel, then the brightest isolated, unflagged stars are measured
   on the full image as Gaussian-windowed centroids, with their variances. Star lists and
   catalogs are used as given, brightest first when fluxes come with them.
2. **Asterisms.** For each of the ``max_control_points`` brightest stars, every triangle
   among it and its four nearest neighbours, described by the invariants ``(L1/L3, L2/L3)``
   of its sorted side lengths (and, for the similarity and shift models, its orientation,
   so that a mirror image never matches).
3. **Candidates.** Pairs of triangles whose invariants lie within ``invariant_tol`` of each
   other (a k-d tree query), in order of invariant distance.
   When no hypothesis below succeeds, three times as many control stars are tried.
4. **Hypotheses, without random draws.** Each candidate, in that order, proposes a
   transform of the chosen model from its three vertex pairs, and is scored by how many
   control stars of the source it sends within ``pixel_tol`` of a star of the target.
   Candidates go in batches; the search stops at the first batch whose best hypothesis
   matches half the control stars, else every candidate is tried and the best one kept. The
   result is the same on every run and in every thread: there is nothing random to seed.
5. **Refinement over all stars.** The hypothesis is refined by weighted least squares over
   *all* matched stars (up to ``max_stars`` per list, not only the control points):
   re-match every source star to its nearest target star within ``pixel_tol``
   (one-to-one), fit, clip pairs whose residual is above 4 robust sigma, and repeat until
   the pairs no longer change. Weights are the inverse variances of the pairs when the
   positions carry them (``errx2 + erry2``, as :func:`find_stars` gives), else equal.

Models: ``"similarity"`` (shift, rotation and uniform scale; OpenCV's
``estimateAffinePartial2D``, Umeyama's least squares), ``"affine"`` (six parameters) and
``"shift"`` (translation only).

Conventions: arrays are indexed ``[y, x]``; positions are (x, y) pixel order, 0-based pixel
centres, not NumPy (row, col) axis order. A transform's ``matrix`` maps source (x, y) pixels
to target (x, y) pixels: ``[x_t, y_t, 1] = matrix @ [x_s, y_s, 1]``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import is_cupy_array, to_host, xp_of
from dagpre.ops._checks import check_image, check_positive_int, check_threads
from dagpre.types import Catalog, Frame, InputError

__all__ = ["MODELS", "Transform", "find_stars", "find_transform"]

#: Transform models :func:`find_transform` can fit.
MODELS = ("similarity", "affine", "shift")

#: Neighbours per control star whose triangles are formed (the star itself included).
_N_NEIGHBOURS = 5
#: Hypotheses scored per batch (bounds memory; the result does not depend on it).
_BATCH = 256
#: Chance that any wrong triangle hypothesis reaches the match count asked of the best one.
_FALSE_ALARM = 1e-3
#: Residuals above this many robust sigma are clipped in the refinement.
_CLIP_SIGMA = 4.0
#: Residuals shorter than this (px) are never clipped (exact lists have round-off only).
_NEVER_CLIP = 1e-3
#: Median of a 2-D Gaussian residual length in units of the per-axis sigma: sqrt(2 ln 2).
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))
#: Refinement rounds at most (it stops as soon as the matched pairs stay the same).
_MAX_ROUNDS = 20
#: Position variance floor (px^2, (0.003 px)^2) added to known variances: without a gain the
#: photon noise of bright stars is unknown, and no star should weigh without bound.
_VAR_FLOOR = 1e-5
#: Detection defaults of :func:`find_stars` (astroalign: 5 sigma, 5 pixels).
_DETECT_DEFAULTS = {"thresh": 5.0, "minarea": 5, "deblend_cont": 1.0, "clean": False}
#: detect_sources flags that disqualify a star: deblended (1) or truncated by the edge (2).
_BAD_FLAGS = 1 | 2
#: A star is crowded when a neighbour within this many FWHM has this fraction of its flux.
_ISOLATION_FWHM = 3.0
_ISOLATION_FLUX = 0.01
#: Windowed centroids: window sigma = FWHM / 2.3548, iterated until a step (px) is below
#: _WIN_STEP (SExtractor: 1e-4), at most _WIN_ITER times (SExtractor: 16).
_WIN_STEP = 1e-4
_WIN_ITER = 20
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class Transform:
    """A 2-D linear transform from source to target pixels, with the matches behind it.

    Attributes
    ----------
    matrix : ndarray (3, 3) float64
        Homogeneous matrix mapping source (x, y) pixels to target (x, y) pixels:
        ``[x_t, y_t, 1] = matrix @ [x_s, y_s, 1]``; (x, y) pixel order, 0-based pixel
        centres. Read-only.
    model : str
        ``"similarity"``, ``"affine"`` or ``"shift"``.
    n_matches : int
        Number of star pairs the final least-squares fit used.
    rms : float
        Root mean square of the 2-D residual lengths ``|matrix(source) - target|`` of those
        pairs, pixels (NaN when there are none).
    source_index, target_index : ndarray (n_matches,) int64
        Rows of the matched stars in the inputs: the rows of a star list or catalog as
        given, or for an image the rows of its :func:`find_stars` catalog (brightest first).
    source_xy, target_xy : ndarray (n_matches, 2) float64
        The matched positions, (x, y) pixels.
    n_source, n_target : int
        Stars available for matching in each input (after selection, before matching).

    A transform known otherwise (from WCS, from :func:`~dagpre.ops.xcorr.xcorr_shift`) is
    made with ``Transform(matrix)`` (a 3x3 or 2x3 array; ``model`` defaults to
    ``"affine"``, with no matches).
    """

    matrix: np.ndarray
    model: str = "affine"
    n_matches: int = 0
    rms: float = math.nan
    source_index: np.ndarray | None = None
    target_index: np.ndarray | None = None
    source_xy: np.ndarray | None = None
    target_xy: np.ndarray | None = None
    n_source: int = 0
    n_target: int = 0

    def __post_init__(self) -> None:
        matrix = np.array(to_host(self.matrix), dtype=np.float64)
        if matrix.shape == (2, 3):
            matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
            raise InputError("matrix", f"expected a finite 3x3 (or 2x3) matrix, got {matrix!r}")
        if not np.array_equal(matrix[2], [0.0, 0.0, 1.0]):
            raise InputError("matrix", f"expected an affine last row [0, 0, 1], got {matrix[2]}")
        if self.model not in MODELS:
            raise InputError("model", f"expected one of {MODELS}, got {self.model!r}")
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        for name in ("source_index", "target_index"):
            value = getattr(self, name)
            arr = np.zeros(0, np.int64) if value is None else np.array(value, dtype=np.int64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        for name in ("source_xy", "target_xy"):
            value = getattr(self, name)
            arr = np.zeros((0, 2)) if value is None else np.array(value, dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def apply(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Map source pixel positions to target pixel positions.

        Parameters
        ----------
        x, y : float or array_like (NumPy or CuPy)
            Source positions, (x, y) pixel order, 0-based pixel centres.

        Returns
        -------
        (x_t, y_t)
            Target positions, float64, same shape and device as the input.
        """
        xp = xp_of(x, y)
        x = xp.asarray(x, dtype=xp.float64)
        y = xp.asarray(y, dtype=xp.float64)
        (a, b, c), (d, e, f) = self.matrix[:2].tolist()  # Python floats: fine with CuPy
        return a * x + b * y + c, d * x + e * y + f

    def inverse(self) -> Transform:
        """The transform from target to source pixels, with the matches swapped.

        Its ``rms`` is measured in source pixels.
        """
        matrix = np.linalg.inv(self.matrix)
        return Transform(
            matrix=matrix,
            model=self.model,
            n_matches=self.n_matches,
            rms=_rms(matrix, self.target_xy, self.source_xy),
            source_index=self.target_index,
            target_index=self.source_index,
            source_xy=self.target_xy,
            target_xy=self.source_xy,
            n_source=self.n_target,
            n_target=self.n_source,
        )

    @property
    def residuals(self) -> np.ndarray:
        """``(n_matches, 2)`` residuals ``target_xy - matrix(source_xy)``, pixels."""
        px, py = self.apply(self.source_xy[:, 0], self.source_xy[:, 1])
        return self.target_xy - np.column_stack([px, py])

    @property
    def rotation(self) -> float:
        """Rotation angle in degrees, from +x towards +y (the similarity part for an affine)."""
        m = self.matrix
        return math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))

    @property
    def scale(self) -> float:
        """Linear scale factor ``sqrt(|det|)`` of the 2x2 part (target px per source px)."""
        return math.sqrt(abs(float(np.linalg.det(self.matrix[:2, :2]))))

    def __repr__(self) -> str:
        return (
            f"Transform(model={self.model!r}, n_matches={self.n_matches}, "
            f"rms={self.rms:.4g} px, rotation={self.rotation:.5f} deg, scale={self.scale:.6f}, "
            f"offset=({self.matrix[0, 2]:.3f}, {self.matrix[1, 2]:.3f}))"
        )


def _rms(matrix, src_xy, dst_xy) -> float:
    """RMS length (px) of ``dst_xy - matrix(src_xy)``; NaN without pairs."""
    if src_xy.shape[0] == 0:
        return math.nan
    r = dst_xy - (src_xy @ matrix[:2, :2].T + matrix[:2, 2])
    return float(np.sqrt(np.mean(r[:, 0] ** 2 + r[:, 1] ** 2)))


# --------------------------------------------------------------------------- star lists


@dataclass(frozen=True)
class _Stars:
    """A star list ready for matching: brightest (or first) first, host float64."""

    xy: np.ndarray  # (n, 2)
    var: np.ndarray | None  # (n,) position variance errx2 + erry2, px^2, or None
    index: np.ndarray  # (n,) rows in the caller's input
    n_input: int  # rows (or detections) before selection


def find_stars(
    image: Any,
    *,
    mask: Any = None,
    max_stars: int | None = 1000,
    gain: float | None = None,
    binning: int | None = None,
    detect_kwargs: Mapping | None = None,
    threads: int | None = None,
) -> Catalog:
    """Bright, isolated stars with precise positions, for matching and alignment.

    Stars are *found* on the image binned ``binning`` x ``binning`` (block means; 1 keeps
    every pixel): background from :func:`~dagpre.ops.background.estimate_background`
    (meshes of 64 image pixels), sources from :func:`~dagpre.ops.detect.detect_sources` (5
    sigma over the global background RMS, ``minarea=5``, no deblending or cleaning).
    Kept are the unflagged ones (not truncated by the edge) with no neighbour within 3 FWHM
    brighter than 1 % of their flux. Their positions are then *measured* on the full image
    as Gaussian-windowed centroids with the local background subtracted (window sigma = the
    median FWHM / 2.3548; SExtractor's ``XWIN_IMAGE`` iteration, sampled at pixel centres,
    until a step is below 1e-4 px), which are 1.5-2 times more precise than isophotal
    barycentres. A star whose centroid does not converge in 20 steps, moves by more than
    ``max(2, binning)`` px, or has a masked or off-image pixel in its window is dropped.

    Parameters
    ----------
    image : ndarray (ny, nx) or Frame
        Pixels (ADU), NumPy or CuPy, with or without sky. For a :class:`Frame`, its non-zero
        mask pixels are ignored and its ``gain`` is used.
    mask : ndarray (ny, nx), optional
        Non-zero where pixels must be ignored (combined with a Frame's own mask).
    max_stars : int or None
        Keep the brightest this many stars (None: all).
    gain : float, optional
        Electrons per ADU, for the Poisson part of the position errors.
    binning : int, optional
        Block size for finding stars; None takes the smallest (up to 4) that leaves at most
        2**19 pixels (1 up to 724^2, 2 at 1024^2, 3 at 2048^2, 4 at 4096^2). Positions are
        always measured on the full image.
    detect_kwargs : mapping, optional
        Overrides of the :func:`~dagpre.ops.detect.detect_sources` arguments (``thresh``,
        ``minarea``, ``filter_kernel``, ...), applied to the binned image.
    threads : int, optional
        CPU threads for the background and detection (None: every CPU).

    Returns
    -------
    Catalog
        Host (NumPy) columns, brightest first: ``x, y`` (windowed centroids, px, (x, y)
        pixel order, 0-based pixel centres), ``errx2, erry2`` (their variances, px^2,
        SExtractor's ``ERRX2WIN``: background noise, plus photon noise with ``gain``),
        ``x_det, y_det`` (isophotal barycentres from detection, full-resolution px),
        ``flux`` (isophotal flux, ADU), ``background`` (local sky, ADU per pixel), ``row``
        (row in the detection catalog). ``meta``: ``n_detected``, ``fwhm`` (px, median),
        ``sigma`` (px, the window), ``binning``.

    Raises
    ------
    InputError
        For a bad image or parameter, or when nothing is detected (a blank frame).

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.simulate import render_sources
    >>> rng = np.random.default_rng(1)
    >>> gx, gy = np.meshgrid(np.arange(16.0, 128.0, 24.0), np.arange(16.0, 128.0, 24.0))
    >>> x, y = gx.ravel() + rng.uniform(-1, 1, 25), gy.ravel() + rng.uniform(-1, 1, 25)
    >>> image = render_sources((128, 128), x, y, np.full(25, 5e4), 3.0) + 100.0
    >>> image = rng.normal(image, 3.0).astype(np.float32)
    >>> stars = find_stars(image)
    >>> d = np.hypot(stars["x"][:, None] - x, stars["y"][:, None] - y).min(axis=1)
    >>> len(stars), bool(d.max() < 0.01)
    (25, True)
    """
    name = "image"
    data, mask, gain = _unpack_image(image, mask, gain, name)
    return _find_stars(
        data, mask, max_stars, gain, binning, detect_kwargs, check_threads(threads), name
    )


def _unpack_image(image, mask, gain, name):
    if isinstance(image, Frame):
        frame_mask = image.mask != 0
        mask = frame_mask if mask is None else (frame_mask | (_as_mask(image.data, mask, name)))
        if gain is None:
            gain = image.meta.get("gain")
        image = image.data
    check_image(image, name)
    if min(image.shape) < 16:
        raise InputError(
            name,
            "expected an image with both sides >= 16 px, or an (N, 2) / (N, 3) star list "
            f"(x, y[, flux]), got shape {image.shape}",
        )
    if mask is not None:
        mask = _as_mask(image, mask, name)
    if gain is not None and (
        isinstance(gain, bool)
        or not isinstance(gain, numbers.Real)
        or not math.isfinite(gain)
        or gain <= 0
    ):
        gain = None
    return image, mask, gain


def _as_mask(image, mask, name):
    if getattr(mask, "shape", None) != image.shape:
        raise InputError(
            f"{name} mask", f"expected shape {image.shape}, got {getattr(mask, 'shape', None)}"
        )
    return xp_of(image).asarray(mask).astype(bool)


def _auto_binning(shape) -> int:
    """Smallest block size (1 to 4) that leaves at most 2**19 pixels (about 724^2)."""
    return max(1, min(4, math.ceil(math.sqrt(shape[0] * shape[1] / 2**19) - 1e-9)))


def _binned(xp, data, mask, f):
    """Block means of ``f`` x ``f`` pixels (partial blocks at the far edges dropped)."""
    if f == 1:
        return xp.asarray(data, dtype=xp.float32), mask
    ny, nx = (data.shape[0] // f) * f, (data.shape[1] // f) * f
    small = xp.zeros((ny // f, nx // f), dtype=xp.float32)
    for dy, dx in itertools.product(range(f), repeat=2):
        small += data[dy:ny:f, dx:nx:f]  # strided adds: cheaper than a reshaped mean
    small *= xp.float32(1.0 / (f * f))
    small_mask = None
    if mask is not None:
        small_mask = mask[:ny, :nx].reshape(ny // f, f, nx // f, f).any(axis=(1, 3))
    return small, small_mask


def _find_stars(data, mask, max_stars, gain, binning, detect_kwargs, threads, name) -> Catalog:
    from dagpre.ops.background import estimate_background
    from dagpre.ops.detect import detect_sources

    xp = xp_of(data)
    if max_stars is not None:
        max_stars = check_positive_int(max_stars, "max_stars")
    if binning is None:  # search at most about half a megapixel, binning by at most 4
        binning = _auto_binning(data.shape)
    f = check_positive_int(binning, "binning")
    if min(data.shape) // f < 16:
        raise InputError("binning", f"{f} leaves fewer than 16 pixels of {data.shape}")
    kwargs = dict(_DETECT_DEFAULTS)
    if detect_kwargs is not None:
        if not isinstance(detect_kwargs, Mapping):
            raise InputError("detect_kwargs", f"expected a mapping, got {detect_kwargs!r}")
        kwargs.update(detect_kwargs)
    small, small_mask = _binned(xp, data, mask, f)
    try:
        bkg = estimate_background(small, box=max(8, 64 // f), mask=small_mask, threads=threads)
    except InputError as err:  # name the input, not estimate_background's "image"
        raise InputError(name, err.reason) from None
    sub = bkg.subtract(small)
    kwargs.setdefault("err", bkg.global_rms)
    kwargs.setdefault("threads", threads)
    catalog = detect_sources(sub, mask=small_mask, **kwargs)
    n_detected = len(catalog)
    if n_detected == 0:
        raise InputError(
            name,
            f"no sources detected above {kwargs['thresh']} sigma of the background "
            f"(global RMS {bkg.global_rms * f:.4g} per pixel): a blank frame?",
        )
    cols = {
        k: np.asarray(to_host(catalog[k]), dtype=np.float64)
        for k in ("x", "y", "flux", "fwhm", "flag")
    }
    flux = cols["flux"] * (f * f)
    good = (
        ((cols["flag"].astype(np.int64) & _BAD_FLAGS) == 0)
        & np.isfinite(cols["x"])
        & np.isfinite(cols["y"])
        & (flux > 0)
    )
    x_det = f * cols["x"] + 0.5 * (f - 1)
    y_det = f * cols["y"] + 0.5 * (f - 1)
    ix = np.clip(np.rint(cols["x"]), 0, small.shape[1] - 1).astype(np.int64)
    iy = np.clip(np.rint(cols["y"]), 0, small.shape[0] - 1).astype(np.int64)
    sky_all = bkg.background[xp.asarray(iy), xp.asarray(ix)]
    sky_all = np.asarray(to_host(sky_all), dtype=np.float64)
    by_flux = np.flatnonzero(good)[np.argsort(-flux[good], kind="stable")]
    if f == 1:
        fwhm = float(np.median(cols["fwhm"][good])) if good.any() else 2.0
    else:  # the binned image's FWHM is too wide: measure the brightest stars' at full size
        fwhm = _fwhm_full(data, x_det, y_det, sky_all, by_flux, 2.0 * f * cols["fwhm"])
    fwhm = max(fwhm, 1.0)
    good &= ~_crowded(x_det, y_det, flux, _ISOLATION_FWHM * fwhm)
    rows = by_flux[good[by_flux]]
    if max_stars is not None:
        # measure a few more than needed: some are dropped by the window checks
        rows = rows[: max_stars + max_stars // 4 + 8]
    sky = sky_all[rows]
    sigma = fwhm / _FWHM_PER_SIGMA
    noise = bkg.global_rms * f  # per full-resolution pixel, for white noise
    xw, yw, var_x, var_y, ok = _windowed_centroids(
        data, mask, x_det[rows], y_det[rows], sky, sigma, noise, gain, max(2.0, float(f))
    )
    keep = np.flatnonzero(ok)
    if max_stars is not None:
        keep = keep[:max_stars]
    table = {
        "x": xw[keep],
        "y": yw[keep],
        "errx2": var_x[keep],
        "erry2": var_y[keep],
        "x_det": x_det[rows][keep],
        "y_det": y_det[rows][keep],
        "flux": flux[rows][keep],
        "background": sky[keep],
        "row": rows[keep].astype(np.int64),
    }
    meta = {
        "n_detected": n_detected,
        "fwhm": fwhm,
        "sigma": sigma,
        "binning": f,
        "units": {"x": "pix", "y": "pix", "errx2": "pix2", "erry2": "pix2", "flux": "adu"},
    }
    return Catalog(table, meta=meta)


def _fwhm_full(image, x, y, sky, order, width) -> float:
    """Median FWHM (px) of up to 50 of the brightest stars, from the pixels above half peak.

    ``2 sqrt(area / pi)`` as :func:`~dagpre.ops.detect.detect_sources` measures it, on
    stamps of half-size ``max(width)`` px about each star (``order``: brightest first).
    """
    xp = xp_of(image)
    ny, nx = image.shape
    sel = order[:50]
    if sel.size == 0:
        return 2.0
    h = int(np.clip(np.ceil(np.max(width[sel])), 3, 50))
    ix = np.rint(x[sel]).astype(np.int64)
    iy = np.rint(y[sel]).astype(np.int64)
    inside = (ix - h >= 0) & (ix + h < nx) & (iy - h >= 0) & (iy + h < ny)
    if not inside.any():
        return 2.0
    off = np.arange(-h, h + 1)
    pyi = xp.asarray(iy[inside][:, None, None] + off[None, :, None])
    pxi = xp.asarray(ix[inside][:, None, None] + off[None, None, :])
    stamp = image[pyi, pxi].astype(xp.float64) - xp.asarray(sky[sel][inside])[:, None, None]
    peak = stamp.max(axis=(1, 2))
    area = (stamp > 0.5 * peak[:, None, None]).sum(axis=(1, 2))
    fwhm = 2.0 * np.sqrt(np.asarray(to_host(area), dtype=np.float64) / math.pi)
    return float(np.median(fwhm))


def _crowded(x, y, flux, radius) -> np.ndarray:
    """Stars with a neighbour within ``radius`` px holding more than 1 % of their flux."""
    from scipy.spatial import cKDTree

    crowded = np.zeros(x.size, dtype=bool)
    if x.size < 2:
        return crowded
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(radius, output_type="ndarray")
    if pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        crowded[i[flux[j] > _ISOLATION_FLUX * flux[i]]] = True
        crowded[j[flux[i] > _ISOLATION_FLUX * flux[j]]] = True
    return crowded


def _windowed_centroids(image, mask, x, y, sky, sigma, noise, gain, max_move=2.0):
    """Gaussian-windowed centroids and their variances (SExtractor's XWIN, ERRX2WIN).

    Iterates ``c += 2 sum(w I d) / sum(w I)`` over a square stamp of half-size
    ``ceil(4 sigma)``, ``w = exp(-d^2 / 2 sigma^2)``, ``I`` the pixels minus the star's
    local ``sky``; only stars still moving are recomputed. The variances
    are ``4 sum(w^2 s^2 dx^2) / sum(w I)^2`` with ``s^2 = noise^2 (+ I / gain)``. Returns
    host arrays ``x, y, var_x, var_y`` and a flag of the usable stars (converged, positive
    weighted flux, moved less than ``max_move`` px, stamp on the image, no masked pixel in the
    window).
    """
    xp = xp_of(image)
    n = x.size
    ny, nx = image.shape
    h = max(2, math.ceil(4.0 * sigma))
    off = xp.arange(-h, h + 1, dtype=xp.float64)
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    xc = xp.asarray(x, dtype=xp.float64)
    yc = xp.asarray(y, dtype=xp.float64)
    sky_d = xp.asarray(sky, dtype=xp.float64)
    usable = xp.ones(n, dtype=bool)
    converged = xp.zeros(n, dtype=bool)
    var_x = xp.full(n, xp.nan)
    var_y = xp.full(n, xp.nan)
    active = xp.arange(n)

    def stamps(idx):
        cx, cy = xc[idx], yc[idx]
        ix, iy = xp.rint(cx), xp.rint(cy)
        inside = (ix - h >= 0) & (ix + h <= nx - 1) & (iy - h >= 0) & (iy + h <= ny - 1)
        px = ix[:, None, None] + off[None, None, :]
        py = iy[:, None, None] + off[None, :, None]
        pxi = xp.clip(px, 0, nx - 1).astype(xp.int64)
        pyi = xp.clip(py, 0, ny - 1).astype(xp.int64)
        pix = image[pyi, pxi].astype(xp.float64) - sky_d[idx][:, None, None]
        dx = px - cx[:, None, None]  # (n, 1, 2h + 1)
        dy = py - cy[:, None, None]  # (n, 2h + 1, 1)
        # the window is separable; the square stamp reaches 4 sigma (exp(-8) ~ 3e-4) on
        # each axis, so its corners add nothing that matters and keep it symmetric
        win = xp.exp(-dx * dx * inv2s2) * xp.exp(-dy * dy * inv2s2)
        ok = inside
        if mask is not None:
            ok = ok & ~mask[pyi, pxi].any(axis=(1, 2))
        return pix, win, dx, dy, ok

    for _ in range(_WIN_ITER):
        if active.size == 0:
            break
        pix, win, dx, dy, ok = stamps(active)
        wi = win * pix
        tw = wi.sum(axis=(1, 2))
        ok &= tw > 0
        safe = xp.where(ok, tw, 1.0)
        sx = (wi * dx).sum(axis=(1, 2)) / safe
        sy = (wi * dy).sum(axis=(1, 2)) / safe
        usable[active] = ok
        xc[active] = xp.where(ok, xc[active] + 2.0 * sx, xc[active])
        yc[active] = xp.where(ok, yc[active] + 2.0 * sy, yc[active])
        done = ok & (sx * sx + sy * sy < _WIN_STEP * _WIN_STEP)
        converged[active[done]] = True
        active = active[ok & ~done]
    usable &= converged
    moved = (xc - xp.asarray(x)) ** 2 + (yc - xp.asarray(y)) ** 2
    usable &= moved < max_move**2
    idx = xp.flatnonzero(usable)
    if idx.size:
        pix, win, dx, dy, _ = stamps(idx)
        var_pix = xp.full(pix.shape, float(noise) ** 2)
        if gain is not None:
            var_pix = var_pix + xp.maximum(pix, 0.0) / float(gain)
        w2v = win * win * var_pix
        tw2 = (win * pix).sum(axis=(1, 2)) ** 2
        var_x[idx] = 4.0 * (w2v * dx * dx).sum(axis=(1, 2)) / tw2
        var_y[idx] = 4.0 * (w2v * dy * dy).sum(axis=(1, 2)) / tw2
    return tuple(np.asarray(to_host(a)) for a in (xc, yc, var_x, var_y, usable))


def _is_star_list(obj) -> bool:
    shape = getattr(obj, "shape", None)
    if shape is None:
        return not isinstance(obj, Frame)
    return len(shape) == 2 and shape[1] in (2, 3)


def _stars(obj, name, max_stars, binning, detect_kwargs, threads) -> _Stars:
    """A :class:`_Stars` from an image, a Frame, a catalog / mapping or an (N, 2|3) list."""
    if isinstance(obj, Mapping):
        return _stars_from_mapping(obj, name, max_stars)
    if isinstance(obj, Frame) or not _is_star_list(obj):
        data, mask, gain = _unpack_image(obj, None, None, name)
        catalog = _find_stars(data, mask, max_stars, gain, binning, detect_kwargs, threads, name)
        var = catalog["errx2"] + catalog["erry2"]
        return _Stars(
            xy=np.column_stack([catalog["x"], catalog["y"]]),
            var=var,
            index=np.arange(len(catalog), dtype=np.int64),
            n_input=int(catalog.meta["n_detected"]),
        )
    try:
        arr = np.asarray(to_host(obj), dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            name, "expected an image, a Frame, a Catalog or an (N, 2) / (N, 3) star list"
        ) from None
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise InputError(
            name, f"expected an (N, 2) or (N, 3) star list (x, y[, flux]), got shape {arr.shape}"
        )
    flux = arr[:, 2] if arr.shape[1] == 3 else None
    return _select_list(arr[:, 0], arr[:, 1], flux, None, None, max_stars, arr.shape[0])


def _stars_from_mapping(obj, name, max_stars) -> _Stars:
    if "x" not in obj or "y" not in obj:
        raise InputError(name, f"a catalog needs 'x' and 'y' columns, got {list(obj)}")

    def col(key):
        return np.asarray(to_host(obj[key]), dtype=np.float64).reshape(-1) if key in obj else None

    x, y = col("x"), col("y")
    if x.size != y.size:
        raise InputError(name, f"'x' and 'y' differ in length ({x.size} and {y.size})")
    var = None
    if "errx2" in obj and "erry2" in obj:
        var = col("errx2") + col("erry2")
    flag = col("flag")
    bad = None if flag is None else (flag.astype(np.int64) & _BAD_FLAGS) != 0
    return _select_list(x, y, col("flux"), var, bad, max_stars, x.size)


def _select_list(x, y, flux, var, bad, max_stars, n_input) -> _Stars:
    good = np.isfinite(x) & np.isfinite(y)
    if bad is not None:
        good &= ~bad
    if var is not None:
        good &= np.isfinite(var) & (var >= 0)
    rows = np.flatnonzero(good)
    if flux is not None:
        f = np.where(np.isfinite(flux[rows]), flux[rows], -np.inf)
        rows = rows[np.argsort(-f, kind="stable")]
    if max_stars is not None:
        rows = rows[:max_stars]
    return _Stars(
        xy=np.column_stack([x[rows], y[rows]]),
        var=None if var is None else var[rows],
        index=rows.astype(np.int64),
        n_input=int(n_input),
    )


# --------------------------------------------------------------------------- public API


def find_transform(
    source: Any,
    target: Any,
    *,
    model: str = "similarity",
    max_control_points: int = 50,
    max_stars: int | None = 1000,
    pixel_tol: float = 2.0,
    min_matches: int = 6,
    invariant_tol: float = 0.02,
    max_candidates: int = 20000,
    binning: int | None = None,
    detect_kwargs: Mapping | None = None,
    threads: int | None = None,
) -> Transform:
    """The transform that maps source pixels onto target pixels, from stars.

    Parameters
    ----------
    source, target : image, Frame, Catalog or star list
        Each one of: a 2-D image (NumPy or CuPy, any size other than (N, 2) or (N, 3)) or a
        :class:`~dagpre.types.Frame`, whose stars are found by :func:`find_stars`; a
        :class:`~dagpre.types.Catalog` or any mapping with ``x`` and ``y`` columns (and
        optionally ``flux`` to rank by, ``errx2, erry2`` to weight by, and detection
        ``flag`` s, rows flagged as deblended or truncated being skipped), e.g. the output
        of :func:`find_stars` or :func:`~dagpre.ops.detect.detect_sources`; or an (N, 2)
        or (N, 3) array of ``x, y[, flux]`` rows. (x, y) pixel order, 0-based pixel centres.
        Without fluxes, rows are taken brightest first as given.
    model : {"similarity", "affine", "shift"}
        Shift + rotation + uniform scale; full affine; or translation only.
    max_control_points : int
        Brightest stars of each list whose triangles are matched (astroalign's 50); three
        times as many are tried when these give no consistent transform.
    max_stars : int or None
        Brightest stars of each list used to score hypotheses and in the final fit.
    pixel_tol : float
        Largest distance (px) between a transformed source star and its target star for
        the pair to count as a match (astroalign's ``PIXEL_TOL=2``).
    min_matches : int
        Fewest matched star pairs accepted (at least 3).
    invariant_tol : float
        Largest distance between the triangle invariants ``(L1/L3, L2/L3)`` of two
        triangles for them to be tried as a correspondence.
    max_candidates : int
        Most triangle correspondences tried (in order of invariant distance).
    binning, detect_kwargs : optional
        How stars are found in image inputs (see :func:`find_stars`).
    threads : int, optional
        CPU threads for finding stars in images (None: every CPU; two NumPy images are
        searched at the same time, each with half of them). The result does not depend on
        it.

    Returns
    -------
    Transform
        ``matrix`` (source -> target, 3x3), ``n_matches``, ``rms`` (px) and the matched
        pairs.

    Raises
    ------
    InputError
        For bad parameters; an input with fewer than ``min_matches`` usable stars; an image
        where nothing is detected (blank frame); no triangle correspondence whose hypothesis
        matches enough control stars (no overlap, or too few common stars); fewer than
        ``min_matches`` matched pairs after refinement. The messages name the input, or give
        the star counts of both.

    Notes
    -----
    Nothing is random: hypotheses are tried in order of invariant distance (ties by
    index), so two runs, or two threads, give bit-identical transforms.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> src = rng.uniform(0, 1000, (60, 2))
    >>> t = np.radians(0.5)
    >>> rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    >>> dst = src @ rot.T + [12.5, -30.25]
    >>> tr = find_transform(src, dst)
    >>> tr.n_matches, round(tr.rotation, 6), np.round(tr.matrix[:2, 2], 6).tolist()
    (60, 0.5, [12.5, -30.25])
    """
    if model not in MODELS:
        raise InputError("model", f"expected one of {MODELS}, got {model!r}")
    n_ctrl = check_positive_int(max_control_points, "max_control_points")
    if n_ctrl < 3:
        raise InputError("max_control_points", f"expected at least 3, got {max_control_points}")
    if max_stars is not None:
        max_stars = max(check_positive_int(max_stars, "max_stars"), n_ctrl)
    min_matches = check_positive_int(min_matches, "min_matches")
    if min_matches < 3:
        raise InputError("min_matches", f"expected at least 3, got {min_matches}")
    max_candidates = check_positive_int(max_candidates, "max_candidates")
    pixel_tol = _positive_float(pixel_tol, "pixel_tol")
    invariant_tol = _positive_float(invariant_tol, "invariant_tol")
    threads = check_threads(threads)

    src, dst = _both_star_lists(source, target, max_stars, binning, detect_kwargs, threads)
    for stars, name in ((src, "source"), (dst, "target")):
        n, found = stars.xy.shape[0], f"(of {stars.n_input} rows or detections)"
        if n < 3:
            raise InputError(name, f"only {n} usable stars {found}; need >= 3 for a triangle")
        if n < min_matches:
            raise InputError(
                name, f"only {n} usable stars {found}; need >= {min_matches} (min_matches)"
            )
    counts = (
        f"source: {src.xy.shape[0]} stars of {src.n_input}, "
        f"target: {dst.xy.shape[0]} stars of {dst.n_input}"
    )
    # the brightest stars of the two lists may differ (partial overlap, other depth or
    # scale): then three times as many control stars are tried before giving up
    n_most = max(src.xy.shape[0], dst.xy.shape[0])
    for n_try in (n_ctrl, 3 * n_ctrl):
        try:
            hypothesis = _best_hypothesis(
                src, dst, model, n_try, pixel_tol, min_matches, invariant_tol, max_candidates,
                counts,
            )  # fmt: skip
            break
        except InputError:
            if n_try >= n_most or n_try > n_ctrl:
                raise
    matrix, si, ti = _refine(src, dst, model, hypothesis, pixel_tol)
    n = si.size
    if n < min_matches:
        raise InputError(
            "source/target", f"only {n} stars matched; need >= {min_matches} ({counts})"
        )
    p, q = src.xy[si], dst.xy[ti]
    return Transform(
        matrix=matrix,
        model=model,
        n_matches=int(n),
        rms=_rms(matrix, p, q),
        source_index=src.index[si],
        target_index=dst.index[ti],
        source_xy=p,
        target_xy=q,
        n_source=int(src.xy.shape[0]),
        n_target=int(dst.xy.shape[0]),
    )


def _positive_float(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(name, f"expected a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InputError(name, f"expected a positive finite number, got {value!r}")
    return float(value)


def _both_star_lists(source, target, max_stars, binning, detect_kwargs, threads):
    """Star lists of both inputs; two images are searched at the same time."""
    args = [(source, "source"), (target, "target")]
    host_images = [
        not isinstance(obj, Mapping)
        and (isinstance(obj, Frame) or not _is_star_list(obj))
        and not is_cupy_array(obj.data if isinstance(obj, Frame) else obj)
        for obj, _ in args
    ]
    if all(host_images) and threads != 1:  # a GPU gains nothing from host threads
        total = threads or os.cpu_count() or 1
        each = max(1, total // 2)
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(_stars, obj, name, max_stars, binning, detect_kwargs, each)
                for obj, name in args
            ]
            return futures[0].result(), futures[1].result()
    return tuple(
        _stars(obj, name, max_stars, binning, detect_kwargs, threads) for obj, name in args
    )


# --------------------------------------------------------------------------- asterisms


def _triangles(xy: np.ndarray, oriented: bool):
    """Triangles among each star and its nearest neighbours: invariants and vertices.

    Returns ``inv`` (m, 2) or (m, 3) and ``tri`` (m, 3) vertex indices in canonical order:
    the vertices opposite the shortest, middle and longest sides. The invariants are
    ``(L1/L3, L2/L3)``; with ``oriented`` a third column, +-1 per the sense of the
    canonical vertex order, keeps mirror images apart.
    """
    from scipy.spatial import cKDTree

    n = xy.shape[0]
    k = min(n, _N_NEIGHBOURS)
    _, nn = cKDTree(xy).query(xy, k=k)
    nn = np.asarray(nn).reshape(n, k)
    combos = np.array(list(itertools.combinations(range(k), 3)), dtype=np.int64)
    tri = np.sort(nn[:, combos].reshape(-1, 3), axis=1)
    tri = np.unique(tri, axis=0)  # sorted rows: deterministic order
    a, b, c = (xy[tri[:, i]] for i in range(3))
    # side opposite each vertex
    opp = np.stack([np.hypot(*(b - c).T), np.hypot(*(c - a).T), np.hypot(*(a - b).T)], axis=1)
    order = np.argsort(opp, axis=1, kind="stable")
    sides = np.take_along_axis(opp, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    keep = sides[:, 0] > 1e-9 * np.maximum(sides[:, 2], 1.0)
    sides, tri = sides[keep], tri[keep]
    inv = sides[:, :2] / sides[:, 2:3]
    if oriented:
        p, q, r = (xy[tri[:, i]] for i in range(3))
        cross = (q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (
            r[:, 0] - p[:, 0]
        )
        inv = np.column_stack([inv, np.where(cross >= 0, 1.0, -1.0)])
    return inv, tri


def _candidates(inv_s, inv_t, tol, limit):
    """Index pairs (i, j) of triangles with invariants within ``tol``, nearest first."""
    from scipy.spatial import cKDTree

    hits = cKDTree(inv_s).sparse_distance_matrix(cKDTree(inv_t), tol, output_type="ndarray")
    i = hits["i"].astype(np.int64)
    j = hits["j"].astype(np.int64)
    order = np.lexsort((j, i, hits["v"]))[:limit]
    return i[order], j[order]


# --------------------------------------------------------------------------- fits


def _fit(model, p, q, w=None):
    """Weighted least-squares transform (3x3) of ``model`` taking points ``p`` to ``q``."""
    if w is None:
        w = np.ones(p.shape[0])
    w = w / w.sum()
    pm = w @ p
    qm = w @ q
    pc, qc = p - pm, q - qm
    m = np.eye(3)
    if model == "shift":
        a2 = np.eye(2)
    elif model == "similarity":
        zp = pc[:, 0] + 1j * pc[:, 1]
        zq = qc[:, 0] + 1j * qc[:, 1]
        z = (w * np.conj(zp)) @ zq / (w @ (zp.real**2 + zp.imag**2))
        a2 = np.array([[z.real, -z.imag], [z.imag, z.real]])
    else:
        spp = (pc * w[:, None]).T @ pc
        sqp = (qc * w[:, None]).T @ pc
        a2 = np.linalg.solve(spp.T, sqp.T).T
    m[:2, :2] = a2
    m[:2, 2] = qm - a2 @ pm
    return m


def _propose(model, p, q):
    """Transforms (k, 2, 3) from the three vertex pairs of each candidate (k, 3, 2) -> ok."""
    pm = p.mean(axis=1)
    qm = q.mean(axis=1)
    pc = p - pm[:, None, :]
    qc = q - qm[:, None, :]
    k = p.shape[0]
    a2 = np.zeros((k, 2, 2))
    ok = np.ones(k, dtype=bool)
    if model == "shift":
        a2[:, 0, 0] = a2[:, 1, 1] = 1.0
    elif model == "similarity":
        zp = pc[..., 0] + 1j * pc[..., 1]
        zq = qc[..., 0] + 1j * qc[..., 1]
        z = (np.conj(zp) * zq).sum(axis=1) / (np.abs(zp) ** 2).sum(axis=1)
        a2[:, 0, 0] = a2[:, 1, 1] = z.real
        a2[:, 0, 1] = -z.imag
        a2[:, 1, 0] = z.imag
    else:
        # exact affine through three points: A @ [p1 - p0, p2 - p0] = [q1 - q0, q2 - q0]
        dp = np.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]], axis=2)  # columns
        dq = np.stack([q[:, 1] - q[:, 0], q[:, 2] - q[:, 0]], axis=2)
        det = dp[:, 0, 0] * dp[:, 1, 1] - dp[:, 0, 1] * dp[:, 1, 0]
        scale = np.einsum("kij,kij->k", dp, dp)
        ok = np.abs(det) > 1e-3 * scale
        safe = np.where(ok, det, 1.0)
        inv = np.empty_like(dp)
        inv[:, 0, 0] = dp[:, 1, 1] / safe
        inv[:, 1, 1] = dp[:, 0, 0] / safe
        inv[:, 0, 1] = -dp[:, 0, 1] / safe
        inv[:, 1, 0] = -dp[:, 1, 0] / safe
        a2 = dq @ inv
    t = qm - np.einsum("kij,kj->ki", a2, pm)
    return np.concatenate([a2, t[:, :, None]], axis=2), ok


def _best_hypothesis(src, dst, model, n_ctrl, tol, min_matches, inv_tol, max_cand, counts):
    """The 3x3 matrix of the best-scoring triangle correspondence (deterministic order)."""
    from scipy.spatial import cKDTree

    ctrl_s = src.xy[:n_ctrl]
    ctrl_t = dst.xy[:n_ctrl]
    oriented = model != "affine"
    inv_s, tri_s = _triangles(ctrl_s, oriented)
    inv_t, tri_t = _triangles(ctrl_t, oriented)
    ci, cj = _candidates(inv_s, inv_t, inv_tol, max_cand)
    if ci.size == 0:
        raise InputError(
            "source/target",
            f"no consistent transform: none of the {inv_s.shape[0]} and {inv_t.shape[0]} "
            f"triangles of the brightest stars have matching shapes ({counts}); do the "
            "fields overlap?",
        )
    tree = cKDTree(dst.xy)
    n_s = ctrl_s.shape[0]
    # a wrong hypothesis matches its 3 vertices and, by chance, Poisson(lam) of the other
    # control stars; ask for so many more that no wrong one of all the candidates is likely
    lo, hi = dst.xy.min(axis=0), dst.xy.max(axis=0)
    area = max(float(np.prod(hi - lo + 2.0 * tol)), 1.0)
    lam = (n_s - 3) * dst.xy.shape[0] * math.pi * tol * tol / area
    needed = max(min_matches, 3 + _chance_limit(lam, ci.size))
    needed = min(needed, max(min_matches, n_s))
    good_enough = max(needed, min(n_s, ctrl_t.shape[0]) // 2)
    best_score, best_matrix = -1, None
    for start in range(0, ci.size, _BATCH):
        i = ci[start : start + _BATCH]
        j = cj[start : start + _BATCH]
        mats, ok = _propose(model, ctrl_s[tri_s[i]], ctrl_t[tri_t[j]])
        mats = mats[ok]
        if mats.shape[0] == 0:
            continue
        pred = np.einsum("kij,nj->kni", mats[:, :, :2], ctrl_s) + mats[:, None, :, 2]
        dist, _ = tree.query(pred.reshape(-1, 2), distance_upper_bound=tol)
        score = np.isfinite(dist).reshape(mats.shape[0], n_s).sum(axis=1)
        k = int(np.argmax(score))  # the first of equal scores: deterministic
        if score[k] > best_score:
            best_score = int(score[k])
            best_matrix = np.vstack([mats[k], [0.0, 0.0, 1.0]])
        if best_score >= good_enough:
            break
    if best_score < needed:
        raise InputError(
            "source/target",
            f"no consistent transform: the best of {ci.size} triangle correspondences "
            f"matches {max(best_score, 0)} of the {n_s} brightest source stars within "
            f"{tol:g} px; need >= {needed} ({counts}); do the fields overlap?",
        )
    return best_matrix


def _chance_limit(lam: float, trials: int) -> int:
    """Fewest chance matches ``m`` with ``trials * P(Poisson(lam) >= m) < _FALSE_ALARM``."""
    term = math.exp(-lam)  # P(X = m)
    below = 0.0  # P(X < m)
    for m in range(1000):
        if trials * (1.0 - below) < _FALSE_ALARM:
            return m
        below += term
        term *= lam / (m + 1)
    return 1000  # hopelessly crowded: more than any list holds


def _match(pred, tree, tol):
    """One-to-one nearest matches (source rows, target rows) within ``tol``."""
    dist, j = tree.query(pred, distance_upper_bound=tol)
    i = np.flatnonzero(np.isfinite(dist))
    j = j[i]
    order = np.lexsort((i, dist[i]))  # closest first, ties by source row
    i, j = i[order], j[order]
    _, first = np.unique(j, return_index=True)
    keep = np.sort(first)
    i, j = i[keep], j[keep]
    order = np.argsort(i, kind="stable")
    return i[order], j[order]


def _refine(src, dst, model, matrix, tol):
    """Iterated match / weighted fit / clip over all stars; returns matrix and pairs."""
    from scipy.spatial import cKDTree

    tree = cKDTree(dst.xy)
    p_all = src.xy
    prev = None
    si = ti = np.zeros(0, dtype=np.int64)
    for _ in range(_MAX_ROUNDS):
        pred = p_all @ matrix[:2, :2].T + matrix[:2, 2]
        si, ti = _match(pred, tree, tol)
        if si.size < 3:
            break
        p, q = p_all[si], dst.xy[ti]
        var = _pair_variance(src, dst, si, ti, matrix)
        w = 1.0 / var
        keep = np.ones(si.size, dtype=bool)
        for _clip in range(_MAX_ROUNDS):
            try:
                fitted = _fit(model, p[keep], q[keep], w[keep])
            except np.linalg.LinAlgError:  # collinear stars: keep the last good matrix
                break
            matrix = fitted
            r = q - (p @ matrix[:2, :2].T + matrix[:2, 2])
            length = np.hypot(r[:, 0], r[:, 1])
            z = length / np.sqrt(var)
            sigma = np.median(z[keep]) / _RAYLEIGH_MEDIAN
            new_keep = (z <= _CLIP_SIGMA * sigma) | (length <= _NEVER_CLIP)
            if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
                break
            keep = new_keep
        si, ti = si[keep], ti[keep]
        pairs = (si.tobytes(), ti.tobytes())
        if pairs == prev:
            break
        prev = pairs
    return matrix, si, ti


def _pair_variance(src, dst, si, ti, matrix):
    """Variance (px^2) of each pair's residual, or ones when positions carry no errors."""
    if src.var is None and dst.var is None:
        return np.ones(si.size)
    scale2 = abs(float(np.linalg.det(matrix[:2, :2])))
    var = np.full(si.size, _VAR_FLOOR)
    if dst.var is not None:
        var += dst.var[ti]
    if src.var is not None:
        var += scale2 * src.var[si]
    return var
