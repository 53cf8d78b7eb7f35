"""The pipeline's per-frame steps: thin wrappers over the eager functions, one task each.

Each step takes the previous step's result and the workflow's keyword arguments for the
eager function it calls, and returns a small frozen result. A step whose input is a
:class:`Failed` passes it on untouched, and a step that fails returns a :class:`Failed` with
the step's name and a one-line reason instead of raising, so a bad frame is recorded as
failed by the write step and the night goes on. Errors that dagpre raises on purpose
(:class:`~dagpre.types.DagpreError`) and file errors (``OSError``) are expected failures; any
other exception is recorded as an internal error with its type, so that it is not mistaken
for bad data.

Arrays stay on the device they were read to (CuPy on a GPU worker) from step to step;
only the write step copies to the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.types import DagpreError, Frame, InputError, MaskBit

__all__ = [
    "Failed",
    "FrameState",
    "Reference",
    "align_step",
    "background_step",
    "detect_step",
    "mask_step",
    "photometry_step",
    "quality_step",
    "read_step",
    "subtract_step",
    "write_step",
]


@dataclass(frozen=True)
class Failed:
    """A frame that could not go on: which step, and why (one line)."""

    step: str
    reason: str

    def __str__(self) -> str:
        return f"{self.step}: {self.reason}"


@dataclass(frozen=True)
class FrameState:
    """A frame between steps: pixels and mask (on the worker's device) and what is known.

    Attributes
    ----------
    index : int
        Frame index in the store.
    frame : Frame
        Pixels (background-subtracted after the background step, on the reference grid
        after the align step), mask and header.
    variance : ndarray or None
        Per-pixel variance (ADU^2): background noise plus the source Poisson term.
    footprint : ndarray or None
        After alignment: 1 where the pixel maps inside the original frame.
    metrics : dict
        Frame-table values found so far (``background``, ``noise``, ``fwhm``, ...).
    difference, difference_variance, difference_mask : ndarray or None
        After the subtract step: the difference image, its variance and mask.
    to_reference_units : ndarray or None
        Per reference source, the factor that turns a flux on the difference into the
        reference's photometric scale (1 / the photometric scale when the reference was
        convolved, 1 when the science was).
    """

    index: int
    frame: Frame
    variance: Any = None
    footprint: Any = None
    metrics: Mapping[str, Any] = None
    difference: Any = None
    difference_variance: Any = None
    difference_mask: Any = None
    to_reference_units: Any = None


@dataclass(frozen=True)
class Reference:
    """The reference every frame is aligned to and measured against."""

    image: Any
    mask: Any
    wcs: Any
    sources: Mapping[str, np.ndarray]
    frames: tuple
    noise: float
    variance: Any = None


def _guarded(step: str) -> Callable:
    """Pass a Failed input through; turn an exception into a Failed for ``step``."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                if isinstance(value, Failed):
                    return value
            try:
                return fn(*args, **kwargs)
            except (DagpreError, OSError) as err:
                return Failed(step, " ".join(str(err).split()))
            except Exception as err:  # a bug, not bad data: say so, keep the night going
                return Failed(step, f"internal error {type(err).__name__}: {err}")

        return run

    return wrap


@_guarded("read")
def read_step(index: int, path: str, hdu: Any = None, device: str = "auto") -> FrameState:
    """Read frame ``index`` from ``path``; an all-NaN or constant frame is refused."""
    from dagpre.io.fits import read_fits

    frame = read_fits(path, hdu=hdu, device=device)
    good = frame.mask == 0
    if not bool(good.any()):
        raise InputError(path, "no usable pixel (all NaN or masked)")
    values = frame.data[good]
    if float(values.max()) == float(values.min()):
        raise InputError(path, f"blank frame (every pixel is {float(values.min()):g})")
    meta = frame.meta
    metrics = {"mjd": meta.get("mjd"), "exptime": meta.get("exptime")}
    return FrameState(index, frame, metrics={k: v for k, v in metrics.items() if v is not None})


@_guarded("mask")
def mask_step(state: FrameState, params: Mapping[str, Any]) -> FrameState:
    """OR the saturation and bleed-trail mask (:func:`~dagpre.ops.masks.mask_saturation`)."""
    from dagpre.ops.masks import mask_saturation

    frame = state.frame
    if params.get("saturate") is None and frame.meta.get("saturate") is None:
        return state  # no saturation level known: nothing to flag (said in the docs)
    mask = mask_saturation(frame, **params)
    return replace(state, frame=replace(frame, mask=frame.mask | mask))


@_guarded("background")
def background_step(state: FrameState, params: Mapping[str, Any]) -> FrameState:
    """Subtract :func:`~dagpre.ops.background.estimate_background`; variance from its RMS."""
    from dagpre.ops.background import estimate_background

    frame = state.frame
    bkg = estimate_background(frame.data, mask=frame.mask != 0, **params)
    data = bkg.subtract(frame.data)
    variance = bkg.rms.astype(np.float32) ** 2
    gain = frame.meta.get("gain")
    if gain:
        xp = xp_of(data)
        variance = variance + xp.maximum(data, 0) / np.float32(gain)
    metrics = {
        **state.metrics,
        "background": float(bkg.global_back),
        "noise": float(bkg.global_rms),
    }
    return replace(state, frame=replace(frame, data=data), variance=variance, metrics=metrics)


def _used_order(out, params: Mapping[str, Any]) -> str:
    """The interpolation :func:`~dagpre.ops.align.align` actually used."""
    if out.method == "xcorr" and not params.get("subpixel", False):
        return "nearest"
    return params.get("order", "bilinear")


def _interpolation_variance_factor(out, shape, order: str):
    """Per output pixel, ``sum_i w_i^2`` of the interpolation taps (``(ny, nx)`` array).

    Resampling averages neighbouring pixels, so the resampled image's noise is smaller than
    the resampled variance map says: for locally constant variance the output variance is
    the input's times ``sum_i w_i^2`` (1 at pixel centres, 1/4 for bilinear at a pixel
    corner). Exact for ``bilinear`` and ``lanczos3`` (whose taps weight the pixels
    directly); ``nearest`` needs none; ``bicubic``'s prefiltered spline has no such form
    and keeps factor 1 (its variance map is then an overestimate).
    """
    from dagpre.ops.warp import _weights

    if order in ("nearest", "bicubic"):
        return None
    if hasattr(out.transform, "full"):  # a solved WCS PixelMap
        x_in, y_in = out.transform.full()
    else:
        xp = xp_of(out.image)
        inv = np.linalg.inv(np.asarray(out.transform.matrix, dtype=np.float64))
        yy, xx = (a.astype(np.float64) for a in xp.mgrid[0 : shape[0], 0 : shape[1]])
        w = inv[2, 0] * xx + inv[2, 1] * yy + inv[2, 2]
        x_in = (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]) / w
        y_in = (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]) / w
    xp = xp_of(x_in)
    factor = None
    for coord in (x_in, y_in):
        frac = coord - xp.floor(coord)
        part = sum(wk * wk for wk in _weights(order, frac, xp))
        factor = part if factor is None else factor * part
    return factor.astype(np.float32)


@_guarded("align")
def align_step(state: FrameState, reference: Reference, params: Mapping[str, Any]) -> FrameState:
    """Resample onto the reference grid (:func:`~dagpre.ops.align.align`), variance too.

    The variance map is resampled the same way and scaled by the taps' ``sum w^2`` (see
    :func:`_interpolation_variance_factor`), so it describes the resampled pixels' noise.
    """
    from dagpre.ops.align import align

    ref = Frame(reference.image, reference.mask, wcs=reference.wcs, meta={})  # the grid to land on
    out = align(state.frame, ref, **params)
    var = align(replace(state.frame, data=state.variance.astype(np.float32)), ref, **params).image
    factor = _interpolation_variance_factor(out, ref.shape, _used_order(out, params))
    if factor is not None:
        var = var * factor
    xp = xp_of(out.image)
    off = out.footprint == 0
    mask = out.mask | xp.where(off, np.uint8(MaskBit.OFF_FOOTPRINT), np.uint8(0))
    image = xp.where(off, np.float32(0), out.image).astype(np.float32)
    frame = Frame(image, mask.astype(np.uint8), state.frame.header, reference.wcs,
                  dict(state.frame.meta))  # fmt: skip
    return replace(state, frame=frame, variance=xp.where(off, np.inf, var), footprint=out.footprint)


@_guarded("subtract")
def subtract_step(state: FrameState, reference: Reference, params: Mapping[str, Any]):
    """Difference with the reference (:func:`~dagpre.ops.subtract.subtract`)."""
    from dagpre.ops.subtract import subtract

    frame = state.frame
    sub = subtract(
        frame.data, reference.image, science_mask=frame.mask, reference_mask=reference.mask,
        science_variance=state.variance, reference_variance=reference.variance, **params,
    )  # fmt: skip
    x, y = reference.sources["x"], reference.sources["y"]
    factor = 1.0 / sub.scale_at(x, y) if sub.convolved == "reference" else np.ones(x.shape)
    return replace(
        state, difference=sub.difference, difference_variance=sub.variance,
        difference_mask=sub.mask, to_reference_units=factor,
    )  # fmt: skip


@_guarded("detect")
def detect_step(state: FrameState, params: Mapping[str, Any]) -> dict:
    """Detect on the frame (:func:`~dagpre.ops.detect.detect_sources`); count and FWHM."""
    from dagpre.ops.detect import detect_sources

    frame = state.frame
    var = state.variance
    err = xp_of(var).sqrt(var) if var is not None else state.metrics.get("noise")
    cat = detect_sources(frame.data, mask=frame.mask != 0, err=err, **{"thresh": 5.0, **params})
    flag = np.asarray(to_host(cat["flag"])) if len(cat) else np.zeros(0)
    fwhm = np.asarray(to_host(cat["fwhm"])) if len(cat) else np.zeros(0)
    clean = fwhm[(flag == 0) & (fwhm > 0)]
    return {
        "n_sources": len(cat),
        "fwhm": float(np.median(clean)) if clean.size else math.nan,
        "catalog": {k: np.asarray(to_host(v)) for k, v in cat.items()},
    }


@_guarded("quality")
def quality_step(state: FrameState, params: Mapping[str, Any]) -> dict:
    """The frame-table metrics used to choose the reference (small: gathered)."""
    found = detect_step(state, params)
    if isinstance(found, Failed):
        return Failed("quality", found.reason)
    return {
        "index": state.index,
        "fwhm": found["fwhm"],
        "noise": state.metrics["noise"],
        "background": state.metrics["background"],
        "n_sources": found["n_sources"],
    }


@_guarded("photometry")
def photometry_step(state: FrameState, reference: Reference, params: Mapping[str, Any]) -> dict:
    """Aperture fluxes at every reference source on the aligned frame: a light-curve column."""
    from dagpre.ops.photometry import aperture_photometry

    radii = params.get("radii", [5.0])
    x = reference.sources["x"]
    y = reference.sources["y"]
    if state.difference is None:  # no subtraction: fluxes measured on the aligned frame
        image, var, mask = state.frame.data, state.variance, state.frame.mask
    else:
        image, var, mask = state.difference, state.difference_variance, state.difference_mask
    err = xp_of(var).sqrt(var) if var is not None else state.metrics.get("noise")
    phot = aperture_photometry(image, x, y, float(radii[0]), err=err, mask=mask != 0, subpix=0)
    flux = np.asarray(to_host(phot.flux))
    flux_err = np.asarray(to_host(phot.fluxerr))
    if state.difference is not None:  # total flux on the reference's scale
        flux = reference.sources["flux_aper"] + flux * state.to_reference_units
        flux_err = flux_err * state.to_reference_units
    return {
        "flux": flux,
        "flux_err": flux_err,
        "flag": np.asarray(to_host(phot.flag)).astype(np.int32),
    }


def write_step(store_path: str, index: int, state: Any, found: Any, phot: Any) -> dict:
    """Write a frame's products and metrics, then its status; a Failed is recorded as such.

    The status is written last, so a frame interrupted mid-write stays ``pending``.
    Returns the frame's summary row (small: gathered by the client).
    """
    from dagpre.io import store as zs

    root = zs.open_store(store_path)
    failed = next((v for v in (state, found, phot) if isinstance(v, Failed)), None)
    if failed is not None:
        zs.set_frame_status(root, index, "failed", str(failed))
        return {"index": index, "status": "failed", "error": str(failed)}
    products = {"aligned": state.frame.data, "mask": state.frame.mask}
    variance = state.variance
    if state.difference is not None:
        products["difference"] = state.difference
        products["mask"] = state.frame.mask | state.difference_mask
        variance = state.difference_variance
    if variance is not None:
        var = to_host(variance)
        products["variance"] = np.where(np.isfinite(var), var, np.nan)
    zs.write_frame(root, index, products)
    if "lightcurves" in root and phot is not None:
        zs.write_lightcurve_column(root, index, phot)
    row = {k: v for k, v in state.metrics.items() if k in zs.FRAME_COLUMNS}
    row.update(n_sources=found["n_sources"], fwhm=found["fwhm"])
    zs.write_frame_row(root, index, row)
    zs.set_frame_status(root, index, "done")
    return {"index": index, "status": "done", "error": "", **row}
