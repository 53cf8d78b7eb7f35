"""Celestial WCS pixel mapping on NumPy or CuPy: TAN, TAN-SIP and TPV, a whole grid at once.

An astropy :class:`~astropy.wcs.WCS` (or a FITS header) is parsed once, by
:func:`parse_wcs`, into a :class:`TanWCS`: a small frozen record of numbers (``CRPIX``, the
``CD`` matrix, ``CRVAL``, ``LONPOLE``, SIP and TPV coefficients). Everything after that is
array arithmetic in the array module of the coordinates (``numpy`` or ``cupy``), in
float64; astropy is never called per pixel.

The chain, pixel to sky, is wcslib's (Calabretta & Greisen 2002, A&A 395, 1077):

1. SIP (Shupe et al. 2005): ``p' = p + (A(u, v), B(u, v))`` with ``(u, v) = p - CRPIX`` in
   FITS pixels (1-based).
2. Linear: intermediate world coordinates ``(x, y) = CD (p' - CRPIX)``, degrees.
3. TPV (wcslib's ``dis.c``, SCAMP's convention): ``x' = P1(x, y)``, ``y' = P2(y, x)`` with
   the 40-term polynomials of ``PV1_0..39`` and ``PV2_0..39`` (odd powers of
   ``r = sqrt(x^2 + y^2)`` at indices 3, 11, 23, 39; absent coefficients are 0, as wcslib
   takes them).
4. Gnomonic (TAN) projection and the spherical rotation to ``(ra, dec)``, done with unit
   vectors: the native direction of ``(x, y)`` is ``(-y, x, 180/pi)`` (unnormalised), and one
   3x3 rotation (from ``CRVAL`` and ``LONPOLE``) turns it into the celestial direction. So
   :func:`pixel_to_pixel` between two frames needs no trigonometry per pixel at all: the two
   rotations (and a frame change such as ICRS to Galactic) compose into one matrix.

The way back inverts TAN exactly, and TPV and SIP by Newton's method on the forward
polynomials, started from the inverse SIP polynomials ``AP``/``BP`` when the header has them
(the polynomial inverse alone is only as good as its fit, typically 0.01-0.1 px; astropy's
``all_world2pix`` iterates to the forward polynomial as well). Newton stops when the last
step is below 1e-10 px; points where it does not converge (far outside the region where the
distortion is invertible) and points on the far hemisphere of a projection are NaN.

Agreement with astropy (``all_pix2world`` / ``all_world2pix(tolerance=1e-12)``) over a frame
is a few 1e-9 px in the tests (TAN, simulated TAN-SIP with and without ``AP``/``BP``, DECam
TPV: the float64 rounding of a longitude near 150 deg), against an acceptance bound of
1e-4 px. TPV coefficients are read from wcslib's header text (astropy keeps them inside
wcslib), which carries 13 significant digits.

:func:`solve_pixel_map` is the "solve once" form for resampling: it evaluates the exact
mapping from output pixels to input pixels on a coarse grid (every ``step`` pixels, one node
beyond every edge), interpolates it separably with the 4-point cubic Lagrange polynomial
(exact for cubics, error ``O(step^4)``), and measures the interpolation error against the
exact mapping half-way between all nodes. If twice that exceeds ``tol`` (default 1e-4 px),
the step is halved, down to 4 px, and below that every pixel is evaluated exactly. With the
default 32 px step the error is ~1e-9 px on a 2k frame with 1.5 px of SIP distortion.
:func:`pixel_map` returns the full-resolution grids.

Supported: celestial CTYPEs ``TAN``, ``TAN-SIP`` and ``TPV``, longitude and latitude axes in
either order, any celestial frame astropy knows (frames are
related by one rotation). Anything else -- other projections, lookup-table distortions
(``CPDIS``/``D2IMDIS``), wcslib ``DP``/``DQ`` distortions, ``PV`` cards on a ``TAN`` axis --
raises :class:`~dagpre.types.InputError` naming the CTYPE.

Pixel conventions: ``(x, y)`` pixel order, 0-based pixel centres (the centre of the first
pixel is ``(0.0, 0.0)``), not NumPy ``(row, col)`` axis order; sky coordinates are
``(lon, lat)`` = ``(ra, dec)`` in degrees, in the WCS's own frame.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dagpre.backend import xp_of
from dagpre.ops._checks import check_shape
from dagpre.types import InputError

__all__ = [
    "PixelMap",
    "TanWCS",
    "parse_wcs",
    "pixel_map",
    "pixel_to_pixel",
    "pixel_to_world",
    "solve_pixel_map",
    "world_to_pixel",
]

_R0 = 180.0 / math.pi  # wcslib's radius of the generating sphere, degrees
_NEWTON_TOL_PX = 1e-10  # Newton stops when its last step is below this (pixels)
_NEWTON_MAXITER = 50
_MIN_STEP = 4  # coarse-grid spacing below which pixel_map evaluates every pixel
_JACOBIAN_H = 0.5  # half-step (px) of the central differences for the Jacobian
_SAFETY = 2.0  # the error between check points can exceed the one at them (~1.4x seen)


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class TanWCS:
    """A celestial tangent-plane WCS reduced to numbers: what the per-pixel code needs.

    Made by :func:`parse_wcs`; immutable, hashable, cheap to pickle (a Dask task can carry
    it). Attributes are plain tuples of floats.

    Attributes
    ----------
    ctype : (str, str)
        The two celestial CTYPEs as the header writes them, e.g.
        ``("RA---TAN-SIP", "DEC--TAN-SIP")`` or ``("RA---TPV", "DEC--TPV")``.
    crpix : (float, float)
        Reference pixel, FITS 1-based, header axis order.
    cd : ((float, float), (float, float))
        ``CD`` matrix (``PC * CDELT``), degrees per pixel.
    crval : (float, float)
        ``(lon, lat)`` of the reference point, degrees.
    lonpole : float
        Native longitude of the celestial pole, degrees (180 unless the header says
        otherwise).
    lng_axis : int
        0 when the first axis is longitude, 1 when it is latitude.
    sip_a, sip_b : tuple of (p, q, coefficient), optional
        Non-zero terms of the forward SIP polynomials ``A_p_q``, ``B_p_q``.
    sip_ap, sip_bp : tuple of (p, q, coefficient), optional
        Non-zero terms of the inverse SIP polynomials, when the header has them.
    sip_crpix : (float, float), optional
        The reference pixel the SIP polynomials use (astropy keeps its own copy).
    tpv_lng, tpv_lat : tuple of (index, coefficient), optional
        Non-zero ``PVi_m`` of the longitude and latitude axes, ``m = 0..39``.
    frame : astropy frame or None
        The celestial frame (ICRS, FK5, Galactic, ...), for :func:`pixel_to_pixel` between
        frames; ``None`` when astropy cannot name it (then both sides must be ``None``).
    shape : (int, int) or None
        ``(ny, nx)`` from ``NAXIS2``/``NAXIS1`` when known.
    """

    ctype: tuple[str, str]
    crpix: tuple[float, float]
    cd: tuple[tuple[float, float], tuple[float, float]]
    crval: tuple[float, float]
    lonpole: float = 180.0
    lng_axis: int = 0
    sip_a: tuple | None = None
    sip_b: tuple | None = None
    sip_ap: tuple | None = None
    sip_bp: tuple | None = None
    sip_crpix: tuple[float, float] | None = None
    tpv_lng: tuple | None = None
    tpv_lat: tuple | None = None
    frame: Any = field(default=None, compare=False)
    shape: tuple[int, int] | None = None

    @property
    def has_sip(self) -> bool:
        """Whether SIP polynomials are applied in pixel space."""
        return self.sip_a is not None

    @property
    def has_tpv(self) -> bool:
        """Whether a TPV polynomial is applied to the intermediate world coordinates."""
        return self.tpv_lng is not None

    @property
    def kind(self) -> str:
        """``"TAN"``, ``"TAN-SIP"``, ``"TPV"`` or ``"TPV-SIP"``."""
        base = "TPV" if self.has_tpv else "TAN"
        return f"{base}-SIP" if self.has_sip else base

    def rotation(self) -> np.ndarray:
        """3x3 float64 matrix turning native unit vectors into celestial ones."""
        lon_p = math.radians(self.crval[0])
        lat_p = math.radians(self.crval[1])
        phi_p = math.radians(self.lonpole)
        sd, cd = math.sin(lat_p), math.cos(lat_p)
        m = np.array([[-sd, 0.0, cd], [0.0, -1.0, 0.0], [cd, 0.0, sd]])
        return _rot_z(lon_p) @ m @ _rot_z(-phi_p)


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------- parsing


_SUPPORTED = "TAN, TAN-SIP, TPV"


def parse_wcs(wcs: Any, name: str = "wcs") -> TanWCS:
    """Reduce an astropy WCS (or a FITS header) to a :class:`TanWCS` record.

    Parameters
    ----------
    wcs : astropy.wcs.WCS, astropy.io.fits.Header or TanWCS
        The celestial WCS. A ``TanWCS`` is returned as it is. A WCS with more than two
        axes is reduced to its celestial part (``wcs.celestial``).
    name : str
        The parameter name used in error messages.

    Returns
    -------
    TanWCS

    Raises
    ------
    InputError
        When there are no celestial axes, or the projection or distortion is not one of
        TAN, TAN-SIP, TPV (the message names the CTYPE).

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval = [150.0, 2.0]
    >>> w.wcs.crpix = [50.5, 50.5]
    >>> w.wcs.cdelt = [-1e-4, 1e-4]
    >>> parse_wcs(w).kind
    'TAN'
    """
    if isinstance(wcs, TanWCS):
        return wcs
    from astropy.io import fits
    from astropy.wcs import WCS

    if isinstance(wcs, fits.Header):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wcs = WCS(wcs)
        except Exception as exc:  # astropy raises many types on bad headers
            raise InputError(name, f"cannot parse a WCS from the header ({exc})") from exc
    if not isinstance(wcs, WCS):
        raise InputError(
            name, f"expected an astropy WCS, a FITS header or a TanWCS, got {type(wcs).__name__}"
        )
    if not wcs.has_celestial:
        raise InputError(name, f"has no celestial axes (CTYPE {list(wcs.wcs.ctype)})")
    if wcs.naxis != 2:
        wcs = wcs.celestial
    # wcslib's own header text: the only place astropy shows TPV (its Wcsprm reports
    # "TAN" and keeps the PV cards inside wcslib's distortion struct)
    header = _cards(wcs.wcs.to_header(relax=True))
    lng, lat = int(wcs.wcs.lng), int(wcs.wcs.lat)
    ctype = (str(header.get("CTYPE1", "")), str(header.get("CTYPE2", "")))
    codes = {c[5:8] for c in ctype}
    shown = f"CTYPE {ctype[0]!r}/{ctype[1]!r}"
    if len(codes) != 1 or not codes <= {"TAN", "TPV"}:
        raise InputError(name, f"{shown}: projection not supported (supported: {_SUPPORTED})")
    tpv = codes == {"TPV"}
    for extra in (ctype[0][8:], ctype[1][8:]):
        if extra not in ("", "-SIP"):
            raise InputError(name, f"{shown}: distortion not supported (supported: {_SUPPORTED})")
    if any(getattr(wcs, a, None) is not None for a in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        raise InputError(name, f"{shown}: lookup-table distortion (CPDIS/D2IMDIS) is not supported")
    if any(k.startswith(("DP1", "DP2", "DQ1", "DQ2", "CPDIS", "CQDIS")) for k in header):
        raise InputError(name, f"{shown}: wcslib DP/DQ distortion is not supported")
    phi0, theta0 = float(wcs.wcs.phi0), float(wcs.wcs.theta0)
    if not tpv and (wcs.wcs.get_pv() or phi0 != 0.0 or theta0 != 90.0):
        raise InputError(
            name,
            f"{shown}: PV cards on a TAN axis (fiducial-point offsets or the pre-2012 SCAMP "
            "convention) are not supported; SCAMP distortions should be written as TPV",
        )
    cd = np.asarray(wcs.pixel_scale_matrix, dtype=np.float64)
    if not np.all(np.isfinite(cd)) or abs(np.linalg.det(cd)) == 0.0:
        raise InputError(name, f"{shown}: the CD (PC x CDELT) matrix is singular")
    crpix = tuple(float(v) for v in wcs.wcs.crpix)
    sip = {}
    if wcs.sip is not None:
        s = wcs.sip
        sip = {
            "sip_a": _sip_terms(s.a),
            "sip_b": _sip_terms(s.b),
            "sip_ap": _sip_terms(s.ap) if s.ap is not None else None,
            "sip_bp": _sip_terms(s.bp) if s.bp is not None else None,
            "sip_crpix": tuple(float(v) for v in s.crpix),
        }
    tpv_terms = {}
    if tpv:
        tpv_terms = {
            "tpv_lng": _tpv_terms(header, lng + 1),
            "tpv_lat": _tpv_terms(header, lat + 1),
        }
    frame = None
    try:
        from astropy.wcs.utils import wcs_to_celestial_frame

        frame = wcs_to_celestial_frame(wcs)
    except Exception:  # an unknown frame; only same-to-same mapping is possible then
        frame = None
    shape = None
    if wcs.pixel_shape is not None:
        shape = (int(wcs.pixel_shape[1]), int(wcs.pixel_shape[0]))
    return TanWCS(
        ctype=ctype,
        crpix=crpix,
        cd=((float(cd[0, 0]), float(cd[0, 1])), (float(cd[1, 0]), float(cd[1, 1]))),
        crval=(float(wcs.wcs.crval[lng]), float(wcs.wcs.crval[lat])),
        lonpole=float(wcs.wcs.lonpole),
        lng_axis=lng,
        frame=frame,
        shape=shape,
        **sip,
        **tpv_terms,
    )


def _cards(text: str) -> dict[str, Any]:
    """Keyword -> value (str or float) of the 80-character cards of a header string."""
    cards = {}
    for i in range(0, len(text), 80):
        card = text[i : i + 80]
        key = card[:8].strip()
        if not key or card[8:10] != "= ":
            continue
        raw = card[10:].strip()
        if raw.startswith("'"):
            cards[key] = raw[1:].split("'", 1)[0].rstrip()
            continue
        raw = raw.split("/", 1)[0].strip()
        try:
            cards[key] = float(raw)
        except ValueError:
            cards[key] = raw
    return cards


def _sip_terms(coeffs: Any) -> tuple:
    c = np.asarray(coeffs, dtype=np.float64)
    return tuple((int(p), int(q), float(c[p, q])) for p, q in zip(*np.nonzero(c), strict=True))


def _tpv_terms(header: Any, axis: int) -> tuple:
    terms = []
    for m in range(40):
        value = header.get(f"PV{axis}_{m}")
        if value is not None and float(value) != 0.0:
            terms.append((m, float(value)))
    return tuple(terms)


# TPV term m multiplies x**i * y**j * r**k; the 40 terms go by degree d, with x**d first,
# and an r**d term after the monomials of each odd degree (wcslib dis.c, SCAMP).
def _tpv_powers() -> tuple[tuple[int, int, int], ...]:
    powers = []
    for d in range(8):
        powers += [(d - j, j, 0) for j in range(d + 1)]
        if d % 2 == 1:
            powers.append((0, 0, d))
    return tuple(powers)


_TPV_POWERS = _tpv_powers()


# --------------------------------------------------------------------------- polynomials


class _Powers:
    """Powers of one coordinate array, made as they are asked for."""

    def __init__(self, base: Any) -> None:
        self._p = [None, base]
        self.base = base

    def __getitem__(self, n: int) -> Any:
        while len(self._p) <= n:
            self._p.append(self._p[-1] * self.base)
        return self._p[n]


def _poly(terms: tuple, up: _Powers, vp: _Powers, zero: Any) -> Any:
    """Sum of ``c u**p v**q`` over ``terms`` ``(p, q, c)``; ``zero`` sets shape and dtype."""
    out = zero
    for p, q, c in terms:
        if p and q:
            out = out + c * (up[p] * vp[q])
        elif p:
            out = out + c * up[p]
        elif q:
            out = out + c * vp[q]
        else:
            out = out + c
    return out


def _d_terms(terms: tuple, axis: int) -> tuple:
    """Terms of the derivative of a SIP polynomial along u (axis 0) or v (axis 1)."""
    out = []
    for p, q, c in terms:
        if axis == 0 and p:
            out.append((p - 1, q, p * c))
        elif axis == 1 and q:
            out.append((p, q - 1, q * c))
    return tuple(out)


def _tpv(terms: tuple, x: Any, y: Any, xp: Any, grad: bool = False):
    """TPV polynomial at ``(x, y)``, and with ``grad`` its partial derivatives too."""
    xpw, ypw = _Powers(x), _Powers(y)
    need_r = any(_TPV_POWERS[m][2] for m, _ in terms)
    r = xp.sqrt(x * x + y * y) if need_r else None
    rpw = _Powers(r) if need_r else None
    rinv = xp.where(r > 0, 1.0 / xp.where(r > 0, r, 1.0), 0.0) if need_r and grad else None
    zero = xp.zeros_like(x)
    val, dx, dy = zero, zero, zero
    for m, c in terms:
        i, j, k = _TPV_POWERS[m]
        if k:
            val = val + c * rpw[k]
            if grad:  # d r^k / dx = k x r^(k-2)
                rk2 = rpw[k - 2] if k > 2 else (rinv if k == 1 else 1.0)
                dx = dx + (c * k) * (x * rk2)
                dy = dy + (c * k) * (y * rk2)
            continue
        mono = (xpw[i] if i else 1.0) * (ypw[j] if j else 1.0)
        val = val + c * mono
        if grad:
            if i:
                dx = dx + (c * i) * ((xpw[i - 1] if i > 1 else 1.0) * (ypw[j] if j else 1.0))
            if j:
                dy = dy + (c * j) * ((xpw[i] if i else 1.0) * (ypw[j - 1] if j > 1 else 1.0))
    if grad:
        return val, dx, dy
    return val


def _max_abs(xp: Any, *arrays: Any) -> float:
    """Largest finite ``|a|`` over the arrays (0 when there is none); one host sync."""
    worst = 0.0
    for a in arrays:
        if a.size:
            worst = max(worst, float(xp.max(xp.where(xp.isfinite(a), xp.abs(a), 0.0))))
    return worst


def _newton2(f, x: Any, y: Any, xp: Any, tol: float) -> tuple[Any, Any]:
    """Solve ``f(x, y) = 0`` by Newton's method; ``f`` returns ``(f0, f1, j00, j01, j10, j11)``.

    Stops when the largest step is below ``tol``; points whose last step is still above
    ``1e4 * tol`` (diverging or oscillating far outside the invertible region) are NaN.
    Overflow and division by a singular Jacobian there are expected, so NumPy's warnings
    are silenced for the loop (``np.errstate`` is thread-local; CuPy does not warn).
    """
    step = xp.zeros_like(x)
    with np.errstate(all="ignore"):
        for _ in range(_NEWTON_MAXITER):
            f0, f1, j00, j01, j10, j11 = f(x, y)
            det = j00 * j11 - j01 * j10
            dx = (j11 * f0 - j01 * f1) / det
            dy = (j00 * f1 - j10 * f0) / det
            x = x - dx
            y = y - dy
            step = xp.maximum(xp.abs(dx), xp.abs(dy))
            if _max_abs(xp, step) < tol:
                break
        bad = ~(step < 1e4 * tol)
    return xp.where(bad, xp.nan, x), xp.where(bad, xp.nan, y)


# --------------------------------------------------------------------------- the stages


def _as_float(xp: Any, a: Any) -> Any:
    return xp.asarray(a, dtype=xp.float64)


def _pix_to_iwc(w: TanWCS, x: Any, y: Any, xp: Any) -> tuple[Any, Any]:
    """0-based pixels -> intermediate world coordinates (lng, lat order), degrees."""
    px = x + 1.0
    py = y + 1.0
    if w.has_sip:
        u = px - w.sip_crpix[0]
        v = py - w.sip_crpix[1]
        up, vp = _Powers(u), _Powers(v)
        zero = xp.zeros_like(u)
        px = px + _poly(w.sip_a, up, vp, zero)
        py = py + _poly(w.sip_b, up, vp, zero)
    dx = px - w.crpix[0]
    dy = py - w.crpix[1]
    (c00, c01), (c10, c11) = w.cd
    i0 = c00 * dx + c01 * dy
    i1 = c10 * dx + c11 * dy
    xi, eta = (i0, i1) if w.lng_axis == 0 else (i1, i0)
    if w.has_tpv:
        xi, eta = _tpv(w.tpv_lng, xi, eta, xp), _tpv(w.tpv_lat, eta, xi, xp)
    return xi, eta


def _iwc_to_pix(w: TanWCS, xi: Any, eta: Any, xp: Any) -> tuple[Any, Any]:
    """Intermediate world coordinates (lng, lat order, degrees) -> 0-based pixels."""
    if w.has_tpv:
        xi, eta = _tpv_inverse(w, xi, eta, xp)
    i0, i1 = (xi, eta) if w.lng_axis == 0 else (eta, xi)
    (c00, c01), (c10, c11) = w.cd
    det = c00 * c11 - c01 * c10
    px = (c11 * i0 - c01 * i1) / det + w.crpix[0]
    py = (c00 * i1 - c10 * i0) / det + w.crpix[1]
    if w.has_sip:
        px, py = _sip_inverse(w, px, py, xp)
    return px - 1.0, py - 1.0


def _tpv_inverse(w: TanWCS, xi_t: Any, eta_t: Any, xp: Any) -> tuple[Any, Any]:
    lng, lat = w.tpv_lng, w.tpv_lat

    def f(x, y):
        p1, d1x, d1y = _tpv(lng, x, y, xp, grad=True)
        p2, d2y, d2x = _tpv(lat, y, x, xp, grad=True)  # P2 takes (y, x)
        return p1 - xi_t, p2 - eta_t, d1x, d1y, d2x, d2y

    # start from the inverse of the linear terms (x' ~ a0 + a1 x + a2 y, y' ~ b0 + b1 y + b2 x)
    a = dict(lng)
    b = dict(lat)
    a1, a2, b1, b2 = a.get(1, 0.0), a.get(2, 0.0), b.get(1, 0.0), b.get(2, 0.0)
    det = a1 * b1 - a2 * b2
    if det != 0.0:
        rx, ry = xi_t - a.get(0, 0.0), eta_t - b.get(0, 0.0)
        x0 = (b1 * rx - a2 * ry) / det
        y0 = (a1 * ry - b2 * rx) / det
    else:
        x0, y0 = xi_t, eta_t
    scale = math.sqrt(abs(np.linalg.det(np.asarray(w.cd))))
    return _newton2(f, x0, y0, xp, _NEWTON_TOL_PX * scale)


def _sip_inverse(w: TanWCS, fx: Any, fy: Any, xp: Any) -> tuple[Any, Any]:
    """Solve ``p + SIP(p - crpix) = f`` for ``p`` (FITS pixels)."""
    cx, cy = w.sip_crpix
    ut, vt = fx - cx, fy - cy
    if w.sip_ap is not None and w.sip_bp is not None:
        up, vp = _Powers(ut), _Powers(vt)
        zero = xp.zeros_like(ut)
        u0 = ut + _poly(w.sip_ap, up, vp, zero)
        v0 = vt + _poly(w.sip_bp, up, vp, zero)
    else:
        u0, v0 = ut, vt
    a, b = w.sip_a, w.sip_b
    a_u, a_v, b_u, b_v = _d_terms(a, 0), _d_terms(a, 1), _d_terms(b, 0), _d_terms(b, 1)

    def f(u, v):
        up, vp = _Powers(u), _Powers(v)
        zero = xp.zeros_like(u)
        return (
            u + _poly(a, up, vp, zero) - ut,
            v + _poly(b, up, vp, zero) - vt,
            1.0 + _poly(a_u, up, vp, zero),
            _poly(a_v, up, vp, zero),
            _poly(b_u, up, vp, zero),
            1.0 + _poly(b_v, up, vp, zero),
        )

    u, v = _newton2(f, u0, v0, xp, _NEWTON_TOL_PX)
    return u + cx, v + cy


def _native_vector(xi: Any, eta: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Gnomonic: intermediate (xi, eta) degrees -> native direction, unnormalised."""
    return -eta, xi, xp.full_like(xi, _R0)


def _project(nx: Any, ny: Any, nz: Any, xp: Any) -> tuple[Any, Any]:
    """Native direction -> gnomonic (xi, eta) degrees; NaN on the far hemisphere."""
    ok = nz > 0
    inv = xp.where(ok, _R0 / xp.where(ok, nz, 1.0), xp.nan)
    return ny * inv, -nx * inv


def _apply3(m: np.ndarray, a: Any, b: Any, c: Any) -> tuple[Any, Any, Any]:
    m = [[float(v) for v in row] for row in m]
    return (
        m[0][0] * a + m[0][1] * b + m[0][2] * c,
        m[1][0] * a + m[1][1] * b + m[1][2] * c,
        m[2][0] * a + m[2][1] * b + m[2][2] * c,
    )


# --------------------------------------------------------------------------- public mapping


def pixel_to_world(wcs: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """Sky coordinates of pixel positions (astropy's ``all_pix2world(x, y, 0)``).

    Parameters
    ----------
    wcs : TanWCS, astropy.wcs.WCS or astropy.io.fits.Header
        TAN, TAN-SIP or TPV celestial WCS (parsed with :func:`parse_wcs` when not a
        ``TanWCS``).
    x, y : array_like
        Pixel positions, ``(x, y)`` order, 0-based pixel centres, NumPy or CuPy, any shape.

    Returns
    -------
    lon, lat : ndarray, float64
        Degrees, in the WCS's frame (``(ra, dec)`` for an equatorial WCS); ``lon`` in
        ``[0, 360)``. On the device of ``x``.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval = [150.0, 2.0]
    >>> w.wcs.crpix = [50.5, 50.5]
    >>> w.wcs.cdelt = [-1e-4, 1e-4]
    >>> ra, dec = pixel_to_world(w, 49.5, 49.5)
    >>> round(float(ra), 9), round(float(dec), 9)
    (150.0, 2.0)
    """
    w = parse_wcs(wcs)
    xp = xp_of(x, y)
    x, y = _as_float(xp, x), _as_float(xp, y)
    xi, eta = _pix_to_iwc(w, x, y, xp)
    c0, c1, c2 = _apply3(w.rotation(), *_native_vector(xi, eta, xp))
    lon = xp.degrees(xp.arctan2(c1, c0)) % 360.0
    lat = xp.degrees(xp.arctan2(c2, xp.sqrt(c0 * c0 + c1 * c1)))
    return lon, lat


def world_to_pixel(wcs: Any, lon: Any, lat: Any) -> tuple[Any, Any]:
    """Pixel positions of sky coordinates (astropy's ``all_world2pix(lon, lat, 0)``).

    Parameters
    ----------
    wcs : TanWCS, astropy.wcs.WCS or astropy.io.fits.Header
        TAN, TAN-SIP or TPV celestial WCS.
    lon, lat : array_like
        Degrees in the WCS's frame, NumPy or CuPy, any shape.

    Returns
    -------
    x, y : ndarray, float64
        ``(x, y)`` pixel order, 0-based pixel centres; NaN for points on the far side of
        the sky or where the distortion cannot be inverted. On the device of ``lon``.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval = [150.0, 2.0]
    >>> w.wcs.crpix = [50.5, 50.5]
    >>> w.wcs.cdelt = [-1e-4, 1e-4]
    >>> x, y = world_to_pixel(w, 150.0, 2.0)
    >>> round(float(x), 9), round(float(y), 9)
    (49.5, 49.5)
    """
    w = parse_wcs(wcs)
    xp = xp_of(lon, lat)
    lon = xp.radians(_as_float(xp, lon))
    lat = xp.radians(_as_float(xp, lat))
    cl = xp.cos(lat)
    c = (cl * xp.cos(lon), cl * xp.sin(lon), xp.sin(lat))
    xi, eta = _project(*_apply3(w.rotation().T, *c), xp)
    return _iwc_to_pix(w, xi, eta, xp)


def _frame_rotation(frame_from: Any, frame_to: Any, name: str) -> np.ndarray | None:
    """Cartesian rotation from one celestial frame to another; None when they are the same."""
    if frame_from is None and frame_to is None:
        return None
    if frame_from is None or frame_to is None:
        raise InputError(name, "one WCS has a celestial frame astropy cannot name; cannot relate")
    if frame_from.is_equivalent_frame(frame_to):
        return None
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(0)
    lon = np.concatenate([[0.0, 90.0, 0.0], rng.uniform(0.0, 360.0, 16)])
    lat = np.concatenate([[0.0, 0.0, 90.0], np.degrees(np.arcsin(rng.uniform(-1, 1, 16)))])
    src = SkyCoord(lon, lat, unit="deg", frame=frame_from)
    dst = src.transform_to(frame_to)
    a = src.cartesian.xyz.value.T
    b = dst.cartesian.xyz.value.T
    # best rotation b ~ R a (Kabsch), then check it is one
    u, _, vt = np.linalg.svd(b.T @ a)
    rot = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    if np.max(np.abs(a @ rot.T - b)) > 1e-11:  # ~2 microarcsec
        raise InputError(
            name,
            f"frames {frame_from.name} and {frame_to.name} are not related by a rotation "
            "(e.g. FK4 E-terms); transform one WCS first",
        )
    return rot


def _composite(w_from: TanWCS, w_to: TanWCS, name: str = "wcs") -> np.ndarray:
    """Native direction of ``w_from`` -> native direction of ``w_to``: one 3x3 matrix."""
    q = w_from.rotation()
    frame = _frame_rotation(w_from.frame, w_to.frame, name)
    if frame is not None:
        q = frame @ q
    return w_to.rotation().T @ q


def _pixel_to_pixel(w_from: TanWCS, w_to: TanWCS, q: np.ndarray, x, y, xp):
    xi, eta = _pix_to_iwc(w_from, x, y, xp)
    xi, eta = _project(*_apply3(q, *_native_vector(xi, eta, xp)), xp)
    return _iwc_to_pix(w_to, xi, eta, xp)


def pixel_to_pixel(wcs_from: Any, wcs_to: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """Pixel positions in one frame -> pixel positions of the same sky points in another.

    The same as astropy's ``wcs_to.all_world2pix(*wcs_from.all_pix2world(x, y, 0), 0)``
    (``astropy.wcs.utils.pixel_to_pixel``), evaluated without trigonometry per pixel: the
    two spherical rotations (and a change of celestial frame, if any) compose into one
    3x3 matrix.

    Parameters
    ----------
    wcs_from, wcs_to : TanWCS, astropy.wcs.WCS or astropy.io.fits.Header
        Celestial WCS of the frame the positions are in, and of the frame wanted.
    x, y : array_like
        Positions in ``wcs_from``'s frame, ``(x, y)`` pixel order, 0-based pixel centres,
        NumPy or CuPy, any shape.

    Returns
    -------
    x, y : ndarray, float64
        Positions in ``wcs_to``'s frame, same convention and device; NaN where the point is
        on the far side of ``wcs_to``'s tangent plane or its distortion cannot be inverted.

    Raises
    ------
    InputError
        For an unsupported WCS, or frames not related by a rotation.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> a = WCS(naxis=2)
    >>> a.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> a.wcs.crval = [150.0, 2.0]
    >>> a.wcs.crpix = [50.5, 50.5]
    >>> a.wcs.cdelt = [-1e-4, 1e-4]
    >>> b = a.deepcopy()
    >>> b.wcs.crpix = [60.5, 45.5]
    >>> x, y = pixel_to_pixel(a, b, 0.0, 0.0)
    >>> round(float(x), 9), round(float(y), 9)
    (10.0, -5.0)
    """
    w_from = parse_wcs(wcs_from, "wcs_from")
    w_to = parse_wcs(wcs_to, "wcs_to")
    xp = xp_of(x, y)
    x, y = xp.broadcast_arrays(_as_float(xp, x), _as_float(xp, y))
    q = _composite(w_from, w_to, "wcs_to")
    return _pixel_to_pixel(w_from, w_to, q, x, y, xp)


# --------------------------------------------------------------------------- the coarse map


def _cubic_weights(t: Any, xp: Any) -> Any:
    """Cubic Lagrange weights of the taps -1, 0, 1, 2 at ``t`` in [0, 1] (exact for cubics)."""
    tm1, tm2, tp1 = t - 1.0, t - 2.0, t + 1.0
    return xp.stack(
        [-t * tm1 * tm2 / 6.0, tp1 * tm1 * tm2 / 2.0, -tp1 * t * tm2 / 2.0, tp1 * t * tm1 / 6.0],
        axis=-1,
    )


def _interp_matrix(pos: np.ndarray, step: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights from the nodes to pixel positions ``pos``: (len(pos), n_cells + 3), and cells.

    Node ``m`` sits at pixel ``(m - 1) * step``; a position in cell ``c`` (between nodes
    ``c + 1`` and ``c + 2``) uses nodes ``c .. c + 3``.
    """
    t = np.asarray(pos, dtype=np.float64) / step
    cell = np.clip(np.floor(t), 0, n_cells - 1).astype(np.int64)
    w = _cubic_weights(t - cell, np)
    mat = np.zeros((t.size, n_cells + 3))
    rows = np.arange(t.size)
    for k in range(4):
        mat[rows, cell + k] = w[:, k]
    return mat, cell


def _matmul(a: Any, b: Any, xp: Any) -> Any:
    """``a @ b``; on NumPy in column chunks of at most ``_BLAS_SMALL`` multiply-adds.

    OpenBLAS goes multi-threaded above ~2.6e5 multiply-adds per call; for these thin
    products that was ~10x slower on a busy 2-core machine, and it would oversubscribe
    the warp's own threads. Small calls stay single-threaded.
    """
    if xp is not np:
        return a @ b
    a = np.ascontiguousarray(a)
    chunk = max(1, _BLAS_SMALL // max(1, a.size))
    if chunk >= b.shape[1]:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    for c in range(0, b.shape[1], chunk):
        np.matmul(a, b[:, c : c + chunk], out=out[:, c : c + chunk])
    return out


_FULL_BAND = 256  # output rows per band when PixelMap.full() assembles the whole map
_BLAS_SMALL = 1 << 17  # multiply-adds per matmul call in PixelMap.rows (single-threaded)


@dataclass(frozen=True)
class PixelMap:
    """Input-pixel coordinates of every output pixel, stored compactly ("solve once").

    Made by :func:`solve_pixel_map`. Holds the exact mapping on a coarse grid of nodes,
    already interpolated along x (``(n_node_rows, nx)`` per coordinate: 4 MB for a 4k
    frame at the default step), and produces any band of output rows on demand with one
    small matrix product, so the full-resolution map need never be stored. When
    interpolation could not reach ``tol`` (``exact`` is true), bands are evaluated exactly.

    Attributes
    ----------
    wcs_in, wcs_out : TanWCS
        The parsed input and output WCS.
    shape_out : (int, int)
        ``(ny, nx)`` of the output grid.
    step : int
        Node spacing in output pixels (0 when ``exact``).
    max_error : float
        Largest interpolation error found at the check points, input pixels (0 when
        ``exact``).
    exact : bool
        Whether every pixel is evaluated exactly.
    """

    wcs_in: TanWCS
    wcs_out: TanWCS
    shape_out: tuple[int, int]
    step: int
    max_error: float
    exact: bool
    _tx: Any = field(default=None, repr=False, compare=False)  # (node rows, nx): x_in
    _ty: Any = field(default=None, repr=False, compare=False)  # (node rows, nx): y_in
    _tdet: Any = field(default=None, repr=False, compare=False)  # (node rows, nx): |det J|
    _wy: Any = field(default=None, repr=False, compare=False)  # (ny, node rows) weights
    _cells: Any = field(default=None, repr=False, compare=False)  # host: cell of each row
    _q: Any = field(default=None, repr=False, compare=False)  # composite rotation
    _on_gpu: bool = field(default=False, repr=False, compare=False)  # CuPy tables

    @property
    def _xp(self) -> Any:  # a flag, not the module, so that the map pickles (Dask)
        return importlib.import_module("cupy") if self._on_gpu else np

    @property
    def has_jacobian(self) -> bool:
        """Whether :meth:`rows` can return the pixel-area ratio (``jacobian=True``)."""
        return self.exact or self._tdet is not None

    def rows(self, start: int = 0, stop: int | None = None, jacobian: bool = False):
        """Input-pixel coordinates of output rows ``start:stop``.

        Parameters
        ----------
        start, stop : int
            Output row range (``stop`` defaults to the last row).
        jacobian : bool
            Also return ``|det d(x_in, y_in) / d(x_out, y_out)|``, the input-pixel area
            covered by each output pixel (needs ``solve_pixel_map(..., jacobian=True)``
            unless ``exact``).

        Returns
        -------
        x_in, y_in : ndarray (stop - start, nx) float64
            ``(x, y)`` input pixel order, 0-based pixel centres; NaN where undefined.
        det : ndarray (stop - start, nx) float64, only with ``jacobian``
        """
        ny, nx = self.shape_out
        stop = ny if stop is None else stop
        xp = self._xp
        if jacobian and not self.has_jacobian:
            raise InputError("jacobian", "this PixelMap was solved without jacobian=True")
        if self.exact:
            y, x = xp.meshgrid(
                xp.arange(start, stop, dtype=xp.float64),
                xp.arange(nx, dtype=xp.float64),
                indexing="ij",
            )
            xin, yin = _pixel_to_pixel(self.wcs_out, self.wcs_in, self._q, x, y, xp)
            if not jacobian:
                return xin, yin
            return xin, yin, _exact_det(self.wcs_out, self.wcs_in, self._q, x, y, xp)
        lo = int(self._cells[start])
        hi = int(self._cells[stop - 1]) + 4
        w = self._wy[start:stop, lo:hi]
        tables = [self._tx, self._ty] + ([self._tdet] if jacobian else [])
        return tuple(_matmul(w, t[lo:hi], xp) for t in tables)

    def full(self, jacobian: bool = False):
        """The whole map: ``(x_in, y_in)`` (and ``det`` with ``jacobian``), each ``shape_out``."""
        ny, nx = self.shape_out
        xp = self._xp
        n_out = 3 if jacobian else 2
        out = [xp.empty((ny, nx), dtype=xp.float64) for _ in range(n_out)]
        band = ny if self.exact else _FULL_BAND
        for start in range(0, ny, band):
            stop = min(ny, start + band)
            for dst, src in zip(out, self.rows(start, stop, jacobian=jacobian), strict=True):
                dst[start:stop] = src
        return tuple(out)


def _exact_det(w_from: TanWCS, w_to: TanWCS, q, x, y, xp) -> Any:
    """``|det J|`` of the mapping at ``(x, y)`` by central differences of +-0.5 px."""
    h = _JACOBIAN_H
    xa, ya = _pixel_to_pixel(w_from, w_to, q, x + h, y, xp)
    xb, yb = _pixel_to_pixel(w_from, w_to, q, x - h, y, xp)
    xc, yc = _pixel_to_pixel(w_from, w_to, q, x, y + h, xp)
    xd, yd = _pixel_to_pixel(w_from, w_to, q, x, y - h, xp)
    j00, j10 = (xa - xb) / (2 * h), (ya - yb) / (2 * h)
    j01, j11 = (xc - xd) / (2 * h), (yc - yd) / (2 * h)
    return xp.abs(j00 * j11 - j01 * j10)


def solve_pixel_map(
    wcs_in: Any,
    wcs_out: Any,
    shape_out: tuple[int, int],
    *,
    step: int = 32,
    tol: float = 1e-4,
    jacobian: bool = False,
    like: Any = None,
) -> PixelMap:
    """Solve the output-to-input pixel mapping once, compactly, to a checked accuracy.

    The exact mapping (:func:`pixel_to_pixel` from ``wcs_out`` to ``wcs_in``) is evaluated
    on nodes every ``step`` output pixels, with one node beyond each edge, and interpolated
    separably with the 4-point cubic Lagrange polynomial (exact for cubics, error
    ``O(step^4)``, largest mid-way between nodes). The error is measured against the exact
    mapping half-way between nodes along x, along y and diagonally, over the whole frame;
    the largest error anywhere was found within 1.4 times the largest at these points, so
    the map is accepted when twice the measured error is within ``tol``. Otherwise the
    step is halved, and below 4 px every pixel is evaluated
    exactly (``PixelMap.exact``). Nodes where the mapping is undefined (the far hemisphere
    of the input's tangent plane, or a distortion that cannot be inverted) also force exact
    evaluation.

    Parameters
    ----------
    wcs_in, wcs_out : TanWCS, astropy.wcs.WCS or astropy.io.fits.Header
        WCS of the input image and of the output grid.
    shape_out : (int, int)
        ``(ny, nx)`` of the output grid.
    step : int
        Initial node spacing, output pixels (>= 4).
    tol : float
        Largest acceptable interpolation error, input pixels. The default, 1e-4 px, is
        well above the typical error of the default 32 px grid (~1e-7 px on a 4k frame with
        1.5 px of SIP distortion) and well below what resampling can notice.
    jacobian : bool
        Also interpolate ``|det J|`` (input-pixel area per output pixel) for flux
        conservation.
    like : array, optional
        An array whose module (NumPy or CuPy) the map is made with; NumPy by default.

    Returns
    -------
    PixelMap

    Raises
    ------
    InputError
        For an unsupported WCS, a bad shape, step or tolerance.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> a = WCS(naxis=2)
    >>> a.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> a.wcs.crval = [150.0, 2.0]
    >>> a.wcs.crpix = [50.5, 50.5]
    >>> a.wcs.cdelt = [-1e-4, 1e-4]
    >>> b = a.deepcopy()
    >>> b.wcs.crval = [150.001, 2.0]
    >>> pmap = solve_pixel_map(a, b, (100, 100))
    >>> x_in, y_in = pmap.full()
    >>> x_in.shape, bool(pmap.max_error < 1e-4)
    ((100, 100), True)
    """
    w_in = parse_wcs(wcs_in, "wcs_in")
    w_out = parse_wcs(wcs_out, "wcs_out")
    ny, nx = check_shape(shape_out, "shape_out")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < _MIN_STEP:
        raise InputError("step", f"expected an integer >= {_MIN_STEP}, got {step!r}")
    if not tol > 0:
        raise InputError("tol", f"expected a positive number of pixels, got {tol!r}")
    xp = xp_of(like)
    q = _composite(w_out, w_in, "wcs_in")
    step = int(step)
    while step >= _MIN_STEP:
        made = _coarse(w_out, w_in, q, (ny, nx), step, tol, jacobian, xp)
        if made is None:  # undefined nodes: exact evaluation
            break
        err, parts = made
        if _SAFETY * err <= tol:
            return PixelMap(w_in, w_out, (ny, nx), step, err, False, *parts, q, xp is not np)
        step //= 2
    return PixelMap(w_in, w_out, (ny, nx), 0, 0.0, True, _q=q, _on_gpu=xp is not np)


def _coarse(w_from, w_to, q, shape, step, tol, jacobian, xp):
    """``(error, (tx, ty, tdet, wy, cells))`` for one node spacing; None if a node is undefined."""
    ny, nx = shape
    cy = max(1, -(-(ny - 1) // step))  # cells along y
    cx = max(1, -(-(nx - 1) // step))
    gy, gx = xp.meshgrid(
        xp.asarray((np.arange(cy + 3) - 1.0) * step),
        xp.asarray((np.arange(cx + 3) - 1.0) * step),
        indexing="ij",
    )
    nodes_x, nodes_y = _pixel_to_pixel(w_from, w_to, q, gx, gy, xp)
    if not bool(xp.all(xp.isfinite(nodes_x) & xp.isfinite(nodes_y))):
        return None
    wx, _ = _interp_matrix(np.arange(nx), step, cx)
    wy, cells = _interp_matrix(np.arange(ny), step, cy)
    wxt = xp.asarray(wx.T)
    tx = _matmul(nodes_x, wxt, xp)  # (cy + 3, nx): interpolated along x
    ty = _matmul(nodes_y, wxt, xp)
    # check points every half step (mid-way between nodes along x, y and diagonally)
    ky = np.minimum(np.arange(0, 2 * cy + 1) * (0.5 * step), ny - 1)
    kx = np.minimum(np.arange(0, 2 * cx + 1) * (0.5 * step), nx - 1)
    py, px = xp.meshgrid(xp.asarray(ky), xp.asarray(kx), indexing="ij")
    ex, ey = _pixel_to_pixel(w_from, w_to, q, px, py, xp)
    if not bool(xp.all(xp.isfinite(ex) & xp.isfinite(ey))):
        return None
    cwy = xp.asarray(_interp_matrix(ky, step, cy)[0])
    cwx = xp.asarray(_interp_matrix(kx, step, cx)[0].T)
    ix = _matmul(_matmul(cwy, nodes_x, xp), cwx, xp)
    iy = _matmul(_matmul(cwy, nodes_y, xp), cwx, xp)
    err = _max_abs(xp, ix - ex, iy - ey)
    tdet = None
    if jacobian and _SAFETY * err <= tol:
        tdet = _matmul(_exact_det(w_from, w_to, q, gx, gy, xp), wxt, xp)
    return err, (tx, ty, tdet, xp.asarray(wy), cells)


def pixel_map(
    wcs_in: Any,
    wcs_out: Any,
    shape_out: tuple[int, int],
    *,
    step: int = 32,
    tol: float = 1e-4,
    like: Any = None,
) -> tuple[Any, Any]:
    """Input-pixel coordinates of every pixel of an output grid.

    :func:`solve_pixel_map` followed by :meth:`PixelMap.full`: the exact mapping on a
    coarse grid, interpolated to full resolution with a measured error below ``tol``.

    Parameters
    ----------
    wcs_in, wcs_out : TanWCS, astropy.wcs.WCS or astropy.io.fits.Header
        WCS of the input image and of the output grid.
    shape_out : (int, int)
        ``(ny, nx)`` of the output grid.
    step, tol, like
        As in :func:`solve_pixel_map`.

    Returns
    -------
    x_in, y_in : ndarray (ny, nx) float64
        For output pixel ``[j, i]``, the input position ``(x_in[j, i], y_in[j, i])`` of the
        same sky point: ``(x, y)`` pixel order, 0-based pixel centres. NaN where undefined.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> a = WCS(naxis=2)
    >>> a.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> a.wcs.crval = [150.0, 2.0]
    >>> a.wcs.crpix = [50.5, 50.5]
    >>> a.wcs.cdelt = [-1e-4, 1e-4]
    >>> b = a.deepcopy()
    >>> b.wcs.crpix = [40.5, 50.5]
    >>> x_in, y_in = pixel_map(a, b, (100, 100))
    >>> round(float(x_in[0, 0]), 6), round(float(y_in[0, 0]), 6) + 0.0
    (10.0, 0.0)
    """
    return solve_pixel_map(wcs_in, wcs_out, shape_out, step=step, tol=tol, like=like).full()
