"""The reference image of a field: best frames chosen, aligned, scaled, combined, measured.

:func:`build_reference` is pyDIA's reference step made whole:

1. **Choice**: every frame's :func:`~dagpre.ops.quality.frame_quality` (or rows given);
   frames with a non-uniform sky (``nonuniformity > max_nonuniformity``: shutter shadows,
   cloud edges), trailed or elongated stars (``ellipticity > max_ellipticity``), too few
   PSF stars or no FWHM are left out; the rest rank by FWHM, then by background. Or the
   frames the caller names (``select``).
2. **Grid and scale**: the best frame is the grid; the next candidates are aligned onto it
   (:func:`~dagpre.ops.align.align_with_variance`) and their photometric scale against it
   is the median flux ratio of its bright isolated stars (large apertures, so seeing does not
   matter). Frames whose scale is off the candidates' median by more than
   ``max_scale_offset`` (a cloud, a shutter failure: ``0.2`` is a 20 % loss of light) are
   left out and the next candidate is tried. Kept frames are divided by their scale, so the
   reference is on the photometric scale of the best kept frame.
3. **Combination**: ``"median"`` (NaN-aware; variance ``pi/2`` times that of the mean for
   three or more frames) or ``"mean_clip"`` (per pixel, values farther than ``clip_sigma``
   of their own noise from the median are dropped, the rest averaged; variance ``sum var /
   m^2``). Masked and off-footprint pixels take no part; a pixel no frame covers is
   ``OFF_FOOTPRINT`` in the mask and 0 in the image.
4. **Sources**: detected on the reference (``detect``), or an existing catalog (RA/Dec,
   e.g. Gaia or the survey's own) placed through the WCS and refined by windowed centroids
   (pyDIA offers both); PSF model (:func:`~dagpre.ops.psf.build_psf`) from isolated stars;
   PSF-fit and aperture fluxes of every source.

Conventions: arrays are indexed ``[y, x]``; positions are (x, y) pixel order with 0-based
pixel centres.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.types import Frame, InputError, MaskBit

__all__ = [
    "COMBINE",
    "Reference",
    "build_reference",
    "prepare_frame",
    "rank_frames",
    "reference_photometry",
]

COMBINE = ("median", "mean_clip")


@dataclass(frozen=True, eq=False)
class Reference:
    """A field's reference image and what was measured on it.

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        Background-subtracted combined image (ADU, the best kept frame's photometric scale).
    mask : ndarray (ny, nx) uint8
        :class:`~dagpre.types.MaskBit` flags where no frame contributed (0 elsewhere).
    wcs : astropy.wcs.WCS or None
        WCS of the grid (the best frame's).
    catalog : dict of ndarray
        One row per source: ``x, y`` (px), ``ra, dec`` (deg, with a WCS), ``flux_aper,
        fluxerr_aper`` (ADU in the aperture), ``flux_psf, fluxerr_psf, flag_psf`` (PSF fit;
        NaN without a PSF model), and the detection columns when sources were detected.
    frames : tuple
        The frames combined, best first (their index in the input, or their path).
    noise : float
        Background RMS of the combined image, ADU.
    variance : ndarray (ny, nx) float32 or None
        Per-pixel variance (ADU^2), ``inf`` where no frame contributed.
    psf : PSFModel or None
        The empirical PSF of the reference (:mod:`dagpre.ops.psf`).
    quality : tuple of dict
        Per input frame, its :func:`~dagpre.ops.quality.frame_quality` row (when computed).
    scales : tuple of float
        Photometric scale of each combined frame against the best (same order as ``frames``).
    notes : tuple of str
        What was left out and why (e.g. no PSF model with ``psf="auto"`` and too few stars).
    """

    image: Any
    mask: Any
    wcs: Any
    catalog: Mapping[str, np.ndarray]
    frames: tuple
    noise: float
    variance: Any = None
    psf: Any = None
    quality: tuple = ()
    scales: tuple = ()
    notes: tuple = ()

    @property
    def sources(self) -> Mapping[str, np.ndarray]:
        """The catalog (the store calls it the reference's sources table)."""
        return self.catalog

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the reference grid."""
        return tuple(int(v) for v in self.image.shape)


def _as_frame(item: Any, index: int, hdu: Any = None) -> Frame:
    if isinstance(item, Frame):
        return item
    if isinstance(item, (str, Path)):
        from dagpre.io.fits import read_fits

        return read_fits(item, hdu=hdu)
    if hasattr(item, "to_frame"):  # a simulated frame
        return item.to_frame()
    raise InputError(f"frames[{index}]", f"expected a Frame or a FITS path, got {type(item)}")


def prepare_frame(
    frame: Frame, *, mask: Mapping[str, Any] | None = None, background: Mapping | None = None
) -> tuple[Frame, Any, float]:
    """Mask saturation, subtract the background, and make the variance map of one frame.

    Parameters
    ----------
    frame : Frame
        A raw frame.
    mask : dict, optional
        :func:`~dagpre.ops.masks.mask_saturation` keyword arguments; applied when the frame
        has a saturation level (``meta["saturate"]``) or ``mask`` names one.
    background : dict, optional
        :func:`~dagpre.ops.background.estimate_background` keyword arguments.

    Returns
    -------
    frame : Frame
        Background-subtracted, mask updated.
    variance : ndarray (ny, nx) float32
        Sky RMS squared plus the sources' Poisson term ``max(data, 0) / gain`` (ADU^2).
    noise : float
        Global sky RMS, ADU.
    """
    from dagpre.ops.background import estimate_background
    from dagpre.ops.masks import mask_saturation

    if mask is not None and (mask.get("saturate") is not None or frame.meta.get("saturate")):
        frame = replace(frame, mask=frame.mask | mask_saturation(frame, **mask))
    bkg = estimate_background(frame.data, mask=frame.mask != 0, **(background or {}))
    data = bkg.subtract(frame.data)
    variance = bkg.rms.astype(np.float32) ** 2
    gain = frame.meta.get("gain")
    if gain:
        variance = variance + xp_of(data).maximum(data, 0) / np.float32(gain)
    return replace(frame, data=data), variance.astype(np.float32), float(bkg.global_rms)


def rank_frames(
    quality: Sequence[Mapping[str, Any] | None],
    *,
    max_nonuniformity: float = 0.05,
    max_ellipticity: float = 0.2,
    min_psf_stars: int = 5,
) -> list[int]:
    """Indices of the frames usable for a reference, best first.

    A frame is usable when its quality row exists (None for a frame that failed), has a
    finite FWHM from at least ``min_psf_stars`` stars, ``nonuniformity <=
    max_nonuniformity`` and ``ellipticity <= max_ellipticity`` (missing keys pass). Usable
    frames rank by FWHM (to 0.01 px), then background, then noise, then index.
    """
    ok = []
    for i, row in enumerate(quality):
        if not isinstance(row, Mapping):
            continue
        fwhm = row.get("fwhm", math.nan)
        if not np.isfinite(fwhm) or row.get("n_psf_stars", min_psf_stars) < min_psf_stars:
            continue
        if row.get("nonuniformity", 0.0) > max_nonuniformity:
            continue
        if row.get("ellipticity", 0.0) > max_ellipticity:
            continue
        key = (round(float(fwhm), 2), row.get("background", 0.0), row.get("noise", 0.0), i)
        ok.append((key, i))
    return [i for _, i in sorted(ok)]


def _scale_stars(image: Any, variance: Any, mask: Any, fwhm: float) -> tuple[Any, Any, float]:
    """Bright isolated stars of the grid frame for flux ratios: (x, y, aperture radius)."""
    from dagpre.ops.detect import detect_sources
    from dagpre.ops.quality import isolated_stars

    xp = xp_of(image)
    cat = detect_sources(image, thresh=10.0, err=xp.sqrt(variance), mask=mask != 0)
    if not len(cat):
        return np.zeros(0), np.zeros(0), 1.0
    radius = float(max(3.0 * fwhm, 5.0)) if np.isfinite(fwhm) else 8.0
    idx = isolated_stars(cat, image.shape, radius=2 * radius, edge=radius + 2)
    flux = np.asarray(to_host(cat["flux"]))[idx]
    order = np.argsort(-flux)[:200]
    idx = idx[order]
    return np.asarray(to_host(cat["x"]))[idx], np.asarray(to_host(cat["y"]))[idx], radius


def _flux_ratio(base_flux: np.ndarray, image: Any, mask: Any, x, y, radius: float) -> float:
    """Median flux ratio of the grid frame's scale stars on ``image`` (1 with under 3)."""
    flux = _ratio_flux(image, mask, x, y, radius)
    ok = np.isfinite(flux) & (base_flux > 0)
    return float(np.median(flux[ok] / base_flux[ok])) if ok.sum() >= 3 else 1.0


def _combine(stack: list, variances: list, combine: str, clip_sigma: float):
    """(image, variance, count) of the aligned, scaled frames (NumPy, NaN = no data)."""
    cube = np.stack(stack)
    vcube = np.stack(variances)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: flagged by the caller
        count = np.sum(np.isfinite(cube), axis=0)
        if len(stack) == 1:
            return cube[0], vcube[0], count
        med = np.nanmedian(cube, axis=0)
        if combine == "median":
            mean_var = np.nanmean(vcube, axis=0) / np.maximum(count, 1)
            # variance of a median of n values: pi/2 times that of their mean (n >= 3)
            return med, mean_var * np.where(count >= 3, np.pi / 2, 1.0), count
        keep = np.isfinite(cube) & (np.abs(cube - med) <= clip_sigma * np.sqrt(vcube))
        keep |= np.isfinite(cube) & (np.sum(keep, axis=0) == 0)  # never drop every value
        m = np.sum(keep, axis=0)
        image = np.sum(np.where(keep, cube, 0.0), axis=0) / np.maximum(m, 1)
        var = np.sum(np.where(keep, vcube, 0.0), axis=0) / np.maximum(m, 1) ** 2
        image = np.where(m > 0, image, np.nan)
        return image, var, m


def _place_catalog(catalog: Mapping[str, Any], image, mask, wcs, fwhm: float) -> dict:
    """An external RA/Dec catalog on the reference grid, positions refined by winpos."""
    from dagpre.ops.photometry import winpos

    if wcs is None:
        raise InputError("catalog", "placing a catalog by RA/Dec needs the reference's WCS")
    for key in ("ra", "dec"):
        if key not in catalog:
            raise InputError("catalog", f"expected 'ra' and 'dec' columns (deg); no {key!r}")
    ra = np.asarray(catalog["ra"], dtype=np.float64)
    dec = np.asarray(catalog["dec"], dtype=np.float64)
    x, y = wcs.all_world2pix(ra, dec, 0)
    ny, nx = image.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    if not on.any():
        raise InputError("catalog", f"none of its {ra.size} sources falls on the reference")
    out = {k: np.asarray(v)[on] for k, v in catalog.items()}
    x, y = x[on], y[on]
    sig = max(fwhm, 1.0) / 2.3548 if np.isfinite(fwhm) else 1.0
    win = winpos(image, x, y, sig, mask=mask)
    wx, wy = np.asarray(to_host(win.x)), np.asarray(to_host(win.y))
    moved = np.hypot(wx - x, wy - y)
    good = (np.asarray(to_host(win.flag)) == 0) & np.isfinite(moved) & (moved < 1.0)
    out["x_wcs"], out["y_wcs"] = x, y
    out["x"] = np.where(good, wx, x)
    out["y"] = np.where(good, wy, y)
    out["refined"] = good
    return out


def reference_photometry(
    image: Any,
    x: Any,
    y: Any,
    *,
    variance: Any = None,
    mask: Any = None,
    psf: Any = None,
    radius: float = 5.0,
) -> dict:
    """PSF-fit and aperture fluxes of sources on the reference (ADU).

    Returns ``flux_psf, fluxerr_psf, flag_psf`` (NaN and flag 0 without ``psf``) and
    ``flux_aper, fluxerr_aper, flag_aper`` (circular aperture of ``radius`` px), NumPy.
    """
    from dagpre.ops.photometry import aperture_photometry
    from dagpre.ops.psfphot import psf_photometry

    xp = xp_of(image)
    err = xp.sqrt(variance) if variance is not None else None
    bad = None if mask is None else mask != 0
    aper = aperture_photometry(image, x, y, radius, err=err, mask=bad)
    out = {
        "flux_aper": np.asarray(to_host(aper.flux), dtype=np.float64),
        "fluxerr_aper": np.asarray(to_host(aper.fluxerr), dtype=np.float64),
        "flag_aper": np.asarray(to_host(aper.flag)).astype(np.int32),
    }
    n = out["flux_aper"].shape[0]
    if psf is None:
        out.update(flux_psf=np.full(n, np.nan), fluxerr_psf=np.full(n, np.nan),
                   flag_psf=np.zeros(n, np.int32))  # fmt: skip
        return out
    fit = psf_photometry(image, psf, x, y, variance=variance, mask=mask)
    out["flux_psf"] = np.asarray(to_host(fit.flux), dtype=np.float64)
    out["fluxerr_psf"] = np.asarray(to_host(fit.fluxerr), dtype=np.float64)
    out["flag_psf"] = np.asarray(to_host(fit.flag)).astype(np.int32)
    return out


def build_reference(
    frames: Sequence[Any],
    n_best: int = 3,
    combine: str = "median",
    *,
    select: Sequence[int] | None = None,
    quality: Sequence[Mapping[str, Any] | None] | None = None,
    mask: Mapping[str, Any] | None = None,
    background: Mapping[str, Any] | None = None,
    align: Mapping[str, Any] | None = None,
    detect: Mapping[str, Any] | None = None,
    catalog: Mapping[str, Any] | None = None,
    psf: bool | str | Mapping[str, Any] = True,
    aperture_radius: float = 5.0,
    clip_sigma: float = 3.0,
    max_nonuniformity: float = 0.05,
    max_ellipticity: float = 0.2,
    max_scale_offset: float = 0.2,
    extra_candidates: int = 2,
    hdu: Any = None,
    progress: Callable[[str], None] | None = None,
) -> Reference:
    """Build a field's reference from its best frames (see the module docstring).

    Parameters
    ----------
    frames : sequence of Frame or path
        The night's raw frames (sky not subtracted). Paths are read only when needed.
    n_best : int
        Frames to combine.
    combine : {"median", "mean_clip"}
        How the aligned, scaled frames are combined.
    select : sequence of int, optional
        Use exactly these frames (by index, the first is the grid) instead of choosing.
    quality : sequence of dict or None, optional
        Per frame, its :func:`~dagpre.ops.quality.frame_quality` row (``.as_dict()``);
        computed here when not given (``None`` marks a frame that cannot be used).
    mask, background, align, detect : dict, optional
        Keyword arguments of :func:`~dagpre.ops.masks.mask_saturation` (None: no
        saturation mask), :func:`~dagpre.ops.background.estimate_background`,
        :func:`~dagpre.ops.align.align` (default ``method="wcs"`` when the frames have a
        WCS, else ``"stars"``; bilinear) and :func:`~dagpre.ops.detect.detect_sources`
        (default ``thresh=5``).
    catalog : mapping, optional
        Existing source list with ``ra, dec`` (deg), placed on the reference through its
        WCS and refined, instead of detecting; other columns are carried along.
    psf : bool, "auto" or dict
        Build the PSF model (True, or :func:`~dagpre.ops.psf.build_psf` keyword arguments;
        too few PSF stars is then an error); ``"auto"``: build it when the field has enough
        stars, else go on without one and say so in ``notes`` (its spatial order: 2 with
        at least 48 PSF stars, 1 with 24, else 0, see :func:`_psf_order`); False: no model
        (``flux_psf`` NaN).
    aperture_radius : float
        Aperture radius of ``flux_aper``, px.
    clip_sigma : float
        ``"mean_clip"``'s rejection threshold, in units of each value's own noise.
    max_nonuniformity, max_ellipticity : float
        Frames above these are not candidates (see :func:`rank_frames`).
    max_scale_offset : float
        A candidate whose photometric scale is off the candidates' median by more than this
        fraction is not combined. A frame with fewer than 3 unflagged scale stars (bright,
        isolated, S/N >= 10 on the grid frame) is given scale 1.
    extra_candidates : int
        Candidates aligned beyond ``n_best``, to replace frames the scale check refuses.
    hdu : int or str, optional
        HDU to read for paths.
    progress : callable, optional
        Called with one line per frame aligned.

    Returns
    -------
    Reference

    Raises
    ------
    InputError
        An unknown ``combine``; no usable frame (each frame's reason is given); a named
        frame out of range; a failed alignment (naming the frame).

    Examples
    --------
    >>> import dagpre as dp
    >>> night = dp.simulate.night(n_frames=4, shape=(256, 256), n_stars=200, seed=2)
    >>> ref = build_reference([f.to_frame() for f in night.frames], n_best=2)
    >>> ref.image.shape, len(ref.frames)
    ((256, 256), 2)
    """
    from dagpre.ops.align import align_with_variance
    from dagpre.ops.quality import frame_quality

    say = progress or (lambda text: None)
    if combine not in COMBINE:
        raise InputError("combine", f"expected one of {', '.join(COMBINE)}, got {combine!r}")
    if not isinstance(n_best, int) or isinstance(n_best, bool) or n_best < 1:
        raise InputError("n_best", f"expected a positive integer, got {n_best!r}")
    n = len(frames)
    if n == 0:
        raise InputError("frames", "no frame given")
    loaded: dict[int, Frame] = {}

    def get(i: int) -> Frame:
        if i not in loaded:
            loaded[i] = _as_frame(frames[i], i, hdu)
        return loaded[i]

    rows: tuple = ()
    if select is not None:
        ranked = [int(i) for i in select]
        bad = [i for i in ranked if not 0 <= i < n]
        if bad or not ranked:
            raise InputError("select", f"expected frame indices in 0..{n - 1}, got {list(select)}")
        wanted, spare = ranked, []
    else:
        if quality is None:
            quality = []
            for i in range(n):
                # an unreadable file is an error, not an unusable frame; not kept in memory
                frame = _as_frame(frames[i], i, hdu)
                try:
                    quality.append(frame_quality(frame).as_dict())
                except InputError as err:
                    quality.append(None)
                    say(f"frame {i}: no quality ({err})")
        if len(quality) != n:
            raise InputError("quality", f"expected {n} rows (one per frame), got {len(quality)}")
        rows = tuple(quality)
        ranked = rank_frames(
            quality, max_nonuniformity=max_nonuniformity, max_ellipticity=max_ellipticity
        )
        if not ranked:
            raise InputError("frames", f"no frame is usable as a reference (of {n})")
        wanted = ranked[: n_best + extra_candidates]
        spare = ranked[n_best + extra_candidates :]

    align_params = dict(align or {})
    first = get(wanted[0])
    align_params.setdefault("method", "wcs" if first.wcs is not None else "stars")
    base, base_var, _ = prepare_frame(first, mask=mask, background=background)
    grid = Frame(base.data, base.mask, header=base.header, wcs=base.wcs, meta={})
    fwhm0 = rows[wanted[0]]["fwhm"] if rows and rows[wanted[0]] else math.nan
    sx, sy, sr = _scale_stars(base.data, base_var, base.mask, fwhm0)
    base_flux = _ratio_flux(base.data, base.mask, sx, sy, sr)
    base_mask = to_host(base.mask)
    aligned = {wanted[0]: (to_host(base.data), to_host(base_var), base_mask == 0, 1.0, base_mask)}

    def add(i: int) -> bool:
        frame, var, _ = prepare_frame(get(i), mask=mask, background=background)
        try:
            out, v = align_with_variance(frame, var, grid, **align_params)
        except InputError as err:
            if select is not None:  # a frame the caller named: its failure is an error
                raise InputError(f"frames[{i}]", f"aligning onto the reference grid: {err}"
                                 ) from None  # fmt: skip
            say(f"reference: frame {i} left out: aligning onto the grid failed: {err}")
            return False
        finally:
            loaded.pop(i, None)  # aligned copies are kept below, not the raw frame
        good = xp_of(out.image).isfinite(out.image) & (out.footprint > 0)
        if out.mask is not None:
            good &= out.mask == 0
        image = xp_of(out.image).where(good, out.image, 0)
        scale = _flux_ratio(base_flux, image, ~good, sx, sy, sr)
        xp = xp_of(out.image)
        bits = xp.where(out.footprint > 0, np.uint8(0), np.uint8(MaskBit.OFF_FOOTPRINT))
        if out.mask is not None:
            bits = bits | out.mask
        aligned[i] = (to_host(out.image), to_host(v), to_host(good), scale, to_host(bits))
        say(f"reference: frame {i} aligned, scale {scale:.3f}")
        return True

    keep = [wanted[0], *(i for i in wanted[1:] if add(i))]
    if select is None:
        while True:
            scales = np.array([aligned[i][3] for i in keep])
            med = float(np.median(scales))
            ok = [i for i in keep if abs(aligned[i][3] / med - 1) <= max_scale_offset]
            if len(ok) >= min(n_best, len(ranked)) or not spare:
                keep = ok[:n_best] if ok else keep[:1]
                break
            nxt = spare.pop(0)
            keep = [*ok, nxt] if add(nxt) else ok
    scale0 = aligned[keep[0]][3]
    stack, variances = [], []
    bits = np.zeros(base_mask.shape, np.uint8)
    for i in keep:
        image, var, good, scale, frame_bits = aligned[i]
        bits |= frame_bits
        s = scale / scale0
        stack.append(np.where(good, image / s, np.nan))
        variances.append(np.where(good, var / s**2, np.nan))
    combined, variance, count = _combine(stack, variances, combine, clip_sigma)
    empty = ~np.isfinite(combined) | (count == 0)
    # a pixel no frame could give keeps the bits that took it away (saturated core, trail,
    # off the footprint of every frame)
    ref_mask = np.where(empty, np.maximum(bits, 1), np.uint8(0)).astype(np.uint8)
    image = np.where(empty, 0.0, combined).astype(np.float32)
    variance = np.where(empty, np.inf, variance).astype(np.float32)
    return _measure(
        image, ref_mask, variance, base.wcs, tuple(keep), rows,
        tuple(aligned[i][3] / scale0 for i in keep), detect=detect, catalog=catalog, psf=psf,
        aperture_radius=aperture_radius, fwhm=fwhm0,
    )  # fmt: skip


def _ratio_flux(image, mask, x, y, radius) -> np.ndarray:
    """Aperture fluxes of the scale stars, NaN where the aperture is flagged."""
    from dagpre.ops.photometry import aperture_photometry

    if x.size == 0:
        return np.zeros(0)
    phot = aperture_photometry(image, x, y, radius, mask=mask != 0)
    flux = np.asarray(to_host(phot.flux))
    return np.where(np.asarray(to_host(phot.flag)) == 0, flux, np.nan)


#: PSF stars per spatial term below which ``psf="auto"`` drops to a lower model order.
_PSF_STARS_PER_TERM = 8


def _psf_order(n_stars: int) -> int:
    """Spatial order of the ``psf="auto"`` model for ``n_stars`` PSF stars.

    Quadratic (6 terms) when there are at least 8 stars per term, else linear (3), else
    constant: a night's PSF width changes along a curve across the field (the simulator's
    and real optics' field curvature), and a linear model then misfits stars by a
    position-dependent fraction of their flux, which turns into a scale error on every
    variable's light curve.
    """
    for order, terms in ((2, 6), (1, 3)):
        if n_stars >= _PSF_STARS_PER_TERM * terms:
            return order
    return 0


def _measure(image, mask, variance, wcs, frames, rows, scales, *, detect, catalog, psf,
             aperture_radius, fwhm) -> Reference:  # fmt: skip
    """Noise, sources, PSF model and photometry of a combined image."""
    from dagpre.ops.background import estimate_background
    from dagpre.ops.detect import detect_sources

    bkg = estimate_background(image, mask=mask != 0)
    noise = float(bkg.global_rms)
    err = np.sqrt(np.where(np.isfinite(variance), variance, 0.0)).astype(np.float32)
    err = np.where(mask != 0, np.float32(np.inf), err)
    params = {"thresh": 5.0, **(detect or {})}
    det = detect_sources(image, err=err, mask=mask != 0, wcs=wcs, **params)
    det_cols = {k: np.asarray(to_host(v)) for k, v in det.items()}
    if catalog is not None:
        sources = _place_catalog(catalog, image, mask, wcs, fwhm)
        if wcs is not None:
            sky = wcs.all_pix2world(sources["x"], sources["y"], 0)
            sources["ra"], sources["dec"] = (np.asarray(c) for c in sky)
    else:
        sources = det_cols
    model = None
    notes = []
    if psf:
        from dagpre.ops.psf import build_psf, select_psf_stars

        try:
            stars = select_psf_stars(det, image.shape, mask=mask) if len(det) else []
            kwargs = dict(psf) if isinstance(psf, Mapping) else {"order": _psf_order(len(stars))}
            model = build_psf(
                image, det_cols["x"][stars], det_cols["y"][stars], variance=variance,
                mask=mask, **kwargs,
            )  # fmt: skip
        except InputError as err:
            if psf != "auto":
                raise
            notes.append(f"no PSF model ({err}); PSF fluxes are NaN, light curves use apertures")
    phot = reference_photometry(
        image, sources["x"], sources["y"], variance=variance, mask=mask, psf=model,
        radius=aperture_radius,
    )  # fmt: skip
    sources = {**sources, **phot}
    sources["id"] = np.arange(sources["x"].shape[0], dtype=np.int64)
    return Reference(
        image, mask, wcs, sources, frames, noise, variance, model, rows, scales, tuple(notes)
    )
