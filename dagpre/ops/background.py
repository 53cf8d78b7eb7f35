"""Sky background and background-RMS maps, SExtractor-compatible, on NumPy or CuPy.

The image is cut into a grid of ``box`` x ``box`` meshes (the last row and column of meshes
are partial when the image size is not a multiple of ``box``; they are used, not dropped).
Each mesh gets a background value and an RMS from its unmasked, finite pixels; meshes with
too few such pixels are rejected and refilled from their nearest valid neighbours; the mesh
maps are median filtered and interpolated to full resolution with SExtractor's natural
bicubic spline (or, with ``interpolation="zoom"``, photutils' ``ndimage.zoom``). Meshes are
processed by array operations over ``(n_meshes, pixels_per_mesh)`` rows; nothing loops over
meshes or pixels. On the GPU every mesh goes in one batch. On the CPU the meshes go in
blocks of whole mesh rows (about a million pixels each), so that each block's
temporaries stay in cache, and the blocks run on a thread pool (NumPy releases the GIL in
its kernels); a mesh's result does not depend on its block or on the thread count, so the
result is the same, bit for bit, with any ``threads``.

The ``"sextractor"`` estimator is SExtractor's (and SEP's ``sep.Background``) exactly: a
2-sigma pre-cut, a quantised histogram, iterative 3-sigma clipping around the histogram
median interpolated within its bin, and the mode ``2.5 median - 1.5 mean`` (the median where
``|mean - median| / sigma >= 0.3``). We write our own rather than calling SEP because SEP
works only on the host, one mesh after another; this version runs on the GPU unchanged.

The other estimators follow photutils' ``Background2D`` with a ``SigmaClip(sigma, maxiters)``
on each mesh: ``"median"`` (``MedianBackground``), ``"mean"`` (``MeanBackground``) and
``"sigma_clip"`` (``SExtractorBackground``: the same mode formula on exactly clipped pixels,
no histogram). Their RMS is the standard deviation of the clipped pixels. With
``interpolation="zoom"`` and ``filter_edges="truncate"`` the full maps are photutils'
(``Background2D`` with ``exclude_percentile=50``), to about 1e-7 of the sky level, on images
that are a whole number of meshes. Where the last row or column of meshes is partial,
photutils measures those meshes from their own pixels as we do, but rejects one that has
fewer usable pixels than the given fraction of a *whole* box (we count its own pixels), and
refills rejected meshes by inverse-distance weighting (we, as SExtractor, average the
nearest valid meshes); there the maps differ.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import ndimage_of, xp_of
from dagpre.ops._checks import check_threads
from dagpre.types import InputError

__all__ = ["ESTIMATORS", "FILTER_EDGES", "INTERPOLATIONS", "Background", "estimate_background"]

ESTIMATORS = ("sextractor", "median", "mean", "sigma_clip")
INTERPOLATIONS = ("sextractor", "zoom")
FILTER_EDGES = ("shrink", "truncate")

# SExtractor / SEP constants (src/background.c); kept as named module constants, not settings.
_QUANTIF_NSIGMA = 5.0  # histogram spans mean +/- 5 sigma
_QUANTIF_NMAXLEVELS = 4096  # at most this many histogram bins
_QUANTIF_AMIN = 4.0  # minimum number of "mode pixels" per bin
_HIST_EPS = 1e-4  # relative sigma change that ends the histogram clipping
_HIST_MAXITER = 100
_MODE_FALLBACK = 0.3  # |mean - median| / sigma above which the median is used
# CPU work goes in blocks of whole mesh rows of about this many pixels (see _mesh_row_blocks)
_BLOCK_PIXELS = 1 << 20
_HIST_CHUNK = 64  # histogram bins per chunk of the two-level running sums (_histogram_mode)


@dataclass(frozen=True)
class Background:
    """Result of :func:`estimate_background`.

    Attributes
    ----------
    background, rms : ndarray (ny, nx) float32
        Full-resolution sky level and its RMS, in the image's units (ADU), on the image's
        device.
    global_back, global_rms : float
        Median of the filtered mesh maps (SExtractor's global values).
    mesh_background, mesh_rms : ndarray (nmy, nmx) float32
        The mesh maps after rejection, refill and median filtering.
    mesh_rejected : ndarray (nmy, nmx) bool
        Meshes that had too few usable pixels and were refilled from their neighbours.
    box : tuple of int
        ``(box_y, box_x)`` mesh size in pixels.
    estimator : str
        The estimator used.
    """

    background: Any
    rms: Any
    global_back: float
    global_rms: float
    mesh_background: Any
    mesh_rms: Any
    mesh_rejected: Any
    box: tuple[int, int]
    estimator: str

    def subtract(self, image: Any) -> Any:
        """``image - background`` as float32, on the image's device."""
        return (image - self.background).astype(np.float32)


def estimate_background(
    image: Any,
    box: int | tuple[int, int] = 64,
    filter_size: int | tuple[int, int] = 3,
    estimator: str = "sextractor",
    sigma: float = 3.0,
    maxiters: int = 5,
    mask: Any = None,
    filter_threshold: float = 0.0,
    min_good_fraction: float = 0.5,
    interpolation: str = "sextractor",
    filter_edges: str = "shrink",
    threads: int | None = None,
) -> Background:
    """Estimate the sky background and its RMS over an image.

    Parameters
    ----------
    image : ndarray (ny, nx)
        NumPy or CuPy image (ADU). NaN and infinite pixels are ignored.
    box : int or (int, int)
        Mesh size in pixels, ``box`` or ``(box_y, box_x)``. SExtractor's ``BACK_SIZE``.
    filter_size : int or (int, int)
        Size of the median filter over the mesh grid (odd; 1 disables it).
        ``BACK_FILTERSIZE``; see ``filter_edges`` for the grid edges.
    estimator : {"sextractor", "median", "mean", "sigma_clip"}
        Per-mesh estimator (see the module docstring).
    sigma : float
        Clipping threshold in standard deviations for ``median``, ``mean`` and
        ``sigma_clip`` (``sextractor`` always clips at SExtractor's fixed 2 then 3 sigma).
    maxiters : int
        Maximum clipping iterations for ``median``, ``mean`` and ``sigma_clip``.
    mask : ndarray (ny, nx), optional
        Non-zero (or True) marks pixels to ignore, e.g. a ``Frame.mask``.
    filter_threshold : float
        Replace a mesh by its filtered value only where they differ by at least this much
        (ADU); 0 filters every mesh. SExtractor's ``BACK_FILTERTHRESH``.
    min_good_fraction : float
        A mesh with fewer than this fraction of usable pixels is rejected and refilled from
        the nearest valid meshes (SExtractor's ``BACK_MINGOODFRAC``, 0.5).
    interpolation : {"sextractor", "zoom"}
        From the mesh grid to every pixel: ``"sextractor"``, SExtractor's (and SEP's)
        natural bicubic spline through the mesh centres, extrapolated beyond the outer
        ones; ``"zoom"``, photutils' ``Background2D`` default (``ndimage.zoom`` by the box
        size, cubic, ``mode="reflect"``, ``grid_mode=True``, cropped to the image, clipped to
        the range of the mesh values), for maps that agree with photutils.
    filter_edges : {"shrink", "truncate"}
        The median filter near the grid edges: ``"shrink"``, the window shrinks
        symmetrically (SExtractor, SEP); ``"truncate"``, the whole window is cut off by the
        edge and the median taken over the meshes inside it (photutils).
    threads : int, optional
        CPU threads for blocks of mesh rows and of image lines; None uses every CPU
        (``os.cpu_count()``), 1 runs in the calling thread. The result does not depend on
        it. Ignored for CuPy input.

    Returns
    -------
    Background
        Full-resolution maps on the image's device, mesh maps and global values.

    Raises
    ------
    InputError
        For a non-2-D image, a bad parameter, a mask of another shape, or an image with no
        valid mesh (everything masked or non-finite).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(100.0, 5.0, size=(256, 256)).astype(np.float32)
    >>> bkg = estimate_background(image, box=64)
    >>> bool(abs(bkg.global_back - 100.0) < 0.5), bool(abs(bkg.global_rms - 5.0) < 0.2)
    (True, True)
    """
    xp = xp_of(image)
    box_yx = _pair("box", box, minimum=1)
    filt_yx = _pair("filter_size", filter_size, minimum=1)
    if estimator not in ESTIMATORS:
        raise InputError("estimator", f"expected one of {ESTIMATORS}, got {estimator!r}")
    if interpolation not in INTERPOLATIONS:
        raise InputError(
            "interpolation", f"expected one of {INTERPOLATIONS}, got {interpolation!r}"
        )
    if filter_edges not in FILTER_EDGES:
        raise InputError("filter_edges", f"expected one of {FILTER_EDGES}, got {filter_edges!r}")
    if getattr(image, "ndim", None) != 2:
        raise InputError("image", f"expected a 2-D array, got ndim={getattr(image, 'ndim', None)}")
    if not sigma > 0:
        raise InputError("sigma", f"expected a positive number, got {sigma!r}")
    if int(maxiters) != maxiters or maxiters < 1:
        raise InputError("maxiters", f"expected a positive integer, got {maxiters!r}")
    if not 0.0 < min_good_fraction <= 1.0:
        raise InputError("min_good_fraction", f"expected 0 < f <= 1, got {min_good_fraction!r}")
    if mask is not None and tuple(mask.shape) != tuple(image.shape):
        raise InputError("mask", f"shape {tuple(mask.shape)} differs from image {image.shape}")
    threads = check_threads(threads)

    data = xp.asarray(image, dtype=xp.float32)
    if mask is not None:
        mask = xp.asarray(mask)
    ny, nx = data.shape
    grid = (-(-ny // box_yx[0]), -(-nx // box_yx[1]))
    blocks = _mesh_row_blocks(xp, grid, box_yx)
    n_threads = 1 if xp is not np else min(len(blocks), int(threads or os.cpu_count() or 1))

    def measure(rows: tuple[int, int]):
        return _block_meshes(
            xp, data, mask, rows, box_yx, estimator, sigma, int(maxiters), min_good_fraction
        )

    with ThreadPoolExecutor(n_threads) if n_threads > 1 else nullcontext() as pool:
        parts = _map(pool, measure, blocks)
        back, rms, good = (xp.concatenate(p) for p in zip(*parts, strict=True))
        if not bool(good.any()):
            raise InputError(
                "image",
                "no valid background mesh: every mesh has fewer than "
                f"{min_good_fraction:.0%} unmasked finite pixels (box={box_yx})",
            )
        back = back.reshape(grid)
        rms = rms.reshape(grid)
        rejected = ~good.reshape(grid)
        back, rms = _refill_rejected(xp, back, rms, rejected)
        back, rms = _median_filter_meshes(xp, back, rms, filt_yx, filter_threshold, filter_edges)
        global_back = float(xp.median(back))
        global_rms = float(xp.median(rms))
        if global_rms <= 0.0:  # SExtractor: fall back to the median of the positive RMS meshes
            positive = rms[rms > 0]
            global_rms = float(xp.median(positive)) if positive.size else 1.0

        shape = (ny, nx)
        if interpolation == "sextractor":
            back_map, rms_map = _spline_to_full(xp, (back, rms), shape, box_yx, pool)
        else:
            back_map, rms_map = (_zoom_to_full(xp, g, shape, box_yx) for g in (back, rms))
    return Background(
        background=back_map,
        rms=rms_map,
        global_back=global_back,
        global_rms=global_rms,
        mesh_background=back.astype(xp.float32),
        mesh_rms=rms.astype(xp.float32),
        mesh_rejected=rejected,
        box=box_yx,
        estimator=estimator,
    )


# --------------------------------------------------------------------------- helpers


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    pair = tuple(np.atleast_1d(value).tolist())
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2 or any(int(v) != v or v < minimum for v in pair):
        raise InputError(name, f"expected an integer >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _map(pool, fn, items) -> list:
    """``[fn(i) for i in items]``, on ``pool``'s threads when there is a pool (same order)."""
    return list(pool.map(fn, items)) if pool is not None else [fn(i) for i in items]


def _mesh_row_blocks(xp, grid, box_yx) -> list[tuple[int, int]]:
    """Split the mesh rows into blocks: one block on the GPU, ~``_BLOCK_PIXELS`` on the CPU.

    On the GPU every mesh goes through one batch. On the CPU the meshes go in blocks of
    whole mesh rows so that each block's temporaries stay in cache (and in memory the
    allocator reuses instead of faulting in fresh pages), and so that blocks can run on
    several threads. A mesh's values never depend on the block it falls in.
    """
    nmy, nmx = grid
    if xp is not np:
        return [(0, nmy)]
    per_block = max(1, _BLOCK_PIXELS // (box_yx[0] * box_yx[1] * nmx))
    return [(r, min(r + per_block, nmy)) for r in range(0, nmy, per_block)]


def _block_meshes(xp, data, mask, rows, box_yx, estimator, sigma, maxiters, min_good_fraction):
    """Background, RMS and "good" flag of every mesh in mesh rows ``rows[0]:rows[1]``.

    The block is copied once into ``(n_meshes, bh*bw)`` rows (NaN-padded to whole meshes).
    When there is no mask and every mesh's float64 sum is finite (so no pixel is NaN or
    infinite, and no mesh is partial), the per-pixel usable flags are never built.
    """
    ny, nx = data.shape
    bh, bw = box_yx
    my0, my1 = rows
    nmx = -(-nx // bw)
    y0, y1 = my0 * bh, min(my1 * bh, ny)
    pad = ((0, (my1 - my0) * bh - (y1 - y0)), (0, nmx * bw - nx))
    block = data[y0:y1]
    if pad[0][1] or pad[1][1]:
        block = xp.pad(block, pad, constant_values=np.nan)
    vals = block.reshape(my1 - my0, bh, nmx, bw).transpose(0, 2, 1, 3).reshape(-1, bh * bw)
    sums = vals.sum(axis=1, dtype=xp.float64)
    if mask is None and bool(xp.isfinite(sums).all()):
        use = None
        n_usable = xp.full(vals.shape[0], bh * bw, dtype=xp.int64)
    else:
        use = xp.isfinite(vals)
        if mask is not None:
            masked = xp.pad(mask[y0:y1].astype(bool), pad, constant_values=True)
            use &= ~masked.reshape(my1 - my0, bh, nmx, bw).transpose(0, 2, 1, 3).reshape(use.shape)
        n_usable = use.sum(axis=1)
        sums = None
    heights = xp.minimum(bh, ny - bh * xp.arange(my0, my1))
    widths = xp.minimum(bw, nx - bw * xp.arange(nmx))
    mesh_npix = (heights[:, None] * widths[None, :]).reshape(-1)
    good = n_usable.astype(xp.float32) >= (mesh_npix * min_good_fraction).astype(xp.float32)
    if estimator == "sextractor":
        back, rms = _sextractor_meshes(xp, vals, sums, use, n_usable, good)
    else:
        back, rms = _clipped_meshes(xp, vals, use, good, estimator, sigma, maxiters)
    return back, rms, good


def _mean_std(xp, values, n, sums=None):
    """Mean and population standard deviation per row of zero-filled float32 values.

    Sums and sums of squares are float64 (pixels widened to float64, then pairwise sums
    along each row). ``sums`` are the row sums when already known.
    """
    wide = values.astype(xp.float64)
    if sums is None:
        sums = wide.sum(axis=1)
    wide *= wide
    safe_n = xp.maximum(n, 1)
    mean = sums / safe_n
    var = wide.sum(axis=1) / safe_n - mean * mean
    return mean, xp.sqrt(xp.maximum(var, 0.0))


def _sextractor_meshes(xp, vals, sums, use, n_usable, good):
    """SExtractor's ``backstat`` + ``backhisto`` + ``backguess`` for every good mesh.

    ``vals`` are the float32 pixels (one mesh a row), ``sums`` their float64 row sums when
    already known (no unusable pixel), ``use`` the usable flags (None: all usable).
    """
    f32 = xp.float32
    back = xp.full(good.shape, xp.nan, dtype=xp.float64)
    rms = xp.full(good.shape, xp.nan, dtype=xp.float64)
    all_good = bool(good.all())
    if not bool(good.any()):
        return back, rms
    if not all_good:
        idx = xp.flatnonzero(good)
        vals, n_usable = vals[idx], n_usable[idx]
        use = None if use is None else use[idx]
        sums = None if sums is None else sums[idx]
    # the pixels with every unusable one set to 0 (finite everywhere)
    clean = vals if use is None else xp.where(use, vals, f32(0.0))
    # backstat: mean/sigma, then again within mean +/- 2 sigma (cuts rounded to float)
    mean, std = _mean_std(xp, clean, n_usable, sums)
    lcut = (mean - 2.0 * std).astype(f32)[:, None]
    hcut = (mean + 2.0 * std).astype(f32)[:, None]
    in_cut = vals >= lcut  # NaN (padding) compares False
    in_cut &= vals <= hcut
    if use is not None:
        in_cut &= use
    npix = xp.count_nonzero(in_cut, axis=1)
    mean, std = _mean_std(xp, clean * in_cut, npix)
    del in_cut
    step = np.sqrt(2.0 / np.pi) * _QUANTIF_NSIGMA / _QUANTIF_AMIN
    nlevels = xp.minimum((step * npix + 1).astype(xp.int64), _QUANTIF_NMAXLEVELS)
    qscale = xp.where(std > 0.0, 2.0 * _QUANTIF_NSIGMA * std / xp.maximum(nlevels, 1), 1.0)
    qscale = qscale.astype(f32)
    qzero = (mean - _QUANTIF_NSIGMA * std).astype(f32)
    # backhisto: bin = (int)(pix/qscale + cste) in float arithmetic, truncated toward zero;
    # cste = 0.499999 - qzero/qscale with the quotient in float, the difference in double.
    # Clipping to [-1, nlevels] first keeps the cast defined and sends every pixel outside
    # its mesh's histogram to bin -1 or bin nlevels; counting uses nlevels + 2 slots per
    # mesh (slot = bin + 1), and the two outer slots are dropped. Unusable pixels get key 0
    # (the first mesh's "below" slot, dropped).
    cste = (0.499999 - (qzero / qscale).astype(xp.float64)).astype(f32)
    scaled = clean / qscale[:, None]
    scaled += cste[:, None]
    xp.maximum(scaled, f32(-1.0), out=scaled)
    xp.minimum(scaled, nlevels.astype(f32)[:, None], out=scaled)
    n_max = -(-int(nlevels.max()) // _HIST_CHUNK) * _HIST_CHUNK  # whole chunks of bins
    slots = n_max + 2
    keys = scaled.astype(xp.int64)
    del scaled
    keys += (xp.arange(keys.shape[0], dtype=xp.int64) * slots + 1)[:, None]
    if use is not None:
        keys *= use
    counts = xp.bincount(keys.ravel(), minlength=keys.shape[0] * slots)
    del keys
    counts = counts.reshape(-1, slots)
    counts[xp.arange(counts.shape[0]), nlevels + 1] = 0  # bin nlevels: past the histogram
    hist = counts[:, 1 : n_max + 1]
    med, mea, sig = _histogram_mode(xp, hist, nlevels)
    qzero64, qscale64 = qzero.astype(xp.float64), qscale.astype(xp.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        use_mode = xp.abs((mea - med) / sig) < _MODE_FALLBACK
    mode = xp.where(use_mode, 2.5 * med - 1.5 * mea, med)
    back_good = xp.where(xp.abs(sig) > 0.0, qzero64 + mode * qscale64, qzero64 + mea * qscale64)
    rms_good = sig * qscale64
    back_good = back_good.astype(f32).astype(xp.float64)
    rms_good = rms_good.astype(f32).astype(xp.float64)
    if all_good:
        return back_good, rms_good
    back[idx] = back_good
    rms[idx] = rms_good
    return back, rms


def _histogram_mode(xp, hist, nlevels):
    """SExtractor's ``backguess`` on many histograms at once.

    Returns the clipped median (interpolated within its bin), mean and sigma, all in bin
    units, per histogram row. Each row iterates until its sigma converges (relative change
    below 1e-4), drops below 0.1 bin, or after 100 rounds, as in SExtractor; rows that have
    finished are left alone while the others go on.

    SExtractor finds the median by walking two pointers in from both ends of the clipping
    window, adding the next bin to whichever side holds fewer counts (ties go to the high
    side). That walk is a merge of two non-decreasing running sums, and working it through
    shows the low side ends after exactly ``a = #{k : C(k) + C(k+1) < S}`` bins, where
    ``C(k)`` counts the first ``k`` bins of the window and ``S`` its total. With ``G`` the
    row's cumulative count, ``G[j] + G[j+1]`` never decreases, so ``a`` is a search in a
    sorted sequence. ``tests/test_background.py`` holds this to the literal walk.

    The running sums of counts, counts*bin and counts*bin^2 are kept in two levels so that
    no full-size running sum is ever built: exact per-chunk sums over chunks of
    ``_HIST_CHUNK`` bins (one matrix product) and their running sums, plus, for each row a
    round asks about, the partial sum inside one chunk. The search for ``a`` likewise finds
    the chunk first, then the bin inside it. Every sum is an exact integer.
    """
    n_rows, n_bins = hist.shape
    c = _HIST_CHUNK
    n_chunks = -(-n_bins // c)
    if n_chunks * c != n_bins:
        hist = xp.pad(hist, ((0, 0), (0, n_chunks * c - n_bins)))
    chunks = hist.reshape(n_rows, n_chunks, c)
    j = xp.arange(c, dtype=xp.int64)
    powers = xp.stack([xp.ones_like(j), j, j * j], axis=1).astype(xp.float64)  # 1, bin, bin^2
    # per-chunk moments about the chunk's first bin: a float64 matrix product of integers
    # whose sums stay far below 2**53, so exact
    local = (chunks.astype(xp.float64) @ powers).astype(xp.int64)
    base = (xp.arange(n_chunks, dtype=xp.int64) * c)[None, :]
    m0, m1, m2 = local[..., 0], local[..., 1], local[..., 2]
    moments = (m0, m1 + base * m0, m2 + 2 * base * m1 + base * base * m0)
    # running sums over chunks with a leading 0: prefix[k][r, b] = sum over bins < c*b
    zero = xp.zeros((n_rows, 1), dtype=xp.int64)
    prefix = [xp.concatenate([zero, xp.cumsum(m, axis=1)], axis=1) for m in moments]
    del local, m0, m1, m2, moments

    def running(rows, t, order=3):
        """Exact sums over bins ``< t`` of row ``rows``: counts (and *bin, *bin^2)."""
        b = xp.minimum(t // c, n_chunks - 1)
        part = chunks[rows, b]
        part = xp.where(j[None, :] < (t - b * c)[:, None], part, 0)
        p0 = part.sum(axis=1)
        if order == 1:
            return prefix[0][rows, b] + p0
        p1, p2 = (part * j).sum(axis=1), (part * (j * j)).sum(axis=1)
        start = b * c
        return (
            prefix[0][rows, b] + p0,
            prefix[1][rows, b] + p1 + start * p0,
            prefix[2][rows, b] + p2 + 2 * start * p1 + start * start * p0,
        )

    lcut = xp.zeros(n_rows, dtype=xp.int64)
    hcut = nlevels.astype(xp.int64) - 1
    sig = 10.0 * hcut.astype(xp.float64)
    sig1 = xp.ones(n_rows)
    med = xp.zeros(n_rows)
    mea = xp.zeros(n_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_HIST_MAXITER):
            active = (sig >= 0.1) & (xp.abs(sig / sig1 - 1.0) > _HIST_EPS)
            act = xp.flatnonzero(active)
            if act.size == 0:
                break
            sig1[act] = sig[act]
            lo = lcut[act]  # the window's first bin
            hi = hcut[act] + 1  # one past its last bin
            g0_lo, g1_lo, g2_lo = running(act, lo)
            g0_hi, g1_hi, g2_hi = running(act, hi)
            total = g0_hi - g0_lo
            # first bin t with G[t] + G[t+1] >= total + 2 G[lo]: chunk, then bin in chunk
            target = (total + 2 * g0_lo)[:, None]
            pair_at_chunk_start = 2 * prefix[0][act, :-1] + chunks[act, :, 0]
            n_below = xp.count_nonzero(pair_at_chunk_start < target, axis=1)
            b = xp.maximum(n_below - 1, 0)
            part = chunks[act, b]
            inclusive = xp.cumsum(part, axis=1)
            pairs = 2 * prefix[0][act, b][:, None] + 2 * inclusive - part
            split = xp.where(n_below > 0, b * c + xp.count_nonzero(pairs < target, axis=1), 0)
            a = xp.where(total > 0, xp.clip(split - lo, 0, hi - lo), 0)
            hilow = lo + a
            lowsum = running(act, hilow, order=1) - g0_lo
            highsum = total - lowsum
            hihigh_bin = hilow - 1
            # SExtractor may peek one bin past the window's end (read as 0 past the row's end)
            past_end = xp.where(hilow < n_bins, hist[act, xp.minimum(hilow, n_bins - 1)], 0)
            peak = xp.maximum(past_end, hist[act, xp.maximum(hilow - 1, 0)])
            new_med = xp.where(
                hihigh_bin >= 0, hihigh_bin + 0.5 + (highsum - lowsum) / (2.0 * peak), 0.0
            )
            has = total > 0
            safe_total = xp.where(has, total, 1).astype(xp.float64)
            new_mea = xp.where(has, (g1_hi - g1_lo) / safe_total, 0.0)
            var = xp.where(has, (g2_hi - g2_lo) / safe_total - new_mea * new_mea, 0.0)
            new_sig = xp.sqrt(xp.maximum(var, 0.0))
            low = new_med - 3.0 * new_sig
            high = new_med + 3.0 * new_sig
            top = nlevels[act].astype(xp.int64) - 1
            lcut[act] = xp.where(low > 0.0, xp.trunc(low + 0.5), 0).astype(xp.int64)
            hcut[act] = xp.where(
                high < top, xp.trunc(xp.where(high > 0, high + 0.5, high - 0.5)), top
            ).astype(xp.int64)
            med[act], mea[act], sig[act] = new_med, new_mea, new_sig
    return med, mea, sig


def _clipped_meshes(xp, vals, use, good, estimator, nsigma, maxiters):
    """Sigma-clipped per-mesh statistics, as photutils' ``SigmaClip`` + estimator.

    ``vals`` holds each mesh's float32 pixels in a row, ``use`` their usable flags (None:
    all usable); the clipping works in float64. Only good meshes are measured (a rejected
    mesh may have no usable pixel at all), the others get NaN.
    """
    back = xp.full(good.shape, xp.nan, dtype=xp.float64)
    rms = xp.full(good.shape, xp.nan, dtype=xp.float64)
    idx = xp.flatnonzero(good)
    if idx.size == 0:
        return back, rms
    if idx.size < good.size:
        vals, use = vals[idx], (None if use is None else use[idx])
    work = (vals if use is None else xp.where(use, vals, xp.float32(np.nan))).astype(xp.float64)
    for _ in range(maxiters):
        center = xp.nanmedian(work, axis=1)
        std = xp.nanstd(work, axis=1)
        clip = (work < (center - nsigma * std)[:, None]) | (work > (center + nsigma * std)[:, None])
        if not bool(clip.any()):
            break
        work = xp.where(clip, xp.nan, work)
    with np.errstate(invalid="ignore", divide="ignore"):
        median = xp.nanmedian(work, axis=1)
        mean = xp.nanmean(work, axis=1)
        std = xp.nanstd(work, axis=1)
        if estimator == "median":
            back_good = median
        elif estimator == "mean":
            back_good = mean
        else:  # "sigma_clip": SExtractor's mode formula on exactly clipped pixels
            mode = xp.where(
                xp.abs(mean - median) / std < _MODE_FALLBACK, 2.5 * median - 1.5 * mean, median
            )
            back_good = xp.where(std == 0.0, mean, mode)
    back[idx] = back_good
    rms[idx] = std
    return back, rms


def _refill_rejected(xp, back, rms, rejected):
    """Replace rejected meshes by the mean of their nearest valid meshes (SExtractor)."""
    if not bool(rejected.any()):
        return back, rms
    nmy, nmx = back.shape
    yy, xx = xp.meshgrid(xp.arange(nmy), xp.arange(nmx), indexing="ij")
    bad = xp.flatnonzero(rejected.ravel())
    ok = xp.flatnonzero(~rejected.ravel())
    d2 = (yy.ravel()[bad, None] - yy.ravel()[None, ok]) ** 2 + (
        xx.ravel()[bad, None] - xx.ravel()[None, ok]
    ) ** 2
    nearest = d2 == d2.min(axis=1, keepdims=True)
    weights = nearest / nearest.sum(axis=1, keepdims=True)
    back, rms = back.ravel().copy(), rms.ravel().copy()
    back[bad] = weights @ back[ok]
    rms[bad] = weights @ rms[ok]
    return back.reshape(nmy, nmx), rms.reshape(nmy, nmx)


def _median_filter_meshes(xp, back, rms, filt_yx, threshold, edges="shrink"):
    """The mesh median filter, near the grid edges as SExtractor or as photutils.

    ``edges="shrink"`` (SExtractor): the window shrinks symmetrically, so a mesh next to an
    edge is filtered over one mesh each side along that axis. ``edges="truncate"``
    (photutils' ``generic_filter(nanmedian, mode="constant", cval=nan)``): the full window
    is cut off by the edge, so the median is over the meshes that fall inside it.
    """
    fy, fx = filt_yx[0] // 2, filt_yx[1] // 2
    if fy == 0 and fx == 0:
        return back, rms
    nmy, nmx = back.shape
    # each mesh's half-window, limited by its distance to the nearest edge (or not)
    ry = xp.minimum(fy, xp.minimum(xp.arange(nmy), nmy - 1 - xp.arange(nmy)))[:, None]
    rx = xp.minimum(fx, xp.minimum(xp.arange(nmx), nmx - 1 - xp.arange(nmx)))[None, :]
    if edges == "truncate":  # the NaN padding alone cuts the window off at the edge
        ry, rx = xp.full_like(ry, fy), xp.full_like(rx, fx)
    pad = ((fy, fy), (fx, fx))
    back_p = xp.pad(back, pad, constant_values=np.nan)
    rms_p = xp.pad(rms, pad, constant_values=np.nan)
    stack_b, stack_r = [], []
    for dy in range(-fy, fy + 1):  # a loop over window offsets (9 for 3x3), not meshes
        for dx in range(-fx, fx + 1):
            inside = (abs(dy) <= ry) & (abs(dx) <= rx)
            sl = (slice(fy + dy, fy + dy + nmy), slice(fx + dx, fx + dx + nmx))
            stack_b.append(xp.where(inside, back_p[sl], np.nan))
            stack_r.append(xp.where(inside, rms_p[sl], np.nan))
    med_b = xp.nanmedian(xp.stack(stack_b), axis=0)
    med_r = xp.nanmedian(xp.stack(stack_r), axis=0)
    replace = xp.abs(med_b - back) >= threshold
    return xp.where(replace, med_b, back), xp.where(replace, med_r, rms)


def _spline_d2_operator(n: int) -> np.ndarray:
    """Matrix giving natural-spline second derivatives (SExtractor's scaling) of n nodes.

    SExtractor's recurrence (``makebackspline``) is linear in the node values with
    coefficients that depend only on ``n``; applying it to the identity gives the operator
    once per grid size instead of once per image line.
    """
    values = np.eye(n)
    d2 = np.zeros((n, n))
    if n < 3:
        return d2
    u = np.zeros((n - 1, n))
    diag = np.zeros(n)
    for k in range(1, n - 1):
        temp = -1.0 / (diag[k - 1] + 4.0)
        diag[k] = temp
        u[k] = temp * (u[k - 1] - 6.0 * (values[k + 1] + values[k - 1] - 2.0 * values[k]))
    for k in range(n - 2, 0, -1):
        d2[k] = (diag[k] * d2[k + 1] + u[k]) / 6.0
    return d2


def _spline_weights(
    n_nodes: int, n_pixels: int, box: int, half_pixel: bool, curved: bool = True
) -> np.ndarray:
    """``(n_pixels, n_nodes)`` weights of SExtractor's cubic spline along one axis.

    SExtractor's spline is linear in the node values: a pixel at node coordinate ``t`` between
    nodes ``lo`` and ``lo + 1`` (``d = t - lo``) gets ``(1-d) v[lo] + d v[lo+1]
    + ((1-d)^3 - (1-d)) v''[lo] + (d^3 - d) v''[lo+1]`` with ``v'' = D v`` from
    :func:`_spline_d2_operator`. Beyond the outer nodes the end pieces extrapolate.
    Node coordinates: x uses ``(x + 0.5) / box - 0.5``; y uses ``y / box - 0.5``, exactly as
    SExtractor and SEP do (their y convention sits half a pixel from their x convention).
    """
    if n_nodes == 1:
        return np.ones((n_pixels, 1))
    pos = (np.arange(n_pixels) + (0.5 if half_pixel else 0.0)) / box - 0.5
    lo = np.clip(np.floor(pos), 0, n_nodes - 2).astype(np.int64)
    d = pos - lo
    c = 1.0 - d
    rows = np.arange(n_pixels)
    linear = np.zeros((n_pixels, n_nodes))
    curve = np.zeros((n_pixels, n_nodes))
    linear[rows, lo] = c
    linear[rows, lo + 1] = d
    curve[rows, lo] = c**3 - c
    curve[rows, lo + 1] = d**3 - d
    if not curved:
        return linear
    return linear + curve @ _spline_d2_operator(n_nodes)


def _spline_x_pieces(n_nodes: int, n_pixels: int, box: int):
    """How each image column takes its value from the four coefficients of its interval.

    Along x, SExtractor's spline gives a pixel at node coordinate ``t = (x + 0.5) / box -
    0.5`` between nodes ``k`` and ``k + 1`` (``d = t - k``, ``c = 1 - d``) the value
    ``c v[k] + d v[k+1] + (c^3 - c) s[k] + (d^3 - d) s[k+1]``, ``s`` the line's second
    derivatives. Interval ``k`` holds columns ``box//2 + k*box`` to ``box//2 + (k+1)*box - 1``,
    the first one also the columns left of it and the last one those right of it
    (extrapolated). Returns ``(x0, n_full, w_mid, pieces)``: the ``n_full`` whole intervals
    from column ``x0`` share the ``(4, box)`` weights ``w_mid``; ``pieces`` lists the other
    column ranges as ``(start, stop, k, weights (4, stop - start))``.
    """

    def weights(x, k):
        d = (x + 0.5) / box - 0.5 - k
        c = 1.0 - d
        return np.stack([c, d, c**3 - c, d**3 - d])

    x0 = box // 2
    n_full = min(n_nodes - 1, max(0, (n_pixels - x0) // box))
    x_right = x0 + n_full * box
    k_right = min(n_full, n_nodes - 2)
    pieces = [(0, x0, 0, weights(np.arange(x0), 0))]
    if x_right < n_pixels:
        pieces.append((x_right, n_pixels, k_right, weights(np.arange(x_right, n_pixels), k_right)))
    return x0, n_full, weights(x0 + np.arange(box), 0), pieces


def _spline_to_full(xp, grids, shape, box_yx, pool=None):
    """SExtractor's bicubic spline from the mesh grid to every pixel.

    SExtractor interpolates each node column along y, recomputes second derivatives along
    x for each image line, then interpolates along x. Along y that is one small matrix
    product for all lines (``Wy @ G``); the second derivatives of every line are another
    (``D`` from :func:`_spline_d2_operator`). Along x each pixel needs only the four
    coefficients of its interval, so all whole intervals of a set of lines are one matrix
    product of (lines x intervals, 4) coefficients with (4, box) weights, and the columns
    before the first and after the last whole interval one more each: four multiply-adds
    a pixel (not one per mesh column), on BLAS or cuBLAS. On the CPU the lines go in
    blocks (on ``pool``'s threads when given), each written straight into the float32 map;
    the GPU takes all lines at once. ``tests/test_background.py`` holds the maps to the
    dense product ``Wy @ G @ Wx.T`` (one weight per mesh column) within one float32 unit;
    on 300 random grid and image sizes they came out identical.
    """
    ny, nx = shape
    nmy, nmx = grids[0].shape
    wy = xp.asarray(_spline_weights(nmy, ny, box_yx[0], half_pixel=False))
    x0, n_full, w_mid, pieces = _spline_x_pieces(nmx, nx, box_yx[1])
    w_mid = xp.asarray(w_mid)
    pieces = [(a, b, k, xp.asarray(w)) for a, b, k, w in pieces]
    # With a single row of meshes SExtractor reuses the (zero) y second derivatives along x,
    # so it interpolates linearly between mesh centres there; we do the same.
    d2_t = xp.asarray(_spline_d2_operator(nmx).T) if nmy > 1 else None
    maps = []
    for grid in grids:
        rows = wy @ grid.astype(xp.float64)  # (ny, nmx): every line's node values
        out = xp.empty(shape, dtype=xp.float32)
        if nmx == 1:
            out[...] = rows
            maps.append(out)
            continue
        d2 = rows @ d2_t if d2_t is not None else xp.zeros_like(rows)
        coeffs = xp.stack([rows[:, :-1], rows[:, 1:], d2[:, :-1], d2[:, 1:]], axis=-1)

        def lines(y0, y1, coeffs=coeffs, out=out):
            block = coeffs[y0:y1]
            if n_full:
                whole = block[:, :n_full].reshape(-1, 4) @ w_mid
                out[y0:y1, x0 : x0 + n_full * box_yx[1]] = whole.reshape(y1 - y0, -1)
            for a, b, k, w in pieces:
                out[y0:y1, a:b] = block[:, k] @ w

        if xp is not np:
            lines(0, ny)
        else:
            step = max(1, _BLOCK_PIXELS // (8 * nx))
            _map(pool, lambda y0, s=step: lines(y0, min(y0 + s, ny)), range(0, ny, step))
        maps.append(out)
    return maps


def _zoom_to_full(xp, grid, shape, box_yx):
    """photutils' ``Background2D`` interpolation of a mesh grid to every pixel.

    As photutils 3.0's default (``BkgZoomInterpolator``): ``ndimage.zoom`` by the box size,
    cubic (``order=3``), ``mode="reflect"``, ``grid_mode=True`` (mesh values sit at the
    centres of whole boxes, partial edge meshes included), cropped to the image and
    clipped to the range of the mesh values; a constant grid gives a constant map.
    """
    lo, hi = float(xp.min(grid)), float(xp.max(grid))
    if lo == hi:
        return xp.full(shape, lo, dtype=xp.float32)
    zoomed = ndimage_of(grid).zoom(
        grid.astype(xp.float64),
        box_yx,
        output=xp.float32,
        order=3,
        mode="reflect",
        grid_mode=True,
    )
    zoomed = xp.ascontiguousarray(zoomed[: shape[0], : shape[1]])
    return xp.clip(zoomed, xp.float32(lo), xp.float32(hi), out=zoomed)
