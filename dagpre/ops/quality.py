"""Frame quality: seeing, shape, sky, depth and defects of one exposure, on NumPy or CuPy.

:func:`frame_quality` measures what reference selection and the frames table need:

* **FWHM and ellipticity** from adaptive (Gaussian-weighted, iterated) second moments of
  isolated, unsaturated, unflagged stars — the weight is matched to each star in turn, as in
  Bernstein & Jarvis (2002) / GalSim's HSM, so a Gaussian star gives its true sigma; the
  pixel's own ``1/12 px^2`` is taken off. All stars go through at once as stacked stamps.
  For a Moffat star the value is the FWHM of its best-matched Gaussian (smaller than the
  Moffat's nominal FWHM by a fixed factor for a given beta), so frames rank by seeing
  whatever the profile. The frame's value is the median over stars.
* **Background and noise**: :func:`~dagpre.ops.background.estimate_background`'s global
  values; **source count** at 5 sigma; **saturated fraction** of the pixels.
* **Non-uniformity**: a plane is fitted (by least squares, then refitted to the meshes
  within 3 sigma) to the background mesh map, and the fraction of meshes whose residual
  exceeds ``nonuniform_tolerance`` times the frame's noise RMS is reported. A sky gradient
  is a plane and passes; a shutter shadow, a cloud edge or scattered light does not.

Conventions: arrays are indexed ``[y, x]``; positions are (x, y) pixel order with 0-based
pixel centres.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.ops._checks import check_image
from dagpre.types import Frame, InputError, MaskBit

__all__ = ["FrameQuality", "adaptive_moments", "frame_quality", "isolated_stars"]

_SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class FrameQuality:
    """Result of :func:`frame_quality` (plain floats; ``as_dict()`` for a table row).

    Attributes
    ----------
    fwhm : float
        Median FWHM of the isolated stars' matched Gaussians, pixels (NaN if none).
    ellipticity : float
        Median ``1 - b/a`` of those stars (0 round).
    n_psf_stars : int
        Stars used for ``fwhm`` and ``ellipticity``.
    background, noise : float
        Global sky level and its RMS, ADU.
    n_sources : int
        Detections above ``thresh`` sigma.
    saturated_fraction : float
        Fraction of pixels saturated (``MaskBit.SATURATED`` / ``BLEED`` in the mask, or at or
        above ``saturate``).
    nonuniformity : float
        Fraction of background meshes off a plane by more than the tolerance (0 to 1).
    """

    fwhm: float
    ellipticity: float
    n_psf_stars: int
    background: float
    noise: float
    n_sources: int
    saturated_fraction: float
    nonuniformity: float

    def as_dict(self) -> dict:
        """The fields as a dict of Python scalars."""
        return asdict(self)


def isolated_stars(catalog: Any, shape: tuple[int, int], *, radius: float, edge: float) -> Any:
    """Indices (NumPy) of unflagged detections with no other detection within ``radius``.

    Parameters
    ----------
    catalog : Catalog or mapping
        ``x``, ``y``, ``flag`` columns (a :func:`~dagpre.ops.detect.detect_sources` result).
    shape : (int, int)
        ``(ny, nx)`` of the image: stars within ``edge`` px of a border are dropped.
    radius, edge : float
        Isolation radius and border margin, pixels.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(to_host(catalog["x"]), dtype=np.float64)
    y = np.asarray(to_host(catalog["y"]), dtype=np.float64)
    flag = np.asarray(to_host(catalog["flag"]))
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    xy = np.column_stack([x, y])
    # distance to the nearest other detection (the first hit is itself; inf when alone)
    nearest = cKDTree(xy).query(xy, k=2)[0][:, 1]
    ny, nx = shape
    inside = (x >= edge) & (x <= nx - 1 - edge) & (y >= edge) & (y <= ny - 1 - edge)
    return np.flatnonzero((nearest > radius) & (flag == 0) & inside)


def adaptive_moments(
    image: Any, x: Any, y: Any, *, size: int = 15, sigma0: float = 1.5, iterations: int = 12
) -> tuple[Any, Any, Any]:
    """Adaptive second moments of stars, all at once: ``(sxx, syy, sxy)`` in px^2.

    The Gaussian weight's covariance is set to twice the weighted moments at each iteration
    (the fixed point of a Gaussian star is its own covariance) and its centre follows the
    weighted centroid. The pixel's own variance (1/12 px^2 per axis) is subtracted.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image.
    x, y : array_like (n,)
        Star positions, (x, y) pixel order, 0-based pixel centres; stamps must lie inside
        the image (see :func:`isolated_stars`'s ``edge``).
    size : int
        Odd stamp side, pixels.
    sigma0 : float
        Starting weight sigma, pixels.
    iterations : int
        Fixed-point iterations (they converge in a handful).

    Returns
    -------
    sxx, syy, sxy : ndarray (n,)
        On the image's device; NaN where the weighted flux is not positive.
    """
    xp = xp_of(image)
    h = size // 2
    x = xp.asarray(x, dtype=np.float64)
    y = xp.asarray(y, dtype=np.float64)
    ix = xp.floor(x + 0.5).astype(np.int64)
    iy = xp.floor(y + 0.5).astype(np.int64)
    off = xp.arange(-h, h + 1)
    rows = (iy[:, None] + off[None, :])[:, :, None]
    cols = (ix[:, None] + off[None, :])[:, None, :]
    stamps = image[rows, cols].astype(np.float64)  # (n, s, s)
    du = (cols - x[:, None, None]).astype(np.float64)  # (n, 1, s)
    dv = (rows - y[:, None, None]).astype(np.float64)  # (n, s, 1)
    n = x.shape[0]
    cxx = xp.full(n, sigma0**2)
    cyy = xp.full(n, sigma0**2)
    cxy = xp.zeros(n)
    mx = xp.zeros(n)
    my = xp.zeros(n)
    for _ in range(iterations):
        det = cxx * cyy - cxy**2
        ixx, iyy, ixy = cyy / det, cxx / det, -cxy / det
        u = du - mx[:, None, None]
        v = dv - my[:, None, None]
        w = xp.exp(
            -0.5 * (ixx[:, None, None] * u**2 + iyy[:, None, None] * v**2
                    + 2 * ixy[:, None, None] * u * v)
        ) * stamps  # fmt: skip
        tot = w.sum(axis=(1, 2))
        good = tot > 0
        safe = xp.where(good, tot, 1.0)
        dx = (w * u).sum(axis=(1, 2)) / safe
        dy = (w * v).sum(axis=(1, 2)) / safe
        mxx = (w * u * u).sum(axis=(1, 2)) / safe - dx**2
        myy = (w * v * v).sum(axis=(1, 2)) / safe - dy**2
        mxy = (w * u * v).sum(axis=(1, 2)) / safe - dx * dy
        mx = xp.clip(mx + dx, -h / 2, h / 2)
        my = xp.clip(my + dy, -h / 2, h / 2)
        # fixed point: weight covariance = 2 x weighted moments (kept positive definite)
        cxx = xp.clip(2 * mxx, 0.1, h * h)
        cyy = xp.clip(2 * myy, 0.1, h * h)
        cxy = xp.clip(2 * mxy, -0.95 * xp.sqrt(cxx * cyy), 0.95 * xp.sqrt(cxx * cyy))
    nan = xp.where(good, 0.0, np.nan)
    pix = 1.0 / 12.0
    return cxx - pix + nan, cyy - pix + nan, cxy + nan


def _nonuniformity(mesh: np.ndarray, rejected: np.ndarray, noise: float, tol: float) -> float:
    """Fraction of meshes whose residual from a robustly fitted plane exceeds ``tol * noise``."""
    ny, nx = mesh.shape
    if ny * nx < 4:
        return 0.0
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    ok = ~rejected & np.isfinite(mesh)
    if ok.sum() < 3:
        return 0.0
    design = np.column_stack([np.ones(ok.sum()), xx[ok], yy[ok]])
    values = mesh[ok].astype(np.float64)
    keep = np.ones(values.size, dtype=bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        resid = values - design @ coef
        scale = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        new = np.abs(resid) <= max(3.0 * scale, 1e-12)
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
    resid = mesh - (coef[0] + coef[1] * xx + coef[2] * yy)
    return float(np.mean(np.abs(resid[ok]) > tol * noise))


def frame_quality(
    image: Any,
    mask: Any = None,
    *,
    saturate: float | None = None,
    thresh: float = 5.0,
    box: int = 64,
    isolation: float | None = None,
    nonuniform_tolerance: float = 0.25,
    background: dict | None = None,
    detect: dict | None = None,
) -> FrameQuality:
    """Seeing, shape, sky, depth and defects of one exposure.

    Parameters
    ----------
    image : Frame or ndarray (ny, nx)
        A raw frame (sky not subtracted), NumPy or CuPy. A :class:`~dagpre.Frame` gives its
        mask and ``meta["saturate"]`` too.
    mask : ndarray (ny, nx), optional
        Non-zero marks unusable pixels (``MaskBit`` flags).
    saturate : float, optional
        Saturation level, ADU (default: the frame's ``meta["saturate"]``; with neither, only
        the mask's ``SATURATED`` / ``BLEED`` bits count).
    thresh : float
        Detection threshold for the source count, sigma.
    box : int
        Background mesh size, pixels (also the non-uniformity's resolution); a ``box`` in
        ``background`` wins.
    isolation : float, optional
        A star is used for the FWHM when no other detection lies within this radius, px
        (default 15 px).
    nonuniform_tolerance : float
        A mesh deviates from the fitted sky plane when off by more than this many noise RMS.
        Meshes average ``box^2`` pixels, so 0.25 RMS is many times their own scatter.
    background, detect : dict, optional
        Extra keyword arguments for :func:`~dagpre.ops.background.estimate_background` and
        :func:`~dagpre.ops.detect.detect_sources`.

    Returns
    -------
    FrameQuality

    Raises
    ------
    InputError
        For a non-2-D or empty image, or one with no usable background mesh.
    """
    from dagpre.ops.background import estimate_background
    from dagpre.ops.detect import detect_sources

    if isinstance(image, Frame):
        mask = image.mask if mask is None else mask
        saturate = image.meta.get("saturate") if saturate is None else saturate
        image = image.data
    check_image(image)
    xp = xp_of(image)
    bad = xp.zeros(image.shape, dtype=bool) if mask is None else xp.asarray(mask) != 0
    bad = bad | ~xp.isfinite(image)
    bkg = estimate_background(image, mask=bad, **{"box": box, **(background or {})})
    data = xp.where(bad, 0, bkg.subtract(image)).astype(np.float32)
    cat = detect_sources(data, thresh=thresh, err=bkg.rms, mask=bad, **(detect or {}))
    sat = xp.zeros(image.shape, dtype=bool)
    if mask is not None:
        sat = (xp.asarray(mask) & (MaskBit.SATURATED | MaskBit.BLEED)) != 0
    if saturate is not None:
        sat = sat | (xp.nan_to_num(image) >= saturate)
    fwhm = ell = math.nan
    n_psf = 0
    if len(cat):
        size = 15
        idx = isolated_stars(cat, image.shape, radius=isolation or 15.0, edge=size // 2 + 1)
        peak = np.asarray(to_host(cat["peak"]))[idx]
        if saturate is not None:
            idx = idx[peak + float(bkg.global_back) < 0.8 * saturate]
        if idx.size:
            x = np.asarray(to_host(cat["x"]))[idx]
            y = np.asarray(to_host(cat["y"]))[idx]
            stars_sat = np.asarray(to_host(sat[np.round(y).astype(int), np.round(x).astype(int)]))
            x, y = x[~stars_sat], y[~stars_sat]
            sxx, syy, sxy = (np.asarray(to_host(a)) for a in adaptive_moments(data, x, y))
            tr = 0.5 * (sxx + syy)
            dif = np.sqrt(np.maximum((0.5 * (sxx - syy)) ** 2 + sxy**2, 0))
            lam1, lam2 = tr + dif, tr - dif
            ok = np.isfinite(lam1) & (lam2 > 0)
            if ok.any():
                star_fwhm = _SIGMA_TO_FWHM * (lam1[ok] * lam2[ok]) ** 0.25
                # cosmic rays and galaxies off the stellar locus: within 3 MADs of the median
                med = np.median(star_fwhm)
                mad = 1.4826 * np.median(np.abs(star_fwhm - med)) + 1e-3 * med
                core = np.abs(star_fwhm - med) <= 3 * mad
                fwhm = float(np.median(star_fwhm[core]))
                ell = float(np.median(1 - np.sqrt(lam2[ok][core] / lam1[ok][core])))
                n_psf = int(core.sum())
    nonuni = _nonuniformity(
        np.asarray(to_host(bkg.mesh_background), dtype=np.float64),
        np.asarray(to_host(bkg.mesh_rejected), dtype=bool),
        float(bkg.global_rms),
        nonuniform_tolerance,
    )
    if not np.isfinite(bkg.global_rms) or bkg.global_rms <= 0:
        raise InputError("image", f"background RMS is {bkg.global_rms}; the frame is blank")
    return FrameQuality(
        fwhm=fwhm,
        ellipticity=ell,
        n_psf_stars=n_psf,
        background=float(bkg.global_back),
        noise=float(bkg.global_rms),
        n_sources=len(cat),
        saturated_fraction=float(xp.mean(sat)),
        nonuniformity=nonuni,
    )
