"""Empirical PSF model (DAOPHOT's, as pyDIA uses it): an analytic core plus a residual table.

:func:`build_psf` fits the PSF of an image to a set of stars (chosen with
:func:`select_psf_stars`) and returns a :class:`PSFModel`. The model of a star at ``(x, y)``
on the pixel centred at ``(X, Y)`` is ``P = (G + R) / (sum of G + R over the stamp)``:

* **Core** ``G``: an elliptical 2-D Gaussian *integrated over the pixel*, exactly along x (a
  difference of ``erf``) and by 4-point Gauss-Legendre along y (1e-7 of the peak for
  sigma 0.8 px), at the exact offset ``(X - x, Y - y)``. Its shape
  ``(sigma_x, sigma_y, rho)`` (rms widths along x and y in px, and their correlation;
  ``rho = 0`` is an ellipse aligned with the axes) varies across the field as
  ``c0 + c1 u + c2 v`` (``order=1``), plus ``c3 u^2 + c4 u v + c5 v^2`` (``order=2``),
  or is constant (``order=0``); ``u, v`` are the
  position scaled to [-1, 1] over the image, ``u = 2 x / (nx - 1) - 1``,
  ``v = 2 y / (ny - 1) - 1``.
* **Residual table** (LUT) ``R``: what the core misses, on a grid of one node per pixel,
  ``R = L0 + L1 u + L2 v`` (``order=1``), plus ``L3 u^2 + L4 u v + L5 v^2`` (``order=2``),
  or ``L0``, evaluated at the star's sub-pixel offset with a separable cubic B-spline (the
  table holds its coefficients; nodes beyond the table take the edge nodes' values). The
  table is *fitted*, not stacked: it is the weighted least-squares solution
  (preconditioned conjugate gradients over all stars at once) of "the spline surface at
  each star's offset equals that star's normalised residual", so no star's noisy residual
  is ever resampled. The B-spline beat Catmull-Rom nodes by 2x on noise-free Moffat stars
  of FWHM 2.5-3 px (worst pixel 0.3 % instead of 0.7 % of the peak at the worst sub-pixel
  offset); ``tests/test_psf.py`` holds the model to 1 % of the peak against the truth at
  the worst offsets.

Fitting (:func:`build_psf`), vectorised over stars (batched 3 x 3 solves, batched
``(s, s)`` matrix products; no Python loop over stars):

1. The core and each star's flux and centroid are fitted together (alternating
   Gauss-Newton steps: a 3-parameter fit per star, then one joint step of the core's
   ``3 k`` shape coefficients), the core on the pixels within one FWHM of each star
   (DAOPHOT's fitting radius: the core takes the peak, the table the wings).
2. ``iterations`` times: fit the table to the residuals; refit each star's flux and
   centroid with the full model; reject stars whose reduced chi^2 (a 2 % profile error
   added to the variance, as DAOPHOT does, so that bright stars are not rejected for the
   model's own small errors) lies above ``median + clip * 1.4826 MAD``. After the first
   rejection the core is fitted again without the outliers. A last table fit follows.

The core and the table weigh each star by its S/N but its pixels equally (see
:func:`_star_weights`); the stars' fluxes and centroids use the per-pixel weights.

Normalisation: every stamp sums to 1 within its ``s x s`` box, so a flux fitted with the
model (:func:`~dagpre.ops.psfphot.psf_photometry`) is the flux *within the box*; light in
the wings beyond it (about 1 % for a Moffat with ``beta = 3`` in the default box) is an
aperture correction the model does not know.

Conventions: arrays are indexed ``[y, x]`` (stamps ``[n, j, i]``: rows y, columns x);
positions are (x, y) pixel order with 0-based pixel centres, not NumPy (row, col) order.
The stamp of a star at ``(x, y)`` covers the pixels ``(floor(x + 0.5) - h + i,
floor(y + 0.5) - h + j)`` for ``i, j < s``, ``h = s // 2`` (the contract of
:mod:`dagpre.ops.psfphot`).
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import to_host, xp_of
from dagpre.ops._checks import check_image, check_positive_int, check_shape, usable_pixels
from dagpre.types import InputError, MaskBit

__all__ = ["PSFModel", "build_psf", "select_psf_stars"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Gauss-Legendre nodes (pixels, about the pixel centre) and weights, 4 per pixel along y.
_GL_NODES = tuple(0.5 * float(t) for t in np.polynomial.legendre.leggauss(4)[0])
_GL_WEIGHTS = tuple(0.5 * float(w) for w in np.polynomial.legendre.leggauss(4)[1])
#: Fewest usable stars for a constant (order 0), linearly (1) and quadratically (2) varying model.
_MIN_STARS = (5, 10, 20)
#: Spatial terms of each order: (1,), (1, u, v), (1, u, v, u^2, u v, v^2).
_TERMS = (1, 3, 6)
#: Fractional profile error added to the variance for the chi^2 of the outlier clip.
_PROFILE_ERROR = 0.02
#: Joint core / centroid iterations of stage 1, and star refits per table fit.
_CORE_ITERATIONS = 8
_STAR_ITERATIONS = 2
#: Conjugate-gradient limit and tolerance of the table fit (relative residual norm).
_CG_MAXITER = 300
_CG_RTOL = 1e-9
#: Stamp pixels per chunk when evaluating many stars (bounds memory, not the result).
_CHUNK_PIXELS = 1 << 20
#: Kernel half-width (taps beyond the node) of the cubic B-spline.
_TAPS = 2
_FORMAT_VERSION = 1
#: The core is fitted to pixels within this many FWHM of each star.
_CORE_RADIUS = 1.0


# =========================================================================== the model


@dataclass(frozen=True, eq=False)
class PSFModel:
    """An empirical PSF: elliptical Gaussian core plus residual table, varying over the field.

    Call it as ``psf(x, y)`` to get ``(n, s, s)`` stamps (the
    :mod:`dagpre.ops.psfphot` contract); store it with :meth:`to_arrays`.

    Attributes
    ----------
    core : ndarray (k, 3) float64
        Coefficients of the core's shape ``(sigma_x, sigma_y, rho)`` (px, px, -) on the
        basis ``(1, u, v, u^2, u v, v^2)[:k]``; ``k = 1, 3, 6`` for order 0, 1, 2.
    lut : ndarray (k, s, s) float64
        Residual table terms (cubic B-spline coefficients, one per pixel, indexed
        ``[term, j, i]``), in units of the normalised PSF.
    shape : tuple of int
        ``(ny, nx)`` of the image the model was built on (defines ``u, v``).
    x, y, flux : ndarray (m,) float64
        The stars given to :func:`build_psf`, with their refined centroids ((x, y) pixel
        order, 0-based pixel centres) and fluxes within the stamp (NaN where unusable).
    used : ndarray (m,) bool
        Stars used by the final table fit.
    chi2 : ndarray (m,) float64
        Each star's reduced chi^2 against the final model (profile error included).
    """

    core: np.ndarray
    lut: np.ndarray
    shape: tuple[int, int]
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    used: np.ndarray
    chi2: np.ndarray

    @property
    def size(self) -> int:
        """Side ``s`` of the stamps (odd, pixels)."""
        return int(self.lut.shape[-1])

    @property
    def order(self) -> int:
        """Spatial order: 0 (constant), 1 (linear) or 2 (quadratic in ``x`` and ``y``)."""
        return _TERMS.index(self.lut.shape[0])

    @property
    def center(self) -> tuple[float, float]:
        """Field centre ``((nx - 1) / 2, (ny - 1) / 2)``, (x, y) pixel order."""
        ny, nx = self.shape
        return 0.5 * (nx - 1), 0.5 * (ny - 1)

    def core_at(self, x: Any, y: Any) -> tuple[Any, Any, Any]:
        """The core's ``(sigma_x, sigma_y, rho)`` at positions ``(x, y)`` (px, px, -)."""
        xp = xp_of(x, y)
        xs, ys = _positions(xp, x, y)
        b = _basis(xp, xs, ys, self.shape, self.lut.shape[0])
        q = _core_params(xp, b, xp.asarray(self.core))
        return q[:, 0], q[:, 1], q[:, 2]

    def __call__(self, x: Any, y: Any) -> Any:
        """Normalised PSF stamps of stars at ``(x, y)``, moved to their sub-pixel positions.

        Parameters
        ----------
        x, y : array_like (n,)
            Star positions, (x, y) pixel order, 0-based pixel centres. NumPy or CuPy: the
            stamps are made on the same device.

        Returns
        -------
        ndarray (n, s, s) float64
            Stamp ``[k, j, i]`` is the model on the pixel ``(floor(x + 0.5) - h + i,
            floor(y + 0.5) - h + j)``, ``h = s // 2``; each stamp sums to 1.
        """
        xp = xp_of(x, y)
        xs, ys = _positions(xp, x, y)
        dx = xs - xp.floor(xs + 0.5)
        dy = ys - xp.floor(ys + 0.5)
        return self._render(xp, xs, ys, dx, dy)

    def stamp(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The normalised PSF centred on the middle pixel of an ``(s, s)`` NumPy array.

        Parameters
        ----------
        x, y : float, optional
            Where in the field, (x, y) pixel order, 0-based pixel centres; default the
            field centre. Only the shape's variation is taken from there: the star sits
            exactly on the centre of pixel ``[h, h]``.
        """
        cx, cy = self.center
        xs = np.array([cx if x is None else float(x)])
        ys = np.array([cy if y is None else float(y)])
        zero = np.zeros(1)
        return self._render(np, xs, ys, zero, zero)[0]

    @property
    def fwhm(self) -> float:
        """FWHM (px) of the model at the field centre, as a continuous profile.

        ``2 sqrt(A / pi)``, ``A`` the area above half the peak (the geometric mean of the
        axes for an elliptical PSF), from the half-maximum radius along 90 rays. The
        profile is the core's Gaussian plus the table surface with the pixel's blur
        taken out to second order (``R - laplacian(R) / 24``), so it estimates the PSF
        before pixel integration.
        """
        return _model_fwhm(self)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain NumPy arrays (for a Zarr group) from which :meth:`from_arrays` rebuilds it."""
        return {
            "version": np.asarray(_FORMAT_VERSION, dtype=np.int64),
            "core": np.array(self.core, dtype=np.float64),
            "lut": np.array(self.lut, dtype=np.float64),
            "shape": np.asarray(self.shape, dtype=np.int64),
            "x": np.array(self.x, dtype=np.float64),
            "y": np.array(self.y, dtype=np.float64),
            "flux": np.array(self.flux, dtype=np.float64),
            "used": np.array(self.used, dtype=bool),
            "chi2": np.array(self.chi2, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> PSFModel:
        """Rebuild a model from :meth:`to_arrays`' mapping (NumPy or Zarr arrays).

        Raises
        ------
        InputError
            When a key is missing or the arrays do not fit together.
        """
        try:
            a = {k: np.asarray(arrays[k]) for k in ("version", "core", "lut", "shape")}
            extra = {k: np.asarray(arrays[k]) for k in ("x", "y", "flux", "used", "chi2")}
        except KeyError as err:
            raise InputError("arrays", f"missing PSF model array {err.args[0]!r}") from None
        if int(a["version"]) != _FORMAT_VERSION:
            raise InputError("arrays", f"unknown PSF model format version {int(a['version'])}")
        core, lut = a["core"].astype(np.float64), a["lut"].astype(np.float64)
        k = lut.shape[0] if lut.ndim == 3 else -1
        if k not in _TERMS or lut.shape[1] != lut.shape[2] or lut.shape[1] % 2 == 0:
            raise InputError(
                "arrays", f"expected a (1, 3 or 6, s, s) table, s odd, got {lut.shape}"
            )
        if core.shape != (k, 3):
            raise InputError("arrays", f"expected core coefficients ({k}, 3), got {core.shape}")
        ny, nx = (int(v) for v in a["shape"])
        return cls(
            core=core,
            lut=lut,
            shape=(ny, nx),
            x=extra["x"].astype(np.float64),
            y=extra["y"].astype(np.float64),
            flux=extra["flux"].astype(np.float64),
            used=extra["used"].astype(bool),
            chi2=extra["chi2"].astype(np.float64),
        )

    def _render(self, xp, xs, ys, dx, dy):
        """``(n, s, s)`` normalised stamps: spatial terms at ``(xs, ys)``, offsets ``dx, dy``."""
        n = int(xs.shape[0])
        s = self.size
        k = self.lut.shape[0]
        special = _special(xp)
        core = xp.asarray(self.core)
        lut = xp.asarray(self.lut)
        out = xp.empty((n, s, s), dtype=xp.float64)
        chunk = max(1, _CHUNK_PIXELS // (s * (s + 1) * len(_GL_NODES)))
        for i0 in range(0, n, chunk):
            sl = slice(i0, min(n, i0 + chunk))
            b = _basis(xp, xs[sl], ys[sl], self.shape, k)
            out[sl] = _model(xp, special, b, core, lut, dx[sl], dy[sl])
        return out


# =========================================================================== model kernels


def _special(xp):
    return importlib.import_module("scipy.special" if xp is np else "cupyx.scipy.special")


def _positions(xp, x, y):
    xs = xp.atleast_1d(xp.asarray(x, dtype=xp.float64)).reshape(-1)
    ys = xp.atleast_1d(xp.asarray(y, dtype=xp.float64)).reshape(-1)
    if xs.shape != ys.shape:
        raise InputError("y", f"x and y differ in length: {xs.shape[0]} vs {ys.shape[0]}")
    return xs, ys


def _basis(xp, xs, ys, shape, k):
    """``(n, k)`` spatial basis ``(1, u, v, u^2, u v, v^2)[:k]``, ``u, v`` in [-1, 1]."""
    ny, nx = shape
    one = xp.ones_like(xs)
    if k == 1:
        return one[:, None]
    u = 2.0 * xs / max(nx - 1, 1) - 1.0
    v = 2.0 * ys / max(ny - 1, 1) - 1.0
    terms = [one, u, v, u * u, u * v, v * v]
    return xp.stack(terms[:k], axis=1)


def _core_params(xp, b, core):
    """``(n, 3)`` core shapes ``(sigma_x, sigma_y, rho)``, kept in a valid range."""
    q = b @ core
    sx = xp.maximum(q[:, 0], 0.05)
    sy = xp.maximum(q[:, 1], 0.05)
    rho = xp.clip(q[:, 2], -0.95, 0.95)
    return xp.stack([sx, sy, rho], axis=1)


def _core_stamps(xp, special, dx, dy, q, s):
    """Pixel-integrated elliptical Gaussians ``(n, s, s)`` (each integrates to 1 on the plane).

    ``dx, dy``: star position minus the centre of the stamp's middle pixel; ``q``: ``(n, 3)``
    shapes. ``G = N(y; 0, sy^2) N(x; rho sx / sy y, sx^2 (1 - rho^2))``: exact ``erf``
    differences along x at each of 4 Gauss-Legendre nodes per pixel along y.
    """
    h = s // 2
    sx, sy, rho = q[:, 0], q[:, 1], q[:, 2]
    nodes = xp.asarray(_GL_NODES, dtype=xp.float64)
    weights = xp.asarray(_GL_WEIGHTS, dtype=xp.float64)
    t = xp.arange(s, dtype=xp.float64) - h
    yy = (t[:, None] + nodes[None, :])[None] - dy[:, None, None]  # (n, s, m)
    gy = xp.exp(-0.5 * (yy / sy[:, None, None]) ** 2) * (
        weights / (math.sqrt(2.0 * math.pi) * sy[:, None, None])
    )
    mx = (rho * sx / sy)[:, None, None] * yy  # conditional mean of x
    scale = 1.0 / (math.sqrt(2.0) * sx * xp.sqrt(1.0 - rho * rho))
    edges = xp.arange(s + 1, dtype=xp.float64) - h - 0.5
    arg = edges[None, None, None, :] - (dx[:, None, None] + mx)[..., None]
    e = special.erf(arg * scale[:, None, None, None])
    ex = 0.5 * (e[..., 1:] - e[..., :-1])  # (n, s, m, s)
    return xp.einsum("njm,njmi->nji", gy, ex)


def _bspline(xp, t):
    """Cubic B-spline kernel at ``t`` (support |t| < 2)."""
    a = xp.abs(t)
    inner = 2.0 / 3.0 - a * a + 0.5 * a**3
    outer = (2.0 - a) ** 3 / 6.0
    return xp.where(a < 1.0, inner, xp.where(a < 2.0, outer, 0.0))


def _taps(xp, f):
    """First node offset ``base`` (n,) and the 4 B-spline weights (n, 4) for offsets ``f``.

    Pixel ``i`` of a star at offset ``f`` (star minus middle-pixel centre) lies
    ``i - h - f`` from the star; node ``a`` sits at ``a - h``. With ``-f = base + u``
    (``0 <= u < 1``) the pixel takes nodes ``a = i + base - 1 + m``, ``m < 4``, with
    weights ``B(1 + u), B(u), B(1 - u), B(2 - u)``.
    """
    g = -f
    base = xp.floor(g)
    u = (g - base)[:, None]
    v = 1.0 - u
    w = xp.concatenate(
        [v**3 / 6.0, 2.0 / 3.0 - u * u + 0.5 * u**3, 2.0 / 3.0 - v * v + 0.5 * v**3, u**3 / 6.0],
        axis=1,
    )
    return base.astype(xp.int64), w


def _interp_matrix(xp, f, s):
    """``(n, s, s)``: weight of table node ``a`` for stamp pixel ``i`` at offset ``f``.

    Banded (4 nodes per pixel, see :func:`_taps`). Nodes beyond the table take the edge
    node's value (their weights are added to it), so the weights of a pixel sum to 1.
    """
    n = int(f.shape[0])
    base, w = _taps(xp, f)
    m = xp.zeros((n, s, s), dtype=xp.float64)
    rows = xp.arange(n)[:, None]
    pix = xp.arange(s)[None, :]
    for t in range(4):
        node = xp.clip(pix + (base - 1 + t)[:, None], 0, s - 1)
        m[rows, pix, node] += w[:, t : t + 1]
    return m


def _lut_stamps(xp, my, mx, b, lut):
    """Table surface at each star's offset: ``My (sum_t b_t L_t) Mx^T``, ``(n, s, s)``."""
    terms = xp.einsum("nt,tba->nba", b, lut)
    return my @ terms @ xp.swapaxes(mx, 1, 2)


def _model(xp, special, b, core, lut, dx, dy, *, normalise=True):
    """Normalised (or raw) model stamps ``(n, s, s)``."""
    s = lut.shape[-1]
    q = _core_params(xp, b, core)
    m = _core_stamps(xp, special, dx, dy, q, s)
    m = m + _lut_stamps(xp, _interp_matrix(xp, dy, s), _interp_matrix(xp, dx, s), b, lut)
    if not normalise:
        return m
    total = m.sum(axis=(1, 2))
    return m / xp.where(total > 0, total, 1.0)[:, None, None]


def _bspline2(t):
    """Second derivative of the cubic B-spline at ``t``."""
    a = np.abs(t)
    return np.where(a < 1.0, 3.0 * a - 2.0, np.where(a < 2.0, 2.0 - a, 0.0))


def _node_weights(t, s, kernel):
    """``(..., s)`` weights of the table nodes at offsets ``t`` (px from the star), folded."""
    h = s // 2
    a = np.arange(-_TAPS - 1, s + _TAPS + 1, dtype=np.float64) - h
    w = kernel(t[..., None] - a)
    lo, hi = _TAPS + 1, _TAPS + 1 + s
    m = w[..., lo:hi].copy()
    m[..., 0] += w[..., :lo].sum(axis=-1)
    m[..., -1] += w[..., hi:].sum(axis=-1)
    return m


def _continuous(model: PSFModel, tx, ty):
    """The continuous model at offsets ``(tx, ty)`` px from a star at the field centre.

    The core's Gaussian plus the table surface with the pixel's blur taken out to second
    order (``R - laplacian(R) / 24``: the table holds pixel-integrated residuals).
    """
    s = model.size
    cx, cy = model.center
    b = _basis(np, np.array([cx]), np.array([cy]), model.shape, model.lut.shape[0])
    sx, sy, rho = _core_params(np, b, model.core)[0]
    zx, zy = tx / sx, ty / sy
    g = np.exp(-0.5 * (zx * zx - 2 * rho * zx * zy + zy * zy) / (1 - rho * rho))
    g /= 2 * math.pi * sx * sy * math.sqrt(1 - rho * rho)
    lut = np.tensordot(b[0], model.lut, axes=1)

    def spline(t):
        return _bspline(np, t)

    wx, wy = _node_weights(tx, s, spline), _node_weights(ty, s, spline)
    wx2, wy2 = _node_weights(tx, s, _bspline2), _node_weights(ty, s, _bspline2)
    r = ((wy @ lut) * wx).sum(axis=-1)
    lap = ((wy2 @ lut) * wx).sum(axis=-1) + ((wy @ lut) * wx2).sum(axis=-1)
    return g + r - lap / 24.0


def _model_fwhm(model: PSFModel) -> float:
    """Continuous-profile FWHM at the field centre (see :attr:`PSFModel.fwhm`)."""
    h = model.size // 2
    t = np.arange(-16, 17) / 16.0  # the peak, within 1 px of the centre
    near = _continuous(model, t[None, :], t[:, None])
    j, i = np.unravel_index(int(np.argmax(near)), near.shape)
    x0, y0, peak = t[i], t[j], float(near[j, i])
    phi = np.arange(90) * (2 * math.pi / 90)
    r = np.arange(0, h * 50 + 1) / 50.0
    prof = _continuous(model, x0 + r[None, :] * np.cos(phi)[:, None],
                       y0 + r[None, :] * np.sin(phi)[:, None])  # fmt: skip
    below = prof < 0.5 * peak
    first = np.where(below.any(axis=1), below.argmax(axis=1), r.size - 1)
    first = np.maximum(first, 1)
    rows = np.arange(phi.size)
    p0, p1 = prof[rows, first - 1], prof[rows, first]
    frac = np.clip((p0 - 0.5 * peak) / np.where(p0 != p1, p0 - p1, 1.0), 0.0, 1.0)
    radius = r[first - 1] + frac * (r[first] - r[first - 1])
    area = 0.5 * float((radius**2).sum()) * (2 * math.pi / phi.size)
    return 2.0 * math.sqrt(area / math.pi)


# =========================================================================== star selection


def _default_size(fwhm: float) -> int:
    return max(11, 2 * math.ceil(2.5 * fwhm) + 1)


def select_psf_stars(
    catalog: Any,
    shape: tuple[int, int],
    *,
    size: int | None = None,
    min_snr: float = 20.0,
    isolation: float | None = None,
    max_stars: int = 200,
    saturated_flag_bits: int = int(MaskBit.SATURATED | MaskBit.BLEED),
    mask: Any = None,
    saturate: float | None = None,
    err: Any = None,
    gain: float | None = None,
    neighbour_ratio: float = 0.01,
) -> np.ndarray:
    """Pick isolated, unsaturated, unblended point sources to build a PSF from.

    A row of the catalog is kept when all of these hold:

    1. ``flag == 0``: not deblended from a larger detection (OBJ_MERGED), not touching the
       frame edge (OBJ_TRUNC), not a singular line of pixels (OBJ_SINGU); finite
       ``x, y``, positive ``flux`` and ``peak``.
    2. Its whole ``size x size`` stamp (about ``floor(x + 0.5), floor(y + 0.5)``) lies in
       the image, with no pixel of ``mask`` carrying a ``saturated_flag_bits`` bit.
    3. Not saturated: ``peak < saturate`` when ``saturate`` is given.
    4. ``S/N = flux / sqrt(npix err^2 + flux / gain) >= min_snr`` (isophotal flux and
       area; ``err`` defaults to the detection noise the catalog recorded, its
       ``thresh`` column divided by ``catalog.meta["thresh"]``; right when the catalog
       was detected with ``err``).
    5. Point-like: ``fwhm`` within ``max(3 sigma, 20 %)`` of the median of the rows that
       pass 1-4 (sigma: 1.4826 MAD), which rejects cosmic rays (sharper) and galaxies
       (wider); elongation ``a / b`` at most ``max(3 sigma, 0.2)`` above its median
       (tracks, unresolved pairs).
    6. Isolated: no other detection (of any kind, every row of the catalog) within
       ``isolation`` px with more than ``neighbour_ratio`` times its flux.

    Of the survivors, at most ``max_stars`` are returned, the brightest first in each
    cell of a 4 x 4 grid over the image in turn (so a spatially varying model sees the
    whole field).

    Parameters
    ----------
    catalog : Catalog or mapping of columns
        From :func:`~dagpre.ops.detect.detect_sources`: ``x, y, flux, peak, flag, fwhm, a,
        b, npix`` (and ``thresh`` unless ``err`` is given); NumPy or CuPy columns.
    shape : (int, int)
        ``(ny, nx)`` of the image.
    size : int, optional
        Stamp side (odd, px); default ``max(11, 2 ceil(2.5 FWHM) + 1)`` from the median
        catalog FWHM of the ``flag == 0`` rows, as :func:`build_psf`.
    min_snr : float
        Least isophotal S/N.
    isolation : float, optional
        Neighbour radius (px); default ``size``.
    max_stars : int
        Most stars returned.
    saturated_flag_bits : int
        :class:`~dagpre.types.MaskBit` bits of ``mask`` that disqualify a star whose stamp
        touches them (default SATURATED | BLEED). Other masked pixels (bad, cosmic) do not
        reject a star: :func:`build_psf` leaves them out of the fit.
    mask : ndarray (ny, nx), optional
        The frame's MaskBit mask.
    saturate : float, optional
        Peak level (ADU above the background, the catalog's unit) at and above which a
        star is taken as saturated; give it a little below the full well to leave out
        non-linear stars.
    err : float or array_like (n,), optional
        Background noise per pixel (ADU, 1 sigma), scalar or per row.
    gain : float, optional
        Electrons per ADU, for the stars' own Poisson noise in the S/N (none when absent).
    neighbour_ratio : float
        Flux ratio above which a neighbour within ``isolation`` rejects a star.

    Returns
    -------
    ndarray (m,) int64
        Row numbers of the chosen stars (NumPy, ascending).

    Raises
    ------
    InputError
        Naming the parameter: missing columns, bad shape or numbers.

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.ops.detect import detect_sources
    >>> from dagpre.simulate import render_sources
    >>> x, y = np.meshgrid(np.linspace(20, 108, 5), np.linspace(20, 108, 5))
    >>> x, y = x.ravel() + 0.3, y.ravel() - 0.2
    >>> image = render_sources((128, 128), x, y, [5000.0], [3.0])
    >>> image += np.random.default_rng(0).normal(0, 2.0, image.shape)
    >>> cat = detect_sources(image.astype(np.float32), thresh=5.0, err=2.0)
    >>> idx = select_psf_stars(cat, image.shape)
    >>> len(idx)
    25
    """
    ny, nx = check_shape(shape, "shape")
    needed = ["x", "y", "flux", "peak", "flag", "fwhm", "a", "b", "npix"]
    if err is None:
        needed.append("thresh")
    missing = [c for c in needed if c not in catalog]
    if missing:
        raise InputError("catalog", f"missing column(s) {', '.join(missing)}")
    col = {c: np.asarray(to_host(catalog[c]), dtype=np.float64) for c in needed}
    n = col["x"].shape[0]
    for name, value in (("min_snr", min_snr), ("neighbour_ratio", neighbour_ratio)):
        if not _is_number(value) or value < 0:
            raise InputError(name, f"expected a non-negative number, got {value!r}")
    max_stars = check_positive_int(max_stars, "max_stars")
    if size is None:
        good = (col["flag"] == 0) & (col["fwhm"] > 0)
        med = float(np.median(col["fwhm"][good])) if good.any() else 3.0
        size = _default_size(med)
    size = _check_size(size)
    if isolation is None:
        isolation = float(size)
    if not _is_number(isolation) or isolation < 0:
        raise InputError("isolation", f"expected a non-negative radius in px, got {isolation!r}")
    if saturate is not None and not (_is_number(saturate) and saturate > 0):
        raise InputError("saturate", f"expected a positive level, got {saturate!r}")
    if gain is not None and not (_is_number(gain) and gain > 0):
        raise InputError("gain", f"expected a positive gain (e-/ADU), got {gain!r}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x, y, flux, peak = col["x"], col["y"], col["flux"], col["peak"]
    h = size // 2
    with np.errstate(invalid="ignore", divide="ignore"):
        # 1. clean detections
        ok = (col["flag"] == 0) & np.isfinite(x) & np.isfinite(y) & (flux > 0) & (peak > 0)
        # 2. whole stamp inside the image, no saturated pixel in it
        ix = np.floor(np.where(np.isfinite(x), x, -1e9) + 0.5).astype(np.int64)
        iy = np.floor(np.where(np.isfinite(y), y, -1e9) + 0.5).astype(np.int64)
        ok &= (ix >= h) & (ix < nx - h) & (iy >= h) & (iy < ny - h)
        if mask is not None:
            if tuple(getattr(mask, "shape", ())) != (ny, nx):
                raise InputError("mask", f"expected shape {(ny, nx)}, got {np.shape(mask)}")
            bad = (np.asarray(to_host(mask)).astype(np.int64) & int(saturated_flag_bits)) != 0
            ok[ok] &= ~_box_any(bad, ix[ok], iy[ok], h)
        # 3. saturation by peak
        if saturate is not None:
            ok &= peak < float(saturate)
        # 4. S/N
        if err is None:
            thresh = float(getattr(catalog, "meta", {}).get("thresh", 1.0))
            noise = col["thresh"] / thresh
        else:
            noise = np.broadcast_to(np.asarray(to_host(err), dtype=np.float64), (n,))
        var = col["npix"] * noise**2 + (flux / gain if gain is not None else 0.0)
        snr = flux / np.sqrt(np.where(var > 0, var, np.inf))
        ok &= snr >= float(min_snr)
        # 5. point-like
        fwhm = col["fwhm"]
        elong = col["a"] / col["b"]
        if ok.any():
            med, sig = _median_sigma(fwhm[ok])
            ok &= np.abs(fwhm - med) <= max(3.0 * sig, 0.2 * med)
        if ok.any():
            med, sig = _median_sigma(elong[ok])
            ok &= elong <= med + max(3.0 * sig, 0.2)
    # 6. isolated from every detection
    if ok.any() and isolation > 0 and n > 1:
        ok &= ~_crowded(x, y, flux, float(isolation), float(neighbour_ratio))
    idx = np.flatnonzero(ok)
    if idx.size > max_stars:
        cell = np.clip((4 * x[idx] / nx).astype(np.int64), 0, 3)
        cell = cell + 4 * np.clip((4 * y[idx] / ny).astype(np.int64), 0, 3)
        order = np.lexsort((-flux[idx], cell))  # by cell, brightest first
        rank = np.empty(idx.size, dtype=np.int64)
        first = np.r_[0, np.flatnonzero(np.diff(cell[order])) + 1]
        counts = np.diff(np.r_[first, idx.size])
        rank[order] = np.arange(idx.size) - np.repeat(first, counts)
        pick = np.lexsort((-flux[idx], rank))[:max_stars]
        idx = np.sort(idx[pick])
    return idx.astype(np.int64)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _median_sigma(v):
    med = float(np.median(v))
    return med, 1.4826 * float(np.median(np.abs(v - med)))


def _box_any(bad, ix, iy, h):
    """Whether any ``bad`` pixel lies in the ``(2h+1)^2`` box about each ``(ix, iy)``."""
    c = np.zeros((bad.shape[0] + 1, bad.shape[1] + 1), dtype=np.int64)
    c[1:, 1:] = np.cumsum(np.cumsum(bad, axis=0), axis=1)
    y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
    return (c[y1, x1] - c[y0, x1] - c[y1, x0] + c[y0, x0]) > 0


def _crowded(x, y, flux, radius, ratio):
    """Rows with a neighbour within ``radius`` brighter than ``ratio`` times their flux."""
    from scipy.spatial import cKDTree

    fin = np.isfinite(x) & np.isfinite(y)
    rows = np.flatnonzero(fin)
    pairs = cKDTree(np.c_[x[rows], y[rows]]).query_pairs(radius, output_type="ndarray")
    out = np.zeros(x.shape[0], dtype=bool)
    if pairs.size:
        i, j = rows[pairs[:, 0]], rows[pairs[:, 1]]
        fi, fj = np.abs(flux[i]), np.abs(flux[j])
        out[i[fj > ratio * fi]] = True
        out[j[fi > ratio * fj]] = True
    return out


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise InputError("size", f"expected an odd integer >= 5, got {size!r}")
    if size < 5 or size % 2 == 0:
        raise InputError("size", f"expected an odd integer >= 5, got {size}")
    return int(size)


# =========================================================================== fitting


def build_psf(
    image: Any,
    x: Any,
    y: Any,
    *,
    size: int | None = None,
    fwhm: float | None = None,
    variance: Any = None,
    mask: Any = None,
    order: int = 1,
    flux: Any = None,
    iterations: int = 3,
    clip: float = 3.0,
) -> PSFModel:
    """Fit an empirical PSF (Gaussian core plus residual table) to stars in an image.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image (ADU), NumPy or CuPy (the fit runs on its device).
    x, y : array_like (n,)
        Star positions, (x, y) pixel order, 0-based pixel centres (e.g. catalog rows from
        :func:`select_psf_stars`); refined by the fit.
    size : int, optional
        Odd stamp side (px); default ``max(11, 2 ceil(2.5 FWHM) + 1)``.
    fwhm : float, optional
        First guess of the FWHM (px); default from the stars (area above half their peak).
    variance : ndarray (ny, nx), optional
        Per-pixel variance (ADU^2), weights ``1 / variance``; pixels where it is not
        positive and finite are left out. None: equal weights from the background noise
        of the stamps' border pixels (1.4826 MAD), no Poisson term; then bright stars are
        more easily rejected as outliers.
    mask : ndarray (ny, nx), optional
        Non-zero marks pixels to leave out (a MaskBit mask as is).
    order : {0, 1, 2}
        0: one PSF for the whole image; 1 (2): core shape and table linear (quadratic) in
        ``x`` and ``y``. A PSF whose width changes across the field by more than a few
        per cent along a curve (optics' field curvature) needs 2, or fluxes fitted with
        the model carry a position-dependent scale error.
    flux : array_like (n,), optional
        First guess of the fluxes (ADU); default the sum of each stamp.
    iterations : int
        Table fits, each followed by refitting the stars and rejecting outliers.
    clip : float
        Outlier threshold, in robust sigma of the stars' reduced chi^2 above its median.

    Returns
    -------
    PSFModel
        Holding NumPy arrays; its stamps are made on the device of the positions given.

    Raises
    ------
    InputError
        For a bad image, positions, size, order or maps, or when fewer than 5 stars (10
        for ``order=1``, 20 for ``order=2``) are usable (stamp inside the image, positive
        flux, at least half the stamp's pixels usable).

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.simulate import render_sources
    >>> g = np.linspace(20, 108, 4)
    >>> x, y = (v.ravel() + 0.25 for v in np.meshgrid(g, g))
    >>> image = render_sources((128, 128), x, y, [1e4], [3.0], psf="gaussian")
    >>> psf = build_psf(image, x, y, order=0)
    >>> psf.size, round(psf.fwhm, 2), psf(np.array([50.3]), np.array([60.0])).shape
    (17, 3.0, (1, 17, 17))
    """
    check_image(image, "image")
    xp = xp_of(image)
    ny, nx = image.shape
    xs, ys = _positions(xp, x, y)
    n = int(xs.shape[0])
    if not (bool(xp.all(xp.isfinite(xs))) and bool(xp.all(xp.isfinite(ys)))):
        raise InputError("x", "expected finite positions")
    if isinstance(order, bool) or order not in (0, 1, 2):
        raise InputError("order", f"expected 0, 1 or 2, got {order!r}")
    iterations = check_positive_int(iterations, "iterations")
    if not _is_number(clip) or clip <= 0:
        raise InputError("clip", f"expected a positive number of sigma, got {clip!r}")
    if fwhm is not None and not (_is_number(fwhm) and fwhm > 0):
        raise InputError("fwhm", f"expected a positive FWHM in px, got {fwhm!r}")
    for name, arr in (("variance", variance), ("mask", mask)):
        if arr is not None and tuple(getattr(arr, "shape", ())) != (ny, nx):
            raise InputError(name, f"shape {np.shape(arr)} differs from image {(ny, nx)}")
    need = _MIN_STARS[order]
    if n < need:
        raise InputError("x", _too_few(n, order))
    data, var, usable = usable_pixels(xp, image, variance, mask)
    data = xp.where(usable, data, 0.0)
    weight = None
    if variance is not None:
        weight = xp.where(usable, 1.0 / xp.where(usable, var, 1.0), 0.0)
    if fwhm is None:
        fwhm = _guess_fwhm(xp, data, usable, xs, ys)
    size = _default_size(fwhm) if size is None else _check_size(size)
    if size > min(ny, nx):
        raise InputError("size", f"stamp side {size} exceeds the image {(ny, nx)}")
    if weight is None:
        sigma = _border_noise(xp, data, usable, xs, ys, size)
        weight = usable / (sigma * sigma) if sigma > 0 else usable.astype(xp.float64)
    fit = _Fit(xp, data, weight, (ny, nx), size, order)
    f0 = None if flux is None else xp.asarray(flux, dtype=xp.float64).reshape(-1)
    if f0 is not None and f0.shape != xs.shape:
        raise InputError("flux", f"expected {n} fluxes, got {f0.shape[0]}")
    result = fit.run(xs, ys, f0, float(fwhm), iterations, float(clip))
    return result


def _too_few(m: int, order: int) -> str:
    return (
        f"only {m} usable PSF stars; need >= {_MIN_STARS[0]} "
        f"(for order=1, >= {_MIN_STARS[1]}; order=2, >= {_MIN_STARS[2]}); got order={order}"
    )


def _guess_fwhm(xp, data, usable, xs, ys) -> float:
    """Median over the stars of ``2 sqrt(A / pi)``, ``A`` the pixels above half the peak."""
    ny, nx = data.shape
    h = min(7, (min(ny, nx) - 1) // 2)
    d, _, ok = _cutouts(xp, data, usable.astype(xp.float64), xs, ys, 2 * h + 1)
    peak = d.max(axis=(1, 2))
    area = (d > 0.5 * peak[:, None, None]).sum(axis=(1, 2))
    good = ok & (peak > 0)
    if not bool(good.any()):
        raise InputError("x", _too_few(0, 0))
    est = to_host(2.0 * xp.sqrt(area[good] / math.pi))
    return max(1.0, float(np.median(est)))


def _border_noise(xp, data, usable, xs, ys, size) -> float:
    """1.4826 MAD of the usable pixels on the border of the stars' stamps (ADU)."""
    d, w, ok = (to_host(a) for a in _cutouts(xp, data, usable.astype(xp.float64), xs, ys, size))
    ring = np.ones((size, size), dtype=bool)
    ring[2:-2, 2:-2] = False
    vals = d[ok][:, ring][w[ok][:, ring] > 0]
    if vals.size == 0:
        return 0.0
    med = np.median(vals)
    return float(1.4826 * np.median(np.abs(vals - med)))


def _cutouts(xp, data, weight, xs, ys, s):
    """``(n, s, s)`` data and weight stamps about ``floor(x + 0.5)``, and ``inside`` (n,)."""
    ny, nx = data.shape
    h = s // 2
    ix = xp.floor(xs + 0.5).astype(xp.int64)
    iy = xp.floor(ys + 0.5).astype(xp.int64)
    inside = (ix >= h) & (ix < nx - h) & (iy >= h) & (iy < ny - h)
    offs = xp.arange(-h, h + 1)
    rows = xp.clip(iy[:, None] + offs[None, :], 0, ny - 1)[:, :, None]
    cols = xp.clip(ix[:, None] + offs[None, :], 0, nx - 1)[:, None, :]
    return data[rows, cols], weight[rows, cols] * inside[:, None, None], inside


def _star_weights(xp, w, m):
    """One weight per star: its pixel weights averaged with the model's square as weights.

    The core and the table are fitted with these (usable pixels only): their unavoidable
    misfit is then spread evenly over the stamp instead of being pushed into the peak,
    where Poisson weights are lowest (0.4 % instead of 0.8 % of the peak at FWHM 2.5 px);
    the stars' fluxes and centroids keep the per-pixel weights.
    """
    m2 = m * m
    usable = w > 0
    ws = (w * m2).sum(axis=(1, 2)) / xp.maximum((usable * m2).sum(axis=(1, 2)), 1e-300)
    return usable * ws[:, None, None]


class _Fit:
    """The state of one :func:`build_psf` fit (arrays on the image's device)."""

    def __init__(self, xp, data, weight, shape, size, order):
        self.xp = xp
        self.special = _special(xp)
        self.data = data
        self.weight = weight
        self.shape = shape
        self.s = size
        self.k = _TERMS[order]
        self.order = order

    # ------------------------------------------------------------------ pieces

    def stamps(self, xs, ys):
        """Data, weights, offsets ``dx, dy`` and the inside flags of the stars' stamps."""
        xp = self.xp
        d, w, _ = _cutouts(xp, self.data, self.weight, xs, ys, self.s)
        dx = xs - xp.floor(xs + 0.5)
        dy = ys - xp.floor(ys + 0.5)
        return d, w, dx, dy

    def model(self, b, core, lut, dx, dy, normalise=True):
        return _model(self.xp, self.special, b, core, lut, dx, dy, normalise=normalise)

    def fit_stars(self, d, w, b, core, lut, dx, dy, flux, steps):
        """Gauss-Newton steps of each star's ``(flux, dx, dy)`` with the model fixed."""
        xp = self.xp
        eps = 1e-2
        for _ in range(steps):
            m = self.model(b, core, lut, dx, dy)
            mx = self.model(b, core, lut, dx + eps, dy) - self.model(b, core, lut, dx - eps, dy)
            my = self.model(b, core, lut, dx, dy + eps) - self.model(b, core, lut, dx, dy - eps)
            f = flux[:, None, None]
            jac = xp.stack([m, f * mx / (2 * eps), f * my / (2 * eps)], axis=-1)
            jac = jac.reshape(jac.shape[0], -1, 3)
            wf = w.reshape(w.shape[0], -1)
            r = (d - f * m).reshape(d.shape[0], -1)
            hess = xp.einsum("npc,np,npd->ncd", jac, wf, jac)
            grad = xp.einsum("npc,np,np->nc", jac, wf, r)
            diag = xp.einsum("ncc->nc", hess)
            hess = hess + (1e-9 * diag + 1e-300)[:, :, None] * xp.eye(3)
            step = xp.linalg.solve(hess, grad[:, :, None])[:, :, 0]
            step = xp.where(xp.isfinite(step), step, 0.0)
            flux = flux + step[:, 0]
            dx = dx + xp.clip(step[:, 1], -0.5, 0.5)
            dy = dy + xp.clip(step[:, 2], -0.5, 0.5)
        return flux, dx, dy

    def fit_core(self, d, w, b, core, dx, dy, flux, good, radius):
        """One joint Gauss-Newton step of the core's ``(k, 3)`` shape coefficients.

        Only pixels within ``radius`` of each star count (DAOPHOT's fitting radius): the
        core should match the peak, the table takes the wings.
        """
        xp = self.xp
        k, s = self.k, self.s
        h = s // 2
        t = xp.arange(s, dtype=xp.float64) - h
        r2 = (t[None, None, :] - dx[:, None, None]) ** 2 + (
            t[None, :, None] - dy[:, None, None]
        ) ** 2
        zero = xp.zeros((k, s, s))
        eps = 1e-3
        m = self.model(b, core, zero, dx, dy)
        w = _star_weights(xp, w, m) * (r2 <= radius * radius)
        cols = []
        for c in range(3):
            dq = xp.zeros((k, 3))
            dq[0, c] = eps
            cols.append((self.model(b, core + dq, zero, dx, dy) - m) / eps)
        f = flux[:, None, None]
        jac = xp.stack(cols, axis=-1).reshape(d.shape[0], -1, 3) * flux[:, None, None]
        wf = (w * good[:, None, None]).reshape(d.shape[0], -1)
        r = (d - f * m).reshape(d.shape[0], -1)
        hq = xp.einsum("npc,np,npd->ncd", jac, wf, jac)
        gq = xp.einsum("npc,np,np->nc", jac, wf, r)
        hess = xp.einsum("nt,nu,ncd->tcud", b, b, hq).reshape(3 * k, 3 * k)
        grad = xp.einsum("nt,nc->tc", b, gq).reshape(3 * k)
        hess = hess + 1e-6 * xp.diag(xp.diag(hess)) + 1e-300 * xp.eye(3 * k)
        step = xp.linalg.solve(hess, grad).reshape(k, 3)
        step = xp.where(xp.isfinite(step), step, 0.0)
        # keep widths positive: at most halve / double them per step
        lim = 0.5 * xp.abs(core[0, :2])
        step[:, :2] = xp.clip(step[:, :2], -lim, lim)
        step[:, 2] = xp.clip(step[:, 2], -0.3, 0.3)
        return core + step

    def fit_lut(self, d, w, b, core, dx, dy, flux, good, lut0):
        """Weighted least-squares table (preconditioned conjugate gradients)."""
        xp = self.xp
        s, k = self.s, self.k
        zero = xp.zeros((k, s, s))
        g = self.model(b, core, zero, dx, dy, normalise=False)
        f = xp.where(good, flux, 1.0)[:, None, None]
        r = xp.where(good[:, None, None], d / f - g, 0.0)
        w = _star_weights(xp, w, g)
        wt = w * (f * f) * good[:, None, None]
        my = _interp_matrix(xp, dy, s)
        mx = _interp_matrix(xp, dx, s)
        myt = xp.swapaxes(my, 1, 2)

        def adjoint(q):
            return xp.einsum("nt,nba->tba", b, myt @ q @ mx)

        def normal(lut):
            return adjoint(wt * _lut_stamps(xp, my, mx, b, lut))

        diag = xp.einsum("nt,nba->tba", b * b, xp.swapaxes(my * my, 1, 2) @ wt @ (mx * mx))
        lam = 1e-9 * float(diag.mean()) + 1e-300
        precond = 1.0 / (diag + lam)
        rhs = adjoint(wt * r)
        lut = lut0
        res = rhs - normal(lut) - lam * lut
        z = precond * res
        p = z
        rz = float((res * z).sum())
        stop = _CG_RTOL * float(xp.sqrt((rhs * rhs).sum()))
        for _ in range(_CG_MAXITER):
            if float(xp.sqrt((res * res).sum())) <= stop:
                break
            ap = normal(p) + lam * p
            alpha = rz / float((p * ap).sum())
            lut = lut + alpha * p
            res = res - alpha * ap
            z = precond * res
            rz_new = float((res * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
        return lut

    def chi2(self, d, w, b, core, lut, dx, dy, flux):
        """Reduced chi^2 per star, with the profile error in the variance."""
        xp = self.xp
        fm = flux[:, None, None] * self.model(b, core, lut, dx, dy)
        usable = w > 0
        var = xp.where(usable, 1.0 / xp.where(usable, w, 1.0), 0.0) + (_PROFILE_ERROR * fm) ** 2
        wc = xp.where(usable, 1.0 / xp.where(usable, var, 1.0), 0.0)
        npix = usable.sum(axis=(1, 2))
        c2 = (wc * (d - fm) ** 2).sum(axis=(1, 2)) / xp.maximum(npix - 3, 1)
        return c2

    # ------------------------------------------------------------------ driver

    def run(self, xs, ys, flux, fwhm, iterations, clip):
        xp = self.xp
        s, k = self.s, self.k
        n = int(xs.shape[0])
        need = _MIN_STARS[self.order]
        b = _basis(xp, xs, ys, self.shape, k)  # fixed: stars move by far less than the field
        d, w, dx, dy = self.stamps(xs, ys)
        ix, iy = xs - dx, ys - dy
        npix = (w > 0).sum(axis=(1, 2))
        good = npix >= (s * s) // 2
        if flux is None:
            flux = d.sum(axis=(1, 2))
        flux = xp.where(xp.isfinite(flux), flux, 0.0)
        good &= flux > 0
        m_good = int(good.sum())
        if m_good < need:
            raise InputError("x", _too_few(m_good, self.order))
        core = xp.zeros((k, 3))
        core[0, 0] = core[0, 1] = fwhm / _FWHM_PER_SIGMA
        lut = xp.zeros((k, s, s))
        refit_core = True
        for it in range(iterations + 1):
            if it:
                d, w, dx, dy, ix, iy = self._recentre(d, w, dx, dy, ix, iy)
            good = self._still_good(good, flux, dx, dy) & ((w > 0).sum(axis=(1, 2)) >= s * s // 2)
            if int(good.sum()) < need:
                raise InputError("x", _too_few(int(good.sum()), self.order))
            if refit_core:  # stage 1: the core with the stars' fluxes and centroids
                lut = xp.zeros((k, s, s))
                for _ in range(_CORE_ITERATIONS):
                    flux, dx, dy = self.fit_stars(d, w, b, core, lut, dx, dy, flux, 1)
                    good = self._still_good(good, flux, dx, dy)
                    core = self.fit_core(d, w, b, core, dx, dy, flux, good, _CORE_RADIUS * fwhm)
            # stage 2: the table, then the stars with the full model, then the outliers
            lut = self.fit_lut(d, w, b, core, dx, dy, flux, good, lut)
            if it == iterations:
                break
            flux, dx, dy = self.fit_stars(d, w, b, core, lut, dx, dy, flux, _STAR_ITERATIONS)
            good = self._still_good(good, flux, dx, dy)
            c2 = self.chi2(d, w, b, core, lut, dx, dy, flux)
            kept = self._clip(good, c2, clip, need)
            # the first outliers also pulled the core: fit it again without them
            refit_core = it == 0 and int(kept.sum()) < int(good.sum())
            good = kept
        c2 = self.chi2(d, w, b, core, lut, dx, dy, flux)
        okay = self._still_good(xp.ones(n, dtype=bool), flux, dx, dy)
        okay &= (w > 0).sum(axis=(1, 2)) > 0
        model = PSFModel(
            core=np.asarray(to_host(core), dtype=np.float64),
            lut=np.asarray(to_host(lut), dtype=np.float64),
            shape=self.shape,
            x=np.asarray(to_host(xp.where(okay, ix + dx, xp.nan))),
            y=np.asarray(to_host(xp.where(okay, iy + dy, xp.nan))),
            flux=np.asarray(to_host(xp.where(okay, flux, xp.nan))),
            used=np.asarray(to_host(good)),
            chi2=np.asarray(to_host(xp.where(okay, c2, xp.nan))),
        )
        return model

    def _still_good(self, good, flux, dx, dy):
        xp = self.xp
        fine = xp.isfinite(flux) & (flux > 0) & xp.isfinite(dx) & xp.isfinite(dy)
        return good & fine & (xp.abs(dx) < 1.5) & (xp.abs(dy) < 1.5)

    def _recentre(self, d, w, dx, dy, ix, iy):
        """Cut the stamps again about the stars' new nearest pixels."""
        xs, ys = ix + dx, iy + dy
        d, w, dx, dy = self.stamps(xs, ys)
        return d, w, dx, dy, xs - dx, ys - dy

    def _clip(self, good, c2, clip, need):
        """Drop stars whose chi^2 is above ``median + clip 1.4826 MAD`` (keeping ``need``)."""
        xp = self.xp
        vals = c2[good]
        if int(vals.shape[0]) <= need:
            return good
        med = xp.median(vals)
        sig = 1.4826 * xp.median(xp.abs(vals - med))
        keep = good & (c2 <= med + clip * sig)
        if int(keep.sum()) < need:
            return good
        return keep
