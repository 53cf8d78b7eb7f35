"""Kernel bases of image subtraction and the convolutions that apply them (NumPy or CuPy).

A matching kernel is ``K(u, v; x, y) = sum_k a_k(x, y) b_k(u, v)``: basis images ``b_k``
with spatial polynomials ``a_k``. This module builds the bases and applies them:

* :func:`make_basis` — ``"gaussian"`` (Alard & Lupton 1998, HOTPANTS: Gaussians times
  polynomials), ``"delta"`` (Bramich 2008: one free pixel per basis image) and
  ``"modified_delta"`` (Bramich et al. 2013 / pyDIA: the centre pixel plus zero-sum
  ``delta_k - delta_centre`` images, so the kernel sum, the photometric scale, rests on one
  element that can have its own spatial degree). Element 0 is always the one that carries
  the kernel sum in the Gaussian and modified-delta bases (every other element sums to 0).
* :func:`convolve_stamps` — every basis image convolved with a stack of small cut-outs, for
  the least-squares fit: separable 1-D passes for the Gaussian basis (each element is
  ``g(u) u^p * g(v) v^q``), a single gather of shifted views for the delta bases.
* :func:`poly_convolve` — ``sum_j t_j(x, y) (image ⊗ kernel_j)(x, y)`` over a whole frame,
  for monomials ``t_j`` of the pixel position, by FFTs in row bands (memory bounded by
  the band, not the frame).

Conventions: kernel images are indexed ``[v + r, u + r]`` with ``(u, v)`` the (x, y) offset
and ``r`` the half-width; convolution is ``(R ⊗ b)(x, y) = sum_uv R(x - u, y - v) b(u, v)``,
so a kernel with its weight at ``(u, v) = (1, 0)`` moves the image by +1 pixel in x.
Spatial monomials are ``x'^i y'^j`` of the position scaled to ``[-1, 1]`` over the frame
(:func:`scaled_coords`), listed by :func:`poly_terms`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import fft_of, is_cupy_array, ndimage_of

#: Kernel bases :func:`make_basis` builds.
BASES = ("gaussian", "delta", "modified_delta")
#: HOTPANTS' default Gaussian widths (px) and polynomial degrees (``-ng 3 6 0.70 4 1.50 2 3.00``).
HOTPANTS_SIGMAS = (0.7, 1.5, 3.0)
HOTPANTS_DEGREES = (6, 4, 2)
#: The matching-kernel width HOTPANTS' defaults are made for (sigma, px): its README asks
#: for basis widths of 0.5, 1 and 2 times the matching width.
HOTPANTS_MATCH_SIGMA = 1.5


def poly_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of the monomials ``x^i y^j`` of total degree <= ``degree``.

    Ordered by degree, then by falling power of x: ``1, x, y, x^2, xy, y^2, ...``.
    """
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def scaled_coords(shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(cx, hx, cy, hy)``: positions scaled to [-1, 1] are ``(x - cx) / hx, (y - cy) / hy``."""
    ny, nx = shape
    cx, cy = 0.5 * (nx - 1), 0.5 * (ny - 1)
    return cx, max(cx, 0.5), cy, max(cy, 0.5)


def monomials(xp, x, y, terms, norm) -> Any:
    """``(n, len(terms))`` float64: each monomial at the positions ``(x, y)`` (px)."""
    cx, hx, cy, hy = norm
    u = (xp.asarray(x, dtype=xp.float64) - cx) / hx
    v = (xp.asarray(y, dtype=xp.float64) - cy) / hy
    return xp.stack([u**i * v**j for i, j in terms], axis=-1)


# =========================================================================== bases


@dataclass(frozen=True, eq=False)
class KernelBasis:
    """A kernel basis and how to convolve with it (host arrays; see the module docstring).

    Attributes
    ----------
    name : str
        One of :data:`BASES`.
    half : int
        Kernel half-width ``r`` (px); the kernel is ``2 r + 1`` square.
    images : ndarray (nb, 2r+1, 2r+1) float64
        The basis images ``b_k``.
    sums_to_zero : ndarray (nb,) bool
        Elements whose sum is 0 (they change the kernel's shape, not its sum).
    raw_x, raw_y : ndarray (nraw, 2r+1) float64 or None
        Gaussian basis: 1-D factors of the raw separable elements (``b = outer(raw_y,
        raw_x)``), in groups that share ``raw_x`` (see ``x_groups``).
    x_groups : list of (ndarray, list of int) or None
        Gaussian basis: each distinct x factor and the raw elements that use it.
    offsets : ndarray (nraw, 2) int or None
        Delta bases: ``(du, dv)`` of each raw one-pixel element.
    diag, column0 : ndarray (nb,) float64
        ``b_k = diag_k * raw_k - column0_k * raw_0`` (element 0: ``diag_0 * raw_0``).
    sigmas, degrees : tuple
        Gaussian basis: widths (px) and polynomial degrees.
    """

    name: str
    half: int
    images: np.ndarray
    sums_to_zero: np.ndarray
    diag: np.ndarray
    column0: np.ndarray
    raw_x: np.ndarray | None = None
    raw_y: np.ndarray | None = None
    x_groups: list | None = None
    offsets: np.ndarray | None = None
    sigmas: tuple = ()
    degrees: tuple = ()

    @property
    def size(self) -> int:
        """Kernel side, ``2 * half + 1`` pixels."""
        return 2 * self.half + 1

    @property
    def n(self) -> int:
        """Number of basis elements."""
        return int(self.images.shape[0])


def make_basis(
    name: str,
    half: int,
    sigmas: tuple[float, ...] = HOTPANTS_SIGMAS,
    degrees: tuple[int, ...] = HOTPANTS_DEGREES,
) -> KernelBasis:
    """Build the kernel basis ``name`` of half-width ``half`` (arguments already checked).

    Gaussian: for each ``(sigma, degree)`` the elements ``exp(-(u^2 + v^2) / 2 sigma^2) u^p
    v^q`` with ``p + q <= degree``, each scaled to unit L2 norm; element 0 (first Gaussian,
    ``p = q = 0``) is scaled to unit sum and every other element with a non-zero sum has
    ``sum * b_0`` taken off (HOTPANTS), so only element 0 changes the kernel sum.
    """
    size = 2 * half + 1
    if name == "gaussian":
        return _gaussian_basis(half, tuple(sigmas), tuple(degrees))
    # delta bases: the centre first, then the other pixels in raster order
    dv, du = np.divmod(np.arange(size * size), size)
    du, dv = du - half, dv - half
    order = np.argsort((du != 0) | (dv != 0), kind="stable")
    offsets = np.stack([du[order], dv[order]], axis=1).astype(np.int64)
    nb = offsets.shape[0]
    images = np.zeros((nb, size, size))
    images[np.arange(nb), offsets[:, 1] + half, offsets[:, 0] + half] = 1.0
    diag = np.ones(nb)
    column0 = np.zeros(nb)
    if name == "modified_delta":
        column0[1:] = 1.0
        images[1:, half, half] = -1.0
    sums = images.sum(axis=(1, 2))
    return KernelBasis(
        name=name,
        half=half,
        images=images,
        sums_to_zero=np.abs(sums) < 1e-12,
        diag=diag,
        column0=column0,
        offsets=offsets,
    )


def _gaussian_basis(half: int, sigmas: tuple, degrees: tuple) -> KernelBasis:
    u = np.arange(-half, half + 1, dtype=np.float64)
    raw_x, raw_y, groups = [], [], []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        g = np.exp(-0.5 * (u / sigma) ** 2)
        for p in range(degree + 1):
            members = []
            for q in range(degree + 1 - p):
                members.append(len(raw_x))
                raw_x.append(g * u**p)
                raw_y.append(g * u**q)
            groups.append((g * u**p, members))
    raw_x, raw_y = np.array(raw_x), np.array(raw_y)
    raw = raw_y[:, :, None] * raw_x[:, None, :]
    # keep the first element first: groups were built p-major, so raw 0 is (g0, p=0, q=0)
    norms = np.sqrt((raw**2).sum(axis=(1, 2)))
    sums = raw.sum(axis=(1, 2)) / norms
    diag = 1.0 / norms
    diag[0] = 1.0 / raw[0].sum()
    column0 = sums * diag[0]  # b_k = raw_k / n_k - (sum(raw_k) / n_k) * b_0
    column0[0] = 0.0
    column0[np.abs(sums) < 1e-12 * np.abs(sums).max()] = 0.0
    images = raw * diag[:, None, None] - column0[:, None, None] * raw[0]
    kept = np.abs(images.sum(axis=(1, 2))) < 1e-9
    kept[0] = False
    return KernelBasis(
        name="gaussian",
        half=half,
        images=images,
        sums_to_zero=kept,
        diag=diag,
        column0=column0,
        raw_x=raw_x,
        raw_y=raw_y,
        x_groups=groups,
        sigmas=tuple(float(s) for s in sigmas),
        degrees=tuple(int(d) for d in degrees),
    )


# =========================================================================== stamps


def convolve_stamps(basis: KernelBasis, cutouts: Any, out_dtype=None) -> Any:
    """Every basis image convolved with each cut-out, valid part only.

    Parameters
    ----------
    basis : KernelBasis
    cutouts : ndarray (s, h + 2r, w + 2r)
        Image cut-outs (NumPy or CuPy), ``r = basis.half``.
    out_dtype : dtype, optional
        Result dtype (default: the cut-outs').

    Returns
    -------
    ndarray (s, nb, h, w)
        ``C[s, k] = (cutout_s ⊗ b_k)`` on the ``h x w`` pixels whose kernel footprint lies
        inside the cut-out.
    """
    xp = _xp(cutouts)
    r = basis.half
    s, hh, ww = cutouts.shape
    h, w = hh - 2 * r, ww - 2 * r
    dtype = out_dtype or cutouts.dtype
    if basis.name == "gaussian":
        ndi = ndimage_of(cutouts)
        raw = xp.empty((s, basis.raw_x.shape[0], h, w), dtype=dtype)
        for fx, members in basis.x_groups:
            row = ndi.convolve1d(cutouts, xp.asarray(fx, dtype=cutouts.dtype), axis=2)
            row = xp.ascontiguousarray(row[:, :, r : r + w])
            for j in members:
                fy = xp.asarray(basis.raw_y[j], dtype=cutouts.dtype)
                col = ndi.convolve1d(row, fy, axis=1)
                raw[:, j] = col[:, r : r + h, :]
    else:
        du, dv = basis.offsets[:, 0], basis.offsets[:, 1]
        iy = xp.asarray((r - dv)[:, None] + np.arange(h)[None, :])
        ix = xp.asarray((r - du)[:, None] + np.arange(w)[None, :])
        raw = cutouts[:, iy[:, :, None], ix[:, None, :]].astype(dtype, copy=False)
    return _combine(xp, basis, raw)


def _combine(xp, basis: KernelBasis, raw):
    """Apply ``b_k = diag_k raw_k - column0_k raw_0`` in place on the stamp axis 1."""
    first = raw[:, :1].copy() if np.any(basis.column0 != 0.0) else None
    if not np.all(basis.diag == 1.0):
        raw *= xp.asarray(basis.diag, dtype=raw.dtype)[None, :, None, None]
    if first is not None:
        raw -= xp.asarray(basis.column0, dtype=raw.dtype)[None, :, None, None] * first
    return raw


# =========================================================================== frames


def poly_convolve(
    image: Any,
    kernels: Any,
    terms: list[tuple[int, int]],
    norm: tuple[float, float, float, float],
    band_rows: int = 1024,
    threads: int | None = None,
) -> Any:
    """``sum_j t_j(x, y) (image ⊗ kernels[j])(x, y)`` over the frame, float32.

    Parameters
    ----------
    image : ndarray (ny, nx) float32
        NumPy or CuPy; reflected across the frame edges where the kernel reaches out.
    kernels : ndarray (nt, 2r+1, 2r+1)
        One kernel per monomial, indexed ``[v + r, u + r]``, same device as ``image``.
    terms : list of (int, int)
        Exponents ``(i, j)`` of the monomials ``t_j = x'^i y'^j`` (scaled coordinates).
    norm : (cx, hx, cy, hy)
        From :func:`scaled_coords`.
    band_rows : int
        Rows per FFT band: memory is about ``(band_rows + 2r) * (nx + 2r) * 24`` bytes.
    threads : int, optional
        ``workers`` of ``scipy.fft`` (ignored on CuPy).
    """
    xp = _xp(image)
    fft = fft_of(image)
    ny, nx = image.shape
    r = (kernels.shape[-1] - 1) // 2
    kw = {} if is_cupy_array(image) else {"workers": threads or os.cpu_count() or 1}
    padded = xp.pad(image, r, mode="reflect") if r else image
    kernels = kernels.astype(xp.float32)
    cx, hx, cy, hy = norm
    xs = (xp.arange(nx, dtype=xp.float64) - cx) / hx
    max_i = max(i for i, _ in terms)
    max_j = max(j for _, j in terms)
    xpow = [xp.ones(nx, dtype=xp.float32)]
    for _ in range(max_i):
        xpow.append((xpow[-1] * xs).astype(xp.float32))
    out = xp.zeros((ny, nx), dtype=xp.float32)
    cached: dict = {}
    for y0 in range(0, ny, band_rows):
        y1 = min(ny, y0 + band_rows)
        hb = y1 - y0
        block = padded[y0 : y1 + 2 * r]
        fshape = (_fast_len(hb + 2 * r), _fast_len(nx + 2 * r))
        if fshape not in cached:
            cached.clear()
            cached[fshape] = fft.rfft2(kernels, s=fshape, axes=(-2, -1), **kw)
        kf = cached[fshape]
        fblock = fft.rfft2(block, s=fshape, **kw)
        ys = (xp.arange(y0, y1, dtype=xp.float64) - cy) / hy
        ypow = [xp.ones(hb, dtype=xp.float32)]
        for _ in range(max_j):
            ypow.append((ypow[-1] * ys).astype(xp.float32))
        for t, (i, j) in enumerate(terms):
            conv = fft.irfft2(fblock * kf[t], s=fshape, **kw)[
                2 * r : 2 * r + hb, 2 * r : 2 * r + nx
            ]
            if i:
                conv *= xpow[i][None, :]
            if j:
                conv *= ypow[j][:, None]
            out[y0:y1] += conv
    return out


def batch_convolve_valid(cutouts: Any, kernels: Any) -> Any:
    """Each cut-out ``(s, h + 2r, w + 2r)`` convolved with its own kernel ``(s, 2r+1, 2r+1)``,
    valid part ``(s, h, w)``, by batched FFTs."""
    xp = _xp(cutouts)
    fft = fft_of(cutouts)
    hh, ww = cutouts.shape[-2:]
    r = (kernels.shape[-1] - 1) // 2
    fshape = (_fast_len(hh), _fast_len(ww))
    prod = fft.rfft2(cutouts, s=fshape) * fft.rfft2(kernels.astype(cutouts.dtype), s=fshape)
    out = fft.irfft2(prod, s=fshape)
    return xp.ascontiguousarray(out[:, 2 * r : hh, 2 * r : ww])


def _fast_len(n: int) -> int:
    import scipy.fft

    return int(scipy.fft.next_fast_len(int(n), real=True))


def _xp(a):
    from dagpre.backend import xp_of

    return xp_of(a)


def gaussian_sigmas_for(sigma_match: float | None) -> tuple[float, ...]:
    """HOTPANTS' widths, scaled up to a wide matching kernel (px, Gaussian sigma).

    ``None`` (FWHMs unknown) or a matching width up to 1.5 px gives HOTPANTS' defaults
    (0.7, 1.5, 3.0), made for a matching width of about 1.5 px (its README's 0.5x, 1x, 2x
    rule); a wider matching kernel scales them by ``sigma_match / 1.5``. They are not
    scaled down for nearly equal seeings: the broad element is what follows the far wings
    of real (Moffat-like) PSFs, whose matching kernels have heavy tails.
    """
    if sigma_match is None or not math.isfinite(sigma_match):
        return HOTPANTS_SIGMAS
    s = max(float(sigma_match), HOTPANTS_MATCH_SIGMA)
    return tuple(round(v * s / HOTPANTS_MATCH_SIGMA, 4) for v in HOTPANTS_SIGMAS)
