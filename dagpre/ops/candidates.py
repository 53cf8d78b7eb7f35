"""Transient and variability candidates: detections on difference images, matched over frames.

Two steps, each vectorised:

* :func:`difference_detections` (per frame): sources of ``D / sqrt(var)`` above ``thresh``
  — positive ones (brightening, new sources) and, with ``negative=True``, negative ones
  (fading) — detected with :func:`~dagpre.ops.detect.detect_sources` on the difference with
  its per-pixel error. Each detection's S/N is the PSF-fit flux over its error when a PSF is
  given (the matched-filter S/N), else the flux in a 1.5-FWHM aperture over its error.
  Detections touching masked pixels are dropped (saturated cores, bleed trails, frame
  edges leave residuals that are not astrophysical), and so are detections sharper than a
  star (half-maximum FWHM below ``min_fwhm_ratio`` times the PSF's: hot pixels and cosmic
  rays, which resampling leaves about one pixel wide).
* :func:`match_candidates` (per night): detections of all frames within ``radius`` px of
  each other (friends of friends) are one candidate; a candidate is kept when seen in at
  least ``min_detections`` frames (a cosmic ray or a noise peak is seen once). Its
  position is the S/N-weighted mean, ``frame`` the first frame it was seen in,
  ``peak_frame``, ``flux`` and ``snr`` those of its highest-S/N detection, and ``source``
  the nearest reference source within ``source_radius`` (−1 if none: a new object).
  ``residual`` marks a candidate within ``residual_radius`` of a reference source at least
  ``residual_ratio`` times brighter than its peak flux: the wings of a bright star that the
  kernel did not subtract perfectly (a 1 % residual of a star 100 times the candidate),
  not a new source; kept in the table, to be filtered on.

Conventions: positions are (x, y) pixel order with 0-based pixel centres on the reference
grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.types import InputError

__all__ = ["CANDIDATE_COLUMNS", "difference_detections", "match_candidates"]

#: The candidates table's columns (the store's ``candidates/``), in order.
CANDIDATE_COLUMNS = (
    "id", "x", "y", "ra", "dec", "frame", "peak_frame", "flux", "snr", "sign",
    "n_detections", "source", "on_source", "residual",
)  # fmt: skip


def difference_detections(
    difference: Any,
    variance: Any,
    mask: Any = None,
    *,
    thresh: float = 5.0,
    minarea: int = 3,
    psf: Any = None,
    fwhm: float = 3.0,
    negative: bool = True,
    min_snr: float | None = None,
    min_fwhm_ratio: float = 0.5,
) -> dict[str, np.ndarray]:
    """Detections on one difference image: ``x, y, flux, fluxerr, snr, sign`` (NumPy).

    Parameters
    ----------
    difference, variance : ndarray (ny, nx)
        The difference image (ADU) and its variance (ADU^2), NumPy or CuPy.
    mask : ndarray (ny, nx), optional
        Non-zero marks pixels not to use.
    thresh : float
        Detection threshold on ``D / sqrt(var)`` (after the detection filter), sigma.
    minarea : int
        Pixels above the threshold a detection needs.
    psf : callable or ndarray, optional
        PSF for the S/N (:func:`~dagpre.ops.psfphot.psf_photometry`); None: aperture S/N.
    fwhm : float
        PSF FWHM, px (aperture radius ``1.5 * fwhm`` without ``psf``; a PSF model's own
        ``fwhm`` is used when it has one).
    negative : bool
        Also detect negative residuals (``sign = -1``).
    min_snr : float, optional
        Keep detections whose measured S/N (absolute) reaches this (default ``thresh``).
    min_fwhm_ratio : float
        Detections narrower than this fraction of the PSF FWHM are dropped (0 keeps all).

    Returns
    -------
    dict of ndarray (n,)
        ``x, y`` (px), ``flux, fluxerr`` (ADU, signed), ``snr`` (signed flux / error),
        ``sign`` (+1 or -1, int8).
    """
    from dagpre.ops.detect import detect_sources
    from dagpre.ops.photometry import aperture_photometry
    from dagpre.ops.psfphot import psf_photometry

    xp = xp_of(difference)
    bad = ~xp.isfinite(difference) | ~xp.isfinite(variance) | (variance <= 0)
    if mask is not None:
        bad = bad | (xp.asarray(mask) != 0)
    err = xp.sqrt(xp.where(bad, np.float32(1), variance)).astype(np.float32)
    data = xp.where(bad, np.float32(0), difference).astype(np.float32)
    min_snr = thresh if min_snr is None else min_snr
    fwhm = float(getattr(psf, "fwhm", fwhm))
    cols: dict[str, list] = {k: [] for k in ("x", "y", "flux", "fluxerr", "snr", "sign")}
    for sign in (1, -1) if negative else (1,):
        cat = detect_sources(sign * data, thresh=thresh, err=err, mask=bad, minarea=minarea)
        if not len(cat):
            continue
        x = np.asarray(to_host(cat["x"]), dtype=np.float64)
        y = np.asarray(to_host(cat["y"]), dtype=np.float64)
        if psf is not None:
            fit = psf_photometry(data, psf, x, y, variance=xp.where(bad, np.inf, variance),
                                 mask=bad)  # fmt: skip
            flux, ferr, flag = (np.asarray(to_host(a)) for a in (fit.flux, fit.fluxerr,
                                                                 fit.flag))  # fmt: skip
        else:
            phot = aperture_photometry(data, x, y, 1.5 * fwhm, err=err, mask=bad)
            flux, ferr, flag = (np.asarray(to_host(a)) for a in (phot.flux, phot.fluxerr,
                                                                 phot.flag))  # fmt: skip
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = flux / ferr
        width = np.asarray(to_host(cat["fwhm"]), dtype=np.float64)
        keep = (flag == 0) & np.isfinite(snr) & (sign * snr >= min_snr)
        keep &= width >= min_fwhm_ratio * fwhm
        cols["x"].append(x[keep])
        cols["y"].append(y[keep])
        cols["flux"].append(flux[keep].astype(np.float64))
        cols["fluxerr"].append(ferr[keep].astype(np.float64))
        cols["snr"].append(snr[keep].astype(np.float64))
        cols["sign"].append(np.full(int(keep.sum()), sign, dtype=np.int8))
    dtypes = {"sign": np.int8}
    return {
        k: np.concatenate(v) if v else np.zeros(0, dtype=dtypes.get(k, np.float64))
        for k, v in cols.items()
    }


def match_candidates(
    detections: Sequence[Mapping[str, Any] | None],
    *,
    radius: float = 1.5,
    min_detections: int = 2,
    reference_xy: tuple[Any, Any] | None = None,
    source_radius: float = 2.0,
    reference_flux: Any = None,
    residual_radius: float = 6.0,
    residual_ratio: float = 100.0,
    wcs: Any = None,
) -> dict[str, np.ndarray]:
    """Match per-frame detections into candidates (see the module docstring).

    Parameters
    ----------
    detections : sequence of dict or None
        Per frame (its position is the frame index), :func:`difference_detections`'s
        result; None for a frame with none (failed or not measured).
    radius : float
        Linking length, px: detections closer than this (in any frames) are one candidate.
    min_detections : int
        Frames a candidate must be detected in.
    reference_xy : (x, y) arrays, optional
        Reference sources' positions, px, for ``source`` / ``on_source``.
    source_radius : float
        A candidate sits on a reference source within this distance, px.
    reference_flux : array (n_ref,), optional
        Reference sources' fluxes (same units as the detections'), for ``residual``.
    residual_radius, residual_ratio : float
        ``residual``: a reference source within this distance (px) and at least this many
        times the candidate's peak flux (False everywhere without ``reference_flux``).
    wcs : astropy.wcs.WCS, optional
        Reference WCS for ``ra, dec`` (NaN without).

    Returns
    -------
    dict of ndarray (n_candidates,)
        :data:`CANDIDATE_COLUMNS`: ``id`` int64, ``x, y, ra, dec, flux, snr`` float64,
        ``frame, peak_frame, n_detections, source`` int64, ``sign`` int8 (of the peak
        detection), ``on_source, residual`` bool. Ordered by first frame, then by peak S/N.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if radius <= 0:
        raise InputError("radius", f"expected a positive linking length (px), got {radius}")
    parts = []
    for k, det in enumerate(detections):
        if det is None or len(det["x"]) == 0:
            continue
        m = len(det["x"])
        parts.append({**{c: np.asarray(det[c]) for c in ("x", "y", "flux", "snr", "sign")},
                      "frame": np.full(m, k, dtype=np.int64)})  # fmt: skip
    empty = _empty_table()
    if not parts:
        return empty
    allc = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    xy = np.column_stack([allc["x"], allc["y"]])
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    n = xy.shape[0]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_groups, label = connected_components(graph, directed=False)
    # per group: distinct frames, S/N-weighted position, first frame, peak detection
    frames_seen = np.unique(np.column_stack([label, allc["frame"]]), axis=0)
    n_det = np.bincount(frames_seen[:, 0], minlength=n_groups)
    w = np.abs(allc["snr"])
    wsum = np.bincount(label, weights=w, minlength=n_groups)
    gx = np.bincount(label, weights=w * allc["x"], minlength=n_groups) / wsum
    gy = np.bincount(label, weights=w * allc["y"], minlength=n_groups) / wsum
    first = np.full(n_groups, np.iinfo(np.int64).max)
    np.minimum.at(first, label, allc["frame"])
    order = np.lexsort((-w, label))  # within each group, the highest |S/N| first
    head = order[np.r_[True, label[order][1:] != label[order][:-1]]]
    peak = np.empty(n_groups, dtype=np.int64)
    peak[label[head]] = head
    keep = np.flatnonzero(n_det >= min_detections)
    if keep.size == 0:
        return empty
    p = peak[keep]
    out = {
        "x": gx[keep],
        "y": gy[keep],
        "frame": first[keep].astype(np.int64),
        "peak_frame": allc["frame"][p].astype(np.int64),
        "flux": allc["flux"][p].astype(np.float64),
        "snr": allc["snr"][p].astype(np.float64),
        "sign": allc["sign"][p].astype(np.int8),
        "n_detections": n_det[keep].astype(np.int64),
    }
    source = np.full(keep.size, -1, dtype=np.int64)
    if reference_xy is not None and len(reference_xy[0]):
        tree = cKDTree(np.column_stack([np.asarray(reference_xy[0]), np.asarray(reference_xy[1])]))
        dist, idx = tree.query(np.column_stack([out["x"], out["y"]]))
        source = np.where(dist <= source_radius, idx, -1).astype(np.int64)
    out["source"] = source
    out["on_source"] = source >= 0
    residual = np.zeros(keep.size, dtype=bool)
    if reference_xy is not None and reference_flux is not None and len(reference_xy[0]):
        ref_flux = np.nan_to_num(np.asarray(reference_flux, dtype=np.float64), nan=-np.inf)
        pairs = cKDTree(np.column_stack([out["x"], out["y"]])).sparse_distance_matrix(
            tree, residual_radius, output_type="ndarray"
        )
        brightest = np.full(keep.size, -np.inf)
        np.maximum.at(brightest, pairs["i"], ref_flux[pairs["j"]])
        residual = brightest >= residual_ratio * np.abs(out["flux"])
    out["residual"] = residual
    if wcs is not None:
        ra, dec = wcs.all_pix2world(out["x"], out["y"], 0)
        out["ra"], out["dec"] = np.asarray(ra, dtype=np.float64), np.asarray(dec, np.float64)
    else:
        out["ra"] = out["dec"] = np.full(keep.size, np.nan)
    rank = np.lexsort((-np.abs(out["snr"]), out["frame"]))
    table = {c: out[c][rank] for c in CANDIDATE_COLUMNS if c != "id"}
    return {"id": np.arange(keep.size, dtype=np.int64), **table}


def _empty_table() -> dict[str, np.ndarray]:
    dtypes = {"id": np.int64, "frame": np.int64, "peak_frame": np.int64, "sign": np.int8,
              "n_detections": np.int64, "source": np.int64, "on_source": bool,
              "residual": bool}  # fmt: skip
    return {c: np.zeros(0, dtype=dtypes.get(c, np.float64)) for c in CANDIDATE_COLUMNS}
