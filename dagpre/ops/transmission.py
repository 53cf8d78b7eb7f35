"""Relative transmission of the frames of one field: how much light clouds took, frame by frame.

A cloud dims every star of a frame (and brightens its sky). Frame by frame, without a
catalogue of the field, a cloud-dimmed frame of a rich field looks like a clear frame of a
sparser one; against the other frames of the *same* field it does not. The
:func:`relative_transmission` of a frame is the star light it holds in the sky area it
shares with a base frame of the night, over the base frame's light there, divided by the
median of that ratio over the frames given:

1. Each frame's background (:func:`~dagpre.ops.background.estimate_background`, meshes of
   ``box`` px) is subtracted.
2. The base frame is the one whose total unmasked light is the median (a frame in the
   middle of the night's conditions, not the brightest).
3. Each frame's whole-pixel shift to the base comes from
   :func:`~dagpre.ops.xcorr.xcorr_shift` (star light cross-correlated; no WCS needed).
4. Over the overlap of the two frames, less ``edge`` px at its borders (stars cut by the
   border would count differently under different seeing), and less every pixel within
   ``grow`` px of a pixel masked in either frame (a saturated core masked in one frame and
   not the other), the background-subtracted pixels of both are summed; the ratio of the
   sums is the frame's light against the base's.

Sums of whole stars keep their flux whatever the PSF, so seeing, defocus and trailing do
not change the ratio (to first order: light spread across the overlap's border or into a
masked footprint does); rotations of a few tenths of a degree move the stars near the
border by less than the trimmed ``edge``. What does change it is the background: a sky
error ``e`` ADU per pixel over ``N`` summed pixels adds ``e N`` to the light, and so does
the light the masked footprints of saturated stars take out of the sums. Measured on the
nights of ``tests/test_ml_quality.py`` and ``tests/test_transmission.py`` (clear-frame
transmission 0.9-1.0, clouds 0.3-0.9 across the frame): on 256 x 256 px with 160 stars,
clear frames 0.94-1.10 of the median and cloud frames 0.55-0.73; on 128 x 128 px with 40
stars, where a few masked saturated stars leave little light to sum, clear frames
0.61-1.31 and cloud frames 0.45-0.76.

Conventions: arrays are indexed ``[y, x]``; shifts are ``image(x, y) ~= base(x - dx, y - dy)``
in pixels, as :class:`~dagpre.ops.xcorr.XcorrShift`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import ndimage_of, to_host, xp_of
from dagpre.ops._checks import check_image
from dagpre.types import Frame, InputError

__all__ = ["Transmission", "relative_transmission"]


@dataclass(frozen=True)
class Transmission:
    """Result of :func:`relative_transmission`; arrays in the order of the frames given.

    Attributes
    ----------
    relative : ndarray (n,) float64
        Each frame's light over the median frame's (1 for a typical frame of the night;
        0.6 when clouds took 40 % of it). NaN where it could not be measured (see
        ``reason``).
    ratio : ndarray (n,) float64
        Each frame's light over the base frame's, before the median is divided out.
    base : int
        Index of the base frame.
    dx, dy : ndarray (n,) int64
        Whole-pixel shift of each frame to the base (0 where none was found).
    overlap : ndarray (n,) float64
        Share of the base frame's pixels summed for each frame, in [0, 1].
    reason : tuple of str
        Why a frame's value is NaN ("" where it is not).
    """

    relative: np.ndarray
    ratio: np.ndarray
    base: int
    dx: np.ndarray
    dy: np.ndarray
    overlap: np.ndarray
    reason: tuple


def _pixels(item: Any, mask: Any, index: int) -> tuple[Any, Any]:
    """``(data, bad)`` of one frame: a Frame or any object with ``data`` (and ``mask``, OR-ed
    with ``mask``), or an array."""
    if isinstance(item, Frame) or (hasattr(item, "data") and not hasattr(item, "ndim")):
        data, own = item.data, getattr(item, "mask", None)
    else:
        data, own = item, None
    check_image(data, f"frames[{index}]")
    xp = xp_of(data)
    bad = ~xp.isfinite(data)
    for m in (own, mask):
        if m is not None:
            m = xp.asarray(m)
            if m.shape != data.shape:
                raise InputError(
                    f"masks[{index}]", f"expected shape {data.shape}, got {tuple(m.shape)}"
                )
            bad |= m != 0
    return data, bad


def relative_transmission(
    frames: Sequence,
    *,
    masks: Sequence | None = None,
    box: int = 64,
    grow: int = 8,
    edge: int | None = None,
    max_shift: float | None = None,
    min_overlap: float = 0.1,
    min_significance: float = 5.0,
) -> Transmission:
    """Each frame's transmission relative to the other frames of the same field.

    Parameters
    ----------
    frames : sequence of Frame or ndarray (ny, nx)
        At least 3 raw frames (ADU, sky not subtracted) of one field and filter, NumPy or
        CuPy, of one shape. A :class:`~dagpre.Frame`'s mask is used (or any object's with
        ``data`` and ``mask``).
    masks : sequence of ndarray (ny, nx), optional
        Non-zero marks unusable pixels, OR-ed with the frames' own masks.
    box : int
        Background mesh size, px.
    grow : int
        Pixels within this distance (px, square) of a pixel masked in either frame are left
        out of both sums.
    edge : int, optional
        Pixels trimmed from each border of the overlap (default ``grow``).
    max_shift : float, optional
        Largest shift searched, px (default: half the smaller frame side).
    min_overlap : float
        Least share of the base frame's pixels that must be summed for a value.
    min_significance : float
        Least :attr:`~dagpre.ops.xcorr.XcorrShift.significance` of the shift.

    Returns
    -------
    Transmission

    Raises
    ------
    InputError
        Fewer than 3 frames, frames of different shapes or devices, or a bad parameter.

    Examples
    --------
    >>> import dagpre as dp
    >>> night = dp.simulate.night(n_frames=5, shape=(128, 128), n_stars=40, seed=1,
    ...                           bad_frames={2: "cloud"})
    >>> t = relative_transmission(night.frames)
    >>> bool(t.relative[2] < 0.8), bool(abs(t.relative[0] - 1) < 0.15)
    (True, True)
    """
    from dagpre.ops.background import estimate_background
    from dagpre.ops.xcorr import xcorr_shift

    frames = list(frames)
    if len(frames) < 3:
        raise InputError("frames", f"expected at least 3 frames of one field, got {len(frames)}")
    if masks is not None and len(masks) != len(frames):
        raise InputError("masks", f"expected {len(frames)} masks, got {len(masks)}")
    for name, value, lo in (("box", box, 4), ("grow", grow, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise InputError(name, f"expected an integer >= {lo}, got {value!r}")
    edge = grow if edge is None else edge
    if isinstance(edge, bool) or not isinstance(edge, (int, np.integer)) or edge < 0:
        raise InputError("edge", f"expected an integer >= 0, got {edge!r}")
    if not 0.0 < min_overlap <= 1.0:
        raise InputError("min_overlap", f"expected a fraction in (0, 1], got {min_overlap!r}")
    pix = [_pixels(f, None if masks is None else masks[k], k) for k, f in enumerate(frames)]
    shape = tuple(pix[0][0].shape)
    xp = xp_of(pix[0][0])
    for k, (data, _) in enumerate(pix):
        if tuple(data.shape) != shape:
            raise InputError(f"frames[{k}]", f"expected shape {shape}, got {tuple(data.shape)}")
        if xp_of(data) is not xp:
            raise InputError(f"frames[{k}]", "frames on different devices (NumPy and CuPy)")
    ny, nx = shape
    if max_shift is None:
        max_shift = 0.5 * min(ny, nx)
    ndi = ndimage_of(pix[0][0])

    subtracted, bads = [], []
    for data, bad in pix:
        bkg = estimate_background(data, mask=bad, box=min(box, ny, nx))
        sub = bkg.subtract(data.astype(xp.float64))
        subtracted.append(xp.where(bad, 0.0, sub))
        bads.append(bad)
    totals = np.array([float(s.sum()) for s in subtracted])
    base = int(np.argsort(totals)[(len(totals) - 1) // 2])

    n = len(frames)
    ratio = np.full(n, math.nan)
    overlap = np.zeros(n)
    dxs, dys = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    reason = [""] * n
    square = xp.ones((3, 3), dtype=bool)
    for k in range(n):
        if k == base:
            dx = dy = 0
        else:
            try:
                shift = xcorr_shift(
                    pix[k][0], pix[base][0], max_shift=max_shift, mask=bads[k],
                    reference_mask=bads[base],
                )  # fmt: skip
            except InputError as err:  # this frame only (e.g. blank): said in its reason
                reason[k] = f"no shift to the base frame {base}: {err}"
                continue
            if not shift.significance >= min_significance:
                reason[k] = (
                    f"no shift to the base frame {base} (correlation significance "
                    f"{shift.significance:.1f} < {min_significance})"
                )
                continue
            dx, dy = round(shift.dx), round(shift.dy)
        dxs[k], dys[k] = dx, dy
        x0, x1 = max(0, dx) + edge, min(nx, nx + dx) - edge
        y0, y1 = max(0, dy) + edge, min(ny, ny + dy) - edge
        if x1 <= x0 or y1 <= y0:
            reason[k] = f"no overlap with the base frame {base} (shift {dx}, {dy} px)"
            continue
        a = subtracted[k][y0:y1, x0:x1]
        b = subtracted[base][y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        bad = bads[k][y0:y1, x0:x1] | bads[base][y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        if grow:
            bad = ndi.binary_dilation(bad, structure=square, iterations=grow)
        use = ~bad
        overlap[k] = float(use.sum()) / (ny * nx)
        if overlap[k] < min_overlap:
            reason[k] = (
                f"overlap with the base frame {base} is {overlap[k]:.0%} < {min_overlap:.0%}"
            )
            continue
        light = float(xp.where(use, b, 0.0).sum())
        if not light > 0:
            reason[k] = f"no star light in the base frame {base} over the overlap"
            continue
        ratio[k] = float(xp.where(use, a, 0.0).sum()) / light
    median = float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else math.nan
    relative = ratio / median if median > 0 else np.full(n, math.nan)
    return Transmission(
        relative=np.asarray(to_host(relative), dtype=np.float64),
        ratio=ratio,
        base=base,
        dx=dxs,
        dy=dys,
        overlap=overlap,
        reason=tuple(reason),
    )
