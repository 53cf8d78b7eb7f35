"""Alignment of a frame onto a reference grid: by WCS, by matched stars, or by cross-correlation.

:func:`align` is the one call the pipeline makes; the pieces it chooses between live in their
own modules and are usable alone:

- ``method="wcs"``: :func:`dagpre.ops.warp.reproject` with both frames' celestial WCS (TAN,
  TAN-SIP, TPV evaluated on the device by :mod:`dagpre.ops.wcsmap`, solved once per pair).
- ``method="stars"``: :func:`dagpre.ops.starmatch.find_transform` (triangle invariants,
  deterministic hypothesis search, least squares over all matched stars), then
  :func:`dagpre.ops.warp.warp_affine`.
- ``method="xcorr"``: :func:`dagpre.ops.xcorr.xcorr_shift` (pyDIA's FFT cross-correlation),
  a whole-pixel shift by default, so pixels are copied, not interpolated, and their noise
  stays independent.

Masks travel with the image: each output pixel gets the OR of the bits of the input pixels
its interpolation kernel touches, plus ``MaskBit.OFF_FOOTPRINT`` where it maps outside the
input frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.types import Frame, InputError

__all__ = [
    "METHODS",
    "Aligned",
    "align",
    "align_with_variance",
    "correlated_noise_factor",
    "interpolation_variance_factor",
    "subpixel_offsets",
]

METHODS = ("wcs", "stars", "xcorr")


@dataclass(frozen=True)
class Aligned:
    """A frame resampled onto the reference's pixel grid.

    Attributes
    ----------
    image : ndarray (ny, nx)
        The image on the reference grid (the reference's shape), on the input's device;
        NaN off the footprint.
    footprint : ndarray (ny, nx) float32
        1 where the output pixel maps inside the input frame, 0 outside.
    transform : Transform, PixelMap or XcorrShift
        How the frame was mapped: a :class:`~dagpre.ops.starmatch.Transform` (``"stars"``
        and ``"xcorr"``: ``.matrix`` maps the frame's (x, y) pixels to the reference's) or
        the solved :class:`~dagpre.ops.wcsmap.PixelMap` (``"wcs"``).
    mask : ndarray (ny, nx) uint8 or None
        :class:`~dagpre.types.MaskBit` flags on the reference grid, when the input had a
        mask (a :class:`~dagpre.types.Frame` always has one).
    method : str
        The method used.
    shift : XcorrShift or None
        The measured shift and its significance (``"xcorr"`` only).
    order : str
        The interpolation actually used (``"nearest"`` for a whole-pixel ``"xcorr"`` shift,
        whatever was asked).
    """

    image: Any
    footprint: Any
    transform: Any
    mask: Any = None
    method: str = "wcs"
    shift: Any = None
    order: str = "bilinear"


def _unpack(obj: Any, name: str) -> tuple[Any, Any, Any]:
    """(data, mask, wcs) of a Frame, or (array, None, None)."""
    if isinstance(obj, Frame):
        return obj.data, obj.mask, obj.wcs
    if getattr(obj, "ndim", None) != 2:
        raise InputError(name, f"expected a 2-D array or a Frame, got {type(obj).__name__}")
    return obj, None, None


def align(
    image: Any,
    reference: Any,
    method: str = "wcs",
    order: str = "bilinear",
    *,
    mask: Any = None,
    wcs: Any = None,
    reference_wcs: Any = None,
    model: str = "similarity",
    subpixel: bool = False,
    conserve_flux: bool = False,
    threads: int | None = None,
) -> Aligned:
    """Resample ``image`` onto ``reference``'s pixel grid.

    Parameters
    ----------
    image : Frame or (ny, nx) array
        The frame to align (background-subtracted or not). A :class:`Frame` brings its
        mask and WCS.
    reference : Frame or (ny0, nx0) array
        The grid to align onto; the output has its shape.
    method : {"wcs", "stars", "xcorr"}
        ``"wcs"``: through both celestial WCS (needs them); ``"stars"``: through a
        transform fitted to matched stars (detected in both images); ``"xcorr"``: a shift
        from FFT cross-correlation (translation only).
    order : {"nearest", "bilinear", "bicubic", "lanczos3"}
        Interpolation (``"bicubic"`` is reproject's spline of order 3; ``"lanczos3"`` is
        SWarp's default). Ignored by ``"xcorr"`` without ``subpixel``: a whole-pixel shift
        copies pixels, and each mask bit moves with its own pixel only.
    mask : (ny, nx) uint8 array, optional
        Bit flags of ``image`` (instead of, or in addition to, a Frame's mask).
    wcs, reference_wcs : astropy.wcs.WCS, optional
        WCS of the two frames when they are plain arrays (``"wcs"`` only).
    model : {"similarity", "affine", "shift"}
        Transform fitted by ``"stars"``.
    subpixel : bool
        ``"xcorr"``: refine the shift below a pixel (then the image is interpolated).
    conserve_flux : bool
        Scale by the pixel-area ratio so that fluxes, not surface brightness, are kept
        (for grids of different scale).
    threads : int, optional
        CPU threads (None: every CPU). Ignored on CuPy.

    Returns
    -------
    Aligned

    Raises
    ------
    InputError
        Unknown method or order; a missing WCS for ``"wcs"``; frames that do not overlap;
        too few stars to match (the message says how many were found in each); a blank
        frame.

    Examples
    --------
    >>> import numpy as np
    >>> import dagpre.simulate as sim
    >>> night = sim.night(n_frames=2, shape=(256, 256), n_stars=150, seed=3)
    >>> a, b = (f.to_frame() for f in night.frames)
    >>> out = align(b, a, method="wcs")
    >>> out.image.shape == a.data.shape, out.mask.dtype
    (True, dtype('uint8'))
    """
    from dagpre.ops.warp import reproject, warp_affine

    if method not in METHODS:
        raise InputError("method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    data, frame_mask, frame_wcs = _unpack(image, "image")
    ref_data, _, ref_wcs = _unpack(reference, "reference")
    if mask is not None and frame_mask is not None:
        mask = np.bitwise_or(frame_mask, mask) if isinstance(mask, np.ndarray) else mask
    elif mask is None:
        mask = frame_mask
    shape_out = tuple(int(v) for v in ref_data.shape)

    if method == "wcs":
        wcs = wcs if wcs is not None else frame_wcs
        reference_wcs = reference_wcs if reference_wcs is not None else ref_wcs
        for value, name in ((wcs, "wcs"), (reference_wcs, "reference_wcs")):
            if value is None:
                raise InputError(name, "method='wcs' needs a celestial WCS for both frames")
        out = reproject(
            data, wcs, reference_wcs, shape_out, order, mask=mask, return_footprint=True,
            conserve_flux=conserve_flux, threads=threads,
        )  # fmt: skip
        return Aligned(out.image, out.footprint, out.mapping, out.mask, "wcs", order=order)

    shift = None
    if method == "stars":
        from dagpre.ops.starmatch import find_transform

        transform = find_transform(data, ref_data, model=model, threads=threads)
    else:
        from dagpre.ops.starmatch import Transform
        from dagpre.ops.xcorr import xcorr_shift

        shift = xcorr_shift(data, ref_data, subpixel=subpixel, mask=mask, threads=threads)
        # image(x, y) ~ reference(x - dx, y - dy): image pixel x lands on reference x - dx
        transform = Transform(shift.matrix, model="shift")
    if method == "xcorr" and not subpixel:
        order = "nearest"  # a whole-pixel shift: every order copies the pixels; so do masks
    out = warp_affine(
        data, transform.matrix, shape_out, order, mask=mask, conserve_flux=conserve_flux,
        threads=threads,
    )  # fmt: skip
    return Aligned(out.image, out.footprint, transform, out.mask, method, shift, order)


def interpolation_variance_factor(out: Aligned, shape: tuple[int, int], order: str) -> Any:
    """Per output pixel, ``sum_i w_i^2`` of the interpolation taps (``(ny, nx)`` array).

    Resampling averages neighbouring pixels, so the resampled image's noise is smaller than
    the resampled variance map says: for locally constant variance the output variance is
    the input's times ``sum_i w_i^2`` (1 at pixel centres, 1/4 for bilinear at a pixel
    corner). Exact for ``bilinear`` and ``lanczos3`` (whose taps weight the pixels
    directly); ``nearest`` needs none (None is returned); ``bicubic``'s prefiltered spline
    has no such form and keeps factor 1 (None; its variance map is then an overestimate).
    """
    from dagpre.backend import xp_of
    from dagpre.ops.warp import _weights

    if order in ("nearest", "bicubic"):
        return None
    x_in, y_in = _input_coordinates(out.transform, shape, xp_of(out.image))
    xp = xp_of(x_in)
    factor = None
    for coord in (x_in, y_in):
        frac = coord - xp.floor(coord)
        part = sum(wk * wk for wk in _weights(order, frac, xp))
        factor = part if factor is None else factor * part
    return factor.astype(np.float32)


def _input_coordinates(transform: Any, shape: tuple[int, int], xp: Any) -> tuple[Any, Any]:
    """Input-frame (x, y) of every output pixel, ``shape`` arrays."""
    if hasattr(transform, "full"):  # a solved WCS PixelMap
        return transform.full()
    inv = np.linalg.inv(np.asarray(transform.matrix, dtype=np.float64))
    yy, xx = (a.astype(np.float64) for a in xp.mgrid[0 : shape[0], 0 : shape[1]])
    w = inv[2, 0] * xx + inv[2, 1] * yy + inv[2, 2]
    return (
        (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]) / w,
        (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]) / w,
    )


def subpixel_offsets(transform: Any, shape: tuple[int, int], x: Any, y: Any) -> tuple:
    """Fractional parts ``(fx, fy)`` of the input-frame position that each star's pixel on
    the reference grid was resampled from (the taps' offsets there).

    Parameters
    ----------
    transform : PixelMap or Transform
        An alignment's ``Aligned.transform``.
    shape : (int, int)
        The reference grid.
    x, y : ndarray (n,)
        Star positions on the reference grid, px (0-based pixel centres).
    """
    from dagpre.backend import xp_of

    xp = xp_of(x)
    x_in, y_in = _input_coordinates(transform, shape, xp)
    ny, nx = shape
    ix = xp.clip(xp.floor(xp.asarray(x) + 0.5).astype(np.int64), 0, nx - 1)
    iy = xp.clip(xp.floor(xp.asarray(y) + 0.5).astype(np.int64), 0, ny - 1)
    xs, ys = x_in[iy, ix], y_in[iy, ix]
    return xs - xp.floor(xs), ys - xp.floor(ys)


def correlated_noise_factor(order: str, fx: Any, fy: Any, stamps: Any) -> Any:
    """Per star, how much resampling changed the variance of a weighted sum over its pixels.

    A measurement ``sum_i a_i D_i`` of resampled pixels ``D_i = sum_k t_k S_(i+k)``
    (taps ``t`` at the local sub-pixel offset) has variance ``sigma^2 ||a * t||^2`` for input
    pixels of variance ``sigma^2``: between ``sigma^2 sum t^2 ||a||^2`` (what a per-pixel
    variance map says) and ``sigma^2 ||a||^2`` (a measurement much wider than the taps).
    Returned is ``||a * t||^2 / ||a||^2``, from the weights ``stamps`` (e.g. the PSF at each
    star, which a faint star's PSF fit weights its pixels by) and the taps at each star.

    Parameters
    ----------
    order : str
        The interpolation used (``Aligned.order``).
    fx, fy : ndarray (n,)
        The taps' offsets at each star (:func:`subpixel_offsets`).
    stamps : ndarray (n, s, s)
        Measurement weights per star.

    Returns
    -------
    ndarray (n,) float64
        1 for ``nearest`` (no resampling of noise) and ``bicubic`` (no tap form).
    """
    from dagpre.backend import xp_of
    from dagpre.ops.warp import _weights

    xp = xp_of(stamps)
    n = stamps.shape[0]
    if order in ("nearest", "bicubic") or n == 0:
        return xp.ones(n)
    a = stamps.astype(np.float64)
    for axis, frac in ((2, fx), (1, fy)):
        taps = _weights(order, frac, xp)
        k = len(taps)
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[axis] = (k - 1, k - 1)
        ap = xp.pad(a, pad)
        length = a.shape[axis] + k - 1
        res = 0.0
        for j, t in enumerate(taps):
            sl = [slice(None)] * 3
            sl[axis] = slice(k - 1 - j, k - 1 - j + length)
            res = res + t[:, None, None] * ap[tuple(sl)]
        a = res
    return (a * a).sum(axis=(1, 2)) / (stamps.astype(np.float64) ** 2).sum(axis=(1, 2))


def align_with_variance(
    frame: Frame, variance: Any, reference: Frame, *, return_factor: bool = False, **params: Any
) -> tuple:
    """Align ``frame`` (:func:`align`) and move its variance map with the same mapping.

    The variance is resampled with the transform found for the image (never re-solved on
    the variance map itself) and scaled by the taps' ``sum w^2``
    (:func:`interpolation_variance_factor`), so it describes the resampled pixels' noise.

    Parameters
    ----------
    frame : Frame
        The frame to align; ``variance`` is its per-pixel variance (ADU^2), same shape.
    reference : Frame
        The grid to land on.
    return_factor : bool
        Also return the interpolation factor map (None for ``nearest`` / ``bicubic``).
    **params
        :func:`align`'s keyword arguments (``method``, ``order``, ...).

    Returns
    -------
    aligned : Aligned
        As :func:`align` returns it.
    variance : ndarray (ny, nx) float32
        On the reference grid; ``inf`` off the footprint.
    factor : ndarray (ny, nx) float32 or None
        With ``return_factor``: the ``sum w^2`` the variance was scaled by. Resampled noise
        is correlated between neighbouring pixels, so a sum over many pixels (an aperture, a
        PSF fit) has the variance of ``variance / factor``, not of ``variance``.
    """
    from dagpre.backend import xp_of
    from dagpre.ops.warp import reproject, warp_affine

    out = align(frame, reference, **params)
    order = out.order
    var_in = variance.astype(np.float32)
    shape = tuple(int(v) for v in reference.shape)
    threads = params.get("threads")
    if out.method == "wcs":
        var = reproject(
            var_in, frame.wcs, reference.wcs, shape, order, mapping=out.transform,
            threads=threads,
        )  # fmt: skip
    else:
        var = warp_affine(var_in, out.transform.matrix, shape, order, threads=threads).image
    if params.get("conserve_flux", False):
        # pixels were scaled by the area ratio r, so their variance scales by r^2
        xp = xp_of(var_in)
        ones = xp.ones(var_in.shape, dtype=np.float32)
        if out.method == "wcs":
            ratio = reproject(
                ones, frame.wcs, reference.wcs, shape, "nearest", conserve_flux=True,
                mapping=out.transform, threads=threads,
            )  # fmt: skip
        else:
            ratio = warp_affine(
                ones, out.transform.matrix, shape, "nearest", conserve_flux=True,
                threads=threads,
            ).image  # fmt: skip
        var = var * ratio**2
    factor = interpolation_variance_factor(out, shape, order)
    if factor is not None:
        var = var * factor
    xp = xp_of(out.image)
    # Lanczos' negative lobes ring below zero beside a bright star's variance peak: a
    # variance is never negative (0 marks the pixel unusable downstream)
    var = xp.maximum(var, np.float32(0))
    var = xp.where(out.footprint == 0, np.float32(np.inf), var).astype(np.float32)
    return (out, var, factor) if return_factor else (out, var)
