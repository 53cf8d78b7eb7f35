"""Image subtraction: a spatially varying kernel and background fitted by weighted least squares.

:func:`subtract` models the image that is *not* convolved (the target ``T``) as the other
one (``I``, the image that is convolved) convolved with a kernel, plus a background::

    T(x, y) = sum_k a_k(x, y) (I ⊗ b_k)(x, y) + B(x, y) + noise
    a_k(x, y) = sum_ij c_kij x^i y^j           B(x, y) = sum_ij d_ij x^i y^j

with basis images ``b_k`` (:mod:`dagpre.ops._kernels`: ``"gaussian"`` as HOTPANTS,
``"delta"`` as Bramich 2008, ``"modified_delta"`` as Bramich et al. 2013 / pyDIA) and
polynomials of the pixel position scaled to [-1, 1] over the frame. In the Gaussian and
modified-delta bases every element but the first sums to zero, so the kernel sum, the
photometric scale between the images, is the first element's polynomial alone and has its
own degree ``scale_order``; the other elements carry ``kernel_order``; the background has
``bg_order``. The difference is ``D = T - I ⊗ K - B``, flipped in sign when the science is
the image convolved, so that it is always *science minus reference* (a new source in the
science is positive).

How the fit runs
----------------
1. Both images are cleaned (non-finite pixels set to 0 and flagged, pixels at or above
   ``saturation`` flagged), their sky is measured (:func:`~dagpre.ops.background.
   estimate_background`) and, by default, subtracted; masked pixels of the image to be
   convolved are set to 0 so that they spread nothing.
2. Stamps: stars from :func:`~dagpre.ops.detect.detect_sources` on the reference, kept when
   they are bright, unmasked, not at the edge, star-shaped and without a brighter neighbour,
   then up to ``stamps_per_cell`` of the brightest per cell of a ``stamp_grid`` grid
   (HOTPANTS' stamp layout); or the whole frame in tiles (``stamps="all"``); or positions
   given by the caller. Their FWHMs in both images decide the convolution direction
   (``convolve="auto"``: the sharper image is convolved, so nothing is deconvolved), the
   default kernel size and the Gaussian widths.
3. The basis-convolved stamps ``I ⊗ b_k`` are made once (separable 1-D passes for the
   Gaussian basis, shifted views for the delta bases). As in HOTPANTS the kernel's
   polynomial is taken at each stamp's centre inside that stamp (the background's is
   exact per pixel), so the normal matrix is the per-stamp Gram matrices ``C_s^T W_s C_s``
   (batched matrix products in float64) combined with the outer products of the stamp's
   monomials; it is solved by Cholesky after Jacobi scaling.
4. Iterations (``max_iterations``): the weights become ``1 / (var_T(model) + var_I ⊗ K^2)``
   with the target's Poisson term from the model (Bramich's noise model, not the noisy
   pixels); pixels beyond ``clip_sigma`` and stamps whose reduced chi^2 lies more than
   ``clip_sigma`` robust sigmas above the median are dropped, until nothing changes.
5. The whole frame is convolved as ``sum_m x^i y^j (I ⊗ A_m)`` with one kernel image
   ``A_m = sum_k c_km b_k`` per spatial monomial (the same sum as ``sum_k a_k (I ⊗ b_k)``,
   reordered: 6 FFT convolutions for ``kernel_order=2`` instead of one per basis element),
   by FFTs in row bands so a 4096^2 frame needs a few hundred MB. The variance of ``I ⊗ K``
   is ``var_I ⊗ K^2`` exactly, through the same reordering with the products of monomials
   (15 convolutions for order 2).

Noise model
-----------
Variances are per pixel in ADU^2. ``science_variance`` / ``reference_variance`` maps are
used as given. Otherwise, with ``gain`` (e-/ADU) and ``rdnoise`` (e-) the CCD formula on the
image as given (sky included): ``max(sky + source, 0) / gain + (rdnoise / gain)^2``; with
``gain`` alone, the measured sky RMS squared plus ``max(source, 0) / gain``; with neither,
the sky RMS squared (no Poisson term for sources: bright stars' noise is then
underestimated). ``source`` is the image minus its measured sky.

Conventions: arrays are indexed ``[y, x]``; positions are (x, y) pixel order with 0-based
pixel centres, not NumPy (row, col) order. Kernels are indexed ``[v + r, u + r]`` with
``(u, v)`` the (x, y) offset; convolution is ``(I ⊗ K)(x, y) = sum_uv I(x - u, y - v) K(u, v)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dagpre.backend import fft_of, linalg_of, ndimage_of, to_host, xp_of
from dagpre.ops._checks import check_image, check_positive_int, check_threads
from dagpre.ops._kernels import (
    BASES,
    HOTPANTS_DEGREES,
    _fast_len,
    batch_convolve_valid,
    convolve_stamps,
    gaussian_sigmas_for,
    make_basis,
    monomials,
    poly_convolve,
    poly_terms,
    scaled_coords,
)
from dagpre.types import Catalog, Frame, InputError, MaskBit

__all__ = ["BASES", "CONVOLVE", "Subtraction", "subtract"]

#: Values of ``convolve``.
CONVOLVE = ("auto", "reference", "science")
#: Stamp modes given by name.
STAMP_MODES = ("auto", "all")
#: Rejection reasons counted for the error raised when no stamp survives.
REJECT_REASONS = ("edge", "masked", "faint", "shape", "blended", "clipped")

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_DETECT_THRESH = 5.0  # sigma, detection of stamp candidates on the reference
_MAX_ORDER = 5
_CACHE_BYTES = 512 * 2**20  # basis-convolved stamps kept between iterations up to this
_CHUNK_BYTES = 64 * 2**20  # float64 working set of one chunk of stamps
_RCOND = 1e-5  # relative eigenvalue below which a direction of the fit is dropped
_CLIP_MODEL_FRACTION = 0.1  # a clipped pixel's residual exceeds this fraction of the model


# =========================================================================== result


@dataclass(frozen=True, eq=False)
class Subtraction:
    """Result of :func:`subtract`.

    Attributes
    ----------
    difference : ndarray (ny, nx) float32
        Science minus the matched reference (or the matched science minus the reference
        when the science was convolved), minus the fitted background, in the units and with
        the PSF of the image that was *not* convolved. Same device as the input.
    variance : ndarray (ny, nx) float32
        Its variance (ADU^2): the target's variance plus ``var ⊗ K^2`` of the convolved
        image, with ``K`` the kernel at each pixel.
    mask : ndarray (ny, nx) uint8
        :class:`~dagpre.types.MaskBit` flags: both inputs' masks (plus ``NONFINITE`` and
        ``SATURATED`` found here), and ``CONVOLVED`` within a kernel half-width of a masked
        pixel of the convolved image or of the frame edge.
    kernel : ndarray (gy, gx, 2r+1, 2r+1) float32
        The kernel at the grid positions ``kernel_y`` x ``kernel_x`` (indexed ``[v + r, u +
        r]``); :meth:`kernel_at` gives it anywhere.
    kernel_x, kernel_y : ndarray float64 (host)
        Pixel positions of the kernel grid's columns and rows.
    scale : float
        Photometric scale at the frame centre: flux of a star in the science divided by its
        flux in the reference (the kernel sum when the reference is convolved, its inverse
        when the science is). :meth:`scale_at` and :meth:`scale_map` give it anywhere.
    scale_coeffs : ndarray float64 (host)
        Coefficients of the kernel-sum polynomial (target / convolved flux ratio) over
        ``kernel_terms``; zero beyond ``scale_order``.
    background_coeffs : ndarray float64 (host)
        Coefficients of the fitted background ``B`` over ``background_terms`` (ADU), in the
        target's units, after the sky maps were taken off (``subtract_sky``).
    kernel_terms, background_terms : tuple of (int, int)
        Exponents ``(i, j)`` of the monomials ``x'^i y'^j``, with ``x' = (x - cx) / hx``,
        ``y' = (y - cy) / hy`` the position scaled to [-1, 1] (``coord_norm`` holds ``(cx,
        hx, cy, hy)``).
    convolved : {"reference", "science"}
        Which image was convolved.
    basis : str
        The kernel basis.
    stamps : Catalog
        Per fitting stamp (host columns): ``x, y`` (centre, px), ``chi2`` (reduced chi^2 of
        its used pixels in the last fit), ``npix`` (pixels used), ``used`` (kept to the
        end); ``meta`` has ``tried`` and ``rejected`` (counts per reason).
    fwhm_science, fwhm_reference : float
        FWHMs (px) given or measured on the stamp stars (NaN when unknown).
    n_iterations : int
        Fits made.
    monomial_kernels : ndarray (nm, 2r+1, 2r+1) float64
        ``A_m``: the kernel is ``sum_m t_m(x, y) A_m`` over ``kernel_terms``.
    coord_norm : tuple of float
        ``(cx, hx, cy, hy)``.
    meta : dict
        Orders, sizes, Gaussian widths, sky levels and other provenance.
    convolved_variance : ndarray (ny, nx) float32 or None
        Variance (ADU^2) of the image that was convolved, before its convolution (its
        pixels' noise is independent there; ``⊗ K`` correlates it in the difference).
        :func:`~dagpre.ops.psfphot.psf_photometry` uses it to add that covariance to its
        errors. None on results made without it.
    """

    difference: Any
    variance: Any
    mask: Any
    kernel: Any
    kernel_x: np.ndarray
    kernel_y: np.ndarray
    scale: float
    scale_coeffs: np.ndarray
    background_coeffs: np.ndarray
    kernel_terms: tuple
    background_terms: tuple
    convolved: str
    basis: str
    stamps: Catalog
    fwhm_science: float
    fwhm_reference: float
    n_iterations: int
    monomial_kernels: Any
    coord_norm: tuple
    meta: dict = field(default_factory=dict)
    convolved_variance: Any = None

    @property
    def kernel_size(self) -> int:
        """Side of the kernel, pixels (odd)."""
        return int(self.monomial_kernels.shape[-1])

    def kernel_at(self, x: Any, y: Any) -> Any:
        """The kernel at pixel positions ``(x, y)``: ``(n, 2r+1, 2r+1)`` float64.

        ``(x, y)`` pixel order, 0-based pixel centres; on the device of the result.
        """
        xp = xp_of(self.monomial_kernels)
        x = xp.atleast_1d(xp.asarray(x, dtype=xp.float64))
        y = xp.atleast_1d(xp.asarray(y, dtype=xp.float64))
        p = monomials(xp, x, y, list(self.kernel_terms), self.coord_norm)
        size = self.kernel_size
        flat = p @ self.monomial_kernels.reshape(len(self.kernel_terms), size * size)
        return flat.reshape(-1, size, size)

    def kernel_sum_at(self, x: Any, y: Any) -> np.ndarray:
        """Kernel sum (target / convolved flux ratio) at ``(x, y)``, host float64."""
        p = monomials(np, np.atleast_1d(to_host(x)), np.atleast_1d(to_host(y)),
                      list(self.kernel_terms), self.coord_norm)  # fmt: skip
        return p @ self.scale_coeffs

    def scale_at(self, x: Any, y: Any) -> np.ndarray:
        """Science / reference flux ratio at ``(x, y)`` (host float64)."""
        s = self.kernel_sum_at(x, y)
        return s if self.convolved == "reference" else 1.0 / s

    def scale_map(self) -> np.ndarray:
        """:meth:`scale_at` over the whole frame, ``(ny, nx)`` float32 on the host."""
        ny, nx = self.difference.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        return self.scale_at(xx.ravel(), yy.ravel()).reshape(ny, nx).astype(np.float32)

    def background_at(self, x: Any, y: Any) -> np.ndarray:
        """The fitted background ``B`` at ``(x, y)`` (ADU, host float64)."""
        p = monomials(np, np.atleast_1d(to_host(x)), np.atleast_1d(to_host(y)),
                      list(self.background_terms), self.coord_norm)  # fmt: skip
        return p @ self.background_coeffs


# =========================================================================== inputs


@dataclass(eq=False)
class _Image:
    """One input after cleaning: working arrays on the input's device."""

    sub: Any  # float32, sky subtracted when asked, masked pixels kept
    filled: Any  # float32, ``sub`` with masked pixels set to 0
    mask: Any  # uint8 MaskBit flags
    background: Any  # float32 sky map
    rms: Any  # float32 sky RMS map
    base_var: Any  # float32: variance without the source Poisson term
    inv_gain: float  # 1 / gain for the source Poisson term (0: none)
    var: Any  # float32 data variance: base_var + max(source, 0) * inv_gain
    global_rms: float
    sky_subtracted: bool

    @property
    def source(self):
        """The image minus its sky map."""
        return self.sub if self.sky_subtracted else self.sub - self.background


def _pair(value: Any, name: str, positive: bool = True) -> tuple[Any, Any]:
    """A value for (science, reference): a scalar, None, or a pair."""
    if value is None or isinstance(value, numbers.Real):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise InputError(
                name, f"expected a number or a (science, reference) pair, got {value!r}"
            ) from None
        if len(pair) != 2:
            raise InputError(name, f"expected a (science, reference) pair, got {value!r}")
    for v in pair:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise InputError(name, f"expected finite numbers, got {value!r}")
        if positive and v <= 0:
            raise InputError(name, f"expected positive numbers, got {value!r}")
    return pair


def _order(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(name, f"expected an integer in [0, {_MAX_ORDER}], got {value!r}")
    if not 0 <= value <= _MAX_ORDER:
        raise InputError(name, f"expected an integer in [0, {_MAX_ORDER}], got {value!r}")
    return int(value)


def _unpack_frame(image: Any, name: str) -> tuple[Any, Any, dict]:
    if isinstance(image, Frame):
        return image.data, image.mask, dict(image.meta)
    return image, None, {}


def _prepare(
    xp, data, mask, variance, gain, rdnoise, saturation, name, subtract_sky, sky_box, threads
) -> _Image:
    from dagpre.ops.background import estimate_background

    img = xp.array(data, dtype=xp.float32, copy=True)
    if mask is None:
        m = xp.zeros(img.shape, dtype=xp.uint8)
    else:
        if tuple(mask.shape) != tuple(img.shape):
            raise InputError(
                f"{name}_mask", f"shape {tuple(mask.shape)} differs from {name} {img.shape}"
            )
        mask = xp.asarray(mask)
        if mask.dtype == xp.bool_:
            m = xp.where(mask, xp.uint8(MaskBit.USER), xp.uint8(0)).astype(xp.uint8)
        else:
            m = mask.astype(xp.uint8)
    bad = ~xp.isfinite(img)
    if bool(bad.any()):
        img[bad] = 0.0
        m[bad] |= xp.uint8(MaskBit.NONFINITE)
    if saturation is not None:
        m[img >= saturation] |= xp.uint8(MaskBit.SATURATED)
    var_in = None
    if variance is not None:
        var_in = xp.asarray(variance, dtype=xp.float32)
        if var_in.shape != img.shape:
            raise InputError(
                f"{name}_variance", f"shape {var_in.shape} differs from {name} {img.shape}"
            )
        unusable = ~xp.isfinite(var_in) | (var_in <= 0)
        m[unusable] |= xp.uint8(MaskBit.BAD)
        var_in = xp.where(unusable, xp.float32(0), var_in)
    if bool((m != 0).all()):
        raise InputError(name, "every pixel is masked")
    bkg = estimate_background(img, box=sky_box, mask=m != 0, threads=threads)
    back = bkg.background.astype(xp.float32)
    rms = bkg.rms.astype(xp.float32)
    source = img - back
    sub = source if subtract_sky else img
    if var_in is not None:
        base, inv_gain, var = var_in, 0.0, var_in
    else:
        if rdnoise is not None and gain is None:
            raise InputError("rdnoise", "needs gain (e-/ADU) too")
        if rdnoise is not None:
            base = xp.maximum(back, 0) / xp.float32(gain) + xp.float32((rdnoise / gain) ** 2)
            inv_gain = 1.0 / gain
        else:
            base = rms * rms
            inv_gain = 0.0 if gain is None else 1.0 / gain
        base = base.astype(xp.float32)
        var = base + xp.maximum(source, 0) * xp.float32(inv_gain) if inv_gain else base
    filled = xp.where(m != 0, xp.float32(0), sub).astype(xp.float32)
    return _Image(
        sub=sub.astype(xp.float32),
        filled=filled,
        mask=m,
        background=back,
        rms=rms,
        base_var=base,
        inv_gain=float(inv_gain),
        var=xp.where(m != 0, xp.float32(0), var).astype(xp.float32),
        global_rms=float(bkg.global_rms),
        sky_subtracted=bool(subtract_sky),
    )


# =========================================================================== stamps


def _gather(xp, image, y0, x0, h, w):
    """Cut-outs ``image[y0 + i, x0 + j]`` for ``i < h, j < w``: ``(s, h, w)``."""
    iy = xp.asarray(y0)[:, None] + xp.arange(h)[None, :]
    ix = xp.asarray(x0)[:, None] + xp.arange(w)[None, :]
    return image[iy[:, :, None], ix[:, None, :]]


def _measure_fwhm(xp, image, mask, ix, iy, half, rms, reach) -> np.ndarray:
    """FWHM (px) of stars at integer positions: ``2 sqrt(area above half the peak / pi)``,
    counting pixels within ``reach`` px of the star only (neighbours stay out)."""
    if len(ix) == 0:
        return np.zeros(0)
    cut = _gather(xp, image, iy - half, ix - half, 2 * half + 1, 2 * half + 1)
    mcut = _gather(xp, mask, iy - half, ix - half, 2 * half + 1, 2 * half + 1)
    core = cut[:, half - 1 : half + 2, half - 1 : half + 2]
    peak = core.max(axis=(1, 2))
    off = xp.arange(-half, half + 1, dtype=xp.float64)
    disc = (off[:, None] ** 2 + off[None, :] ** 2) <= reach * reach
    above = ((cut >= 0.5 * peak[:, None, None]) & disc[None]).sum(axis=(1, 2))
    fwhm = 2.0 * xp.sqrt(above / math.pi)
    good = (peak > 20.0 * rms) & ((mcut != 0).sum(axis=(1, 2)) == 0)
    fwhm, good = to_host(fwhm), to_host(good)
    return np.where(good, fwhm, np.nan)


def _star_candidates(xp, ref: _Image, threads) -> dict:
    from dagpre.ops.detect import detect_sources

    cat = detect_sources(
        ref.source,
        thresh=_DETECT_THRESH,
        err=ref.rms,
        mask=ref.mask != 0,
        minarea=5,
        deblend_cont=1.0,
        clean=False,
        threads=threads,
    )
    cols = ("x", "y", "flux", "peak", "flag", "a", "b", "fwhm", "npix")
    return {k: np.asarray(to_host(cat[k]), dtype=np.float64) for k in cols}


def _select_stars(
    cand, shape, half, hs, fwhm_hint, bad_any, min_snr, global_rms, grid, per_cell
) -> tuple[np.ndarray, dict]:
    """Indices of the stamp stars among the candidates and the rejection counts."""
    ny, nx = shape
    n = cand["x"].size
    ix = np.rint(cand["x"]).astype(np.int64)
    iy = np.rint(cand["y"]).astype(np.int64)
    reason = np.full(n, "", dtype=object)
    reach = hs + half
    edge = (ix - reach < 0) | (iy - reach < 0) | (ix + reach > nx - 1) | (iy + reach > ny - 1)
    reason[edge] = "edge"
    reason[(reason == "") & bad_any] = "masked"
    snr = cand["flux"] / (global_rms * np.sqrt(np.maximum(cand["npix"], 1.0)))
    reason[(reason == "") & (snr < min_snr)] = "faint"
    ok = reason == ""
    ref_fwhm = np.nanmedian(cand["fwhm"][ok]) if ok.any() else fwhm_hint
    elong = cand["b"] / np.maximum(cand["a"], 1e-9)
    odd = (cand["fwhm"] < 0.5 * ref_fwhm) | (cand["fwhm"] > 2.0 * ref_fwhm) | (elong < 0.5)
    odd |= cand["flag"] != 0
    reason[(reason == "") & odd] = "shape"
    if n > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([cand["x"], cand["y"]]))
        pairs = tree.query_pairs(float(reach), output_type="ndarray")
        if pairs.size:
            fa, fb = cand["flux"][pairs[:, 0]], cand["flux"][pairs[:, 1]]
            blended = np.zeros(n, dtype=bool)
            blended[pairs[:, 0][fb > 0.5 * fa]] = True
            blended[pairs[:, 1][fa > 0.5 * fb]] = True
            reason[(reason == "") & blended] = "blended"
    keep = np.flatnonzero(reason == "")
    cell = (iy[keep] * grid // ny) * grid + (ix[keep] * grid // nx)
    order = np.lexsort((-cand["flux"][keep], cell))
    keep, cell = keep[order], cell[order]
    first = np.r_[0, np.flatnonzero(np.diff(cell)) + 1]
    rank = np.arange(keep.size) - np.repeat(first, np.diff(np.r_[first, keep.size]))
    chosen = np.sort(keep[rank < per_cell])
    counts = {r: int((reason == r).sum()) for r in REJECT_REASONS if r != "clipped"}
    return chosen, counts


# =========================================================================== fitting


@dataclass(eq=False)
class _Stamps:
    """Fitting regions: ``h x w`` boxes with top-left corners ``(y0, x0)`` (host ints)."""

    y0: np.ndarray
    x0: np.ndarray
    h: int
    w: int
    good: Any  # (s, h*w) bool on device: usable pixels
    cx: np.ndarray  # centres (px)
    cy: np.ndarray

    @property
    def n(self) -> int:
        return int(self.y0.size)


class _Fitter:
    """Normal equations over chunks of stamps; basis-convolved stamps cached when small."""

    def __init__(self, xp, basis, stamps, target, conv, kterms, bterms, active, norm, debias):
        self.xp = xp
        self.debias = debias
        self.basis = basis
        self.st = stamps
        self.t = target
        self.c = conv
        self.kterms = kterms
        self.bterms = bterms
        self.active_km = active  # (nb, nm) bool
        self.norm = norm
        nb, npx = basis.n, stamps.h * stamps.w
        per_stamp = nb * npx * 8 * 2 + nb * nb * 8
        self.chunk = max(1, min(stamps.n, _CHUNK_BYTES // max(per_stamp, 1)))
        self.cache_ok = stamps.n * nb * npx * 4 <= _CACHE_BYTES
        self.cache: dict = {}
        self.pk = monomials(xp, stamps.cx, stamps.cy, kterms, norm)  # (s, nm)
        dy, dx = np.divmod(np.arange(npx), stamps.w)
        self.dy, self.dx = dy, dx

    def chunks(self):
        for i0 in range(0, self.st.n, self.chunk):
            yield i0, min(self.st.n, i0 + self.chunk)

    def data(self, i0, i1):
        """``C (c, nb, p)`` float32, ``T (c, p)``, conv-variance cut-outs, pixel monomials."""
        xp, st, r = self.xp, self.st, self.basis.half
        key = (i0, i1)
        if key in self.cache:
            return self.cache[key]
        y0, x0 = st.y0[i0:i1], st.x0[i0:i1]
        ccut = _gather(xp, self.c.filled, y0 - r, x0 - r, st.h + 2 * r, st.w + 2 * r)
        cb = convolve_stamps(self.basis, ccut).reshape(i1 - i0, self.basis.n, st.h * st.w)
        tcut = _gather(xp, self.t.sub, y0, x0, st.h, st.w).reshape(i1 - i0, -1)
        vcut = _gather(xp, self.c.var, y0 - r, x0 - r, st.h + 2 * r, st.w + 2 * r)
        base = _gather(xp, self.t.base_var, y0, x0, st.h, st.w).reshape(i1 - i0, -1)
        if not self.t.sky_subtracted:  # the model's sky is not source signal
            base = base - _gather(xp, self.t.background, y0, x0, st.h, st.w).reshape(
                i1 - i0, -1
            ) * xp.float32(self.t.inv_gain)
        py = xp.asarray(y0[:, None] + self.dy[None, :], dtype=xp.float64)
        px = xp.asarray(x0[:, None] + self.dx[None, :], dtype=xp.float64)
        pbg = monomials(xp, px, py, self.bterms, self.norm)  # (c, p, nB)
        out = (cb, tcut, vcut, base, pbg)
        if self.cache_ok:
            self.cache[key] = out
        return out

    def normal_equations(self, weights, use):
        """The system for the active stamps (``use``) with per-pixel weights ``(s, p)``."""
        xp = self.xp
        nb, nm, nbg = self.basis.n, len(self.kterms), len(self.bterms)
        m = xp.zeros((nm * nm, nb * nb), dtype=xp.float64)
        rk = xp.zeros((nm, nb), dtype=xp.float64)
        x = xp.zeros((nm, nb * nbg), dtype=xp.float64)
        hb = xp.zeros((nbg, nbg), dtype=xp.float64)
        rb = xp.zeros(nbg, dtype=xp.float64)
        for i0, i1 in self.chunks():
            cb, tcut, vcut, _, pbg = self.data(i0, i1)
            w = weights[i0:i1] * use[i0:i1, None]
            c64 = cb.astype(xp.float64)
            cw = c64 * w[:, None, :]
            t64 = tcut.astype(xp.float64)
            q = cw @ c64.transpose(0, 2, 1)  # (c, nb, nb)
            if self.debias:
                q -= self.noise_gram(w, vcut)
            v = (cw @ t64[:, :, None])[..., 0]  # (c, nb)
            e = cw @ pbg  # (c, nb, nB)
            pbw = pbg * w[:, :, None]
            hb += xp.einsum("cpn,cpo->no", pbw, pbg)
            rb += xp.einsum("cpn,cp->n", pbw, t64)
            pk = self.pk[i0:i1]
            pp = (pk[:, :, None] * pk[:, None, :]).reshape(i1 - i0, nm * nm)
            m += pp.T @ q.reshape(i1 - i0, nb * nb)
            rk += pk.T @ v
            x += pk.T @ e.reshape(i1 - i0, nb * nbg)
        big = m.reshape(nm, nm, nb, nb).transpose(2, 0, 3, 1).reshape(nb * nm, nb * nm)
        idx = xp.asarray(np.flatnonzero(self.active_km.ravel()))
        mk = big[idx][:, idx]
        xk = x.reshape(nm, nb, nbg).transpose(1, 0, 2).reshape(nb * nm, nbg)[idx]
        top = xp.concatenate([mk, xk], axis=1)
        bottom = xp.concatenate([xk.T, hb], axis=1)
        lhs = xp.concatenate([top, bottom], axis=0)
        rhs = xp.concatenate([rk.T.reshape(nb * nm)[idx], rb])
        return lhs, rhs

    def noise_gram(self, w, vcut):
        """Expected noise part of the stamp Gram matrices, ``(c, nb, nb)``.

        ``C_k = (I + n) ⊗ b_k`` carries the convolved image's noise ``n``, so ``sum_p w C_k
        C_l`` is biased by ``sum_u b_k(u) b_l(u) V(u)``, ``V(u) = sum_p w_p var_I(p - u)``
        (white noise): a ridge that would blur the kernel (regression dilution). It is
        taken off, so a noisy image can be the convolved one.
        """
        xp, st, kb = self.xp, self.st, self.basis
        c = w.shape[0]
        r, size = kb.half, kb.size
        wimg = w.reshape(c, st.h, st.w)
        hh, ww = st.h + 2 * r, st.w + 2 * r
        fft = fft_of(vcut)
        fshape = (_fast_len(hh), _fast_len(ww))
        spec = fft.rfft2(vcut.astype(xp.float64), s=fshape) * xp.conj(fft.rfft2(wimg, s=fshape))
        corr = fft.irfft2(spec, s=fshape)[:, : 2 * r + 1, : 2 * r + 1]
        vw = corr[:, ::-1, ::-1]  # V(u, v) at [v + r, u + r]
        if kb.offsets is None:
            bflat = xp.asarray(kb.images.reshape(kb.n, size * size))
            vflat = vw.reshape(c, size * size)
            return xp.einsum("ku,su,lu->skl", bflat, vflat, bflat)
        du, dv = kb.offsets[:, 0], kb.offsets[:, 1]
        vk = vw[:, xp.asarray(dv + r), xp.asarray(du + r)]  # (c, nb), element 0 at the centre
        dq = xp.zeros((c, kb.n, kb.n), dtype=xp.float64)
        idx = xp.arange(kb.n)
        dq[:, idx, idx] = vk
        if kb.name == "modified_delta":
            v0 = vk[:, :1, None]
            dq[:, 1:, 1:] += v0
            dq[:, 0, 1:] = -vk[:, :1]
            dq[:, 1:, 0] = -vk[:, :1]
        return dq

    def unpack(self, sol):
        """Coefficients ``(nb, nm)`` (zeros where inactive) and the background's."""
        xp = self.xp
        nb, nm = self.basis.n, len(self.kterms)
        idx = np.flatnonzero(self.active_km.ravel())
        coef = xp.zeros(nb * nm, dtype=xp.float64)
        coef[xp.asarray(idx)] = sol[: idx.size]
        return coef.reshape(nb, nm), sol[idx.size :]

    def residuals(self, coef, bcoef, mono_kernels):
        """Per stamp ``(s, p)``: normalised residuals, model variance, and the convolved
        model's ``|signal| / sigma``."""
        xp = self.xp
        size = self.basis.size
        nm = len(self.kterms)
        zs, vs, ss = [], [], []
        for i0, i1 in self.chunks():
            cb, tcut, vcut, base, pbg = self.data(i0, i1)
            pk = self.pk[i0:i1]
            a = pk @ coef.T  # (c, nb)
            conv = (a[:, None, :] @ cb.astype(xp.float64))[:, 0, :]
            model = conv + pbg @ bcoef
            ks = (pk @ mono_kernels.reshape(nm, size * size)).reshape(i1 - i0, size, size)
            vconv = batch_convolve_valid(vcut.astype(xp.float64), ks * ks).reshape(i1 - i0, -1)
            signal = conv if self.t.sky_subtracted else model
            var = base + xp.maximum(signal, 0) * self.t.inv_gain + xp.maximum(vconv, 0)
            zs.append((tcut - model) / xp.sqrt(xp.maximum(var, 1e-30)))
            vs.append(var)
            ss.append(xp.abs(conv) / xp.sqrt(xp.maximum(var, 1e-30)))
        return xp.concatenate(zs), xp.concatenate(vs), xp.concatenate(ss)


def _solve(xp, lhs, rhs):
    """Solve the Jacobi-scaled normal equations: Cholesky when well conditioned, else a
    truncated eigen-decomposition.

    A basis can be nearly degenerate on the data (Gaussians times high powers on a small
    kernel grid, few stamps for a spatial term); the directions whose eigenvalue is below
    ``_RCOND`` of the largest carry noise, not information, and are left out rather than
    amplified into a kernel with huge, cancelling parts.
    """
    d = xp.sqrt(xp.abs(xp.diag(lhs)))
    d = xp.where(d > 0, d, 1.0)
    a = lhs / d[:, None] / d[None, :]
    b = rhs / d
    try:
        chol = xp.linalg.cholesky(a)
        pivots = xp.diag(chol) ** 2
        if bool(xp.all(xp.isfinite(chol))) and float(pivots.min()) > _RCOND * float(pivots.max()):
            la = linalg_of(a)
            y = la.solve_triangular(chol, b, lower=True)
            sol = la.solve_triangular(chol.T, y, lower=False)
            if bool(xp.all(xp.isfinite(sol))):
                return sol / d
    except np.linalg.LinAlgError:
        pass
    vals, vecs = xp.linalg.eigh(a)
    keep = vals > vals.max() * _RCOND
    inv = xp.where(keep, 1.0 / xp.where(keep, vals, 1.0), 0.0)
    return (vecs @ (inv * (vecs.T @ b))) / d


# =========================================================================== public


def subtract(
    science: Any,
    reference: Any,
    basis: str = "gaussian",
    kernel_size: int | None = None,
    kernel_order: int = 2,
    bg_order: int = 1,
    *,
    scale_order: int | None = None,
    convolve: str = "auto",
    science_mask: Any = None,
    reference_mask: Any = None,
    science_variance: Any = None,
    reference_variance: Any = None,
    gain: float | tuple | None = None,
    rdnoise: float | tuple | None = None,
    saturation: float | tuple | None = None,
    science_fwhm: float | None = None,
    reference_fwhm: float | None = None,
    stamps: Any = "auto",
    stamp_grid: int = 10,
    stamps_per_cell: int = 3,
    stamp_size: int | None = None,
    min_snr: float = 20.0,
    tile: int = 32,
    gaussian_sigmas: tuple[float, ...] | None = None,
    gaussian_degrees: tuple[int, ...] = HOTPANTS_DEGREES,
    subtract_sky: bool = True,
    sky_box: int = 64,
    clip_sigma: float = 4.0,
    max_iterations: int = 4,
    debias: bool = False,
    kernel_grid: int = 5,
    band_rows: int = 1024,
    threads: int | None = None,
) -> Subtraction:
    """Subtract a reference from a science image with a fitted, spatially varying kernel.

    Parameters
    ----------
    science, reference : ndarray (ny, nx) or Frame
        Aligned images on the same pixel grid (ADU), NumPy or CuPy (both on one device).
        A :class:`~dagpre.types.Frame` brings its mask and its ``gain``, ``rdnoise`` and
        ``saturate`` metadata (used where the arguments below are None).
    basis : {"gaussian", "delta", "modified_delta"}
        Kernel basis (see the module docstring). ``"gaussian"``: HOTPANTS' three
        Gaussians times polynomials (``gaussian_sigmas``, ``gaussian_degrees``);
        ``"delta"``: one free pixel per element (Bramich 2008), the scale then follows
        ``kernel_order``; ``"modified_delta"``: the centre pixel plus zero-sum pixel
        elements (pyDIA), so the scale has its own ``scale_order``.
    kernel_size : int, optional
        Kernel side in pixels (odd, >= 3, at most a quarter of the smaller image side).
        Default ``2 r + 1`` with ``r = clip(ceil(2 * max FWHM), 5, 15)`` (``r = 10``, HOTPANTS'
        default, when no FWHM is known).
    kernel_order : int
        Degree of the kernel shape's spatial polynomial (HOTPANTS ``-ko``, default 2).
    bg_order : int
        Degree of the background polynomial (HOTPANTS ``-bgo``, default 1).
    scale_order : int, optional
        Degree of the photometric scale's polynomial (Gaussian and modified-delta bases;
        default 0, a constant scale as HOTPANTS and SFFT's ``ConstPhotRatio``). Not allowed
        with ``basis="delta"``, whose scale has ``kernel_order``.
    convolve : {"auto", "reference", "science"}
        Image to convolve. ``"auto"`` convolves the one with the smaller FWHM (SFFT's
        ``ForceConv="AUTO"``); ties go to the reference. Either way ``difference`` is
        science minus reference.
    science_mask, reference_mask : ndarray (ny, nx), optional
        uint8 :class:`~dagpre.types.MaskBit` flags (bool: ``True`` becomes ``USER``); masked
        pixels are not fitted and are flagged in the output.
    science_variance, reference_variance : ndarray (ny, nx), optional
        Per-pixel variance (ADU^2); non-positive or non-finite values mask the pixel.
    gain : float or (float, float), optional
        e-/ADU, one for both images or (science, reference); see the noise model above.
    rdnoise : float or (float, float), optional
        Read noise (e-); with ``gain``, the CCD formula on the unsubtracted images.
    saturation : float or (float, float), optional
        ADU; pixels at or above it are flagged ``SATURATED`` and never fitted.
    science_fwhm, reference_fwhm : float, optional
        PSF FWHMs (px); measured on the stamp stars when not given.
    stamps : "auto", "all", Catalog or (x, y)
        ``"auto"``: stars detected on the reference, chosen on a grid (see the module
        docstring); ``"all"``: every unmasked pixel, in ``tile`` x ``tile`` regions (slow with
        the delta bases: the per-region Gram matrices cost ``npix * n_basis^2``); a Catalog
        with ``x, y`` or an ``(x, y)`` pair of arrays: stamps at those positions.
    stamp_grid : int
        HOTPANTS' ``-nsx/-nsy``: the frame is cut into ``stamp_grid`` x ``stamp_grid`` cells.
    stamps_per_cell : int
        Brightest usable stars kept per cell (HOTPANTS' ``-nss``, 3).
    stamp_size : int, optional
        Side of a stamp (odd, px); default ``2 (r + max(3, ceil(max FWHM))) + 1``.
    min_snr : float
        Stamp stars need an isophotal S/N (``flux / (rms sqrt(npix))``) of at least this.
    tile : int
        Side of the regions of ``stamps="all"`` (px).
    gaussian_sigmas : tuple of float, optional
        Widths (px) of the Gaussians. Default: HOTPANTS' (0.7, 1.5, 3.0) scaled to the
        matching width ``sqrt(|sigma_sci^2 - sigma_ref^2|)`` when the FWHMs are known (its
        README's 0.5x, 1x, 2x rule; see :func:`~dagpre.ops._kernels.gaussian_sigmas_for`).
    gaussian_degrees : tuple of int
        Polynomial degree of each Gaussian (HOTPANTS' 6, 4, 2).
    subtract_sky : bool
        Take the measured sky maps off both images before fitting (the background
        polynomial then carries only what is left; with the sky left in, a spatially
        varying scale and the background polynomial are nearly degenerate).
    sky_box : int
        Mesh size (px) of :func:`~dagpre.ops.background.estimate_background`.
    clip_sigma : float
        Pixels with ``|residual| / sigma`` above it, and stamps whose reduced chi^2 is more
        than ``clip_sigma`` robust sigmas above the median, are rejected in the iterations.
    max_iterations : int
        Most fits (the first one weights by the data; later ones by the model).
    debias : bool
        Take the convolved image's own noise out of the normal matrix (it acts as a ridge
        that blurs the kernel when both images are single, equally noisy exposures). Off by
        default: the debiased kernel is noisier, and a reference is usually a deep stack.
    kernel_grid : int
        ``Subtraction.kernel`` is sampled on a ``kernel_grid`` x ``kernel_grid`` grid of
        cell centres.
    band_rows : int
        Rows per FFT band in the full-frame convolutions (memory, not the result).
    threads : int, optional
        CPU threads (FFT workers, background, detection); ignored on CuPy.

    Returns
    -------
    Subtraction

    Raises
    ------
    InputError
        Naming the parameter: shapes that differ, an unknown ``basis`` or ``convolve``
        (the allowed values are listed), an even or too large ``kernel_size``, orders
        outside [0, 5], and when no usable stamp survives (how many were tried and why
        each was rejected).

    Examples
    --------
    >>> from dagpre import simulate
    >>> night = simulate.night(n_frames=2, shape=(256, 256), n_stars=300, seed=3,
    ...                        max_offset=0.0, max_rotation=0.0, n_transients=0)
    >>> sci, ref = night.frames[1].data, night.frames[0].data
    >>> sub = subtract(sci, ref, gain=2.0, rdnoise=5.0, saturation=50000.0)
    >>> sub.difference.shape, sub.convolved in ("reference", "science")
    ((256, 256), True)
    """
    sci_data, sci_fmask, sci_meta = _unpack_frame(science, "science")
    ref_data, ref_fmask, ref_meta = _unpack_frame(reference, "reference")
    check_image(sci_data, "science")
    check_image(ref_data, "reference")
    if tuple(sci_data.shape) != tuple(ref_data.shape):
        raise InputError(
            "reference",
            f"shape {tuple(ref_data.shape)} differs from science {tuple(sci_data.shape)}",
        )
    xp = xp_of(sci_data, ref_data)
    if xp_of(sci_data) is not xp_of(ref_data):
        raise InputError("reference", "science and reference must be on the same device")
    shape = tuple(int(v) for v in sci_data.shape)
    if basis not in BASES:
        raise InputError("basis", f"expected one of {BASES}, got {basis!r}")
    if convolve not in CONVOLVE:
        raise InputError("convolve", f"expected one of {CONVOLVE}, got {convolve!r}")
    kernel_order = _order(kernel_order, "kernel_order")
    bg_order = _order(bg_order, "bg_order")
    if basis == "delta":
        if scale_order is not None and scale_order != kernel_order:
            raise InputError(
                "scale_order",
                "the 'delta' basis ties the photometric scale to kernel_order; "
                "use basis='modified_delta' (or 'gaussian') for a separate scale degree",
            )
        scale_order = kernel_order
    scale_order = 0 if scale_order is None else _order(scale_order, "scale_order")
    if kernel_size is not None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
            raise InputError("kernel_size", f"expected an odd integer, got {kernel_size!r}")
        limit = min(shape) // 4
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise InputError("kernel_size", f"expected an odd integer >= 3, got {kernel_size}")
        if kernel_size > limit:
            raise InputError(
                "kernel_size",
                f"{kernel_size} is too large for a {shape[0]}x{shape[1]} image "
                f"(at most a quarter of the smaller side, {limit})",
            )
    if stamp_size is not None and (
        isinstance(stamp_size, bool) or not isinstance(stamp_size, numbers.Integral)
        or stamp_size < 3 or stamp_size % 2 == 0
    ):  # fmt: skip
        raise InputError("stamp_size", f"expected an odd integer >= 3, got {stamp_size!r}")
    stamp_grid = check_positive_int(stamp_grid, "stamp_grid")
    stamps_per_cell = check_positive_int(stamps_per_cell, "stamps_per_cell")
    tile = check_positive_int(tile, "tile")
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    kernel_grid = check_positive_int(kernel_grid, "kernel_grid")
    band_rows = check_positive_int(band_rows, "band_rows")
    sky_box = check_positive_int(sky_box, "sky_box")
    threads = check_threads(threads)
    if not (isinstance(clip_sigma, numbers.Real) and clip_sigma > 0):
        raise InputError("clip_sigma", f"expected a positive number, got {clip_sigma!r}")
    if isinstance(stamps, str) and stamps not in STAMP_MODES:
        raise InputError(
            "stamps", f"expected one of {STAMP_MODES}, a Catalog or (x, y), got {stamps!r}"
        )
    if gaussian_sigmas is not None and (
        len(gaussian_sigmas) != len(gaussian_degrees) or min(gaussian_sigmas) <= 0
    ):
        raise InputError(
            "gaussian_sigmas", "expected positive widths, one per gaussian_degrees entry"
        )
    if any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0
        for d in gaussian_degrees
    ):
        raise InputError(
            "gaussian_degrees", f"expected non-negative integers, got {gaussian_degrees!r}"
        )

    gains = list(_pair(gain, "gain"))
    rdns = list(_pair(rdnoise, "rdnoise", positive=False))
    sats = list(_pair(saturation, "saturation", positive=False))
    for k, meta in enumerate((sci_meta, ref_meta)):
        gains[k] = gains[k] if gains[k] is not None else meta.get("gain")
        rdns[k] = rdns[k] if rdns[k] is not None else meta.get("rdnoise")
        sats[k] = sats[k] if sats[k] is not None else meta.get("saturate")
    sci_mask = science_mask if science_mask is not None else sci_fmask
    ref_mask = reference_mask if reference_mask is not None else ref_fmask
    sci = _prepare(xp, sci_data, sci_mask, science_variance, gains[0], rdns[0], sats[0],
                   "science", subtract_sky, sky_box, threads)  # fmt: skip
    ref = _prepare(xp, ref_data, ref_mask, reference_variance, gains[1], rdns[1], sats[1],
                   "reference", subtract_sky, sky_box, threads)  # fmt: skip

    # ---- candidates, FWHMs, direction, sizes
    cand = None
    if isinstance(stamps, str) and stamps == "auto":
        cand = _star_candidates(xp, ref, threads)
    elif isinstance(stamps, str):  # "all"
        if science_fwhm is None or reference_fwhm is None:
            cand = _star_candidates(xp, ref, threads)
    else:
        cand = _given_positions(stamps)
    fwhm_s, fwhm_r = _fwhms(xp, sci, ref, cand, science_fwhm, reference_fwhm)
    known = math.isfinite(fwhm_s) and math.isfinite(fwhm_r)
    if convolve == "auto":
        if not known:
            raise InputError(
                "convolve",
                "could not measure both FWHMs (no bright unmasked stars); pass science_fwhm "
                "and reference_fwhm, or convolve='reference' / 'science'",
            )
        side = "reference" if fwhm_r <= fwhm_s else "science"
    else:
        side = convolve
    target, conv = (sci, ref) if side == "reference" else (ref, sci)
    fwhm_max = max(v for v in (fwhm_s, fwhm_r, 0.0) if math.isfinite(v))
    if kernel_size is None:
        half = min(max(math.ceil(2.0 * fwhm_max), 5), 15) if fwhm_max > 0 else 10
        half = min(half, max(1, (min(shape) // 4 - 1) // 2))
    else:
        half = (int(kernel_size) - 1) // 2
    if gaussian_sigmas is None:
        match = None
        if known:
            match = math.sqrt(abs(fwhm_s**2 - fwhm_r**2)) / _FWHM_PER_SIGMA
        sigmas = gaussian_sigmas_for(match)
    else:
        sigmas = tuple(float(s) for s in gaussian_sigmas)
    kb = make_basis(basis, half, sigmas, tuple(int(d) for d in gaussian_degrees))
    if stamp_size is None:
        hs = half + max(3, math.ceil(fwhm_max if fwhm_max > 0 else 3.0))
    else:
        hs = (int(stamp_size) - 1) // 2

    # ---- stamps
    grown_conv = _grow(xp, conv.mask != 0, half)  # pixels a masked conv pixel reaches
    bad = (target.mask != 0) | grown_conv
    tried, counts = 0, {r: 0 for r in REJECT_REASONS}
    if isinstance(stamps, str) and stamps == "all":
        st = _tiles(xp, shape, half, tile, bad)
        tried = st.n
    else:
        n_c = cand["x"].size
        tried = n_c
        ix = np.rint(cand["x"]).astype(np.int64)
        iy = np.rint(cand["y"]).astype(np.int64)
        core = max(2, math.ceil(fwhm_max if fwhm_max > 0 else 3.0))
        inside = (ix >= core) & (iy >= core) & (ix < shape[1] - core) & (iy < shape[0] - core)
        bad_any = np.zeros(n_c, dtype=bool)
        if inside.any():
            sel = np.flatnonzero(inside)
            win = _gather(xp, bad, iy[sel] - core, ix[sel] - core, 2 * core + 1, 2 * core + 1)
            bad_any[sel] = to_host(win.any(axis=(1, 2)))
        if isinstance(stamps, str):
            chosen, c = _select_stars(
                cand, shape, half, hs, fwhm_max or 3.0, bad_any, float(min_snr),
                ref.global_rms, stamp_grid, stamps_per_cell,
            )  # fmt: skip
        else:
            chosen, c = _given_select(cand, shape, half, hs, bad_any)
        counts.update(c)
        size = 2 * hs + 1
        good = ~_gather(xp, bad, iy[chosen] - hs, ix[chosen] - hs, size, size)
        good = good.reshape(chosen.size, size * size)
        st = _Stamps(
            y0=iy[chosen] - hs, x0=ix[chosen] - hs, h=size, w=size, good=good,
            cx=ix[chosen].astype(np.float64), cy=iy[chosen].astype(np.float64),
        )  # fmt: skip
    kterms = poly_terms(max(kernel_order, scale_order))
    bterms = poly_terms(bg_order)
    deg = np.array([i + j for i, j in kterms])
    degrees_k = np.where(kb.sums_to_zero, kernel_order, scale_order)
    if basis == "delta":
        degrees_k[:] = kernel_order
    active_km = deg[None, :] <= degrees_k[:, None]
    n_needed = len(poly_terms(max(kernel_order, scale_order)))
    _check_stamps(st.n, n_needed, tried, counts, kernel_order, scale_order)

    # ---- iterations (whole stamps are rejected among stars only: a tile's chi^2 says more
    # about how many bright stars it holds than about whether it is fit to use)
    clip_stamps = not (isinstance(stamps, str) and stamps == "all")
    norm = scaled_coords(shape)
    fit = _Fitter(xp, kb, st, target, conv, kterms, bterms, active_km, norm, bool(debias))
    use = xp.ones(st.n, dtype=xp.float64)
    pixel_ok = st.good.copy()
    var0 = xp.concatenate(
        [_gather(xp, target.var, st.y0[a:b], st.x0[a:b], st.h, st.w).reshape(b - a, -1)
         for a, b in fit.chunks()]
    )  # fmt: skip
    weights = xp.where(pixel_ok & (var0 > 0), 1.0 / xp.maximum(var0, 1e-30), 0.0)
    chi2 = xp.zeros(st.n)
    n_used = xp.zeros(st.n)
    coef = bcoef = mono = None
    n_iter = 0
    for it in range(max_iterations):
        n_iter = it + 1
        lhs, rhs = fit.normal_equations(weights, use)
        coef, bcoef = fit.unpack(_solve(xp, lhs, rhs))
        mono = xp.einsum("km,kuv->muv", coef, xp.asarray(kb.images))
        z, var, snr = fit.residuals(coef, bcoef, mono)
        ok_now = st.good & (var > 0)
        n_used = (pixel_ok & ok_now).sum(axis=1)
        chi2 = xp.where(pixel_ok & ok_now, z * z, 0.0).sum(axis=1) / xp.maximum(n_used, 1)
        # a pixel is an outlier against its stamp's own residual scale and against the
        # model there (beyond a tenth of it), so that a bright star fitted to 1 % does not
        # lose the core pixels that constrain the kernel most (cosmic rays still go)
        zlim = clip_sigma * xp.sqrt(xp.maximum(chi2, 1.0))
        outlier = (xp.abs(z) > zlim[:, None]) & (xp.abs(z) > _CLIP_MODEL_FRACTION * snr)
        new_pixel_ok = ok_now & ~outlier
        new_use = use.copy()
        live = use > 0
        if clip_stamps and int(live.sum()) > n_needed:
            c_live = chi2[live]
            med = xp.median(c_live)
            mad = 1.4826 * xp.median(xp.abs(c_live - med))
            limit = med + clip_sigma * xp.maximum(mad, 0.1 * med)
            new_use = xp.where(live & (chi2 > limit), 0.0, use)
            if int((new_use > 0).sum()) < n_needed:  # never clip below what the fit needs
                new_use = use
        changed = bool((new_use != use).any()) or bool((new_pixel_ok != pixel_ok).any())
        weights = xp.where(new_pixel_ok, 1.0 / xp.maximum(var, 1e-30), 0.0)
        if it > 0 and not changed:
            break
        use, pixel_ok = new_use, new_pixel_ok
    counts["clipped"] = int(st.n - int((use > 0).sum())) if st.n else 0

    # ---- the whole frame
    conv_img = poly_convolve(conv.filled, mono, kterms, norm, band_rows, threads)
    bg = _poly_map(xp, bcoef, bterms, shape, norm)
    diff = target.sub - conv_img - bg
    if side == "science":
        diff = -diff
    prod_terms, prod_kernels = _squared_kernel_terms(xp, mono, kterms)
    var_conv = poly_convolve(conv.var, prod_kernels, prod_terms, norm, band_rows, threads)
    variance = target.var + xp.maximum(var_conv, 0)
    out_mask = target.mask | conv.mask
    out_mask = xp.where(grown_conv, out_mask | xp.uint8(MaskBit.CONVOLVED), out_mask)

    gx = (np.arange(kernel_grid) + 0.5) * shape[1] / kernel_grid - 0.5
    gy = (np.arange(kernel_grid) + 0.5) * shape[0] / kernel_grid - 0.5
    gxx, gyy = np.meshgrid(gx, gy)
    pg = monomials(xp, xp.asarray(gxx.ravel()), xp.asarray(gyy.ravel()), kterms, norm)
    size = kb.size
    kernel = (pg @ mono.reshape(len(kterms), size * size)).reshape(
        kernel_grid, kernel_grid, size, size
    )
    scale_coeffs = np.asarray(to_host(mono.sum(axis=(1, 2))), dtype=np.float64)
    ksum_centre = float(scale_coeffs[0])
    scale = ksum_centre if side == "reference" else 1.0 / ksum_centre
    stamp_cat = Catalog(
        {
            "x": st.cx.astype(np.float64),
            "y": st.cy.astype(np.float64),
            "chi2": np.asarray(to_host(chi2), dtype=np.float64),
            "npix": np.asarray(to_host(n_used), dtype=np.int64),
            "used": np.asarray(to_host(use > 0), dtype=bool),
        },
        meta={"tried": int(tried), "rejected": dict(counts), "size": int(st.h)},
    )
    meta = {
        "kernel_order": kernel_order,
        "scale_order": scale_order,
        "bg_order": bg_order,
        "kernel_size": size,
        "stamp_size": int(st.h),
        "gaussian_sigmas": kb.sigmas,
        "gaussian_degrees": kb.degrees,
        "n_basis": kb.n,
        "n_parameters": int(active_km.sum()) + len(bterms),
        "subtract_sky": bool(subtract_sky),
        "sky_science": float(to_host(xp.median(sci.background))),
        "sky_reference": float(to_host(xp.median(ref.background))),
    }
    return Subtraction(
        difference=diff.astype(xp.float32),
        variance=variance.astype(xp.float32),
        mask=out_mask.astype(xp.uint8),
        kernel=kernel.astype(xp.float32),
        kernel_x=gx,
        kernel_y=gy,
        scale=float(scale),
        scale_coeffs=scale_coeffs,
        background_coeffs=np.asarray(to_host(bcoef), dtype=np.float64),
        kernel_terms=tuple(kterms),
        background_terms=tuple(bterms),
        convolved=side,
        basis=basis,
        stamps=stamp_cat,
        fwhm_science=float(fwhm_s),
        fwhm_reference=float(fwhm_r),
        n_iterations=n_iter,
        monomial_kernels=mono,
        coord_norm=norm,
        meta=meta,
        convolved_variance=conv.var.astype(xp.float32),
    )


# =========================================================================== helpers


def _given_positions(stamps: Any) -> dict:
    if isinstance(stamps, Catalog) or (hasattr(stamps, "keys") and "x" in stamps):
        x, y = stamps["x"], stamps["y"]
    else:
        try:
            x, y = stamps
        except (TypeError, ValueError):
            raise InputError(
                "stamps", "expected 'auto', 'all', a Catalog or an (x, y) pair"
            ) from None
    x = np.atleast_1d(np.asarray(to_host(x), dtype=np.float64))
    y = np.atleast_1d(np.asarray(to_host(y), dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise InputError("stamps", f"x and y differ in shape: {x.shape} vs {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("stamps", "expected finite positions")
    return {"x": x, "y": y}


def _given_select(cand, shape, half, hs, bad_any):
    ny, nx = shape
    ix = np.rint(cand["x"]).astype(np.int64)
    iy = np.rint(cand["y"]).astype(np.int64)
    reach = hs + half
    edge = (ix - reach < 0) | (iy - reach < 0) | (ix + reach > nx - 1) | (iy + reach > ny - 1)
    masked = ~edge & bad_any
    chosen = np.flatnonzero(~edge & ~masked)
    return chosen, {"edge": int(edge.sum()), "masked": int(masked.sum())}


def _fwhms(xp, sci, ref, cand, fwhm_s, fwhm_r) -> tuple[float, float]:
    for name, v in (("science_fwhm", fwhm_s), ("reference_fwhm", fwhm_r)):
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise InputError(name, f"expected a positive FWHM in pixels, got {v!r}")
    if (fwhm_s is not None and fwhm_r is not None) or cand is None or cand["x"].size == 0:
        return (
            float(fwhm_s) if fwhm_s is not None else math.nan,
            float(fwhm_r) if fwhm_r is not None else math.nan,
        )
    ny, nx = sci.sub.shape
    half = 8
    ix = np.rint(cand["x"]).astype(np.int64)
    iy = np.rint(cand["y"]).astype(np.int64)
    ok = (ix >= half) & (iy >= half) & (ix < nx - half) & (iy < ny - half)
    if ix.size > 1:  # a neighbour in the box would add its pixels above half the peak
        from scipy.spatial import cKDTree

        pts = np.column_stack([cand["x"], cand["y"]])
        dist = cKDTree(pts).query(pts, k=2)[0][:, 1]
        ok &= dist > np.sqrt(2.0) * half
    reach = float(half)
    if "flux" in cand:
        ok &= cand["flag"] == 0
        # bright but not the brightest tenth (saturated or non-linear cores, bleed trails)
        ok &= cand["flux"] <= np.percentile(cand["flux"], 90.0)
        order = np.argsort(-cand["flux"][ok], kind="stable")[:200]
        if ok.any():
            reach = min(float(half), max(4.0, 2.0 * float(np.median(cand["fwhm"][ok]))))
    else:
        order = np.arange(int(ok.sum()))[:200]
    sel = np.flatnonzero(ok)[order]
    out = []
    for v, img in ((fwhm_s, sci), (fwhm_r, ref)):
        if v is not None:
            out.append(float(v))
            continue
        mask = sci.mask | ref.mask
        f = _measure_fwhm(xp, img.source, mask, ix[sel], iy[sel], half, img.global_rms, reach)
        f = f[np.isfinite(f)]
        out.append(float(np.median(f)) if f.size >= 3 else math.nan)
    return out[0], out[1]


def _grow(xp, bad, half):
    """``bad`` dilated by a ``(2 half + 1)`` square; the frame border of ``half`` is set too."""
    ndi = ndimage_of(bad)
    grown = ndi.maximum_filter(bad.astype(xp.uint8), size=2 * half + 1, mode="constant", cval=1)
    return grown.astype(bool)


def _tiles(xp, shape, half, tile, bad) -> _Stamps:
    ny, nx = shape
    t = min(tile, ny - 2 * half, nx - 2 * half)
    if t < 1:
        raise InputError("kernel_size", "leaves no interior pixels to fit with stamps='all'")

    def starts(n):
        s = list(range(half, n - half - t + 1, t))
        if s[-1] + t < n - half:
            s.append(n - half - t)  # the last tile overlaps its neighbour
        return np.array(s, dtype=np.int64)

    ys, xs = starts(ny), starts(nx)
    y0, x0 = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    good = ~_gather(xp, bad, y0, x0, t, t)
    # pixels a previous tile already covers are used once only
    cover = np.zeros(shape, dtype=np.int32)
    dup = np.zeros((y0.size, t, t), dtype=bool)
    for k in range(y0.size):  # a few hundred tiles at most per 1k^2: cheap bookkeeping
        region = cover[y0[k] : y0[k] + t, x0[k] : x0[k] + t]
        dup[k] = region > 0
        region += 1
    good = good & ~xp.asarray(dup)
    return _Stamps(
        y0=y0, x0=x0, h=t, w=t, good=good.reshape(y0.size, -1),
        cx=(x0 + 0.5 * (t - 1)).astype(np.float64), cy=(y0 + 0.5 * (t - 1)).astype(np.float64),
    )  # fmt: skip


def _check_stamps(n, n_needed, tried, counts, kernel_order, scale_order) -> None:
    if n >= max(n_needed, 1):
        return
    why = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none rejected"
    raise InputError(
        "stamps",
        f"no usable stamps: {n} left of {tried} candidates tried ({why}); "
        f"kernel_order={kernel_order} and scale_order={scale_order} need at least {n_needed}. "
        "Lower min_snr, pass stamps='all' or stamp positions, or check the masks",
    )


def _poly_map(xp, coeffs, terms, shape, norm):
    ny, nx = shape
    cx, hx, cy, hy = norm
    u = (xp.arange(nx, dtype=xp.float64) - cx) / hx
    v = (xp.arange(ny, dtype=xp.float64) - cy) / hy
    out = xp.zeros(shape, dtype=xp.float32)
    for c, (i, j) in zip(coeffs, terms, strict=True):
        out += (c * (v**j)[:, None] * (u**i)[None, :]).astype(xp.float32)
    return out


def _squared_kernel_terms(xp, mono, terms):
    """``K^2 = sum_t t(x, y) G_t``: product monomials and their kernel images."""
    out: dict = {}
    for a, (ia, ja) in enumerate(terms):
        for b in range(a, len(terms)):
            ib, jb = terms[b]
            key = (ia + ib, ja + jb)
            term = mono[a] * mono[b] * (1.0 if a == b else 2.0)
            out[key] = out[key] + term if key in out else term
    keys = sorted(out, key=lambda k: (k[0] + k[1], k[1]))
    return keys, xp.stack([out[k] for k in keys])
