"""dagpre: nights of raw astronomical frames to AI-ready products, on NumPy or CuPy.

Eager use, one step at a time (names are the public contract, see DESIGN.md)::

    import dagpre as dp
    frame = dp.read_fits("night/frame_000.fits")
    night = dp.simulate.night(n_frames=5, shape=(512, 512), seed=1)

Sub-packages and heavy dependencies load on first use, so ``import dagpre`` stays fast and
never imports CuPy.
"""

from __future__ import annotations

import importlib

from dagpre._version import __version__
from dagpre.types import Catalog, DagpreError, Frame, InputError, MaskBit

# public name -> "module:attribute" (or "module" for a sub-module), loaded on first access
_LAZY = {
    "read_fits": "dagpre.io.fits:read_fits",
    "write_fits": "dagpre.io.fits:write_fits",
    "simulate": "dagpre.simulate",
    "backend": "dagpre.backend",
    "estimate_background": "dagpre.ops.background:estimate_background",
    "Background": "dagpre.ops.background:Background",
    "zscale": "dagpre.ops.transforms:zscale",
    "interval": "dagpre.ops.transforms:interval",
    "stretch": "dagpre.ops.transforms:stretch",
    "histeq": "dagpre.ops.transforms:histeq",
    "quicklook_png": "dagpre.ops.transforms:quicklook_png",
    "median_flatten": "dagpre.ops.deconvolve:median_flatten",
    "richardson_lucy": "dagpre.ops.deconvolve:richardson_lucy",
    "mask_saturation": "dagpre.ops.masks:mask_saturation",
    "detect_sources": "dagpre.ops.detect:detect_sources",
    "aperture_photometry": "dagpre.ops.photometry:aperture_photometry",
    "ellipse_photometry": "dagpre.ops.photometry:ellipse_photometry",
    "kron_photometry": "dagpre.ops.photometry:kron_photometry",
    "isophotal_photometry": "dagpre.ops.photometry:isophotal_photometry",
    "flux_radius": "dagpre.ops.photometry:flux_radius",
    "kron_radius": "dagpre.ops.photometry:kron_radius",
    "winpos": "dagpre.ops.photometry:winpos",
    "find_transform": "dagpre.ops.starmatch:find_transform",
    "find_stars": "dagpre.ops.starmatch:find_stars",
    "Transform": "dagpre.ops.starmatch:Transform",
    "xcorr_shift": "dagpre.ops.xcorr:xcorr_shift",
    "XcorrShift": "dagpre.ops.xcorr:XcorrShift",
    "reproject": "dagpre.ops.warp:reproject",
    "warp_affine": "dagpre.ops.warp:warp_affine",
    "warp_coords": "dagpre.ops.warp:warp_coords",
    "Warped": "dagpre.ops.warp:Warped",
    "pixel_map": "dagpre.ops.wcsmap:pixel_map",
    "solve_pixel_map": "dagpre.ops.wcsmap:solve_pixel_map",
    "pixel_to_pixel": "dagpre.ops.wcsmap:pixel_to_pixel",
    "align": "dagpre.ops.align:align",
    "Aligned": "dagpre.ops.align:Aligned",
    "subtract": "dagpre.ops.subtract:subtract",
    "Subtraction": "dagpre.ops.subtract:Subtraction",
    "psf_photometry": "dagpre.ops.psfphot:psf_photometry",
    "PSFPhotometry": "dagpre.ops.psfphot:PSFPhotometry",
    "frame_quality": "dagpre.ops.quality:frame_quality",
    "relative_transmission": "dagpre.ops.transmission:relative_transmission",
    "FrameQuality": "dagpre.ops.quality:FrameQuality",
    "build_reference": "dagpre.ops.reference:build_reference",
    "Reference": "dagpre.ops.reference:Reference",
    "variability": "dagpre.ops.variability:variability",
    "difference_detections": "dagpre.ops.candidates:difference_detections",
    "match_candidates": "dagpre.ops.candidates:match_candidates",
    "refine_position": "dagpre.ops.refine:refine_position",
    "build_psf": "dagpre.ops.psf:build_psf",
    "select_psf_stars": "dagpre.ops.psf:select_psf_stars",
    "PSFModel": "dagpre.ops.psf:PSFModel",
    "ml": "dagpre.ml",
    "QualityModel": "dagpre.ml.quality:QualityModel",
}

__all__ = [
    "Catalog",
    "DagpreError",
    "Frame",
    "InputError",
    "MaskBit",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    try:
        target = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dagpre' has no attribute {name!r}") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
