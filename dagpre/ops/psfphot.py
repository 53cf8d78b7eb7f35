"""PSF photometry on difference images (pyDIA's way), every star at once, on NumPy or CuPy.

:func:`psf_photometry` fits each star's flux as the amplitude of a PSF model by weighted
linear least squares on the pixels within ``radius`` of the star:

* the model is the PSF stamp moved to the star's sub-pixel position (a Fourier shift: the
  stamp's transform times a phase ramp), optionally convolved with the subtraction kernel
  at the star's position (:meth:`Subtraction.kernel_at <dagpre.ops.subtract.Subtraction.
  kernel_at>`), both in one product of transforms;
* ``flux = sum(w P D) / sum(w P^2)`` with ``w = 1 / variance``, error ``sqrt(1 / sum(w P^2))``
  (with ``fit_background``, a local constant is fitted with it, a 2 x 2 solve per star);
* on a :class:`~dagpre.ops.subtract.Subtraction`, the error also carries the covariance
  that the kernel gave the convolved image's noise (its per-pixel variance alone counts
  each pixel as independent, which makes faint sources' errors too small by ~30 % against
  a single-exposure reference): the flux is ``sum(a D)`` with fixed weights ``a``, so its
  variance is ``sum(a^2 var_T) + sum_j var_C,j (a ⋆ K)_j^2`` with ``⋆`` the correlation
  with the kernel, computed per star by batched FFTs over the window grown by the kernel;
* stars go through in chunks of stacked ``(n, L, L)`` arrays (batched FFTs and reductions);
  nothing loops over stars.

Units: with ``kernel`` the model is ``psf ⊗ K`` whose sum is the kernel sum, so the flux is
in the units of the image that was *convolved* and ``psf`` must be that image's PSF (pyDIA:
the reference PSF, well measured on the deep reference, and light curves calibrated to the
reference). Without ``kernel`` the model sums to 1 and the flux is in the difference
image's units, with ``psf`` the PSF of the image that was not convolved.

A PSF can also be a model object (issue 8 will bring a DAOPHOT-style one): any callable
``psf(x, y)`` returning ``(n, s, s)`` stamps of the normalised PSF of stars at ``(x, y)``,
sampled on the pixels ``(floor(x + 0.5) - h + i, floor(y + 0.5) - h + j)`` for ``i, j < s``
(``h = s // 2``), already moved to the sub-pixel position and varying with position as the
model likes.

Conventions: arrays are indexed ``[y, x]``; positions are (x, y) pixel order with 0-based
pixel centres, not NumPy (row, col) order.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagpre.backend import fft_of, xp_of
from dagpre.ops._checks import check_image, usable_pixels
from dagpre.types import InputError

__all__ = [
    "PSF_ALLMASKED",
    "PSF_HASMASKED",
    "PSF_TRUNC",
    "PSFPhotometry",
    "psf_photometry",
]

#: The fitting window runs off the image.
PSF_TRUNC = 16
#: Some pixels in the fitting window are masked, non-finite or have no positive variance.
PSF_HASMASKED = 32
#: No usable pixel: the flux is NaN.
PSF_ALLMASKED = 64

_CHUNK_PIXELS = 1 << 22  # stars x transform pixels per chunk


@dataclass(frozen=True, eq=False)
class PSFPhotometry:
    """Result of :func:`psf_photometry`; unpacks as ``flux, fluxerr``.

    Attributes
    ----------
    flux : ndarray (n,) float64
        Fitted amplitude of the model (see the module docstring for its units); NaN where
        no pixel could be used.
    fluxerr : ndarray (n,) float64
        1-sigma error: from ``variance`` when given, else from the scatter of the residuals
        (``sqrt(chi2)`` times the formal error with unit weights).
    flag : ndarray (n,) int16
        :data:`PSF_TRUNC`, :data:`PSF_HASMASKED`, :data:`PSF_ALLMASKED` bits.
    chi2 : ndarray (n,) float64
        Reduced chi^2 of the fit (residuals weighted by ``1 / variance``; unit weights when
        ``variance`` is None).
    npix : ndarray (n,) int64
        Pixels used.
    background : ndarray (n,) float64 or None
        Local constant per pixel with ``fit_background=True``.
    """

    flux: Any
    fluxerr: Any
    flag: Any
    chi2: Any
    npix: Any
    background: Any = None

    def __iter__(self):
        return iter((self.flux, self.fluxerr))


def psf_photometry(
    difference: Any,
    psf: Any,
    x: Any,
    y: Any,
    variance: Any = None,
    *,
    kernel: Any = None,
    mask: Any = None,
    radius: float | None = None,
    fit_background: bool = False,
    covariance: bool = True,
) -> PSFPhotometry:
    """Fluxes of point sources by PSF fitting, vectorised over sources.

    Parameters
    ----------
    difference : ndarray (ny, nx) or Subtraction
        Image to measure (ADU), NumPy or CuPy. A :class:`~dagpre.ops.subtract.Subtraction`
        brings its ``difference``, ``variance`` and ``mask`` (arguments given here win).
    psf : ndarray (s, s) or callable
        A PSF stamp (odd side, centred on its middle pixel; divided by its sum here), or a
        PSF model ``psf(x, y) -> (n, s, s)`` (see the module docstring).
    x, y : array_like (n,)
        Source positions, (x, y) pixel order, 0-based pixel centres.
    variance : ndarray (ny, nx), optional
        Per-pixel variance (ADU^2): weights ``1 / variance``; pixels where it is not
        positive and finite are not used. None: unit weights, errors from the residuals.
    kernel : Subtraction, callable, ndarray (k, k) or (n, k, k), optional
        Convolve the PSF with a kernel first: a Subtraction (its kernel at each star),
        a callable ``kernel_at(x, y) -> (n, k, k)``, one kernel for all or one per star
        (indexed ``[v + r, u + r]``, odd side).
    mask : ndarray (ny, nx), optional
        Non-zero marks pixels not to use (a MaskBit mask as is).
    radius : float, optional
        Fitting radius (px) about each position. Default ``max(3, 1.5 * FWHM)`` of the
        (convolved) PSF model, FWHM from its half-maximum area.
    fit_background : bool
        Also fit a local constant background per star.
    covariance : bool
        With a Subtraction (its ``variance``, not one given here): include in ``fluxerr``
        the pixel covariance of the convolved image's noise (see the module docstring).
        Needs the Subtraction's ``convolved_variance``. False: per-pixel variance only.

    Returns
    -------
    PSFPhotometry
        On the device of ``difference``; unpacks as ``flux, fluxerr``.

    Raises
    ------
    InputError
        For a bad image, PSF (even or non-square stamp, non-positive sum), kernel, or
        positions of different lengths or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.simulate import render_sources
    >>> psf = render_sources((15, 15), [7.0], [7.0], [1.0], [3.0], psf="gaussian")
    >>> image = render_sources((64, 64), [20.3, 40.7], [30.2, 21.6], [500.0, 800.0], [3.0],
    ...                        psf="gaussian")
    >>> flux, fluxerr = psf_photometry(image, psf, [20.3, 40.7], [30.2, 21.6])
    >>> np.round(flux, 1).tolist()
    [500.0, 800.0]
    """
    sub = None
    noise_var = None  # the convolved image's variance when its covariance is added
    if hasattr(difference, "difference") and hasattr(difference, "kernel_at"):
        sub = difference
        difference = sub.difference
        if covariance and variance is None:
            noise_var = getattr(sub, "convolved_variance", None)
            if noise_var is None:
                raise InputError(
                    "covariance", "this Subtraction has no convolved_variance; pass "
                    "covariance=False for per-pixel errors"
                )  # fmt: skip
        variance = sub.variance if variance is None else variance
        mask = sub.mask if mask is None else mask
    check_image(difference, "difference")
    xp = xp_of(difference)
    ny, nx = difference.shape
    xs = xp.atleast_1d(xp.asarray(x, dtype=xp.float64))
    ys = xp.atleast_1d(xp.asarray(y, dtype=xp.float64))
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise InputError("y", f"x and y differ in shape: {xs.shape} vs {ys.shape}")
    if not (bool(xp.all(xp.isfinite(xs))) and bool(xp.all(xp.isfinite(ys)))):
        raise InputError("x", "expected finite positions")
    for name, arr in (("variance", variance), ("mask", mask)):
        if arr is not None and tuple(arr.shape) != (ny, nx):
            raise InputError(name, f"shape {tuple(arr.shape)} differs from difference {(ny, nx)}")
    psf_fn, stamp = _psf_source(xp, psf)
    kernel_fn = _kernel_source(xp, kernel, int(xs.size))
    if radius is not None and not (
        isinstance(radius, numbers.Real) and math.isfinite(radius) and radius > 0
    ):
        raise InputError("radius", f"expected a positive number of pixels, got {radius!r}")
    n = int(xs.size)
    flux = xp.full(n, xp.nan)
    err = xp.full(n, xp.nan)
    flag = xp.zeros(n, dtype=xp.int16)
    chi2 = xp.full(n, xp.nan)
    npix = xp.zeros(n, dtype=xp.int64)
    back = xp.full(n, xp.nan) if fit_background else None
    if n == 0:
        return PSFPhotometry(flux, err, flag, chi2, npix, back)
    data, var, usable = usable_pixels(xp, difference, variance, mask)
    ix = xp.floor(xs + 0.5).astype(xp.int64)
    iy = xp.floor(ys + 0.5).astype(xp.int64)
    # the window: the model's side, or the radius when given (whichever is smaller)
    kern0 = None if kernel_fn is None else kernel_fn(0, 1, xs[:1], ys[:1])
    s0 = int(stamp.shape[0]) if stamp is not None else int(psf_fn(xs[:1], ys[:1]).shape[-1])
    model_side = s0 + (0 if kern0 is None else int(kern0.shape[-1]) - 1)
    if radius is None:
        radius = _default_radius(xp, psf_fn, stamp, kern0, xs, ys)
    half = min((model_side - 1) // 2, math.ceil(radius))
    per_star = max(1, (model_side + 4) ** 2)
    chunk = max(1, _CHUNK_PIXELS // per_star)
    offs = xp.arange(-half, half + 1)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        kern = None if kernel_fn is None else kernel_fn(i0, i1, xs[i0:i1], ys[i0:i1])
        model = _models(xp, psf_fn, stamp, kern, xs[i0:i1], ys[i0:i1], ix[i0:i1], iy[i0:i1], half)
        rows = iy[i0:i1, None] + offs[None, :]
        cols = ix[i0:i1, None] + offs[None, :]
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        rc = xp.clip(rows, 0, ny - 1)[:, :, None]
        cc = xp.clip(cols, 0, nx - 1)[:, None, :]
        dist2 = (cols[:, None, :] - xs[i0:i1, None, None]) ** 2
        dist2 = dist2 + (rows[:, :, None] - ys[i0:i1, None, None]) ** 2
        in_circle = dist2 <= radius * radius
        ok = inside & usable[rc, cc] & in_circle
        d = xp.where(ok, data[rc, cc], 0.0)
        vsafe = None if variance is None else xp.where(ok, var[rc, cc], 1.0)  # no 1/0 off ok
        w = ok.astype(xp.float64) if variance is None else xp.where(ok, 1.0 / vsafe, 0.0)
        trunc = xp.any(in_circle & ~inside, axis=(1, 2))
        hasmasked = xp.any(in_circle & inside & ~ok, axis=(1, 2))
        npx = ok.sum(axis=(1, 2))
        spp = (w * model * model).sum(axis=(1, 2))
        spd = (w * model * d).sum(axis=(1, 2))
        if fit_background:
            sp = (w * model).sum(axis=(1, 2))
            s1 = w.sum(axis=(1, 2))
            sd = (w * d).sum(axis=(1, 2))
            det = spp * s1 - sp * sp
            good = (npx >= 2) & (det > 0)
            safe = xp.where(good, det, 1.0)
            f = xp.where(good, (spd * s1 - sp * sd) / safe, xp.nan)
            b = xp.where(good, (spp * sd - sp * spd) / safe, xp.nan)
            cov = xp.where(good, s1 / safe, xp.nan)
            resid = d - f[:, None, None] * model - b[:, None, None]
            dof = npx - 2
            back[i0:i1] = b
        else:
            good = (npx >= 1) & (spp > 0)
            f = xp.where(good, spd / xp.where(good, spp, 1.0), xp.nan)
            cov = xp.where(good, 1.0 / xp.where(good, spp, 1.0), xp.nan)
            resid = d - f[:, None, None] * model
            dof = npx - 1
        c2 = xp.where(ok, w * resid * resid, 0.0).sum(axis=(1, 2)) / xp.maximum(dof, 1)
        if noise_var is not None:
            if fit_background:
                a = w * (model * s1[:, None, None] - sp[:, None, None]) / safe[:, None, None]
            else:
                a = w * model / xp.where(good, spp, 1.0)[:, None, None]
            knoise = xp.asarray(sub.kernel_at(xs[i0:i1], ys[i0:i1]), dtype=xp.float64)
            r = (int(knoise.shape[-1]) - 1) // 2
            cov = xp.maximum(cov + _convolved_noise_excess(
                xp, a, knoise, _cutouts(xp, noise_var, ix[i0:i1], iy[i0:i1], half + r)
            ), 0.0)  # fmt: skip
        e = xp.sqrt(cov) if variance is not None else xp.sqrt(cov * c2)
        flux[i0:i1] = f
        err[i0:i1] = xp.where(good, e, xp.nan)
        chi2[i0:i1] = xp.where(good, c2, xp.nan)
        npix[i0:i1] = npx
        fl = xp.where(trunc, PSF_TRUNC, 0) | xp.where(hasmasked, PSF_HASMASKED, 0)
        fl = fl | xp.where(good, 0, PSF_ALLMASKED)
        flag[i0:i1] = fl.astype(xp.int16)
    return PSFPhotometry(flux, err, flag, chi2, npix, back)


# =========================================================================== covariance


def _cutouts(xp, image, ix, iy, half):
    """``(n, 2 half + 1, 2 half + 1)`` float64 cut-outs about ``(ix, iy)``; pixels off the
    image or not finite are 0."""
    ny, nx = image.shape
    offs = xp.arange(-half, half + 1)
    rows = iy[:, None] + offs[None, :]
    cols = ix[:, None] + offs[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    vals = image[xp.clip(rows, 0, ny - 1)[:, :, None], xp.clip(cols, 0, nx - 1)[:, None, :]]
    vals = vals.astype(xp.float64)
    return xp.where(inside & xp.isfinite(vals), vals, 0.0)


def _convolved_noise_excess(xp, a, kern, var_c):
    """Per star, ``sum_j var_C,j ((a ⋆ K)_j^2 - (a^2 ⋆ K^2)_j)``: the flux variance that
    the convolved image's noise adds beyond its per-pixel share ``sum_i a_i^2 (var_C ⊗ K^2)_i``.

    The difference holds ``(C ⊗ K)_i = sum_j C_j K_{i-j}``, so ``sum_i a_i (C ⊗ K)_i`` weighs
    ``C_j`` by ``(a ⋆ K)_j = sum_i a_i K_{i-j}``: the full convolution of ``a`` with the
    flipped kernel, on the window grown by the kernel's half-width (``var_c``'s grid).

    a : (n, L, L) estimator weights; kern : (n, k, k) indexed ``[v + r, u + r]``;
    var_c : (n, L + k - 1, L + k - 1).
    """
    fft = fft_of(a)
    side = int(a.shape[-1]) + int(kern.shape[-1]) - 1
    size = _even_fast(side)
    flipped = xp.ascontiguousarray(kern[:, ::-1, ::-1])
    spec_k = fft.rfft2(flipped, s=(size, size))
    spec_k2 = fft.rfft2(flipped * flipped, s=(size, size))
    g = fft.irfft2(fft.rfft2(a, s=(size, size)) * spec_k, s=(size, size))[:, :side, :side]
    h = fft.irfft2(fft.rfft2(a * a, s=(size, size)) * spec_k2, s=(size, size))[:, :side, :side]
    return (var_c * (g * g - h)).sum(axis=(1, 2))


# =========================================================================== models


def _psf_source(xp, psf) -> tuple[Callable | None, Any]:
    if callable(psf) and not hasattr(psf, "ndim"):
        return psf, None
    stamp = xp.asarray(psf, dtype=xp.float64)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise InputError("psf", f"expected an odd square 2-D stamp, got shape {stamp.shape}")
    if not bool(xp.all(xp.isfinite(stamp))):
        raise InputError("psf", "expected finite values")
    total = float(stamp.sum())
    if not total > 0:
        raise InputError("psf", f"expected a positive sum, got {total}")
    return None, stamp / total


def _kernel_source(xp, kernel, n) -> Callable | None:
    """``get(i0, i1, x, y) -> (i1 - i0, k, k)``: the kernels of stars ``i0:i1``, or None."""
    if kernel is None:
        return None
    if hasattr(kernel, "kernel_at"):
        return lambda i0, i1, xq, yq: kernel.kernel_at(xq, yq)
    if callable(kernel) and not hasattr(kernel, "ndim"):
        return lambda i0, i1, xq, yq: kernel(xq, yq)
    k = xp.asarray(kernel, dtype=xp.float64)
    if k.ndim not in (2, 3) or k.shape[-1] != k.shape[-2] or k.shape[-1] % 2 == 0:
        raise InputError(
            "kernel", f"expected odd square kernels (k, k) or (n, k, k), got {k.shape}"
        )
    if k.ndim == 3 and k.shape[0] != n:
        raise InputError("kernel", f"got {k.shape[0]} kernels for {n} positions")
    if k.ndim == 2:
        return lambda i0, i1, xq, yq: xp.broadcast_to(k, (i1 - i0, *k.shape))
    return lambda i0, i1, xq, yq: k[i0:i1]


def _default_radius(xp, psf_fn, stamp, kern, xs, ys) -> float:
    """``max(3, 1.5 FWHM)`` of the model of the first star (FWHM from its half-max area)."""
    ix = xp.floor(xs[:1] + 0.5).astype(xp.int64)
    iy = xp.floor(ys[:1] + 0.5).astype(xp.int64)
    m = _models(xp, psf_fn, stamp, kern, xs[:1], ys[:1], ix, iy, None)[0]
    area = float((m >= 0.5 * m.max()).sum())
    return max(3.0, 1.5 * 2.0 * math.sqrt(area / math.pi))


def _models(xp, psf_fn, stamp, kern, xs, ys, ix, iy, half):
    """``(n, 2 half + 1, 2 half + 1)`` model stamps about ``(ix, iy)`` (whole model if None)."""
    fft = fft_of(xs)
    n = int(xs.size)
    if stamp is not None:
        base = xp.ascontiguousarray(xp.broadcast_to(stamp, (n, *stamp.shape)))
        dx, dy = xs - ix, ys - iy
    else:
        base = xp.asarray(psf_fn(xs, ys), dtype=xp.float64)
        if (
            base.ndim != 3
            or base.shape[0] != n
            or base.shape[1] != base.shape[2]
            or base.shape[1] % 2 == 0
        ):
            raise InputError(
                "psf", f"a PSF model must return (n, s, s) stamps with s odd, got {base.shape}"
            )
        dx = dy = None
    s = base.shape[-1]
    k = None
    if kern is not None:
        k = xp.ascontiguousarray(xp.asarray(kern, dtype=xp.float64))
        if k.ndim != 3 or k.shape[0] != n or k.shape[1] != k.shape[2] or k.shape[1] % 2 == 0:
            raise InputError("kernel", f"expected (n, k, k) kernels with k odd, got {k.shape}")
    ks = 1 if k is None else k.shape[-1]
    full = s + ks - 1
    centre = (s - 1) // 2 + (ks - 1) // 2
    if k is None and dx is None:
        out = base
    else:
        size = _even_fast(full + 4)
        spec = fft.rfft2(base, s=(size, size))
        if k is not None:
            spec = spec * fft.rfft2(k, s=(size, size))
        if dx is not None:
            fy = xp.fft.fftfreq(size)[None, :, None]
            fx = xp.fft.rfftfreq(size)[None, None, :]
            phase = -2j * math.pi * (fx * dx[:, None, None] + fy * dy[:, None, None])
            spec = spec * xp.exp(phase)
        out = fft.irfft2(spec, s=(size, size))
    if half is None:
        return out[:, :full, :full]
    lo = centre - half
    if lo < 0:  # the model is smaller than the window: pad it with zeros
        out = xp.pad(out, ((0, 0), (-lo, -lo), (-lo, -lo)))
        lo = 0
    return out[:, lo : lo + 2 * half + 1, lo : lo + 2 * half + 1]


def _even_fast(n: int) -> int:
    import scipy.fft

    m = int(scipy.fft.next_fast_len(int(n), real=True))
    return m + (m % 2)
