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

__all__ = ["METHODS", "Aligned", "align"]

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
    """

    image: Any
    footprint: Any
    transform: Any
    mask: Any = None
    method: str = "wcs"
    shift: Any = None


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
        return Aligned(out.image, out.footprint, out.mapping, out.mask, "wcs")

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
    return Aligned(out.image, out.footprint, transform, out.mask, method, shift)
