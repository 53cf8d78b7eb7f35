"""Saturation masks: saturated cores, grown disks around them, and bleed trails.

:func:`mask_saturation` turns one image into a uint8 :class:`~dagpre.types.MaskBit` mask on
the device it was given (NumPy or CuPy), with the same code on both backends:

* ``SATURATED``: every pixel at or above the saturation level, grown by a disk whose
  radius scales with the size of the saturated object (see :func:`mask_saturation` for
  the rule);
* ``BLEED``: bleed trails, the charge a saturated core spills along the readout axis
  (``y``, array axis 0) including the partly filled pixel at each end of a trail and trail
  pixels that read below the nominal level;
* ``BAD`` from a bad-pixel map, ``NONFINITE`` for NaN or infinite pixels, and an existing
  mask OR-ed in.

Arrays are indexed ``[y, x]`` (row, column); pixel centres are 0-based integers, so the
centre of the first pixel is ``(x, y) = (0, 0)``. Pixel values and levels are in ADU.

Bleed trails, and what is taken from pyDIA
------------------------------------------
pyDIA (Albrow et al., ``compute_bleed_mask`` in ``Code/image_functions.py``) convolves the
frame with an "extended" Prewitt-like kernel: ten rows along the readout axis of
``[-1, 2, -1]`` across it, i.e. a column's excess over its two neighbours summed over ten
consecutive rows. Sky and smooth gradients cancel, noise averages down, and a narrow
vertical ridge (a trail) stands out. pyDIA flags ``|response| > 1.1 * pixel_max``, grows
every such pixel by a disk of radius 3 and masks whole columns that are more than 15 %
flagged. We take the kernel (made odd, ``bleed_window`` rows, so that it is centred on the
pixel) and the threshold in units of the saturation level, but not the rest: only a
positive response counts (a bright ridge, not the dark columns beside it), the pixel's own
excess must pass the threshold too (so the window does not smear a trail beyond its end),
and a response only counts when it is joined, along its own column, to a saturated pixel
(trails start at saturated cores). That keeps bright unsaturated stars out of the mask
without growing anything or masking whole columns. Because a spilled trail ends in one
partly filled pixel that can read anywhere between the sky and the saturation level, the
pixel just above and just below every saturated pixel is a candidate too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from dagpre.backend import ndimage_of, to_host, xp_of
from dagpre.ops._checks import check_image
from dagpre.types import Frame, InputError, MaskBit

__all__ = ["mask_saturation"]

#: Working-set cap (pixels of one batch of disk boxes) when painting grown disks.
_PAINT_CHUNK = 1 << 22


# --------------------------------------------------------------------------- validation


def _check_number(value: Any, name: str, *, positive: bool) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(name, f"expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InputError(name, f"expected a finite number, got {value!r}")
    if positive and out <= 0.0:
        raise InputError(name, f"expected a positive number, got {value!r}")
    if not positive and out < 0.0:
        raise InputError(name, f"expected a number >= 0, got {value!r}")
    return out


def _check_flags(value: Any, name: str, shape: tuple, xp: Any, *, bits: bool) -> Any:
    """A bad-pixel map (``bits=False``: bool or integer) or a uint8-valued bit mask."""
    if getattr(value, "shape", None) != shape:
        raise InputError(name, f"shape {getattr(value, 'shape', None)} differs from image {shape}")
    kind = np.dtype(value.dtype).kind
    if kind not in ("iu" if bits else "biu"):
        what = "integer bit flags (uint8)" if bits else "a boolean or integer array"
        raise InputError(name, f"expected {what}, got dtype {value.dtype}")
    value = to_host(value) if xp is np else xp.asarray(value)
    if bits and value.dtype != np.uint8:
        low, high = int(value.min()), int(value.max())
        if low < 0 or high > 255:
            raise InputError(name, f"expected bit flags in [0, 255], got values in [{low}, {high}]")
    return value


def _work_dtype(dtype: Any) -> type:
    """float32 where it holds every input value exactly, float64 otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.float32 if dtype.itemsize <= 4 else np.float64
    return np.float32 if dtype.itemsize <= 2 else np.float64


def _at_least(value: float, dtype: type) -> Any:
    """The smallest ``dtype`` number >= ``value``, so ``x >= it`` is exactly ``x >= value``."""
    out = dtype(value)
    if float(out) < value:
        out = np.nextafter(out, dtype(np.inf))
    return out


# --------------------------------------------------------------------------- public step


def mask_saturation(
    image: Any,
    saturate: float | None = None,
    *,
    grow: float = 1.0,
    bleed: bool = True,
    bleed_threshold: float = 0.1,
    bleed_window: int = 9,
    max_radius: float = 64.0,
    bad_pixel_map: Any = None,
    mask: Any = None,
) -> Any:
    """Flag saturated pixels, grown by disks, and bleed trails in one image.

    Parameters
    ----------
    image : ndarray (ny, nx) or Frame
        Pixel values in ADU, NumPy or CuPy, any real dtype. A :class:`~dagpre.types.Frame`
        gives its ``data``; its ``meta["saturate"]`` is the default ``saturate`` and its
        ``mask`` the default ``mask``.
    saturate : float, optional
        Saturation level in ADU (> 0, finite): pixels at or above it are saturated. ``None``
        takes ``image.meta["saturate"]`` from a ``Frame``; it is an error when there is no
        level to take.
    grow : float, optional
        How far each saturated object is grown, in units of its core radius (>= 0). The
        core radius of an object (8-connected saturated pixels) is
        ``r_core = min(sqrt(A / pi), W / 2)`` pixels, with ``A`` its number of pixels and
        ``W`` its width across the readout axis (columns spanned): a bleed trail adds
        length along ``y`` but no width, so trails do not inflate the radius. Every pixel
        within ``grow * r_core`` (at most ``max_radius``) of a saturated pixel of the
        object is flagged ``SATURATED`` (a dilation by a disk). ``0`` flags the saturated
        pixels only. The default, 1, makes a round core's masked disk twice as wide as the
        core: for a Moffat (beta = 3) or Gaussian star that peaks at 5 to 50 times the
        saturation level, its edge lies where the star has fallen to a few per cent of that
        level. A lone saturated pixel (``r_core = 0.5``) grows only for ``grow >= 2``.
    bleed : bool, optional
        Find bleed trails along the readout axis (``y``) and flag them ``BLEED``.
    bleed_threshold : float, optional
        A trail pixel below the saturation level must stand above the mean of its two
        neighbouring columns by more than ``bleed_threshold * saturate`` ADU, both itself
        and on average over ``bleed_window`` rows (> 0). pyDIA's threshold, on the
        average only, is about 0.055 in these units.
    bleed_window : int, optional
        Rows (odd, >= 1) of the extended Prewitt kernel along the readout axis.
    max_radius : float, optional
        Largest growth radius in pixels (> 0). Growth costs about ``(2 * radius + 1)**2``
        operations per boundary pixel of an object, so this bounds the cost of huge
        saturated areas (a very bright star with long trails, an over-exposed region).
    bad_pixel_map : ndarray (ny, nx) of bool or int, optional
        Non-zero pixels are flagged ``BAD``. NumPy or CuPy; it is moved to the image's
        device.
    mask : ndarray (ny, nx) of int, optional
        Existing :class:`~dagpre.types.MaskBit` flags (values 0-255) to OR into the result;
        moved to the image's device.

    Returns
    -------
    ndarray (ny, nx) uint8
        :class:`~dagpre.types.MaskBit` flags on the device of ``image``: ``SATURATED``,
        ``BLEED``, ``BAD`` and ``NONFINITE`` as described, plus whatever ``mask`` held.

    Raises
    ------
    InputError
        Naming the parameter: ``image`` not a non-empty real 2-D array; no saturation level
        or one that is not a positive finite number; a bad ``grow``, ``bleed``,
        ``bleed_threshold``, ``bleed_window`` or ``max_radius``; a ``bad_pixel_map`` or
        ``mask`` of another shape or dtype.

    Notes
    -----
    *Saturated pixels* are the finite pixels ``>= saturate``; NaN and infinite pixels are
    flagged ``NONFINITE`` only (and read as 0 by the filters below).

    *Growth* dilates the whole object, its saturated trail pixels included, so a trail is
    widened by the same ``grow * r_core`` on each side. That costs some area beside long
    trails, but it needs no guess of where a core ends and its trail begins, and two cores
    joined by their trails into one object are both grown. Disks are drawn in integer
    arithmetic, so NumPy and CuPy paint the same pixels.

    *Core centre* (used only to tell a core from its trail for the ``BLEED`` bit): across
    the readout axis, the middle of the object's columns; along it, the mean row of the
    saturated pixels in the object's first and last columns, rounded to a half pixel.
    Those edge columns are barely over the full well, so they spill little and
    symmetrically, and the mean is not dragged along a long or one-sided trail. The core
    disk has radius ``r_core + 1``. When two cores share one object, the second one's
    pixels outside that disk are flagged ``BLEED`` as well as ``SATURATED``.

    *Bleed trails* (``bleed=True``), in the columns that hold a saturated pixel:

    1. the ridge ``d = 2 * I[y, x] - I[y, x - 1] - I[y, x + 1]`` (edge columns repeated)
       must exceed ``2 * bleed_threshold * saturate`` at the pixel, and its sum over
       ``bleed_window`` rows centred on the pixel (pyDIA's extended kernel; edge rows
       repeated) ``bleed_window`` times that;
    2. candidates are the pixels above that, the saturated pixels, and the pixel just above
       and just below each saturated pixel (where the remainder of spilled charge lands);
    3. a trail is a run of candidates along a column that holds a saturated pixel; its
       pixels are flagged ``BLEED``, except saturated pixels inside the core disk. Trail
       pixels at the saturation level are ``SATURATED`` as well.

    Requiring the pixel's own excess too (step 1) keeps the window from smearing a trail
    half a window beyond its end.

    A wide trail that reads *below* ``saturate`` is found along its two edges only (its
    inner columns have no excess over their neighbours); pass the full-well level as
    ``saturate`` for such detectors.

    Cost: a few whole-frame passes (finiteness, the comparison, row and column "any"),
    then work proportional to the saturated area (labelling and growth run on a gathered
    copy of the rows and columns that hold saturated pixels) and to the height times the
    number of such columns (trails). A simulated 4096 x 4096 float32 frame with 40
    saturated stars takes about 0.1 s on a 2-core x86_64 machine
    (``benchmarks/bench_masks.py``); a frame that is mostly saturated takes seconds.

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.types import MaskBit
    >>> image = np.full((64, 64), 100.0, dtype=np.float32)  # sky, ADU
    >>> image[28:35, 29:36] = 1000.0  # a 7 x 7 saturated core at saturate = 1000 ADU
    >>> image[10:28, 32] = 1000.0  # a trail up its middle column...
    >>> image[9, 32] = 420.0  # ...ending in a partly filled pixel
    >>> flags = mask_saturation(image, 1000.0, grow=0)
    >>> flags.dtype, bool(flags[9, 32] & MaskBit.BLEED), bool(flags[8, 32])
    (dtype('uint8'), True, False)
    >>> int(np.count_nonzero(flags & MaskBit.SATURATED))  # 49 core + 18 trail pixels
    67
    >>> # r_core = min(sqrt(67 / pi), 7 / 2) = 3.5 px, so the default grows by 3.5 px
    >>> grown = mask_saturation(image, 1000.0)
    >>> bool(grown[31, 38] & MaskBit.SATURATED), bool(grown[31, 39])
    (True, False)
    """
    frame = image if isinstance(image, Frame) else None
    if frame is not None:
        image = frame.data
        if saturate is None:
            saturate = frame.meta.get("saturate")
        if mask is None:
            mask = frame.mask
    check_image(image, kinds="iuf")
    if saturate is None:
        raise InputError(
            "saturate",
            "no saturation level: pass saturate= (ADU), or a Frame whose meta['saturate'] is set",
        )
    saturate = _check_number(saturate, "saturate", positive=True)
    grow = _check_number(grow, "grow", positive=False)
    if not isinstance(bleed, (bool, np.bool_)):
        raise InputError("bleed", f"expected True or False, got {bleed!r}")
    bleed_threshold = _check_number(bleed_threshold, "bleed_threshold", positive=True)
    if (
        isinstance(bleed_window, (bool, np.bool_))
        or not isinstance(bleed_window, numbers.Integral)
        or bleed_window < 1
        or bleed_window % 2 == 0
    ):
        raise InputError("bleed_window", f"expected an odd positive integer, got {bleed_window!r}")
    bleed_window = int(bleed_window)
    max_radius = _check_number(max_radius, "max_radius", positive=True)
    xp = xp_of(image)
    shape = tuple(image.shape)
    if bad_pixel_map is not None:
        bad_pixel_map = _check_flags(bad_pixel_map, "bad_pixel_map", shape, xp, bits=False)
    if mask is not None:
        mask = _check_flags(mask, "mask", shape, xp, bits=True)

    dtype = _work_dtype(image.dtype)
    work = image.astype(dtype, copy=False)
    finite = None
    if np.dtype(image.dtype).kind == "f":
        finite = xp.isfinite(work)
        if bool(finite.all()):
            finite = None
        else:
            work = xp.where(finite, work, dtype(0))
    sat = xp.ascontiguousarray(work >= _at_least(saturate, dtype))  # raster order below
    out = sat.view(np.uint8) * np.uint8(MaskBit.SATURATED)
    if finite is not None:
        _set_bit(out, ~finite, MaskBit.NONFINITE)

    occupied_cols = sat.any(axis=0)
    if bool(occupied_cols.any()):
        objects = _Objects(sat, sat.any(axis=1), occupied_cols, xp)
        if grow > 0.0:
            _grow(out, objects, np.minimum(grow * objects.r_core, max_radius), xp)
        if bleed:
            cols = xp.flatnonzero(occupied_cols)
            y, x = _bleed_trails(work, sat, cols, saturate, bleed_threshold, bleed_window, xp)
            keep = ~_in_core(y, x, sat, objects, xp)
            out[y[keep], x[keep]] |= np.uint8(MaskBit.BLEED)
    if bad_pixel_map is not None:
        _set_bit(out, bad_pixel_map != 0, MaskBit.BAD)
    if mask is not None:
        out |= mask.astype(np.uint8, copy=False)
    return out


# --------------------------------------------------------------------------- pieces


def _set_bit(out: Any, where: Any, bit: MaskBit) -> None:
    out |= where.astype(np.uint8) * np.uint8(bit)


def _kept(occupied: Any, xp: Any) -> Any:
    """Indices of occupied rows (or columns) plus the first empty one after each run.

    Gathering only these keeps every adjacency of the full image: two kept indices next to
    each other in the list are next to each other in the image, or one of them is empty.
    """
    keep = occupied.copy()
    keep[1:] |= occupied[:-1]
    return xp.flatnonzero(keep)


def _interior(sub: Any, rows: Any, cols: Any, shape: tuple[int, int]) -> Any:
    """Pixels of the gathered ``sub`` whose four image neighbours are all saturated.

    ``rows`` and ``cols`` are the image indices gathered into ``sub``. A neighbour beyond
    the image edge counts as saturated (nothing to grow into there); one beyond the edge of
    ``sub`` but inside the image was left out because it is not saturated.
    """
    inner = sub.copy()
    inner[1:] &= sub[:-1]
    inner[:-1] &= sub[1:]
    inner[:, 1:] &= sub[:, :-1]
    inner[:, :-1] &= sub[:, 1:]
    if int(rows[0]) > 0:
        inner[0] = False
    if int(rows[-1]) < shape[0] - 1:
        inner[-1] = False
    if int(cols[0]) > 0:
        inner[:, 0] = False
    if int(cols[-1]) < shape[1] - 1:
        inner[:, -1] = False
    return inner


class _Objects:
    """The 8-connected saturated objects of one image.

    Attributes: ``sub`` (the gathered rows ``rows`` and columns ``cols`` of the saturation
    map), ``labels`` (their 1-based object labels), ``row_of`` and ``col_of`` (image index
    to ``sub`` index, -1 where not gathered); one entry per boundary pixel (a pixel with a
    4-neighbour in the image that is not saturated): ``ys``, ``xs``, ``label`` (0-based);
    on the host, one entry per object: ``yc2``, ``xc2`` (twice the core centre, rounded to
    an integer) and ``r_core`` (pixels).
    """

    def __init__(self, sat: Any, occupied_rows: Any, occupied_cols: Any, xp: Any) -> None:
        # label a gathered copy holding only the rows and columns with saturated pixels
        # (plus one empty separator after each run): the same objects for a fraction of
        # the work, and raster order is kept because both index lists increase
        ny, nx = sat.shape
        rows, cols = _kept(occupied_rows, xp), _kept(occupied_cols, xp)
        sub = xp.take(xp.take(sat, rows, axis=0), cols, axis=1)
        labels, count = ndimage_of(sub).label(sub, structure=np.ones((3, 3), dtype=bool))
        count = int(count)
        self.labels = labels
        self.row_of = xp.full(ny, -1, dtype=np.int64)
        self.row_of[rows] = xp.arange(rows.size, dtype=np.int64)
        self.col_of = xp.full(nx, -1, dtype=np.int64)
        self.col_of[cols] = xp.arange(cols.size, dtype=np.int64)
        area = xp.bincount(labels.reshape(-1), minlength=count + 1)[1:]
        inner = _interior(sub, rows, cols, sat.shape)
        # an object's first and last columns hold only boundary pixels, or pixels on the
        # image's first or last column: those are all the per-object sums need
        on_edge = (cols == 0) | (cols == nx - 1)
        flat = xp.flatnonzero(sub & (~inner | on_edge[None, :]))
        ncols = sub.shape[1]
        ys, xs = rows[flat // ncols], cols[flat % ncols]
        lab = labels.reshape(-1)[flat].astype(np.int64) - 1
        # first and last column of each object: sort by (label, x), read the ends of groups
        order = xp.argsort(lab * nx + xs)
        lab_sorted, xs_sorted = lab[order], xs[order]
        ids = xp.arange(count, dtype=np.int64)
        xmin = xs_sorted[xp.searchsorted(lab_sorted, ids, side="left")]
        xmax = xs_sorted[xp.searchsorted(lab_sorted, ids, side="right") - 1]
        edge = ((xs == xmin[lab]) | (xs == xmax[lab])).astype(np.float64)
        # integer-valued float64 weights: exact sums in any order (CuPy adds atomically)
        ysum = xp.bincount(lab, weights=ys * edge, minlength=count)
        nedge = xp.bincount(lab, weights=edge, minlength=count)
        area, xmin, xmax, ysum, nedge = (to_host(a) for a in (area, xmin, xmax, ysum, nedge))
        self.r_core = np.minimum(0.5 * (xmax - xmin + 1), np.sqrt(area / np.pi))
        self.yc2 = np.rint(2.0 * ysum / nedge).astype(np.int64)
        self.xc2 = (xmin + xmax).astype(np.int64)
        boundary = ~inner.reshape(-1)[flat]
        self.ys, self.xs, self.label = ys[boundary], xs[boundary], lab[boundary]


def _grow(out: Any, objects: _Objects, radius: np.ndarray, xp: Any) -> None:
    """Flag ``SATURATED`` within ``radius`` (host, px, per object) of each object's pixels.

    The dilation of a set by a disk is the union of the disks about its boundary pixels
    (the pixel of a set nearest to a point outside it always has a 4-neighbour outside
    it), so only those are painted: a pixel ``(y, x)`` is flagged when ``(y - y0)**2 +
    (x - x0)**2 <= floor(radius**2)`` for a boundary pixel ``(y0, x0)``, in int64. Disks
    are painted in batches that share a box (the next power of two above the radius), at
    most ``_PAINT_CHUNK`` box pixels a batch: the loop runs over a handful of box sizes and
    batches, not over objects.
    """
    ny, nx = out.shape
    flat_out = out.reshape(-1)
    reach = np.floor(radius).astype(np.int64)
    q = xp.asarray(np.floor(radius * radius).astype(np.int64))
    box = np.where(reach <= 1, reach, 2 ** np.ceil(np.log2(np.maximum(reach, 1))).astype(np.int64))
    box_of = xp.asarray(box)[objects.label]
    bit = np.uint8(MaskBit.SATURATED)
    for half in np.unique(box[box > 0]).tolist():
        chosen = xp.flatnonzero(box_of == half)
        offs = xp.arange(-half, half + 1, dtype=np.int64)
        per_batch = max(1, _PAINT_CHUNK // (offs.size * offs.size))
        for start in range(0, int(chosen.size), per_batch):
            sel = chosen[start : start + per_batch]
            y0, x0 = objects.ys[sel][:, None, None], objects.xs[sel][:, None, None]
            qq = q[objects.label[sel]][:, None, None]
            dy, dx = offs[None, :, None], offs[None, None, :]
            py, px = y0 + dy, x0 + dx
            inside = dy * dy + dx * dx <= qq
            inside &= (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
            flat_out[(py * nx + px)[inside]] |= bit


def _in_core(y: Any, x: Any, sat: Any, objects: _Objects, xp: Any) -> Any:
    """Which pixels ``(y, x)`` are saturated and inside their object's core disk.

    The core disk is centred on the core centre (``yc2 / 2``, ``xc2 / 2``) with radius
    ``r_core + 1``; the test ``(2y - yc2)**2 + (2x - xc2)**2 <= floor(4 (r_core + 1)**2)``
    is in int64.
    """
    hit = sat[y, x]
    where = xp.flatnonzero(hit)
    y, x = y[where], x[where]
    lab = objects.labels[objects.row_of[y], objects.col_of[x]].astype(np.int64) - 1
    q = np.floor(4.0 * (objects.r_core + 1.0) ** 2).astype(np.int64)
    yc2, xc2, q = (xp.asarray(a)[lab] for a in (objects.yc2, objects.xc2, q))
    dy, dx = 2 * y - yc2, 2 * x - xc2
    hit[where] = dy * dy + dx * dx <= q
    return hit


def _bleed_trails(
    work: Any, sat: Any, cols: Any, saturate: float, threshold: float, window: int, xp: Any
) -> Any:
    """Bleed-trail pixels ``(y, x)``: pyDIA's extended ridge, joined to saturation.

    Only the columns ``cols`` that hold a saturated pixel are examined: a trail runs along
    the column of the saturated run it came from. All arithmetic is elementwise in a fixed
    order (no reductions, scans or FFTs), so NumPy and CuPy give the same bits.
    """
    ny, nx = work.shape
    ridge = 2 * xp.take(work, cols, axis=1)
    ridge -= xp.take(work, xp.maximum(cols - 1, 0), axis=1)
    ridge -= xp.take(work, xp.minimum(cols + 1, nx - 1), axis=1)
    half = window // 2
    padded = xp.pad(ridge, ((half, half), (0, 0)), mode="edge")
    response = padded[:ny].copy()
    for k in range(1, window):
        response += padded[k : k + ny]
    level = 2.0 * threshold * saturate
    sat_c = xp.take(sat, cols, axis=1)
    candidate = ridge > work.dtype.type(level)
    candidate &= response > work.dtype.type(window * level)
    candidate |= sat_c
    candidate[1:] |= sat_c[:-1]
    candidate[:-1] |= sat_c[1:]
    vertical = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=bool)
    runs, count = ndimage_of(work).label(candidate, structure=vertical)
    keep = xp.zeros(int(count) + 1, dtype=bool)
    keep[runs[sat_c]] = True
    keep[0] = False
    found = xp.flatnonzero(keep[runs])
    ncols = cols.shape[0]
    return found // ncols, cols[found % ncols]
