"""Deblurring steps: median_flatten and richardson_lucy (oracle: skimage.restoration).

Tolerances, and how "relative" is measured, are stated at each assertion:
``max_rel(a, b) = max|a - b| / max|b|`` over the whole image.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.optimize import least_squares
from scipy.signal import fftconvolve
from scipy.special import erf

from dagpre.backend import to_host
from dagpre.ops.deconvolve import median_flatten, richardson_lucy
from dagpre.types import InputError

skimage_restoration = pytest.importorskip("skimage.restoration")

GAUSS_SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


# --------------------------------------------------------------------------- helpers


def _pixel_integrated_gaussian_1d(edges: np.ndarray, centre: float, fwhm: float) -> np.ndarray:
    sigma = fwhm / GAUSS_SIGMA_TO_FWHM
    return np.diff(0.5 * (1.0 + erf((edges - centre) / (np.sqrt(2.0) * sigma))))


def gaussian_psf(size: int | tuple[int, int], fwhm: float) -> np.ndarray:
    """Pixel-integrated Gaussian kernel centred at index ((ky - 1) // 2, (kx - 1) // 2)."""
    ky, kx = (size, size) if isinstance(size, int) else size
    py = _pixel_integrated_gaussian_1d(np.arange(ky + 1) - 0.5, (ky - 1) // 2, fwhm)
    px = _pixel_integrated_gaussian_1d(np.arange(kx + 1) - 0.5, (kx - 1) // 2, fwhm)
    psf = np.outer(py, px)
    return psf / psf.sum()


def render_gaussians(shape, x, y, flux, fwhm) -> np.ndarray:
    """Pixel-integrated Gaussian stars; (x, y) pixel order, 0-based pixel centres; ADU."""
    ey, ex = np.arange(shape[0] + 1) - 0.5, np.arange(shape[1] + 1) - 0.5
    image = np.zeros(shape)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        image += fi * np.outer(
            _pixel_integrated_gaussian_1d(ey, yi, fwhm), _pixel_integrated_gaussian_1d(ex, xi, fwhm)
        )
    return image


def star_field(seed: int, shape=(96, 128), n=25, sky=50.0, fwhm=2.0) -> np.ndarray:
    """Positive star field (stars + sky + Poisson noise), float64, ADU."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, shape[1] - 1, n)
    y = rng.uniform(0, shape[0] - 1, n)
    image = render_gaussians(shape, x, y, rng.uniform(500, 5000, n), fwhm) + sky
    return rng.poisson(image).astype(np.float64)


def max_rel(a, b) -> float:
    """max |a - b| / max |b| over the image."""
    a, b = np.asarray(to_host(a), dtype=np.float64), np.asarray(to_host(b), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def gaussian_fit_fwhm(image: np.ndarray, x: float, y: float, radius: int = 6) -> float:
    """FWHM (px) of a round 2-D Gaussian + constant fitted to a stamp around (x, y)."""
    xi, yi = round(x), round(y)
    stamp = image[yi - radius : yi + radius + 1, xi - radius : xi + radius + 1]
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]

    def residual(p):
        amp, x0, y0, sigma, base = p
        model = amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2)) + base
        return (model - stamp).ravel()

    base0 = float(np.median(stamp))
    start = [stamp.max() - base0, x - xi, y - yi, 1.5, base0]
    return GAUSS_SIGMA_TO_FWHM * abs(least_squares(residual, start).x[3])


# --------------------------------------------------------------------------- RL vs skimage


@pytest.mark.parametrize(
    "psf_shape, fwhm",
    [((9, 9), 3.0), ((8, 8), 3.0), ((25, 24), 4.0), ((7, 11), 2.5)],
    ids=["9x9", "8x8-even", "25x24-uneven", "7x11"],
)
@pytest.mark.parametrize("filter_epsilon", [None, 0.45], ids=["no-filter", "eps0.45"])
def test_richardson_lucy_matches_skimage(psf_shape, fwhm, filter_epsilon):
    image = star_field(seed=3)
    psf = gaussian_psf(psf_shape, fwhm)
    ours = richardson_lucy(image, psf, iterations=30, clip=False, filter_epsilon=filter_epsilon)
    ref = skimage_restoration.richardson_lucy(
        image, psf, num_iter=30, clip=False, filter_epsilon=filter_epsilon
    )
    assert ours.dtype == ref.dtype == np.float64
    # Acceptance: within 1e-4 relative, max|a - b| / max|b| (measured: ~3e-15 in float64).
    assert max_rel(ours, ref) < 1e-4
    # and elementwise where the reference is not tiny (1e-3 of its maximum)
    big = ref > 1e-3 * ref.max()
    np.testing.assert_allclose(ours[big], ref[big], rtol=1e-4)
    if filter_epsilon:
        # eps=0.45 < 0.5 zeroes the ratio along the edges in the first iteration (where the
        # zero-padded 'same' convolution of the 0.5 start falls below it): it changes things
        plain = richardson_lucy(image, psf, iterations=30)
        assert max_rel(ours, plain) > 1e-3


def test_richardson_lucy_float32_matches_skimage_float32():
    image = star_field(seed=4).astype(np.float32)
    psf = gaussian_psf(9, 3.0).astype(np.float32)
    ours = richardson_lucy(image, psf, iterations=30)
    ref = skimage_restoration.richardson_lucy(image, psf, num_iter=30, clip=False)
    assert ours.dtype == ref.dtype == np.float32
    # both in float32 (measured ~2e-6): max|a - b| / max|b| < 1e-4
    assert max_rel(ours, ref) < 1e-4


def test_richardson_lucy_clip_matches_skimage_default():
    image = star_field(seed=5)
    image /= image.max()  # skimage's clip=True is meant for data in [-1, 1]
    psf = gaussian_psf(7, 2.5)
    ours = richardson_lucy(image, psf, iterations=20, clip=True)
    ref = skimage_restoration.richardson_lucy(image, psf, num_iter=20)  # clip=True default
    assert ours.max() <= 1.0
    assert ours.max() == 1.0  # the peaks were clipped
    assert max_rel(ours, ref) < 1e-4


def test_richardson_lucy_psf_scale_cancels_except_through_filter_epsilon():
    image = star_field(seed=6)
    psf = gaussian_psf(7, 2.5)
    # the PSF is not normalised (as in skimage); its scale cancels between the two
    # convolutions of an iteration, so only filter_epsilon sees it
    np.testing.assert_allclose(
        richardson_lucy(image, 3.0 * psf, iterations=5),
        richardson_lucy(image, psf, iterations=5),
        rtol=1e-10,
    )
    scaled = richardson_lucy(image, 0.5 * psf, iterations=5, filter_epsilon=0.2)
    ref = skimage_restoration.richardson_lucy(
        image, 0.5 * psf, num_iter=5, clip=False, filter_epsilon=0.2
    )
    assert max_rel(scaled, ref) < 1e-4
    unscaled = richardson_lucy(image, psf, iterations=5, filter_epsilon=0.2)
    assert max_rel(scaled, unscaled) > 1e-3


def test_richardson_lucy_dtypes():
    image = star_field(seed=7)
    psf = gaussian_psf(5, 2.0)
    assert richardson_lucy(image.astype(np.float32), psf, iterations=2).dtype == np.float32
    assert richardson_lucy(image.astype(np.float16), psf, iterations=2).dtype == np.float32
    assert richardson_lucy(image.astype(np.int32), psf, iterations=2).dtype == np.float64
    # float32 arithmetic stays close to float64: max|a - b| / max|b| < 1e-4
    a32 = richardson_lucy(image.astype(np.float32), psf, iterations=30)
    a64 = richardson_lucy(image, psf, iterations=30)
    assert max_rel(a32, a64) < 1e-4


def test_richardson_lucy_psf_larger_than_image():
    image = star_field(seed=8, shape=(10, 12), n=2)
    psf = gaussian_psf((15, 17), 3.0)
    ours = richardson_lucy(image, psf, iterations=10)
    ref = skimage_restoration.richardson_lucy(image, psf, num_iter=10, clip=False)
    assert max_rel(ours, ref) < 1e-4


# --------------------------------------------------------------------------- RL sharpens


def test_richardson_lucy_reduces_fwhm_of_isolated_stars():
    """30 iterations shrink the median FWHM (2-D Gaussian fit) of isolated stars by >= 30%."""
    rng = np.random.default_rng(7)
    shape = (160, 160)
    grid = np.arange(20, shape[0] - 19, 24)  # 6 x 6 stars, 24 px apart: isolated
    gx, gy = np.meshgrid(grid, grid)
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    truth = render_gaussians(shape, x, y, rng.uniform(5e3, 2e4, x.size), fwhm=1.5)
    psf = gaussian_psf(25, 4.0)
    sky = 100.0  # ADU
    observed = rng.poisson(fftconvolve(truth, psf, mode="same") + sky).astype(np.float32)

    sharp = richardson_lucy(observed, psf, iterations=30)

    before = np.median([gaussian_fit_fwhm(observed, xi, yi) for xi, yi in zip(x, y, strict=True)])
    after = np.median([gaussian_fit_fwhm(sharp, xi, yi) for xi, yi in zip(x, y, strict=True)])
    # the blurred stars measure about sqrt(1.5**2 + 4**2) = 4.3 px
    assert 3.9 < before < 4.8
    # Acceptance: at least 30% narrower (measured: 4.38 -> 2.65 px, 39%)
    assert after <= 0.7 * before


# --------------------------------------------------------------------------- median_flatten


def _gradient_field(seed: int = 11, shape=(160, 192)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sky = 200.0 + 0.6 * xx + 0.4 * yy + 2e-3 * (xx - 90.0) ** 2  # ADU, ~190 ADU across
    x = np.array([40.3, 100.7, 150.2, 70.5, 130.1])
    y = np.array([50.6, 80.2, 110.9, 120.4, 40.8])
    stars = render_gaussians(shape, x, y, np.full(5, 2e4), fwhm=3.0)
    noise_sigma = 5.0
    image = sky + stars + rng.normal(0.0, noise_sigma, shape)
    return image.astype(np.float32), sky, stars, x, y, noise_sigma


def _block_means(image: np.ndarray, keep: np.ndarray, block: int) -> np.ndarray:
    means = []
    for y0 in range(0, image.shape[0] - block + 1, block):
        for x0 in range(0, image.shape[1] - block + 1, block):
            sel = keep[y0 : y0 + block, x0 : x0 + block]
            means.append(image[y0 : y0 + block, x0 : x0 + block][sel].mean())
    return np.array(means)


def test_median_flatten_removes_gradient_and_keeps_stars():
    image, _sky, stars, x, y, sigma = _gradient_field()
    size = 31
    flat = median_flatten(image, size=size)
    assert flat.dtype == np.float32
    assert flat.min() >= 0.0
    assert flat.min() == 0.0

    # Sky flat within noise away from the stars and the reflect-mode border (size // 2 px):
    # 16x16 block means of star-free pixels scatter by < 1 ADU (sigma / 16 = 0.3 ADU of
    # noise plus the median filter's own ~0.2 ADU), against ~150 ADU before flattening.
    border = size // 2
    inner = (slice(border, -border), slice(border, -border))
    sky_pixels = stars < 1e-3 * sigma
    before = _block_means(image[inner], sky_pixels[inner], 16)
    after = _block_means(flat[inner], sky_pixels[inner], 16)
    assert np.ptp(before) > 100.0
    assert after.std() < 1.0
    assert np.ptp(after) < 4.0

    # Stars keep their peaks above the flattened sky, within 5% (noise is 5 ADU on ~700)
    level = np.median(flat[inner][sky_pixels[inner]])
    for xi, yi in zip(x, y, strict=True):
        r, c = round(yi), round(xi)
        true_peak = stars[r, c]
        got = flat[r, c] - level
        assert got == pytest.approx(true_peak, rel=0.05, abs=3 * sigma)


def test_median_flatten_mask_excludes_garbage_and_keeps_output_finite():
    image, *_ = _gradient_field(seed=12)
    clean = median_flatten(image, size=21)
    dirty = image.copy()
    dirty[60:70, 80:95] = np.nan
    dirty[100:112, 20:60] = 1e6  # a saturated bleed
    dirty[5, 5] = -np.inf
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[60:70, 80:95] = 16
    mask[100:112, 20:60] = 2
    mask[5, 5] = 1

    flat = median_flatten(dirty, size=21, mask=mask)
    good = mask == 0
    assert np.isfinite(flat).all()
    assert flat.min() >= 0.0
    assert flat[good].min() == 0.0
    assert flat[60:70, 80:95].max() == 0.0  # NaN pixels become 0
    assert flat[5, 5] == 0.0

    # Unmasked pixels see the same background as without the defects, within the noise
    # (sigma = 5 ADU; measured max 2.8 ADU); both are shifted to their own minimum, so
    # compare after removing the median difference.
    diff = (flat - clean)[good]
    assert np.max(np.abs(diff - np.median(diff))) < 4.0
    # whereas leaving the bleed unmasked (NaNs set to 0) biases the sky nearby (~12 ADU)
    naive = np.where(np.isfinite(dirty), dirty, 0.0).astype(np.float32)
    naive_diff = (median_flatten(naive, size=21) - clean)[good]
    assert np.max(np.abs(naive_diff - np.median(naive_diff))) > 8.0


def test_median_flatten_refuses_unmasked_nan():
    image = np.ones((32, 32), dtype=np.float32)
    image[3, 4] = np.nan
    with pytest.raises(InputError) as err:
        median_flatten(image, size=5)
    assert err.value.source == "image"
    mask = np.zeros(image.shape, dtype=bool)
    mask[10, 10] = True  # masks something else
    with pytest.raises(InputError, match="outside mask"):
        median_flatten(image, size=5, mask=mask)
    mask[3, 4] = True
    assert np.isfinite(median_flatten(image, size=5, mask=mask)).all()


@pytest.mark.parametrize(
    "kwargs, source",
    [
        ({"size": 0}, "size"),
        ({"size": 4}, "size"),
        ({"size": 3.0}, "size"),
        ({"size": True}, "size"),
        ({"mask": np.zeros((3, 3), dtype=bool)}, "mask"),
        ({"mask": np.ones((16, 16), dtype=bool)}, "mask"),
    ],
)
def test_median_flatten_validates_parameters(kwargs, source):
    with pytest.raises(InputError) as err:
        median_flatten(np.ones((16, 16)), **kwargs)
    assert err.value.source == source


@pytest.mark.parametrize(
    "image", [np.ones(16), np.ones((2, 8, 8)), np.ones((8, 8), dtype=complex), np.ones((0, 4))]
)
def test_median_flatten_validates_image(image):
    with pytest.raises(InputError) as err:
        median_flatten(image, size=3)
    assert err.value.source == "image"


# --------------------------------------------------------------------------- RL validation


def _nan_psf():
    psf = gaussian_psf(5, 2.0)
    psf[0, 0] = np.nan
    return psf


@pytest.mark.parametrize(
    "kwargs, source",
    [
        ({"psf": np.ones(5)}, "psf"),
        ({"psf": np.ones((3, 3, 3))}, "psf"),
        ({"psf": np.ones((0, 3))}, "psf"),
        ({"psf": _nan_psf()}, "psf"),
        ({"psf": gaussian_psf(5, 2.0) - 0.01}, "psf"),
        ({"psf": np.zeros((5, 5))}, "psf"),
        ({"psf": np.ones((3, 3), dtype=complex)}, "psf"),
        ({"iterations": 0}, "iterations"),
        ({"iterations": -3}, "iterations"),
        ({"iterations": 2.0}, "iterations"),
        ({"iterations": True}, "iterations"),
        ({"clip": "yes"}, "clip"),
        ({"filter_epsilon": -1.0}, "filter_epsilon"),
        ({"filter_epsilon": float("nan")}, "filter_epsilon"),
        ({"filter_epsilon": "0.1"}, "filter_epsilon"),
    ],
)
def test_richardson_lucy_validates_parameters(kwargs, source):
    args = {"psf": gaussian_psf(5, 2.0), **kwargs}
    with pytest.raises(InputError) as err:
        richardson_lucy(np.ones((16, 16)), **args)
    assert err.value.source == source


@pytest.mark.parametrize(
    "image", [np.ones(16), np.ones((2, 8, 8)), np.ones((8, 8), dtype=complex), np.ones((0, 4))]
)
def test_richardson_lucy_validates_image(image):
    with pytest.raises(InputError) as err:
        richardson_lucy(image, gaussian_psf(3, 1.5))
    assert err.value.source == "image"


def test_richardson_lucy_refuses_nonfinite_image():
    image = np.ones((16, 16))
    image[2, 2] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        richardson_lucy(image, gaussian_psf(3, 1.5))


def test_richardson_lucy_zero_filter_epsilon_means_no_filter():
    image = star_field(seed=9)
    psf = gaussian_psf(5, 2.0)
    np.testing.assert_array_equal(
        richardson_lucy(image, psf, iterations=5, filter_epsilon=0.0),
        richardson_lucy(image, psf, iterations=5),
    )


def test_richardson_lucy_is_thread_safe():
    image = star_field(seed=10).astype(np.float32)
    psf = gaussian_psf(9, 3.0)
    expected = richardson_lucy(image, psf, iterations=10)
    results: list = [None] * 4

    def work(i: int) -> None:
        results[i] = richardson_lucy(image, psf, iterations=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- devices


def test_same_body_on_each_device(xp):
    """float32 on xp (NumPy, or CuPy on a GPU) agrees with NumPy float64 within 1e-4."""
    host = star_field(seed=13, shape=(100, 136)).astype(np.float32)
    psf = gaussian_psf(11, 3.0)
    image = xp.asarray(host)

    sharp = richardson_lucy(image, xp.asarray(psf), iterations=30, filter_epsilon=0.3)
    assert type(sharp) is type(image)
    assert sharp.dtype == np.float32
    reference = richardson_lucy(host.astype(np.float64), psf, iterations=30, filter_epsilon=0.3)
    # max|a - b| / max|b| < 1e-4
    assert max_rel(sharp, reference) < 1e-4
    # a host PSF with a device image works too
    assert max_rel(richardson_lucy(image, psf, iterations=30, filter_epsilon=0.3), sharp) < 1e-6

    flat = median_flatten(image, size=15)
    assert type(flat) is type(image)
    assert flat.dtype == np.float32
    assert max_rel(flat, median_flatten(host.astype(np.float64), size=15)) < 1e-4
    assert float(flat.min()) == 0.0

    mask = xp.zeros(host.shape, dtype=xp.uint8)
    mask[40:50, 60:70] = 2
    masked = median_flatten(image, size=15, mask=mask)
    assert type(masked) is type(image)
    host_masked = median_flatten(host.astype(np.float64), size=15, mask=to_host(mask))
    assert max_rel(masked, host_masked) < 1e-4
