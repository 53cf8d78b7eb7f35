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
from dagpre.ops.reference import Reference
from dagpre.types import DagpreError, Frame, InputError, MaskBit

__all__ = [
    "Failed",
    "FrameState",
    "Reference",
    "align_step",
    "background_step",
    "candidates_step",
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
    subtraction : Subtraction or None
        The subtraction itself (its kernel, for PSF photometry through it).
    sum_variance : ndarray or None
        After alignment: ``variance`` without the resampling's ``sum w^2`` reduction (the
        input pixels' variance on the new grid); light-curve errors start from it.
    resampling : (transform, order) or None
        After alignment: how the pixels were resampled, for
        :func:`~dagpre.ops.align.correlated_noise_factor`.
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
    subtraction: Any = None
    sum_variance: Any = None
    resampling: Any = None


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


@_guarded("align")
def align_step(state: FrameState, reference: Reference, params: Mapping[str, Any]) -> FrameState:
    """Resample onto the reference grid (:func:`~dagpre.ops.align.align`), variance too.

    The variance map is moved with the same mapping and scaled by the taps' ``sum w^2``
    (:func:`~dagpre.ops.align.align_with_variance`), so it describes the resampled pixels'
    noise.
    """
    from dagpre.ops.align import align_with_variance

    ref = Frame(reference.image, reference.mask, wcs=reference.wcs, meta={})  # the grid to land on
    out, var, factor = align_with_variance(
        state.frame, state.variance, ref, return_factor=True, **params
    )
    xp = xp_of(out.image)
    off = out.footprint == 0
    mask = out.mask | xp.where(off, np.uint8(MaskBit.OFF_FOOTPRINT), np.uint8(0))
    image = xp.where(off, np.float32(0), out.image).astype(np.float32)
    frame = Frame(image, mask.astype(np.uint8), state.frame.header, reference.wcs,
                  dict(state.frame.meta))  # fmt: skip
    sum_var = var if factor is None else var / factor  # var is already inf off the footprint
    return replace(
        state, frame=frame, variance=var, footprint=out.footprint, sum_variance=sum_var,
        resampling=(out.transform, out.order),
    )  # fmt: skip


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
        difference_mask=sub.mask, to_reference_units=factor, subtraction=sub,
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
    """The frames-table quality row of a raw frame (small: gathered by the client).

    ``params``: ``background`` and ``detect`` (the workflow's step settings, passed to
    :func:`~dagpre.ops.quality.frame_quality`) and ``model`` (a saved
    :class:`~dagpre.ml.quality.QualityModel`, optional) with ``threshold`` and
    ``max_bad_fraction``: its frame score goes to ``quality``, the bad area to
    ``bad_fraction`` and the verdict to ``good``.
    """
    from dagpre.ops.quality import frame_quality

    detect = {k: v for k, v in params.get("detect", {}).items() if k != "thresh"}
    q = frame_quality(
        state.frame, background=params.get("background", {}), detect=detect,
        thresh=params.get("detect", {}).get("thresh", 5.0),
    )  # fmt: skip
    row = {"index": state.index, **q.as_dict(), "good": True}
    model_path = params.get("model")
    if model_path:
        from dagpre.ml.quality import QualityModel, score_frame

        model = QualityModel.load(model_path)
        scored = score_frame(
            model, state.frame.data, state.frame.mask,
            **{k: params[k] for k in ("threshold", "max_bad_fraction") if k in params},
        )  # fmt: skip
        row.update(quality=scored["quality"], bad_fraction=scored["bad_fraction"],
                   good=bool(scored["good"]))  # fmt: skip
    return row


def _noise_factors(state: FrameState, reference: Reference, radius: float, shape) -> tuple:
    """Per source, the variance factor of resampled noise for the aperture and the PSF fit.

    :func:`~dagpre.ops.align.correlated_noise_factor` with the reference PSF at the field
    centre (a faint star's fit weights) and a disc of ``radius`` (the aperture), at every
    source's own sub-pixel offset.
    """
    from dagpre.ops.align import correlated_noise_factor, subpixel_offsets

    x, y = reference.sources["x"], reference.sources["y"]
    n = len(x)
    if state.resampling is None or n == 0:
        return np.ones(n), np.ones(n)
    transform, order = state.resampling
    xp = xp_of(state.difference)
    fx, fy = subpixel_offsets(transform, shape, xp.asarray(x), xp.asarray(y))
    h = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    disc = xp.asarray((xx * xx + yy * yy <= radius * radius).astype(np.float64))
    f_aper = correlated_noise_factor(order, fx, fy, xp.broadcast_to(disc, (n, *disc.shape)))
    f_psf = f_aper
    if reference.psf is not None:
        stamp = reference.psf.stamp() if hasattr(reference.psf, "stamp") else reference.psf
        stamp = xp.asarray(stamp, dtype=np.float64)
        f_psf = correlated_noise_factor(order, fx, fy, xp.broadcast_to(stamp, (n, *stamp.shape)))
    return np.asarray(to_host(f_aper)), np.asarray(to_host(f_psf))


@_guarded("photometry")
def photometry_step(state: FrameState, reference: Reference, params: Mapping[str, Any]) -> dict:
    """A light-curve column: every reference source measured on this frame.

    Without subtraction: aperture fluxes on the aligned frame (``flux``; ``flux_aper`` the
    same). With it (pyDIA's light curves): the difference flux by PSF fitting
    (:func:`~dagpre.ops.psfphot.psf_photometry` with the reference's PSF model through the
    fitted kernel when the reference was convolved, so that it is on the reference's
    photometric scale) plus the source's reference PSF flux gives ``flux``; the aperture
    flux on the difference, scaled to the reference, plus the reference aperture flux gives
    ``flux_aper``. Errors are the science frame's noise as a sum over pixels sees it
    (:attr:`FrameState.sum_variance`): the point-to-point scatter of a light curve. The
    reference's own noise is common to every point (an offset of the whole light curve) and
    is the reference flux's error, ``fluxerr_psf`` / ``fluxerr_aper`` of the sources table.
    """
    from dagpre.ops.photometry import aperture_photometry
    from dagpre.ops.psfphot import psf_photometry

    radii = params.get("radii", [5.0])
    x = reference.sources["x"]
    y = reference.sources["y"]
    if state.difference is None:  # no subtraction: fluxes measured on the aligned frame
        image, var, mask = state.frame.data, state.variance, state.frame.mask
    else:
        image, mask = state.difference, state.difference_mask
        # point-to-point noise: the science frame's, as sums over pixels see it
        var = state.sum_variance if state.sum_variance is not None else state.variance
    err = xp_of(var).sqrt(var) if var is not None else state.metrics.get("noise")
    phot = aperture_photometry(image, x, y, float(radii[0]), err=err, mask=mask != 0, subpix=0)
    flux = np.asarray(to_host(phot.flux))
    flux_err = np.asarray(to_host(phot.fluxerr))
    flag = np.asarray(to_host(phot.flag)).astype(np.int32)
    if state.difference is None:
        return {"flux": flux, "flux_err": flux_err, "flag": flag, "flux_aper": flux,
                "fluxerr_aper": flux_err}  # fmt: skip
    sub = state.subtraction
    units = state.to_reference_units
    f_aper, f_psf = _noise_factors(state, reference, float(radii[0]), image.shape)
    flux_err = flux_err * np.sqrt(f_aper)
    aper = reference.sources["flux_aper"] + flux * units
    # convolving the science scales its noise by the kernel sum (the photometric scale)
    noise_scale = units
    if sub is not None and sub.convolved == "science":
        noise_scale = np.asarray(to_host(sub.scale_at(x, y)))
    out = {"flux_aper": aper, "fluxerr_aper": flux_err * noise_scale}
    if reference.psf is None or "flux_psf" not in reference.sources:
        return {**out, "flux": aper, "flux_err": out["fluxerr_aper"], "flag": flag}
    kernel = sub if sub is not None and sub.convolved == "reference" else None
    fit = psf_photometry(image, reference.psf, x, y, variance=var, kernel=kernel, mask=mask)
    out["flux"] = reference.sources["flux_psf"] + np.asarray(to_host(fit.flux))
    fit_err = np.asarray(to_host(fit.fluxerr)) * np.sqrt(f_psf)
    out["flux_err"] = fit_err if kernel is not None else fit_err * noise_scale
    out["flag"] = np.asarray(to_host(fit.flag)).astype(np.int32)
    return out


@_guarded("detect")
def candidates_step(state: FrameState, reference: Reference, params: Mapping[str, Any]) -> dict:
    """Detections on the difference image (:func:`~dagpre.ops.candidates.difference_detections`)."""
    from dagpre.ops.candidates import difference_detections

    if state.difference is None:
        raise InputError("candidates", "needs the subtract step (detections on the difference)")
    keys = ("thresh", "minarea", "negative", "min_snr", "min_fwhm_ratio")
    det = difference_detections(
        state.difference, state.difference_variance, state.difference_mask,
        psf=reference.psf, **{k: params[k] for k in keys if k in params},
    )  # fmt: skip
    return {"n_sources": len(det["x"]), "fwhm": math.nan, "detections": det}


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
    if "detections" in found:
        zs.write_detections(root, index, found["detections"])
    row = {k: v for k, v in state.metrics.items() if k in zs.FRAME_COLUMNS}
    zs.write_frame_row(root, index, row)  # quality columns come from the quality pass
    zs.set_frame_status(root, index, "done")
    return {"index": index, "status": "done", "error": "", **row,
            "detections": found["n_sources"]}  # fmt: skip
