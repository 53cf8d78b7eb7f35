"""Training sets from a night's store: cut-out triplets, light-curve tensors, torch datasets.

:func:`export_training_set` (``dagpre export STORE OUT``) reads a dagpre store (the layout
of :mod:`dagpre.io.store`) and writes a Zarr v3 group of cut-out triplets around every
candidate and around a sample of reference sources, plus the light curves of every
reference source; labels come from the simulator's truth when the night was simulated.
:class:`CutoutDataset` and :class:`LightCurveDataset` read such a group lazily, one chunk at
a time, as map-style datasets for :class:`torch.utils.data.DataLoader` (also with
``num_workers > 0``). The export needs only NumPy and Zarr; torch is imported by the two
dataset classes alone.

Layout of the training-set group (``N`` cut-outs of ``S x S`` pixels)::

    cutouts     (N, 3, S, S) float32   channels: science, reference, difference (normalised)
    variance    (N, 3, S, S) float32   variance of each channel, in normalised units squared
    mask        (N, S, S)    uint8     MaskBit flags (frame | reference | padding), 0 = good
    norm_offset (N, 3)       float32   raw = cutouts * norm_scale + norm_offset
    norm_scale  (N, 3)       float32
    label       (N,)         int8      1 / 0, or -1 when no truth was found (see below)
    kind        (N,)         str       "candidate" or "source"
    frame       (N,)         int64     frame the science and difference planes come from
    mjd         (N,)         float64   that frame's MJD (start of exposure, UTC)
    x, y        (N,)         float64   reference pixels, (x, y) order, 0-based pixel centres
    x0, y0      (N,)         int64     reference pixel of cut-out pixel [0, 0]
    ra, dec     (N,)         float64   degrees (NaN without a WCS)
    snr         (N,)         float64   candidate: its peak S/N; source: see Notes
    candidate   (N,)         int64     candidate id (-1 for sources)
    source      (N,)         int64     reference-source index (-1 when none)
    truth_id    (N,)         int64     matched truth source id (-1 when none)
    truth_kind  (N,)         str       "star", "variable", "transient" or ""
    lightcurves/ flux, flux_err (n_source, n_frame) float32 ADU, mask (n_source, n_frame)
                 bool (True = bad), mjd (n_frame) float64, per-source label, x, y, ra, dec,
                 flux_ref, source, truth_id, truth_kind (and the pipeline's flux_psf,
                 chi2_dof, stetson_j, variable as pipeline_variable, when the store has them)

Every array is chunked along its first axis (``chunk`` rows, 256 by default), so a reader
streams chunk by chunk; every array carries ``dimension_names``. The group attributes
record the size, the normalisation, the channels, the label meanings, the truth folder
and the source store.

Cut-out geometry: the position ``(x, y)`` falls in the centre pixel ``[S // 2, S // 2]``
(``x0 = floor(x + 0.5) - S // 2``), so the object sits within half a pixel of the centre.
Pixels beyond the reference grid are padding: value 0 in every channel, variance 0, mask
bit :attr:`~dagpre.types.MaskBit.OFF_FOOTPRINT`. Non-finite values (e.g. a failed frame)
are 0 with :attr:`~dagpre.types.MaskBit.NONFINITE`. The exported arrays hold no NaN.

Labels: with truth (``<folder of the frames>/truth/``, as :meth:`dagpre.simulate.
SimulatedNight.write` puts it, read with :func:`dagpre.simulate.read_truth`) a position is
matched on the sky to every truth source within ``match_radius`` pixels (1.5 px times the
reference's pixel scale). A candidate is *real* (1) when a variable star or transient lies
within that radius, else *bogus* (0); a reference source is *variable* (1) under the same
rule, else *constant* (0, also when no truth source is near). Without truth (or without a
WCS) every label is -1.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagpre.types import InputError, MaskBit

__all__ = [
    "CHANNELS",
    "CUTOUT_SIZE",
    "NORMALISATIONS",
    "CutoutDataset",
    "LightCurveDataset",
    "TrainingSetSummary",
    "Triplet",
    "cutouts_from_triplet",
    "export_training_set",
    "load_ztf_triplet",
    "normalise_cutouts",
]

#: Default cut-out side, pixels (as in ZTF alerts).
CUTOUT_SIZE = 63
#: Channel order of every triplet.
CHANNELS = ("science", "reference", "difference")
#: Normalisations applied per cut-out and per channel (see :func:`normalise_cutouts`).
NORMALISATIONS = ("none", "zscale", "robust")
#: Truth kinds that make a position real (candidates) or variable (reference sources).
_REAL_KINDS = ("variable", "transient")
_MAD_TO_SIGMA = 1.4826
_MIN_PIXELS = 5  # fewest usable pixels for a channel's statistics


# =========================================================================== normalisation


def normalise_cutouts(
    cutouts: Any, usable: Any = None, method: str = "robust"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise each cut-out's channels by their own statistics.

    Parameters
    ----------
    cutouts : ndarray (..., H, W)
        Pixel values, e.g. ``(N, 3, H, W)`` triplets or one ``(3, H, W)`` triplet.
    usable : ndarray of bool, broadcastable to ``cutouts``, optional
        Pixels the statistics are taken from (default: the finite ones). Where fewer than
        5 usable pixels remain, all finite pixels are used; where none, the plane is left
        as it is (offset 0, scale 1).
    method : {"none", "zscale", "robust"}
        ``"none"``: unchanged. ``"robust"``: ``(x - median) / sigma`` with ``sigma`` 1.4826
        times the median absolute deviation (the standard deviation when that is 0, 1 when
        both are). ``"zscale"``: ``(x - lo) / (hi - lo)`` clipped to ``[0, 1]``, ``lo, hi``
        from :func:`dagpre.ops.transforms.zscale` (IRAF's display limits).

    Returns
    -------
    normalised : ndarray (..., H, W) float32
        Non-finite input stays non-finite.
    offset, scale : ndarray (...) float32
        Per plane: ``normalised = (x - offset) / scale`` (before the zscale clip), so a
        variance plane becomes ``variance / scale**2``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)
    >>> out, offset, scale = normalise_cutouts(x, method="robust")
    >>> out.shape, offset.tolist()
    ((2, 5, 5), [12.0, 37.0])
    """
    method = _check_method(method)
    x = np.asarray(cutouts, dtype=np.float32)
    if x.ndim < 2:
        raise InputError("cutouts", f"expected (..., H, W) planes, got shape {x.shape}")
    lead = x.shape[:-2]
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    finite = np.isfinite(flat)
    if usable is None:
        use = finite
    else:
        use = np.broadcast_to(np.asarray(usable, dtype=bool), x.shape).reshape(flat.shape) & finite
    few = use.sum(axis=1) < _MIN_PIXELS
    use = np.where(few[:, None], finite, use)
    empty = ~use.any(axis=1)
    offset = np.zeros(flat.shape[0], dtype=np.float64)
    scale = np.ones(flat.shape[0], dtype=np.float64)
    if method == "robust":
        vals = np.where(use, flat, np.nan).astype(np.float64)
        vals[empty] = 0.0  # no all-NaN rows: nanmedian would warn
        med = np.nanmedian(vals, axis=1)
        mad = np.nanmedian(np.abs(vals - med[:, None]), axis=1)
        sigma = _MAD_TO_SIGMA * mad
        flat_sd = ~(sigma > 0)
        if flat_sd.any():
            sigma[flat_sd] = np.nanstd(vals[flat_sd], axis=1)
        sigma[~(sigma > 0) | ~np.isfinite(sigma)] = 1.0
        offset, scale = np.where(empty, 0.0, med), np.where(empty, 1.0, sigma)
    elif method == "zscale":
        from dagpre.ops.transforms import zscale

        for k in np.flatnonzero(~empty):
            lo, hi = zscale(flat[k], mask=~use[k])
            offset[k] = lo
            scale[k] = hi - lo if hi > lo else 1.0
    out = ((flat - offset[:, None]) / scale[:, None]).astype(np.float32)
    if method == "zscale":
        out = np.clip(out, 0.0, 1.0, out=out, where=np.isfinite(out))
    return (
        out.reshape(x.shape),
        offset.astype(np.float32).reshape(lead),
        scale.astype(np.float32).reshape(lead),
    )


@dataclass(frozen=True)
class Triplet:
    """One cut-out triplet, as :func:`cutouts_from_triplet` returns it.

    Attributes
    ----------
    cutout : ndarray (3, S, S) float32
        Science, reference, difference, normalised; 0 at padding and non-finite pixels.
    variance : ndarray (3, S, S) float32
        Variance of each channel in normalised units squared; 0 where unknown.
    mask : ndarray (S, S) uint8
        :class:`~dagpre.types.MaskBit` flags; 0 means good.
    offset, scale : ndarray (3,) float32
        ``raw = cutout * scale + offset`` (before the zscale clip).
    normalise : str
        The normalisation applied.
    """

    cutout: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    normalise: str


def _gather(src, sx0, sy0, x0, y0, size, grid, fill, dtype) -> np.ndarray:
    """The ``size x size`` windows at ``(x0[i], y0[i])`` of a plane whose slice ``src``
    starts at ``(sx0, sy0)``, all at once: ``(n, size, size)``; pixels beyond the ``grid``
    ``(ny, nx)`` take ``fill``. ``src`` must hold every in-grid pixel of every window."""
    ny, nx = grid
    off = np.arange(size)
    rows = np.asarray(y0, dtype=np.int64)[:, None] + off  # (n, size)
    cols = np.asarray(x0, dtype=np.int64)[:, None] + off
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    if src.size == 0:
        return np.full(inside.shape, fill, dtype=dtype)
    rr = np.clip(rows - sy0, 0, src.shape[0] - 1)[:, :, None]
    cc = np.clip(cols - sx0, 0, src.shape[1] - 1)[:, None, :]
    return np.where(inside, src[rr, cc], fill).astype(dtype)


def _finish(raw, var, mask, method):
    """Flag, normalise and clean a block of triplets: the one path every cut-out takes.

    ``raw``, ``var``: (B, 3, S, S) float32 (NaN at padding); ``mask``: (B, S, S) uint8 with
    ``OFF_FOOTPRINT`` at padding. Returns cut-outs, variance, mask, offset, scale.
    """
    bad = ~np.isfinite(raw).all(axis=1) & ((mask & MaskBit.OFF_FOOTPRINT) == 0)
    mask = mask | np.where(bad, np.uint8(MaskBit.NONFINITE), np.uint8(0))
    usable = (mask == 0)[:, None]
    out, offset, scale = normalise_cutouts(raw, usable, method)
    pad = ((mask & MaskBit.OFF_FOOTPRINT) != 0)[:, None]
    out = np.where(pad | ~np.isfinite(out), np.float32(0), out)
    var = var / (scale.astype(np.float64) ** 2)[..., None, None]
    var = np.where(np.isfinite(var) & (var >= 0), var, 0.0).astype(np.float32)
    return out, var, mask.astype(np.uint8), offset, scale


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 3:
        raise InputError("size", f"expected an integer cut-out side >= 3 pixels, got {size!r}")
    return int(size)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _check_method(method: Any) -> str:
    if method not in NORMALISATIONS:
        allowed = ", ".join(NORMALISATIONS)
        raise InputError("normalise", f"expected one of {allowed}, got {method!r}")
    return method


def cutouts_from_triplet(
    science: Any,
    reference: Any,
    difference: Any,
    *,
    variance: Any = None,
    mask: Any = None,
    size: int = CUTOUT_SIZE,
    normalise: str = "robust",
) -> Triplet:
    """One triplet in the training-set layout, from three planes of the same shape.

    The cut-out is centred on the planes' centre pixel ``(nx // 2, ny // 2)``; planes
    larger than ``size`` are cropped, smaller ones padded (value 0, mask bit
    ``OFF_FOOTPRINT``), exactly as :func:`export_training_set` cuts a store's frames, and
    the same normalisation is applied.

    Parameters
    ----------
    science, reference, difference : ndarray (ny, nx)
        The three images (e.g. a ZTF alert's science, template and difference cut-outs).
    variance : ndarray (3, ny, nx), optional
        Variance of each plane. Default: a constant plane per channel, the square of
        1.4826 times the median absolute deviation of its finite pixels (sky noise only).
    mask : ndarray (ny, nx) uint8, optional
        :class:`~dagpre.types.MaskBit` flags of the triplet.
    size : int
        Side of the cut-out, pixels (63).
    normalise : {"none", "zscale", "robust"}
        See :func:`normalise_cutouts`.

    Returns
    -------
    Triplet
        ``cutout`` (3, size, size) float32 and the rest, as the training set stores them.

    Examples
    --------
    >>> import numpy as np
    >>> planes = np.random.default_rng(0).normal(size=(3, 40, 50))
    >>> t = cutouts_from_triplet(*planes, size=63)
    >>> t.cutout.shape, t.cutout.dtype, int(t.mask[0, 0])
    ((3, 63, 63), dtype('float32'), 32)
    """
    size = _check_size(size)
    normalise = _check_method(normalise)
    planes = [np.asarray(p, dtype=np.float32) for p in (science, reference, difference)]
    shape = planes[0].shape
    if len(shape) != 2 or any(p.shape != shape for p in planes):
        shapes = ", ".join(str(p.shape) for p in planes)
        raise InputError("triplet", f"expected three 2-D planes of one shape, got {shapes}")
    if variance is None:
        variance = np.empty((3, *shape), dtype=np.float32)
        for c, plane in enumerate(planes):
            good = plane[np.isfinite(plane)]
            mad = float(np.median(np.abs(good - np.median(good)))) if good.size else 0.0
            variance[c] = (_MAD_TO_SIGMA * mad) ** 2
    variance = np.asarray(variance, dtype=np.float32)
    if variance.shape != (3, *shape):
        raise InputError("variance", f"expected shape {(3, *shape)}, got {variance.shape}")
    mask = np.zeros(shape, np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
    if mask.shape != shape:
        raise InputError("mask", f"expected shape {shape}, got {mask.shape}")
    ny, nx = shape
    x0, y0 = nx // 2 - size // 2, ny // 2 - size // 2
    def cut(src, fill, dtype):
        return _gather(src, 0, 0, [x0], [y0], size, shape, fill, dtype)[0]

    raw = np.stack([cut(p, np.nan, np.float32) for p in planes])
    var = np.stack([cut(v, np.nan, np.float32) for v in variance])
    msk = cut(mask, np.uint8(MaskBit.OFF_FOOTPRINT), np.uint8)
    out, var, msk, offset, scale = _finish(raw[None], var[None], msk[None], normalise)
    return Triplet(out[0], var[0], msk[0], offset[0], scale[0], normalise)


def load_ztf_triplet(
    path: str | os.PathLike, *, size: int = CUTOUT_SIZE, normalise: str = "robust"
) -> Triplet:
    """A ZTF alert's science / template / difference cut-outs as one :class:`Triplet`.

    Parameters
    ----------
    path : str or path-like
        One of the alert's three FITS files (``<id>_cutoutScience.fits``,
        ``<id>_cutoutTemplate.fits``, ``<id>_cutoutDifference.fits``; ``.fits.gz`` too) or
        the common prefix ``<folder>/<id>``. The template is the reference channel.
    size, normalise
        As :func:`cutouts_from_triplet`, which does the rest (the same path as dagpre's own
        cut-outs). ZTF alerts carry no variance plane: it is estimated from each cut-out's
        sky noise.

    Returns
    -------
    Triplet
    """
    from dagpre.io.fits import read_fits

    text = os.fspath(path)
    prefix = text
    for part in ("Science", "Template", "Difference"):
        key = f"_cutout{part}"
        if key in Path(text).name:
            prefix = text[: text.rindex(key)]
    frames = []
    for part in ("Science", "Template", "Difference"):
        found = [p for p in (f"{prefix}_cutout{part}.fits", f"{prefix}_cutout{part}.fits.gz")
                 if Path(p).is_file()]  # fmt: skip
        if not found:
            raise InputError(f"{prefix}_cutout{part}.fits", "no such ZTF cut-out file")
        frames.append(read_fits(found[0], device="cpu"))
    shapes = {f.data.shape for f in frames}
    if len(shapes) != 1:
        raise InputError(prefix, f"the three cut-outs differ in shape: {sorted(shapes)}")
    mask = frames[0].mask | frames[1].mask | frames[2].mask
    data = [np.where(f.mask & MaskBit.NONFINITE, np.nan, f.data) for f in frames]
    return cutouts_from_triplet(*data, mask=mask, size=size, normalise=normalise)


# =========================================================================== export


@dataclass(frozen=True)
class TrainingSetSummary:
    """What :func:`export_training_set` wrote.

    Attributes
    ----------
    path : str
        The training-set group.
    n_cutouts, n_candidates, n_sources : int
        Triplets in all, around candidates, around reference sources.
    n_lightcurves : int
        Light curves written (0 when not exported).
    labelled : bool
        Whether labels came from truth (else every label is -1).
    truth : str
        The truth folder used ("" when none).
    seconds : float
        Wall time of the export.
    """

    path: str
    n_cutouts: int
    n_candidates: int
    n_sources: int
    n_lightcurves: int
    labelled: bool
    truth: str
    seconds: float


def _reference_wcs(root):
    text = root.attrs.get("wcs_header", "")
    if not text:
        return None
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(text))


def _sky(table: Mapping[str, np.ndarray], wcs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """ra, dec (deg) from the table, or through the WCS where absent or NaN."""
    ra = np.asarray(table["ra"], dtype=np.float64) if "ra" in table else np.full(n, np.nan)
    dec = np.asarray(table["dec"], dtype=np.float64) if "dec" in table else np.full(n, np.nan)
    missing = ~(np.isfinite(ra) & np.isfinite(dec))
    if wcs is not None and missing.any():
        x = np.asarray(table["x"], dtype=np.float64)[missing]
        y = np.asarray(table["y"], dtype=np.float64)[missing]
        r, d = wcs.wcs_pix2world(x, y, 0)
        ra, dec = ra.copy(), dec.copy()
        ra[missing], dec[missing] = r, d
    return ra, dec


def _find_truth(paths: Sequence[str], truth: Any) -> tuple[dict | None, str]:
    from dagpre.simulate import read_truth

    if truth is False:
        return None, ""
    if truth is not None and truth is not True:
        return read_truth(truth), str(truth)
    for folder in dict.fromkeys(str(Path(p).parent) for p in paths if p):
        if (Path(folder) / "truth" / "sources.ecsv").is_file():
            try:
                return read_truth(folder), str(Path(folder) / "truth")
            except InputError:
                continue
    return None, ""


def _unit(ra, dec) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _match_truth(ra, dec, truth_sources, radius_deg):
    """(label int8, truth_id int64, truth_kind str) per position; see the module's Labels."""
    from scipy.spatial import cKDTree

    n = len(ra)
    label = np.zeros(n, dtype=np.int8)
    tid = np.full(n, -1, dtype=np.int64)
    tkind = np.full(n, "", dtype=object)
    t_ra = np.asarray(truth_sources["ra"], dtype=np.float64)
    t_dec = np.asarray(truth_sources["dec"], dtype=np.float64)
    if n == 0 or t_ra.size == 0:
        return label, tid, tkind
    t_kind = np.asarray(truth_sources["kind"]).astype(str)
    t_id = np.asarray(truth_sources["id"], dtype=np.int64)
    units = _unit(t_ra, t_dec)
    chord = 2.0 * math.sin(math.radians(radius_deg) / 2.0)
    ok = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    points = _unit(np.asarray(ra)[ok], np.asarray(dec)[ok])
    # nearest truth source within the radius, preferring a real (varying) one
    dist, pick = cKDTree(units).query(points, distance_upper_bound=chord)
    real = np.flatnonzero(np.isin(t_kind, _REAL_KINDS))
    if real.size:
        dist_r, pick_r = cKDTree(units[real]).query(points, distance_upper_bound=chord)
        has_real = np.isfinite(dist_r)
        pick = np.where(has_real, real[np.minimum(pick_r, real.size - 1)], pick)
        label[ok[has_real]] = 1
    near = np.isfinite(dist)
    tid[ok[near]] = t_id[pick[near]]
    tkind[ok[near]] = t_kind[pick[near]]
    return label, tid, tkind


def _table(group) -> dict[str, np.ndarray]:
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}


def _strings(arr) -> np.ndarray:
    return np.asarray(arr[:].tolist(), dtype=str)


def _plan_candidates(root, store, n_frames):
    cand = _table(root["candidates"])
    n = len(next(iter(cand.values()), []))
    if n and ("x" not in cand or "y" not in cand):
        raise InputError(f"{store}/candidates", "the candidates table needs x and y columns")
    key = "peak_frame" if "peak_frame" in cand else "frame"
    if n and key not in cand:
        raise InputError(f"{store}/candidates", "the candidates table needs a frame column")
    frame = np.asarray(cand.get(key, np.zeros(n)), dtype=np.int64)
    if key == "peak_frame" and "frame" in cand:  # fall back where no peak frame is known
        frame = np.where(frame >= 0, frame, np.asarray(cand["frame"], dtype=np.int64))
    bad = (frame < 0) | (frame >= n_frames)
    if bad.any():
        raise InputError(
            f"{store}/candidates",
            f"frame {int(frame[bad][0])} is outside the store's {n_frames} frames",
        )
    return cand, frame


def _plan_sources(root, chosen, done, rng):
    """Frame (largest light-curve deviation among done frames, else random) and its S/N."""
    frame = rng.choice(done, size=chosen.size) if chosen.size else np.zeros(0, np.int64)
    snr = np.full(chosen.size, np.nan)
    if "lightcurves" not in root or not chosen.size:
        return frame.astype(np.int64), snr
    lc = root["lightcurves"]
    flux = np.asarray(lc["flux"][:], dtype=np.float64)[chosen][:, done]
    err = np.asarray(lc["flux_err"][:], dtype=np.float64)[chosen][:, done]
    flag = np.asarray(lc["flag"][:])[chosen][:, done] if "flag" in lc else 0
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0) & (flag == 0)
    has = good.sum(axis=1) >= 2
    if not has.any():
        return frame.astype(np.int64), snr
    med = np.zeros(chosen.size)
    med[has] = np.nanmedian(np.where(good, flux, np.nan)[has], axis=1)
    dev = np.where(good, (flux - med[:, None]) / np.where(good, err, 1.0), 0.0)
    best = np.argmax(np.abs(dev), axis=1)
    frame = np.where(has, done[best], frame)
    snr = np.where(has, dev[np.arange(chosen.size), best], np.nan)
    return frame.astype(np.int64), snr


def _create(group, name, shape, dtype, chunk, dims, values=None):
    chunks = (max(1, min(chunk, shape[0])) if shape[0] else max(1, chunk), *shape[1:])
    fill = "" if dtype is str else 0
    arr = group.create_array(
        name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill, dimension_names=dims
    )
    if values is not None and shape[0]:
        arr[:] = np.asarray(values, dtype=object) if dtype is str else values
    return arr


def export_training_set(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = CUTOUT_SIZE,
    normalise: str = "robust",
    n_sources: int | None = 1000,
    seed: int = 0,
    candidates: bool = True,
    lightcurves: bool = True,
    truth: str | os.PathLike | bool | None = None,
    match_radius: float = 1.5,
    chunk: int = 256,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> TrainingSetSummary:
    """Write a training set (cut-out triplets, light curves, labels) from a night's store.

    Parameters
    ----------
    store : str or path-like
        A dagpre store with ``aligned`` and ``difference`` cubes and a reference (the
        ``variance`` and ``mask`` cubes are used when present, else 0).
    out : str or path-like
        Folder of the Zarr v3 group to write (layout in the module docstring).
    size : int
        Cut-out side, pixels (63, as ZTF alerts).
    normalise : {"none", "zscale", "robust"}
        Per cut-out, per channel (:func:`normalise_cutouts`); recorded in the attributes.
    n_sources : int or None
        Reference sources to cut around, drawn at random with ``seed`` (all when there are
        fewer; ``None`` for all, 0 for none). Each is cut from the done frame where its
        light curve deviates most from its median (a random done frame without one).
    seed : int
        Seed of that draw.
    candidates : bool
        Cut around every row of the store's ``candidates/`` table (at its ``peak_frame``,
        else ``frame``); an error when the store has none.
    lightcurves : bool
        Also write ``lightcurves/`` (every reference source) when the store has them.
    truth : str, path-like or bool, optional
        Folder of the simulator's truth tables; default (``None``): ``truth/`` beside the
        frames, when there is one; ``False``: no labels (all -1).
    match_radius : float
        Sky-matching radius to the truth, reference pixels (converted to degrees through
        the reference WCS).
    chunk : int
        Rows per chunk of every array (256).
    overwrite : bool
        Replace ``out`` when it exists.
    progress : callable, optional
        Called with a line of text per chunk written.

    Returns
    -------
    TrainingSetSummary

    Raises
    ------
    InputError
        Naming the store when it is missing, is not a dagpre store, lacks a needed group
        (``difference``, ``reference``, ``candidates/`` when asked for) or has no done frame;
        naming ``out`` when it exists without ``overwrite``; naming a bad parameter.

    Notes
    -----
    ``snr`` of a reference source's cut-out is ``(flux - median) / flux_err`` of its light
    curve at the chosen frame (signed; NaN without a light curve). ``variance`` channels:
    science = the store's ``variance`` cube when it has no difference cube, else the
    difference's variance (an upper bound of the science's: it adds the convolved
    reference's); reference = ``reference/variance``; difference = the ``variance`` cube.

    The export reads the frames a chunk of cut-outs needs (the bounding box of its windows
    per frame) and writes whole chunks, so memory stays at one chunk plus the reference.
    """
    from dagpre._version import __version__
    from dagpre.io import store as zs

    t_start = time.perf_counter()
    say = progress or (lambda text: None)
    size = _check_size(size)
    normalise = _check_method(normalise)
    if n_sources is not None and not _is_count(n_sources, 0):
        raise InputError("n_sources", f"expected a count >= 0 or None, got {n_sources!r}")
    if not _is_count(chunk, 1):
        raise InputError("chunk", f"expected a positive integer, got {chunk!r}")
    chunk = int(chunk)
    root = zs.open_store(store, mode="r")
    store_s = str(store)
    out = Path(out)
    if out.resolve() == Path(store).resolve():
        raise InputError(str(out), "is the input store itself; write the training set elsewhere")
    if out.exists() and not overwrite:
        raise InputError(str(out), "exists; pass overwrite=True (--overwrite) to replace it")
    for name in ("aligned", "difference"):
        if name not in root:
            why = "run the workflow with the subtract step" if name == "difference" else ""
            raise InputError(store_s, f"no {name!r} cube to cut from{'; ' + why if why else ''}")
    if "reference" not in root or "image" not in root["reference"]:
        raise InputError(store_s, "no reference image (the run did not get that far)")
    if candidates and "candidates" not in root:
        raise InputError(
            store_s,
            "no candidates/ table; run the workflow with the candidates product, or export "
            "without candidates (candidates=False, --no-candidates)",
        )
    status = zs.frame_status(root)
    n_frames = status.size
    done = np.flatnonzero(status == "done")
    if not done.size:
        raise InputError(store_s, "no frame is done; run the workflow first")
    paths = _strings(root["frames"]["path"]).tolist()
    mjd_all = np.asarray(root["frames"]["mjd"][:], dtype=np.float64)
    wcs = _reference_wcs(root)
    truth_tables, truth_dir = _find_truth(paths, truth)
    radius_deg = math.nan
    if wcs is not None:
        from astropy.wcs.utils import proj_plane_pixel_scales

        radius_deg = float(match_radius) * float(np.mean(proj_plane_pixel_scales(wcs.celestial)))
    labelled = truth_tables is not None and wcs is not None

    ref = root["reference"]
    sources = _table(ref["sources"]) if "sources" in ref else {}
    n_ref = len(sources.get("x", []))
    src_ra, src_dec = _sky(sources, wcs, n_ref) if n_ref else (np.zeros(0), np.zeros(0))

    # ---- plan: one row per cut-out; metadata known before any pixel is read
    rows: dict[str, list] = {k: [] for k in ("kind", "frame", "x", "y", "ra", "dec", "snr",
                                              "candidate", "source")}  # fmt: skip
    n_cand = 0
    if candidates:
        cand, cframe = _plan_candidates(root, store_s, n_frames)
        n_cand = cframe.size
        cra, cdec = _sky(cand, wcs, n_cand) if n_cand else (np.zeros(0), np.zeros(0))
        rows["kind"] += ["candidate"] * n_cand
        rows["frame"] += cframe.tolist()
        rows["x"] += np.asarray(cand.get("x", []), dtype=np.float64).tolist()
        rows["y"] += np.asarray(cand.get("y", []), dtype=np.float64).tolist()
        rows["ra"] += cra.tolist()
        rows["dec"] += cdec.tolist()
        rows["snr"] += np.asarray(cand.get("snr", np.full(n_cand, np.nan)), float).tolist()
        ids = cand.get("id", np.arange(n_cand))
        rows["candidate"] += np.asarray(ids, dtype=np.int64).tolist()
        rows["source"] += np.asarray(cand.get("source", np.full(n_cand, -1)), np.int64).tolist()
    rng = np.random.default_rng(seed)
    want = n_ref if n_sources is None else min(int(n_sources), n_ref)
    chosen = np.sort(rng.choice(n_ref, size=want, replace=False)) if want else np.zeros(0, int)
    sframe, ssnr = _plan_sources(root, chosen, done, rng)
    rows["kind"] += ["source"] * chosen.size
    rows["frame"] += sframe.tolist()
    rows["x"] += np.asarray(sources.get("x", []), dtype=np.float64)[chosen].tolist()
    rows["y"] += np.asarray(sources.get("y", []), dtype=np.float64)[chosen].tolist()
    rows["ra"] += src_ra[chosen].tolist()
    rows["dec"] += src_dec[chosen].tolist()
    rows["snr"] += ssnr.tolist()
    rows["candidate"] += [-1] * chosen.size
    rows["source"] += chosen.astype(np.int64).tolist()
    meta = {
        "kind": np.asarray(rows["kind"], dtype=object),
        "frame": np.asarray(rows["frame"], dtype=np.int64),
        "x": np.asarray(rows["x"], dtype=np.float64),
        "y": np.asarray(rows["y"], dtype=np.float64),
        "ra": np.asarray(rows["ra"], dtype=np.float64),
        "dec": np.asarray(rows["dec"], dtype=np.float64),
        "snr": np.asarray(rows["snr"], dtype=np.float64),
        "candidate": np.asarray(rows["candidate"], dtype=np.int64),
        "source": np.asarray(rows["source"], dtype=np.int64),
    }
    n = meta["frame"].size
    meta["mjd"] = mjd_all[meta["frame"]] if n else np.zeros(0)
    meta["x0"] = np.floor(meta["x"] + 0.5).astype(np.int64) - size // 2
    meta["y0"] = np.floor(meta["y"] + 0.5).astype(np.int64) - size // 2
    if labelled:
        lab, tid, tkind = _match_truth(meta["ra"], meta["dec"], truth_tables["sources"], radius_deg)
    else:
        lab, tid, tkind = np.full(n, -1, np.int8), np.full(n, -1, np.int64), np.full(n, "", object)
    meta.update(label=lab, truth_id=tid, truth_kind=tkind)

    # ---- write
    import zarr

    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    img = ("cutout", "channel", "y", "x")
    arrays = {
        "cutouts": _create(group, "cutouts", (n, 3, size, size), "float32", chunk, img),
        "variance": _create(group, "variance", (n, 3, size, size), "float32", chunk, img),
        "mask": _create(group, "mask", (n, size, size), "uint8", chunk, ("cutout", "y", "x")),
        "norm_offset": _create(group, "norm_offset", (n, 3), "float32", chunk,
                               ("cutout", "channel")),
        "norm_scale": _create(group, "norm_scale", (n, 3), "float32", chunk,
                              ("cutout", "channel")),
    }  # fmt: skip
    dtypes = {"kind": str, "truth_kind": str, "label": "int8"}
    for name, values in meta.items():
        dtype = dtypes.get(name, values.dtype)
        _create(group, name, (n,), dtype, chunk, ("cutout",), values)
    ref_image = np.asarray(ref["image"][:], dtype=np.float32)
    grid = ref_image.shape
    ref_mask = np.asarray(ref["mask"][:], np.uint8) if "mask" in ref else np.zeros(grid, np.uint8)
    ref_var = (np.asarray(ref["variance"][:], np.float32) if "variance" in ref
               else np.zeros(grid, np.float32))  # fmt: skip
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        raw = np.full((hi - lo, 3, size, size), np.nan, dtype=np.float32)
        var = np.full((hi - lo, 3, size, size), np.nan, dtype=np.float32)
        msk = np.zeros((hi - lo, size, size), dtype=np.uint8)
        block = np.arange(lo, hi)
        for f in np.unique(meta["frame"][block]):
            items = block[meta["frame"][block] == f]
            bx0 = max(int(meta["x0"][items].min()), 0)
            by0 = max(int(meta["y0"][items].min()), 0)
            bx1 = min(int(meta["x0"][items].max()) + size, grid[1])
            by1 = min(int(meta["y0"][items].max()) + size, grid[0])
            if bx1 <= bx0 or by1 <= by0:
                bx1, by1 = bx0, by0
            box = (int(f), slice(by0, by1), slice(bx0, bx1))
            sci = np.asarray(root["aligned"][box], dtype=np.float32)
            diff = np.asarray(root["difference"][box], dtype=np.float32)
            fvar = (np.asarray(root["variance"][box], dtype=np.float32) if "variance" in root
                    else np.zeros_like(sci))  # fmt: skip
            fmask = (np.asarray(root["mask"][box], dtype=np.uint8) if "mask" in root
                     else np.zeros(sci.shape, np.uint8))  # fmt: skip
            k = items - lo
            x0s, y0s = meta["x0"][items], meta["y0"][items]

            def cut(src, sx0, sy0, fill, dtype, x0s=x0s, y0s=y0s):
                return _gather(src, sx0, sy0, x0s, y0s, size, grid, fill, dtype)

            raw[k, 0] = cut(sci, bx0, by0, np.nan, np.float32)
            raw[k, 1] = cut(ref_image, 0, 0, np.nan, np.float32)
            raw[k, 2] = cut(diff, bx0, by0, np.nan, np.float32)
            dv = cut(fvar, bx0, by0, np.nan, np.float32)
            var[k, 0], var[k, 2] = dv, dv
            var[k, 1] = cut(ref_var, 0, 0, np.nan, np.float32)
            off = np.uint8(MaskBit.OFF_FOOTPRINT)
            msk[k] = cut(fmask, bx0, by0, off, np.uint8) | cut(ref_mask, 0, 0, off, np.uint8)
        cut, cvar, cmask, offset, scale = _finish(raw, var, msk, normalise)
        arrays["cutouts"][lo:hi] = cut
        arrays["variance"][lo:hi] = cvar
        arrays["mask"][lo:hi] = cmask
        arrays["norm_offset"][lo:hi] = offset
        arrays["norm_scale"][lo:hi] = scale
        say(f"cut-outs {hi}/{n}")
    n_lc = 0
    if lightcurves and "lightcurves" in root and n_ref:
        n_lc = _write_lightcurves(
            root, group, sources, src_ra, src_dec, status, mjd_all, chunk,
            truth_tables if labelled else None, radius_deg,
        )  # fmt: skip
    group.attrs.update(
        {
            "dagpre_version": __version__,
            "source_store": str(Path(store).resolve()),
            "size": size,
            "channels": list(CHANNELS),
            "variance_channels": [
                "science: the store's variance cube (the difference's when the store has one: "
                "an upper bound)",
                "reference: reference/variance",
                "difference: the store's variance cube",
            ],
            "normalise": normalise,
            "normalisation": "raw = cutouts * norm_scale + norm_offset; variance in "
            "normalised units squared",
            "padding": "pixels beyond the reference grid: 0, variance 0, mask OFF_FOOTPRINT "
            f"({int(MaskBit.OFF_FOOTPRINT)}); non-finite: 0, mask NONFINITE "
            f"({int(MaskBit.NONFINITE)})",
            "mask_bits": {bit.name: int(bit) for bit in MaskBit},
            "centre": "(x, y) lies in pixel [size // 2, size // 2]; x0 = floor(x + 0.5) - "
            "size // 2; (x, y) reference pixels, 0-based pixel centres",
            "labels": {
                "candidate": "1 real (variable star or transient within match_radius), 0 bogus",
                "source": "1 variable (variable star or transient within match_radius), 0 constant",
                "unknown": -1,
            },
            "labelled": bool(labelled),
            "truth": truth_dir if labelled else "",
            "match_radius_px": float(match_radius),
            "seed": int(seed),
            "n_candidates": int(n_cand),
            "n_sources": int(chosen.size),
            "chunk": chunk,
        }
    )
    seconds = time.perf_counter() - t_start
    return TrainingSetSummary(
        str(out), n, int(n_cand), int(chosen.size), n_lc, bool(labelled),
        truth_dir if labelled else "", seconds,
    )  # fmt: skip


def _write_lightcurves(root, group, sources, ra, dec, status, mjd, chunk, truth, radius_deg):
    lc = root["lightcurves"]
    flux = np.asarray(lc["flux"][:], dtype=np.float64)
    err = np.asarray(lc["flux_err"][:], dtype=np.float64)
    flag = np.asarray(lc["flag"][:]) if "flag" in lc else np.zeros(flux.shape, np.int32)
    bad = (flag != 0) | ~np.isfinite(flux) | ~np.isfinite(err) | (status != "done")[None, :]
    n_src, n_frames = flux.shape
    out = group.create_group("lightcurves")
    sf = ("source", "frame")
    _create(out, "flux", flux.shape, "float32", chunk, sf, np.where(bad, 0.0, flux))
    _create(out, "flux_err", flux.shape, "float32", chunk, sf, np.where(bad, 0.0, err))
    _create(out, "mask", flux.shape, "bool", chunk, sf, bad)
    arr = out.create_array("mjd", shape=(n_frames,), dtype="float64",
                           chunks=(max(n_frames, 1),), dimension_names=("frame",))  # fmt: skip
    arr[:] = mjd
    if truth is not None:
        label, tid, tkind = _match_truth(ra, dec, truth["sources"], radius_deg)
    else:
        label = np.full(n_src, -1, np.int8)
        tid, tkind = np.full(n_src, -1, np.int64), np.full(n_src, "", object)
    per_source = {
        "source": (np.arange(n_src, dtype=np.int64), "int64"),
        "label": (label, "int8"),
        "truth_id": (tid, "int64"),
        "truth_kind": (tkind, str),
        "x": (np.asarray(sources["x"], np.float64), "float64"),
        "y": (np.asarray(sources["y"], np.float64), "float64"),
        "ra": (ra, "float64"),
        "dec": (dec, "float64"),
    }
    if "flux_aper" in sources:
        per_source["flux_ref"] = (np.asarray(sources["flux_aper"], np.float64), "float64")
    for name, new in (("flux_psf", "flux_psf"), ("chi2_dof", "chi2_dof"),
                      ("stetson_j", "stetson_j"), ("variable", "pipeline_variable")):  # fmt: skip
        if name in sources:
            col = np.asarray(sources[name])
            per_source[new] = (col, col.dtype)
    for name, (values, dtype) in per_source.items():
        _create(out, name, (n_src,), dtype, chunk, ("source",), values)
    out.attrs.update(
        {
            "units": {"flux": "ADU (reference photometric scale)", "flux_err": "ADU",
                      "mjd": "d"},
            "mask": "True = bad (flagged, not measured, non-finite, or frame not done); "
            "values there are 0",
            "labels": {"1": "variable", "0": "constant", "-1": "unknown"},
        }
    )  # fmt: skip
    return n_src


# =========================================================================== torch datasets


def _import_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - the ml extra is missing
        raise InputError(
            "torch", "the torch datasets need the ml extra: pip install 'dagpre[ml]'"
        ) from None
    return torch


class _ChunkReader:
    """Reads rows of a group's arrays one chunk at a time; opens the group lazily per process.

    Holds only the path when pickled (each DataLoader worker opens its own handle) and
    keeps the ``keep`` chunks read last, per instance (least recently used dropped first).
    """

    def __init__(self, path: str, names: Sequence[str], chunk: int, keep: int = 2) -> None:
        self.path, self.names, self.chunk, self.keep = path, tuple(names), int(chunk), int(keep)
        self._arrays = None
        self._pid = None
        self._cache: dict[int, dict] = {}

    def __getstate__(self) -> dict:
        return {"path": self.path, "names": self.names, "chunk": self.chunk, "keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["names"], state["chunk"], state["keep"])

    def row(self, index: int) -> dict[str, np.ndarray]:
        import zarr

        if self._arrays is None or self._pid != os.getpid():
            group = zarr.open_group(self.path, mode="r", zarr_format=3)
            self._arrays = {name: group[name] for name in self.names}
            self._pid = os.getpid()
            self._cache = {}
        c = index // self.chunk
        rows = self._cache.pop(c, None)
        if rows is None:
            lo = c * self.chunk
            rows = {k: a[lo : lo + self.chunk] for k, a in self._arrays.items()}
            while len(self._cache) >= max(self.keep, 1):
                self._cache.pop(next(iter(self._cache)))
        self._cache[c] = rows  # most recently used last
        return {k: v[index - c * self.chunk] for k, v in rows.items()}


def _open_group(path: Any, what: str, need: Sequence[str]):
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(str(path), f"no {what} here")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as err:  # zarr raises several types for a folder that is not a group
        raise InputError(str(path), f"not a Zarr v3 group: {err}") from None
    missing = [name for name in need if name not in group]
    if missing:
        raise InputError(str(path), f"not a {what}: missing {', '.join(missing)}")
    return group


def _chunk_order(positions: np.ndarray, chunk: int, seed: int | None) -> list[int]:
    rng = np.random.default_rng(seed)
    chunks = positions // chunk
    order = []
    for c in rng.permutation(np.unique(chunks)):
        members = np.flatnonzero(chunks == c)
        order.extend(rng.permutation(members).tolist())
    return order


_AUGMENTATIONS = ("rotate", "flip", "noise")


def _augmentations(augment: Any) -> frozenset:
    if augment is True or augment is False:
        return frozenset(_AUGMENTATIONS if augment else ())
    names = [augment] if isinstance(augment, str) else list(augment)
    bad = [n for n in names if n not in _AUGMENTATIONS]
    if bad:
        allowed = ", ".join(_AUGMENTATIONS)
        raise InputError("augment", f"expected True, False or some of {allowed}; got {bad[0]!r}")
    return frozenset(names)


class CutoutDataset:
    """Cut-out triplets of a training set (:func:`export_training_set`) as a torch dataset.

    A map-style dataset (``__len__``, ``__getitem__``) as :class:`torch.utils.data.
    DataLoader` takes it; it does not subclass :class:`torch.utils.data.Dataset`, so that
    this module imports without torch. The group is opened lazily in each process and
    read one chunk at a time (the two chunks used last are kept: about 25 MB for 256
    cut-outs of 63 x 63), so ``num_workers > 0`` works (the dataset pickles as its path and
    settings). For shuffled training over many chunks that reads each chunk once per
    epoch, pass ``sampler=dataset.chunk_order(seed)``.

    Parameters
    ----------
    path : str or path-like
        The training-set group.
    augment : bool or sequence of {"rotate", "flip", "noise"}
        ``True`` for all three: a random multiple of 90 degrees rotation and a random
        left-right flip (of image, variance and mask together), and a noise re-draw:
        ``N(0, noise_scale**2 * variance)`` added to each channel (the variance plane in
        normalised units; padding has variance 0 and stays 0). ``False``: none.
    seed : int, optional
        Augmentation of item ``i`` in epoch ``e`` (:meth:`set_epoch`) is drawn from
        ``(seed, e, i)``: the same whatever the worker count. ``None``: fresh entropy.
    transform : callable, optional
        Applied to the image tensor last.
    kind : {"candidate", "source"}, optional
        Only cut-outs of this kind (indices then run over those).
    as_dict : bool
        Return a dict instead of ``(image, label)``.
    noise_scale : float
        Standard deviation of the noise re-draw in units of each pixel's own noise (0.5).

    Returns (``__getitem__``)
    -------------------------
    (image, label)
        ``image`` torch.float32 (3, H, W) (science, reference, difference), ``label`` int
        (1 real / variable, 0 bogus / constant, -1 unknown).
    dict (``as_dict``)
        ``image``, ``variance`` float32 (3, H, W), ``mask`` uint8 (H, W), ``label``,
        ``index`` (row in the group), ``kind``, ``frame``, ``mjd``, ``x``, ``y``, ``ra``,
        ``dec``, ``snr``.
    """

    _ARRAYS = ("cutouts", "variance", "mask")
    _META = ("label", "frame", "mjd", "x", "y", "ra", "dec", "snr")

    def __init__(
        self,
        path: str | os.PathLike,
        augment: bool = False,
        seed: int | None = None,
        transform: Callable | None = None,
        *,
        kind: str | None = None,
        as_dict: bool = False,
        noise_scale: float = 0.5,
    ) -> None:
        _import_torch()
        group = _open_group(path, "training set", (*self._ARRAYS, *self._META, "kind"))
        self.path = str(path)
        self.augment = _augmentations(augment)
        self.seed, self.transform = seed, transform
        self.as_dict, self.noise_scale = bool(as_dict), float(noise_scale)
        self.epoch = 0
        self.meta = {name: np.asarray(group[name][:]) for name in self._META}
        self.meta["kind"] = _strings(group["kind"])
        if kind is not None and kind not in ("candidate", "source"):
            raise InputError("kind", f"expected 'candidate', 'source' or None, got {kind!r}")
        keep = np.ones(self.meta["kind"].size, bool) if kind is None else self.meta["kind"] == kind
        self.indices = np.flatnonzero(keep)
        self.attrs = dict(group.attrs)
        self.chunk = int(group["cutouts"].chunks[0])
        self._reader = _ChunkReader(self.path, self._ARRAYS, self.chunk)

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the dataset's items, in item order (int8)."""
        return self.meta["label"][self.indices]

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation draws of ``epoch`` (with a ``seed``); set before iterating."""
        self.epoch = int(epoch)

    def chunk_order(self, seed: int | None = None) -> list[int]:
        """Item indices with chunks in random order and items shuffled within each chunk."""
        return _chunk_order(self.indices, self.chunk, seed)

    def __getitem__(self, i: int):
        torch = _import_torch()
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} cut-outs")
        index = int(self.indices[i])
        row = self._reader.row(index)
        image, var, mask = row["cutouts"], row["variance"], row["mask"]
        if self.augment:
            image, var, mask = self._augment(index, image, var, mask)
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if self.transform is not None:
            image_t = self.transform(image_t)
        label = int(self.meta["label"][index])
        if not self.as_dict:
            return image_t, label
        out = {
            "image": image_t,
            "variance": torch.from_numpy(np.ascontiguousarray(var, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8)),
            "index": index,
            "kind": str(self.meta["kind"][index]),
        }
        for name in self._META:
            value = self.meta[name][index]
            out[name] = int(value) if name in ("label", "frame") else float(value)
        return out

    def _augment(self, index, image, var, mask):
        key = None if self.seed is None else (int(self.seed), self.epoch, index)
        rng = np.random.default_rng(key)
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        if "rotate" in self.augment:
            image, var, mask = (np.rot90(a, k, axes=(-2, -1)) for a in (image, var, mask))
        if flip and "flip" in self.augment:
            image, var, mask = (a[..., ::-1] for a in (image, var, mask))
        if "noise" in self.augment and self.noise_scale > 0:
            noise = rng.standard_normal(image.shape).astype(np.float32)
            image = image + self.noise_scale * np.sqrt(var) * noise
        return image, var, mask


class LightCurveDataset:
    """Light curves of a training set (``lightcurves/``) as a torch dataset, one per source.

    Map-style and read lazily one chunk of sources at a time, like :class:`CutoutDataset`.

    Parameters
    ----------
    path : str or path-like
        The training-set group (its ``lightcurves/`` is read) or that group itself.
    transform : callable, optional
        Applied to the item dict last.

    Returns (``__getitem__``)
    -------------------------
    dict
        ``flux``, ``flux_err`` torch.float32 (n_frame,) ADU on the reference's photometric
        scale (0 where masked), ``mask`` torch.bool (n_frame,) True = bad, ``mjd``
        torch.float64 (n_frame,), ``label`` int (1 variable, 0 constant, -1 unknown),
        ``source`` int (reference-source index), ``x``, ``y`` (reference pixels).
    """

    _ARRAYS = ("flux", "flux_err", "mask")

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None) -> None:
        _import_torch()
        path = Path(path)
        if (path / "lightcurves").is_dir():
            path = path / "lightcurves"
        group = _open_group(path, "light-curve group", (*self._ARRAYS, "mjd", "label"))
        self.path, self.transform = str(path), transform
        self.mjd = np.asarray(group["mjd"][:], dtype=np.float64)
        self.meta = {k: np.asarray(group[k][:]) for k in ("label", "source", "x", "y")}
        self.chunk = int(group["flux"].chunks[0])
        self._n = int(group["flux"].shape[0])
        self._reader = _ChunkReader(self.path, self._ARRAYS, self.chunk)

    def __len__(self) -> int:
        return self._n

    @property
    def labels(self) -> np.ndarray:
        """Per-source labels (int8)."""
        return self.meta["label"]

    def __getitem__(self, i: int) -> dict:
        torch = _import_torch()
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} light curves")
        i = int(i) % self._n
        row = self._reader.row(i)
        out = {
            "flux": torch.from_numpy(np.asarray(row["flux"], dtype=np.float32)),
            "flux_err": torch.from_numpy(np.asarray(row["flux_err"], dtype=np.float32)),
            "mask": torch.from_numpy(np.asarray(row["mask"], dtype=bool)),
            "mjd": torch.from_numpy(self.mjd.copy()),
            "label": int(self.meta["label"][i]),
            "source": int(self.meta["source"][i]),
            "x": float(self.meta["x"][i]),
            "y": float(self.meta["y"][i]),
        }
        return self.transform(out) if self.transform is not None else out
