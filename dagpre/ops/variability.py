"""Variability statistics of light curves, all sources at once.

:func:`variability` takes ``(source, frame)`` planes of flux and error (the store's
``lightcurves/``) and returns per source:

* ``mean_flux``: inverse-variance weighted mean of the good points;
* ``chi2_dof``: ``sum((f - mean)^2 / err^2) / (n - 1)`` — 1 for a constant source whose
  errors are right;
* ``rms``, ``expected_rms`` (median error) and their ratio ``rms_ratio``;
* ``stetson_j``: Stetson's (1996, PASP 108, 851) J index with observations paired in
  time order — each good point with the next good one, in non-overlapping pairs ``(0, 1),
  (2, 3), ...`` — ``J = mean_k(sign(P_k) sqrt(|P_k|))`` with ``P_k = delta_i delta_j`` and
  ``delta_i = sqrt(n / (n - 1)) (f_i - mean) / err_i``: about 0 for noise (the unpaired
  form ``P_i = delta_i^2 - 1`` is biased to about -0.2 for Gaussian errors), large and
  positive when variability is slow against the cadence (a pair then moves together);
* ``amplitude``: the spread between the 5th and 95th percentiles of the good points (ADU);
* ``chi2_dof_clipped``: ``chi2_dof`` again without the single most deviant point (a cosmic
  ray on the star or a bad column in one frame makes one outlier; variability moves many);
* ``variable``: True when the chi^2 of a constant model without that point is improbable:
  its tail probability (``scipy.stats.chi2.sf`` with ``n - 2`` degrees of freedom) is below
  ``false_alarm``
  (default 1e-3: one constant source in a thousand flagged when errors are right), with at
  least ``min_points`` good points and ``chi2_dof`` at least ``min_chi2_dof`` (a floor
  against flagging stars whose errors are underestimated by a few per cent at high S/N).

A point is good when its flux and error are finite, its error is positive and its flag
is 0. The statistics use each error with ``error_floor`` times the source's mean flux added
in quadrature: difference imaging leaves a residual proportional to a star's flux (kernel
and PSF-model mismatch; measured about 0.1-0.2 % on simulated nights), which would
otherwise flag the brightest constant stars. The stored light-curve errors are not changed.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dagpre.types import InputError

__all__ = ["VARIABILITY_COLUMNS", "variability"]

#: Columns :func:`variability` returns.
VARIABILITY_COLUMNS = (
    "n_good", "mean_flux", "chi2_dof", "rms", "expected_rms", "rms_ratio", "stetson_j",
    "amplitude", "chi2_dof_clipped", "variable",
)  # fmt: skip


def variability(
    flux: Any,
    flux_err: Any,
    flag: Any = None,
    *,
    false_alarm: float = 1e-3,
    min_points: int = 5,
    min_chi2_dof: float = 1.5,
    error_floor: float = 0.002,
) -> dict[str, np.ndarray]:
    """Per-source variability statistics of ``(n_source, n_frame)`` light curves.

    Parameters
    ----------
    flux, flux_err : array_like (n_source, n_frame)
        Fluxes and 1-sigma errors (any one unit, e.g. ADU on the reference's scale).
    flag : array_like (n_source, n_frame) int, optional
        Non-zero marks a point not to use (e.g. the store's ``lightcurves/flag``; -1 for
        not measured).
    false_alarm : float
        Tail probability of chi^2 below which a source is flagged variable.
    min_points : int
        Good points needed for a flag.
    min_chi2_dof : float
        ``chi2_dof`` a flagged source must also reach.
    error_floor : float
        Fraction of the mean flux added in quadrature to every error (0 for none).

    Returns
    -------
    dict of ndarray (n_source,)
        :data:`VARIABILITY_COLUMNS` (see the module docstring); float64, ``n_good`` int64,
        ``variable`` bool. Statistics of a source with fewer than three good points are NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = np.linspace(0, 1, 50)
    >>> flux = np.vstack([100 + rng.normal(0, 1, 50), 100 + 10 * np.sin(6 * t)])
    >>> stats = variability(flux, np.ones_like(flux))
    >>> stats["variable"].tolist()
    [False, True]
    """
    from scipy import stats

    f = np.asarray(flux, dtype=np.float64)
    e = np.asarray(flux_err, dtype=np.float64)
    if f.ndim != 2 or f.shape != e.shape:
        raise InputError("flux", f"expected (n_source, n_frame) planes of one shape, got "
                                 f"{f.shape} and {e.shape}")  # fmt: skip
    good = np.isfinite(f) & np.isfinite(e) & (e > 0)
    if flag is not None:
        fl = np.asarray(flag)
        if fl.shape != f.shape:
            raise InputError("flag", f"expected shape {f.shape}, got {fl.shape}")
        good &= fl == 0
    if error_floor < 0:
        raise InputError("error_floor", f"expected a fraction >= 0, got {error_floor}")
    n = good.sum(axis=1)
    if error_floor:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            level = np.abs(np.nanmedian(np.where(good, f, np.nan), axis=1))
        e = np.sqrt(e**2 + (error_floor * np.nan_to_num(level))[:, None] ** 2)
    w = np.where(good, 1.0 / np.where(good, e, 1.0) ** 2, 0.0)
    fz = np.where(good, f, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-bad sources: NaN, said above
        mean = (w * fz).sum(axis=1) / w.sum(axis=1)
        resid = np.where(good, fz - mean[:, None], 0.0)
        chi2 = (w * resid**2).sum(axis=1)
        dof = n - 1
        chi2_dof = chi2 / dof
        rms = np.sqrt((resid**2).sum(axis=1) / dof)
        expected = np.nanmedian(np.where(good, e, np.nan), axis=1) if f.shape[1] else rms
        delta = np.sqrt(n / dof)[:, None] * resid * np.sqrt(w)
        # good points first, in time order; pair positions (0, 1), (2, 3), ...
        order = np.argsort(~good, axis=1, kind="stable")
        packed = np.take_along_axis(delta, order, axis=1)
        m2 = (f.shape[1] // 2) * 2
        p = packed[:, 0:m2:2] * packed[:, 1:m2:2]
        valid = (2 * np.arange(m2 // 2) + 1)[None, :] < n[:, None]
        n_pairs = valid.sum(axis=1)
        j = np.where(valid, np.sign(p) * np.sqrt(np.abs(p)), 0.0).sum(axis=1) / n_pairs
        lo = np.nanpercentile(np.where(good, f, np.nan), 5, axis=1) if f.shape[1] else rms
        hi = np.nanpercentile(np.where(good, f, np.nan), 95, axis=1) if f.shape[1] else rms
        # leave out each source's most deviant point, then the same chi^2 again
        worst = np.argmax(np.where(good, w * resid**2, -1.0), axis=1)
        keep = good.copy()
        keep[np.arange(f.shape[0]), worst] = False
        w2 = np.where(keep, w, 0.0)
        mean2 = (w2 * fz).sum(axis=1) / w2.sum(axis=1)
        chi2_clip = (w2 * np.where(keep, fz - mean2[:, None], 0.0) ** 2).sum(axis=1)
        chi2_clip_dof = chi2_clip / (n - 2)
    few = n < 3
    out = {
        "n_good": n.astype(np.int64),
        "mean_flux": mean,
        "chi2_dof": chi2_dof,
        "rms": rms,
        "expected_rms": expected,
        "rms_ratio": rms / expected,
        "stetson_j": j,
        "amplitude": hi - lo,
        "chi2_dof_clipped": chi2_clip_dof,
    }
    for key in out:
        if key != "n_good":
            out[key] = np.where(few, np.nan, out[key]).astype(np.float64)
    tail = stats.chi2.sf(np.where(few, 0.0, chi2_clip), np.maximum(n - 2, 1))
    out["variable"] = (
        (n >= min_points) & (tail < false_alarm) & (out["chi2_dof_clipped"] >= min_chi2_dof)
    )
    return out
