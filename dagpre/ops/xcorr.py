"""Translation between two frames by FFT cross-correlation of their star fields (pyDIA).

:func:`xcorr_shift` finds the whole-pixel shift that best overlays two images of the same
field, and optionally refines it below a pixel. Plain phase correlation
(``skimage.registration.phase_cross_correlation``'s default) whitens the spectrum, so noise,
hot pixels and cosmic rays weigh as much as stars, and on star fields it can lock onto a
wrong peak. Here each image is first turned into a map of *star light only*:

1. background-subtracted and divided by the background RMS, giving ``z`` in sigma
   (:func:`~dagpre.ops.background.estimate_background` with meshes of 64 pixels; on frames
   of 1536 px a side or more, measured on every 2nd (4th from 3584 px) pixel of every 2nd
   (4th) row, which has the same noise per pixel, and repeated over the skipped ones);
2. eroded with a 5-pixel cross (each pixel becomes the minimum of itself and its four
   neighbours), which removes single hot pixels, most cosmic-ray hits and one-pixel-wide
   bad columns and bleed trails, but keeps stars (a star's core is wider than a pixel);
3. reduced to its excess over ``threshold`` sigma, clipped at ``clip`` sigma, so that
   thousands of faint and bright stars all count, not the few brightest (nor saturated
   cores and their trails);
4. made zero-mean and apodized with a cosine taper at the edges.

The two maps are cross-correlated with real FFTs (``backend.fft_of``: SciPy or cuFFT), with
no phase normalisation; the highest peak gives the shift. ``subpixel=True`` refines it by an
upsampled DFT of the cross-power spectrum about that peak (Guizar-Sicairos, Thurman &
Fienup 2008), plus a parabola through the upsampled peak.

Sign convention: the shift ``(dx, dy)`` is where the image's content sits relative to the
reference: ``image(x, y) ~= reference(x - dx, y - dy)``, so a star at ``(x, y)`` in the
reference is at ``(x + dx, y + dy)`` in the image. (x, y) pixel order, 0-based pixel
centres, not NumPy (row, col) axis order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagpre.backend import fft_of, is_cupy_array, xp_of
from dagpre.ops._checks import check_image, check_positive_int, check_threads
from dagpre.types import Frame, InputError

__all__ = ["XcorrShift", "xcorr_shift"]

#: The correlation surface's robust noise is measured on every this-many-th lag per axis.
_NOISE_STRIDE = 4
#: Lags within this many pixels of the highest peak (its shoulders) are skipped when looking
#: for the second.
_PEAK_EXCLUSION = 16


@dataclass(frozen=True)
class XcorrShift:
    """Result of :func:`xcorr_shift`.

    Attributes
    ----------
    dx, dy : float
        Shift of the image relative to the reference, pixels: ``image(x, y) ~=
        reference(x - dx, y - dy)``; whole numbers unless ``subpixel``.
    significance : float
        Height of the correlation peak above the surface's median, in robust standard
        deviations of the surface (MAD-based). A clear match on a star field gives tens to
        thousands; below about 10, distrust the shift.
    contrast : float
        Height of the second-highest peak (more than 16 px away) relative to the highest,
        both above the median: near 0 is unambiguous, near 1 means two candidate shifts.
    subpixel : bool
        Whether ``dx, dy`` were refined below a pixel.
    """

    dx: float
    dy: float
    significance: float
    contrast: float
    subpixel: bool

    def __iter__(self):
        return iter((self.dx, self.dy))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 transform from image (x, y) to reference (x, y): a translation by ``-(dx, dy)``.

        The same sense as ``find_transform(image, reference).matrix``.
        """
        m = np.eye(3)
        m[0, 2], m[1, 2] = -self.dx, -self.dy
        return m


def xcorr_shift(
    image: Any,
    reference: Any,
    *,
    subpixel: bool = False,
    upsample: int = 20,
    max_shift: float | None = None,
    mask: Any = None,
    reference_mask: Any = None,
    threshold: float = 2.0,
    clip: float = 10.0,
    taper: int | None = None,
    threads: int | None = None,
) -> XcorrShift:
    """Shift of ``image`` relative to ``reference`` by cross-correlating their star light.

    Parameters
    ----------
    image, reference : ndarray (ny, nx) or Frame
        The two frames (ADU, with or without sky), NumPy or CuPy (both on one device). The
        shapes may differ: both are placed at a common origin (pixel (0, 0)) and zero-padded
        to a common FFT size. A :class:`~dagpre.types.Frame`'s non-zero mask pixels are
        ignored.
    subpixel : bool
        Refine the whole-pixel peak to ``1 / upsample`` px by an upsampled DFT, then by a
        parabola through the three highest upsampled values on each axis.
    upsample : int
        Upsampling factor of the subpixel refinement.
    max_shift : float, optional
        Largest ``|dx|`` and ``|dy|`` searched, pixels. The frames are then zero-padded by
        that much, so no lag within it wraps around. None: no padding beyond a fast FFT
        size, lags up to half that size on each axis.
    mask, reference_mask : ndarray (ny, nx), optional
        Non-zero where pixels of ``image`` / ``reference`` must be ignored (hot pixels,
        saturated stars): they get no weight.
    threshold : float
        Excess over this many background sigma (after the 5-pixel erosion) counts as star
        light.
    clip : float
        Star light is clipped this many sigma above ``threshold``.
    taper : int, optional
        Width in pixels of the cosine taper at each edge; None: 1/32 of the side, 4 to 64.
    threads : int, optional
        CPU threads for the background and the FFTs (None: every CPU). Ignored on CuPy.

    Returns
    -------
    XcorrShift
        ``dx, dy`` (unpacks as ``dx, dy = xcorr_shift(...)``), ``significance``,
        ``contrast``, ``subpixel``; ``matrix`` maps image pixels to reference pixels.

    Raises
    ------
    InputError
        For non-2-D inputs, mixed devices, masks of the wrong shape, bad parameters, or a
        frame with no star light (a blank or flat frame).

    Examples
    --------
    >>> import numpy as np
    >>> from dagpre.simulate import render_sources
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.uniform(0, 256, 150), rng.uniform(0, 256, 150)
    >>> flux = rng.uniform(2e3, 2e4, 150)
    >>> ref = rng.normal(render_sources((256, 256), x, y, flux, 3.0) + 100.0, 3.0)
    >>> img = rng.normal(render_sources((256, 256), x + 17, y - 9, flux, 3.0) + 100.0, 3.0)
    >>> shift = xcorr_shift(img.astype(np.float32), ref.astype(np.float32))
    >>> shift.dx, shift.dy
    (17.0, -9.0)
    """
    img, img_mask = _unpack(image, mask, "image")
    ref, ref_mask = _unpack(reference, reference_mask, "reference")
    if is_cupy_array(img) != is_cupy_array(ref):
        raise InputError("reference", "image and reference must be on the same device")
    upsample = check_positive_int(upsample, "upsample")
    threads = check_threads(threads)
    threshold = _finite(threshold, "threshold")
    clip = _finite(clip, "clip", positive=True)
    if max_shift is not None:
        max_shift = _finite(max_shift, "max_shift")
        if max_shift < 0:
            raise InputError("max_shift", f"expected a non-negative number, got {max_shift!r}")
    if taper is not None and (
        isinstance(taper, bool) or not isinstance(taper, numbers.Integral) or taper < 0
    ):
        raise InputError("taper", f"expected a non-negative integer or None, got {taper!r}")

    from scipy.fft import next_fast_len

    xp = xp_of(img)
    fft = fft_of(img)
    extra = 0 if max_shift is None else math.ceil(max_shift)
    size = tuple(
        next_fast_len(max(a, b) + min(extra, max(a, b)), real=True)
        for a, b in zip(img.shape, ref.shape, strict=True)
    )
    fft_kw = {} if xp is not np else {"workers": threads or -1}  # -1: every CPU
    a = _star_light(img, img_mask, threshold, clip, taper, threads, "image")
    b = _star_light(ref, ref_mask, threshold, clip, taper, threads, "reference")
    spec = fft.rfft2(a, s=size, **fft_kw)
    spec *= xp.conj(fft.rfft2(b, s=size, **fft_kw))
    del a, b
    corr = fft.irfft2(spec, s=size, **fft_kw)

    ly, lx = size
    lag_y = _lags(xp, ly)
    lag_x = _lags(xp, lx)
    if max_shift is not None:
        allowed = (xp.abs(lag_y)[:, None] <= max_shift) & (xp.abs(lag_x)[None, :] <= max_shift)
        corr = xp.where(allowed, corr, -xp.inf)
    flat = int(xp.argmax(corr))
    iy, ix = divmod(flat, lx)
    peak = float(corr[iy, ix])
    sample = corr[::_NOISE_STRIDE, ::_NOISE_STRIDE]
    sample = sample[xp.isfinite(sample)]
    median = float(xp.median(sample))
    mad = float(xp.median(xp.abs(sample - median))) * 1.4826
    near_y = xp.abs(_wrap(xp, lag_y - lag_y[iy], ly)) <= _PEAK_EXCLUSION
    near_x = xp.abs(_wrap(xp, lag_x - lag_x[ix], lx)) <= _PEAK_EXCLUSION
    second = float(xp.max(xp.where(near_y[:, None] & near_x[None, :], -xp.inf, corr)))
    height = peak - median
    contrast = (second - median) / height if height > 0 and math.isfinite(second) else 0.0
    significance = height / mad if mad > 0 else math.inf
    dy, dx = float(lag_y[iy]), float(lag_x[ix])
    if subpixel:
        dy, dx = _refine(xp, spec, size, dy, dx, upsample)
    return XcorrShift(
        dx=dx,
        dy=dy,
        significance=float(significance),
        contrast=float(max(contrast, 0.0)),
        subpixel=bool(subpixel),
    )


# --------------------------------------------------------------------------- helpers


def _unpack(obj, mask, name):
    if isinstance(obj, Frame):
        frame_mask = obj.mask != 0
        if mask is not None:
            frame_mask = frame_mask | _mask(obj.data, mask, name)
        return obj.data, frame_mask
    check_image(obj, name)
    return obj, None if mask is None else _mask(obj, mask, name)


def _mask(image, mask, name):
    if getattr(mask, "shape", None) != image.shape:
        raise InputError(
            "mask" if name == "image" else "reference_mask",
            f"expected shape {image.shape}, got {getattr(mask, 'shape', None)}",
        )
    return xp_of(image).asarray(mask).astype(bool)


def _finite(value, name, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(name, f"expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise InputError(name, f"expected a positive number, got {value!r}")
    return float(value)


def _lags(xp, n):
    """Signed lag of each FFT index: 0, 1, ..., then negative from the middle on."""
    k = xp.arange(n)
    return xp.where(k > n // 2, k - n, k)


def _wrap(xp, d, n):
    return (d + n // 2) % n - n // 2


def _star_light(image, mask, threshold, clip, taper, threads, name):
    """The zero-mean, apodized, clipped star-light map of one frame (float32)."""
    from dagpre.ops.background import estimate_background

    xp = xp_of(image)
    ny, nx = image.shape
    # the sky is smooth: measure it on every f-th pixel of every f-th row (the same noise
    # per pixel), meshes of 64 image pixels, and repeat each value over its f x f block
    f = max(1, min(4, int(min(ny, nx) / 1024 + 0.5)))
    sub_mask = None if mask is None else mask[::f, ::f]
    try:
        bkg = estimate_background(
            image[::f, ::f], box=max(8, 64 // f), mask=sub_mask, threads=threads
        )
    except InputError as err:  # name the input, not estimate_background's "image"
        raise InputError(name, err.reason) from None
    back = bkg.background
    if f > 1:
        back = xp.repeat(xp.repeat(back, f, axis=0), f, axis=1)[:ny, :nx]
    z = xp.asarray(image, dtype=xp.float32) - back
    z *= xp.float32(1.0 / bkg.global_rms)
    bad = ~xp.isfinite(z)
    if mask is not None:
        bad |= mask
    if not bool(bad.any()):
        bad = None
    else:
        z[bad] = 0.0
    # minimum over the pixel and its 4 neighbours (edges: the pixel itself stands in)
    e = z.copy()
    xp.minimum(e[1:, :], z[:-1, :], out=e[1:, :])
    xp.minimum(e[:-1, :], z[1:, :], out=e[:-1, :])
    xp.minimum(e[:, 1:], z[:, :-1], out=e[:, 1:])
    xp.minimum(e[:, :-1], z[:, 1:], out=e[:, :-1])
    del z
    e -= xp.float32(threshold)
    xp.clip(e, 0.0, clip, out=e)
    if bad is not None:
        e[bad] = 0.0
    if not bool(e.any()):
        raise InputError(
            name,
            f"no star light: no pixel is {threshold:g} sigma above the background with its "
            "4 neighbours (a blank or flat frame?)",
        )
    if bad is None:
        e -= e.mean(dtype=xp.float64).astype(xp.float32)
    else:
        good = ~bad
        e -= e[good].mean(dtype=xp.float64).astype(xp.float32)
        e[bad] = 0.0
    e *= _taper(xp, ny, taper)[:, None]
    e *= _taper(xp, nx, taper)[None, :]
    return e


def _taper(xp, n, width):
    """Cosine (Tukey) edge taper of ``width`` px (None: n / 32, from 4 to 64) on each side."""
    if width is None:
        width = int(min(64, max(4, n // 32)))
    width = min(int(width), n // 2)
    w = np.ones(n, dtype=np.float32)
    if width > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
        w[:width] = ramp
        w[n - width :] = ramp[::-1]
    return xp.asarray(w)


def _refine(xp, spec, size, dy, dx, upsample):
    """Subpixel peak by an upsampled DFT about (dy, dx) and a parabola (Guizar-Sicairos)."""
    ly, lx = size
    n = math.ceil(1.5 * upsample) | 1  # odd: the integer peak is the central sample
    offsets = (np.arange(n) - n // 2) / upsample
    ys = dy + offsets
    xs = dx + offsets
    ky = np.fft.fftfreq(ly, d=1.0 / ly)  # signed integer frequencies
    kx = np.arange(lx // 2 + 1, dtype=np.float64)
    # the rfft half-plane stands for both halves: double every column with a mirror image
    weight = np.full(kx.size, 2.0)
    weight[0] = 1.0
    if lx % 2 == 0:
        weight[-1] = 1.0
    # phases in float64 (the lags reach thousands of px), products in single precision
    ex = (np.exp(2j * np.pi * np.outer(kx, xs) / lx) * weight[:, None]).astype(np.complex64)
    ey = np.exp(2j * np.pi * np.outer(ys, ky) / ly).astype(np.complex64)
    up = (xp.asarray(ey) @ (spec.astype(xp.complex64, copy=False) @ xp.asarray(ex))).real
    up = np.asarray(up.get() if is_cupy_array(up) else up)
    j, i = np.unravel_index(int(np.argmax(up)), up.shape)
    fy = _parabola(up[j - 1 : j + 2, i]) if 0 < j < n - 1 else 0.0
    fx = _parabola(up[j, i - 1 : i + 2]) if 0 < i < n - 1 else 0.0
    return float(ys[j] + fy / upsample), float(xs[i] + fx / upsample)


def _parabola(v) -> float:
    """Vertex offset (in samples, within +-0.5) of the parabola through three values."""
    den = v[0] - 2.0 * v[1] + v[2]
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (v[0] - v[2]) / den, -0.5, 0.5))
