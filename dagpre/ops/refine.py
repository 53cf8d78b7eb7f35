"""Coordinate refinement of a target from its difference-image residuals (pyDIA's way).

A variable star blended with a neighbour has a reference centroid pulled toward the
neighbour, so its light curve — PSF fits at that position on the difference images — loses
flux and gains noise. Its *variable* light, though, sits alone on the difference images:
:func:`refine_position` finds the position where a PSF of free amplitude per frame best fits
the stack of differences (least squares over every frame at once; the fluxes are linear and
solved exactly for each trial position by :func:`~dagpre.ops.psfphot.psf_photometry`, the
position by Nelder–Mead on the summed chi^2), then returns the light curve redone there.
Frames where the target does not vary contribute a flat chi^2 and do not pull the position.

Conventions: positions are (x, y) pixel order with 0-based pixel centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import to_host
from dagpre.types import InputError

__all__ = ["RefinedPosition", "refine_position"]


@dataclass(frozen=True)
class RefinedPosition:
    """Result of :func:`refine_position`.

    Attributes
    ----------
    x, y : float
        Refined position, px.
    shift : float
        Distance from the starting position, px.
    flux, fluxerr : ndarray (n_frames,)
        The target's difference flux per frame at the refined position (the redone light
        curve, in the units :func:`~dagpre.ops.psfphot.psf_photometry` gives with the
        ``kernels`` passed).
    chi2 : float
        Summed chi^2 of the fits at the refined position.
    converged : bool
        The optimiser's verdict.
    """

    x: float
    y: float
    shift: float
    flux: np.ndarray
    fluxerr: np.ndarray
    chi2: float
    converged: bool


def _fit_all(differences, psf, x, y, variances, masks, kernels, radius):
    from dagpre.ops.psfphot import psf_photometry

    flux, err, chi2 = [], [], 0.0
    for k, diff in enumerate(differences):
        fit = psf_photometry(
            diff, psf, [x], [y], variance=variances[k], mask=None if masks is None else masks[k],
            kernel=None if kernels is None else kernels[k], radius=radius,
        )  # fmt: skip
        f = float(to_host(fit.flux)[0])
        flux.append(f)
        err.append(float(to_host(fit.fluxerr)[0]))
        npix = int(to_host(fit.npix)[0])
        c = float(to_host(fit.chi2)[0]) * max(npix - 1, 1)
        chi2 += c if np.isfinite(c) else 0.0
    return np.array(flux), np.array(err), chi2


def refine_position(
    differences: Sequence[Any],
    psf: Any,
    x: float,
    y: float,
    *,
    variances: Sequence[Any],
    masks: Sequence[Any] | None = None,
    kernels: Sequence[Any] | None = None,
    radius: float | None = None,
    max_shift: float = 3.0,
    xtol: float = 1e-3,
) -> RefinedPosition:
    """Refine one target's position from a stack of difference images.

    Parameters
    ----------
    differences : sequence of ndarray (ny, nx)
        The target's frames' difference images (ADU), on one grid.
    psf : ndarray (s, s) or callable
        The PSF (see :func:`~dagpre.ops.psfphot.psf_photometry`).
    x, y : float
        Starting position (e.g. the reference catalog's), px.
    variances : sequence of ndarray (ny, nx)
        Per-frame variance (ADU^2).
    masks, kernels : sequence, optional
        Per-frame masks and kernels (``psf_photometry``'s ``mask`` and ``kernel``).
    radius : float, optional
        Fitting radius, px (psf_photometry's default otherwise).
    max_shift : float
        A refined position farther than this from the start is refused (InputError): the fit
        has locked on another object.
    xtol : float
        Position tolerance of the optimiser, px.

    Returns
    -------
    RefinedPosition

    Raises
    ------
    InputError
        For no frames, mismatched lengths, or a shift beyond ``max_shift``.
    """
    from scipy.optimize import minimize

    n = len(differences)
    if n == 0:
        raise InputError("differences", "expected at least one difference image")
    for name, seq in (("variances", variances), ("masks", masks), ("kernels", kernels)):
        if seq is not None and len(seq) != n:
            raise InputError(name, f"expected {n} entries (one per frame), got {len(seq)}")
    x0, y0 = float(x), float(y)

    def cost(p):
        if np.hypot(p[0] - x0, p[1] - y0) > max_shift + 1.0:
            return 1e300  # keep the simplex near the start
        return _fit_all(differences, psf, p[0], p[1], variances, masks, kernels, radius)[2]

    simplex = np.array([[x0, y0], [x0 + 0.5, y0], [x0, y0 + 0.5]])
    res = minimize(cost, np.array([x0, y0]), method="Nelder-Mead",
                   options={"xatol": xtol, "fatol": 1e-6, "initial_simplex": simplex,
                            "maxiter": 400})  # fmt: skip
    xr, yr = (float(v) for v in res.x)
    shift = float(np.hypot(xr - x0, yr - y0))
    if shift > max_shift:
        raise InputError("x", f"the refined position moved {shift:.2f} px (> max_shift "
                              f"{max_shift}); the fit locked on another object")  # fmt: skip
    flux, err, chi2 = _fit_all(differences, psf, xr, yr, variances, masks, kernels, radius)
    return RefinedPosition(xr, yr, shift, flux, err, chi2, bool(res.success))
