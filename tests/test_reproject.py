"""reproject / warp_coords / warp_affine against reproject.reproject_interp and direct sums.

"Interior" below means output pixels whose input position is at least the kernel radius
plus one pixel inside the input frame (bilinear 2 px, bicubic 3 px, nearest 1 px): there
the edge rules (reproject clips the outer half pixel; spline boundary conditions) play no
part. The footprints are compared everywhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import SHARED_DATA, run_in_threads

import dagpre.simulate as sim
from dagpre.backend import to_host
from dagpre.ops import warp
from dagpre.ops.warp import ORDERS, Warped, reproject, warp_affine, warp_coords
from dagpre.ops.wcsmap import pixel_map, solve_pixel_map
from dagpre.simulate import _camera_sip, _make_wcs
from dagpre.types import InputError, MaskBit

RTOL = 1e-4  # against reproject_interp in the interior (we see ~1e-7)
RADIUS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos3": 3}
REPROJECT_ORDER = {"nearest": "nearest-neighbor", "bilinear": "bilinear", "bicubic": "bicubic"}
DECAM = SHARED_DATA / "decam" / "input_data" / "DEC-OBS04a.mini.fits"
LCO = SHARED_DATA / "lco_bulge" / "lsc1m005-fl15-20170614-0130-e91_cropped_v2.fits.gz"


def _read(path):
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (../shared/data beside the checkout)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as hdul:
            data = np.asarray(hdul[0].data)
            return data, WCS(hdul[0].header)


def _sim_wcs(shape, sip=True, offset=(3.2, -7.1), rotation=0.15, center=(150.0, -30.0), scale=0.4):
    w, _ = _make_wcs(shape, center, scale, offset, rotation, _camera_sip(shape) if sip else None)
    return w


def _smooth_sky(shape, seed=0):
    """Sky plus smooth structure plus noise: values far from 0, so relative errors mean
    something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = 200.0 + 30.0 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0.0, 2.0, shape)
    return image.astype(np.float32)


def _rotated_tan_like(w, shape, angle_deg=7.0, shift=(3.3, -2.6)):
    """A TAN grid over the same sky as ``w``, rotated and shifted."""
    out = WCS(naxis=2)
    out.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    centre = w.all_pix2world([[0.5 * (shape[1] - 1), 0.5 * (shape[0] - 1)]], 0)[0]
    out.wcs.crval = centre
    out.wcs.crpix = [0.5 * (shape[1] + 1) + shift[0], 0.5 * (shape[0] + 1) + shift[1]]
    scale = np.sqrt(abs(np.linalg.det(w.celestial.pixel_scale_matrix)))
    t = np.radians(angle_deg)
    out.wcs.cd = scale * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return out


def _compare_with_reproject(image, w_in, w_out, shape_out, order):
    reproject_interp = pytest.importorskip("reproject").reproject_interp
    ref, ref_foot = reproject_interp((image, w_in), w_out, shape_out, order=REPROJECT_ORDER[order])
    got = reproject(image, w_in, w_out, shape_out, order, return_footprint=True)
    assert isinstance(got, Warped)
    np.testing.assert_array_equal(got.footprint, ref_foot)
    x_in, y_in = got.mapping.full()
    r = RADIUS[order] + 1
    ny, nx = image.shape
    interior = (x_in >= r) & (x_in <= nx - 1 - r) & (y_in >= r) & (y_in <= ny - 1 - r)
    assert interior.sum() > 0.5 * interior.size
    np.testing.assert_allclose(got.image[interior], ref[interior], rtol=RTOL)
    # where reproject has a value we have one too, and the same NaNs
    np.testing.assert_array_equal(np.isnan(got.image), np.isnan(ref))
    return got


# --------------------------------------------------------------------------- vs reproject


@pytest.mark.parametrize("order", ["nearest", "bilinear", "bicubic"])
def test_simulated_sip_to_tan_matches_reproject(order):
    shape = (192, 224)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, (180, 200))
    got = _compare_with_reproject(_smooth_sky(shape), w_in, w_out, (180, 200), order)
    assert got.image.dtype == np.float32


@pytest.mark.parametrize("order", ["nearest", "bilinear", "bicubic"])
def test_lco_tan_matches_reproject(order):
    data, w = _read(LCO)
    data = data[:200, :240].astype(np.float32)
    w = w[:200, :240]
    _compare_with_reproject(data, w, _rotated_tan_like(w, (200, 240)), (200, 240), order)


@pytest.mark.parametrize("order", ["nearest", "bilinear", "bicubic"])
def test_decam_tpv_matches_reproject(order):
    data, w = _read(DECAM)
    data = data + 1000.0  # the cut-out is sky-subtracted: put a sky back for relative errors
    out = _rotated_tan_like(w, data.shape, angle_deg=-11.0)
    got = _compare_with_reproject(data, w, out, data.shape, order)
    assert got.image.dtype == np.float64


def test_reproject_to_a_simulated_night_frame():
    night = sim.night(n_frames=2, shape=(128, 128), n_stars=60, seed=5, sip=True)
    a, b = night.frames
    image = (a.data + 100.0).astype(np.float32)  # away from 0 for relative errors
    _compare_with_reproject(image, a.wcs, b.wcs, (128, 128), "bilinear")


# --------------------------------------------------------------------------- lanczos3


def _lanczos3_direct(image, x, y):
    """SWarp's lanczos3 at one position by a plain double loop (edge pixels repeated)."""
    ny, nx = image.shape
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    ix, iy = int(np.floor(x)), int(np.floor(y))

    def weights(t):
        if t < 1e-5:
            return np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
        w = np.array([np.sinc(t - k) * np.sinc((t - k) / 3.0) for k in range(-2, 4)])
        return w / w.sum()

    wx, wy = weights(x - ix), weights(y - iy)
    total = 0.0
    for j in range(-2, 4):
        for i in range(-2, 4):
            yy = min(max(iy + j, 0), ny - 1)
            xx = min(max(ix + i, 0), nx - 1)
            total += wy[j + 2] * wx[i + 2] * image[yy, xx]
    return total


def test_lanczos3_matches_a_direct_sum():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(23, 31))
    ny, nx = image.shape
    xs = rng.uniform(-0.5, nx - 0.5, (9, 11))
    ys = rng.uniform(-0.5, ny - 0.5, (9, 11))
    xs[0, :4] = [3.0, -0.5, nx - 0.5, 1.0 + 1e-7]  # on a centre, on the edges
    ys[0, :4] = [4.0, -0.5, ny - 0.5, 2.0]
    got = warp_coords(image, xs, ys, "lanczos3")
    ref = np.vectorize(lambda x, y: _lanczos3_direct(image, x, y))(xs, ys)
    np.testing.assert_allclose(got.image, ref, rtol=0, atol=1e-12)
    assert got.image.dtype == np.float64


def test_lanczos3_shifts_a_band_limited_image():
    """A fractional shift of a sum of low-frequency waves is the shifted waves, to the
    accuracy of Lanczos-3 itself (its normalised kernel does not reproduce a linear ramp
    exactly: ~0.5 % of the wave amplitude here), and much better than bilinear."""
    shape = (96, 96)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)

    def waves(x, y):
        return 100.0 + 5 * np.sin(0.31 * x + 0.2 * y) + 3 * np.cos(0.17 * x - 0.43 * y + 1.0)

    dx, dy = 0.37, -0.61
    matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
    inner = (slice(8, -8), slice(8, -8))
    expected = waves(x - dx, y - dy)[inner]
    errors = {
        order: np.max(np.abs(warp_affine(waves(x, y), matrix, order=order).image[inner] - expected))
        for order in ("bilinear", "lanczos3")
    }
    assert errors["lanczos3"] < 0.05
    assert errors["lanczos3"] < 0.3 * errors["bilinear"]


# --------------------------------------------------------------------------- NaN and masks


def _taps_touching(x_in, y_in, order, shape, pixel):
    """Outputs whose taps include ``pixel`` (y, x), from the clipped input positions."""
    ny, nx = shape
    xc = np.clip(x_in, 0, nx - 1)
    yc = np.clip(y_in, 0, ny - 1)
    lo, hi = warp._TAPS[order]
    bx = np.floor(xc + 0.5) if order == "nearest" else np.floor(xc)
    by = np.floor(yc + 0.5) if order == "nearest" else np.floor(yc)
    # taps beyond the edge repeat (edge) or mirror (bicubic) the edge pixel; the test
    # pixel sits well inside, so only direct hits count
    return (
        (pixel[1] - bx >= lo)
        & (pixel[1] - bx <= hi)
        & (pixel[0] - by >= lo)
        & (pixel[0] - by <= hi)
    )


@pytest.mark.parametrize("order", ORDERS)
def test_nan_reaches_only_the_outputs_whose_taps_touch_it(order):
    shape = (64, 80)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, shape, angle_deg=20.0)
    image = _smooth_sky(shape, seed=1)
    holed = image.copy()
    holed[30, 40] = np.nan
    clean = reproject(image, w_in, w_out, shape, order)
    got = reproject(holed, w_in, w_out, shape, order, return_footprint=True)
    x_in, y_in = got.mapping.full()
    touch = _taps_touching(x_in, y_in, order, shape, (30, 40)) & (got.footprint == 1)
    # about (2 r)^2 outputs (not exactly: the output grid is rotated 20 deg)
    assert 0.5 * (2 * RADIUS[order] or 1) ** 2 <= touch.sum() <= 2 * (2 * RADIUS[order] or 1) ** 2
    np.testing.assert_array_equal(np.isnan(got.image) & (got.footprint == 1), touch)
    rest = ~touch & (got.footprint == 1)
    if order == "bicubic":  # the prefilter sees the hole filled with its local mean
        np.testing.assert_allclose(got.image[rest], clean[rest], rtol=0, atol=2.0)
    else:
        np.testing.assert_array_equal(got.image[rest], clean[rest])


@pytest.mark.parametrize("order", ORDERS)
def test_mask_bits_are_ored_over_the_taps(order):
    shape = (50, 60)
    image = _smooth_sky(shape, seed=2)
    image[10, 12] = np.nan
    mask = np.zeros(shape, np.uint8)
    mask[20, 30] = MaskBit.SATURATED
    mask[21, 31] = MaskBit.COSMIC
    matrix = np.array([[1.0, 0.05, 2.3], [-0.04, 1.0, -1.6], [0.0, 0.0, 1.0]])
    got = warp_affine(image, matrix, order=order, mask=mask)
    inv = np.linalg.inv(matrix)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    x_in = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]
    y_in = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
    on = got.footprint == 1
    sat = _taps_touching(x_in, y_in, order, shape, (20, 30)) & on
    cr = _taps_touching(x_in, y_in, order, shape, (21, 31)) & on
    nan = _taps_touching(x_in, y_in, order, shape, (10, 12)) & on
    np.testing.assert_array_equal((got.mask & MaskBit.SATURATED) != 0, sat)
    np.testing.assert_array_equal((got.mask & MaskBit.COSMIC) != 0, cr)
    np.testing.assert_array_equal((got.mask & MaskBit.NONFINITE) != 0, nan)
    np.testing.assert_array_equal((got.mask & MaskBit.OFF_FOOTPRINT) != 0, ~on)
    assert not on.all() and on.any()
    assert np.isnan(got.image[~on]).all()
    assert got.mask.dtype == np.uint8


# --------------------------------------------------------------------------- flux


@pytest.mark.parametrize(
    ("order", "tol"), [("bilinear", 1e-3), ("bicubic", 1e-4), ("lanczos3", 1e-4)]
)
def test_conserve_flux_on_a_coarser_grid(order, tol):
    """Stars (no sky) resampled onto a grid of pixels twice as large, rotated 17 deg: the
    total flux is kept (bilinear ~2e-4, bicubic ~1e-6 here)."""
    shape = (256, 256)
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.zeros(shape)
    for _ in range(40):
        cx, cy = rng.uniform(60, 196, 2)
        flux, s = rng.uniform(100, 1000), 1.6
        image += flux / (2 * np.pi * s * s) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    image = image.astype(np.float32)
    w_in = _sim_wcs(shape, offset=(0, 0), rotation=0.0)
    w_out = _sim_wcs((128, 128), sip=False, offset=(0.3, -0.2), rotation=17.0, scale=0.8)
    out = reproject(image, w_in, w_out, (128, 128), order, conserve_flux=True)
    assert abs(np.nansum(out) / image.sum() - 1.0) < tol
    plain = reproject(image, w_in, w_out, (128, 128), order)
    assert abs(np.nansum(plain) / image.sum() - 0.25) < 0.01  # 4 input pixels per output


def test_affine_flux_factor_and_projective_matrix():
    image = np.full((40, 40), 3.0, np.float32)
    shrink = np.diag([0.5, 0.5, 1.0])  # target pixels are 2x larger: 4 source px each
    got = warp_affine(image, shrink, (20, 20), conserve_flux=True)
    np.testing.assert_allclose(got.image, 12.0, rtol=1e-6)
    ramp = np.add.outer(np.arange(40.0), np.arange(40.0)).astype(np.float32)
    tilt = np.array([[0.9, 0.1, 2.0], [-0.1, 0.9, 1.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(  # a homogeneous matrix means the same at any scale
        warp_affine(ramp, 2.0 * tilt).image, warp_affine(ramp, tilt).image, rtol=1e-6
    )
    proj = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1e-3, 2e-3, 1.0]])
    got = warp_affine(image, proj, conserve_flux=True)
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float64)
    inv = np.linalg.inv(proj)
    w = inv[2, 0] * xx + inv[2, 1] * yy + inv[2, 2]
    expected = 3.0 * abs(np.linalg.det(inv)) / np.abs(w) ** 3
    on = got.footprint == 1
    np.testing.assert_allclose(got.image[on], expected[on], rtol=1e-5)


def test_warp_coords_flux_from_gradients():
    image = np.full((30, 30), 2.0)
    y, x = np.mgrid[0:15, 0:15].astype(np.float64)
    got = warp_coords(image, 2.0 * x, 2.0 * y, conserve_flux=True)
    np.testing.assert_allclose(got.image, 8.0)


# --------------------------------------------------------------------------- affine vs scipy


@pytest.mark.parametrize("order", ["nearest", "bilinear", "bicubic"])
def test_warp_affine_matches_scipy_map_coordinates(order):
    from scipy.ndimage import map_coordinates

    image = _smooth_sky((70, 90), seed=4).astype(np.float64)
    matrix = np.array([[0.98, 0.1, 4.2], [-0.12, 1.02, -3.1], [0.0, 0.0, 1.0]])
    got = warp_affine(image, matrix, (60, 80), order)
    inv = np.linalg.inv(matrix)
    y, x = np.mgrid[0:60, 0:80].astype(np.float64)
    x_in = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]
    y_in = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
    k = {"nearest": 0, "bilinear": 1, "bicubic": 3}[order]
    ref = map_coordinates(image, [y_in, x_in], order=k, mode="constant", cval=np.nan)
    r = RADIUS[order] + 1
    interior = (x_in >= r) & (x_in <= 89 - r) & (y_in >= r) & (y_in <= 69 - r)
    np.testing.assert_allclose(got.image[interior], ref[interior], rtol=1e-12)


# --------------------------------------------------------------------------- API


def test_return_types_and_mapping_reuse():
    shape = (64, 64)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, shape)
    image = _smooth_sky(shape)
    plain = reproject(image, w_in, w_out, shape)
    assert isinstance(plain, np.ndarray) and plain.shape == shape
    full = reproject(image, w_in, w_out, shape, return_footprint=True)
    assert full.mask is None and full.footprint.dtype == np.float32
    again = reproject(image + 1, w_in, w_out, shape, mapping=full.mapping)
    np.testing.assert_allclose(again, plain + 1, rtol=1e-6)
    with_mask = reproject(image, w_in, w_out, shape, mask=np.zeros(shape, np.uint8))
    assert isinstance(with_mask, Warped) and with_mask.mask.shape == shape
    ints = reproject(image.astype(np.int16), w_in, w_out, shape)
    assert ints.dtype == np.float32
    x_in, y_in = pixel_map(w_in, w_out, shape)
    by_coords = warp_coords(image, x_in, y_in)
    np.testing.assert_array_equal(by_coords.image, plain)


def test_errors_are_input_errors_naming_the_cause():
    shape = (32, 32)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, shape)
    image = _smooth_sky(shape)
    with pytest.raises(InputError, match=r"order: expected one of \('nearest', 'bilinear'"):
        reproject(image, w_in, w_out, shape, order="cubic")
    with pytest.raises(InputError, match="mask: shape"):
        reproject(image, w_in, w_out, shape, mask=np.zeros((31, 32), np.uint8))
    with pytest.raises(InputError, match="image: expected a 2-D"):
        reproject(image[0], w_in, w_out, shape)
    with pytest.raises(InputError, match="shape_out"):
        reproject(image, w_in, w_out, (0, 32))
    lin = WCS(naxis=2)
    lin.wcs.ctype = ["LINEAR", "LINEAR"]
    with pytest.raises(InputError, match="wcs_out: has no celestial axes"):
        reproject(image, w_in, lin, shape)
    far = _rotated_tan_like(w_in, shape)
    far.wcs.crval = [far.wcs.crval[0] + 1.0, far.wcs.crval[1]]
    with pytest.raises(InputError, match="no overlap"):
        reproject(image, w_in, far, shape)
    sized = w_in.deepcopy()
    sized.pixel_shape = (40, 32)
    with pytest.raises(InputError, match="differs from wcs_in's NAXIS"):
        reproject(image, sized, w_out, shape)
    other = solve_pixel_map(w_in, w_out, (16, 16))
    with pytest.raises(InputError, match="mapping"):
        reproject(image, w_in, w_out, shape, mapping=other)
    with pytest.raises(InputError, match="matrix: is singular"):
        warp_affine(image, np.zeros((3, 3)))
    with pytest.raises(InputError, match="no overlap"):
        warp_affine(image, np.array([[1.0, 0, 500.0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(InputError, match="y_in"):
        warp_coords(image, np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="threads"):
        reproject(image, w_in, w_out, shape, threads=0)


# --------------------------------------------------------------------------- threads


def test_threads_give_serial_results():
    shape = (160, 200)
    w_out = _rotated_tan_like(_sim_wcs(shape), shape)
    frames = [
        (_smooth_sky(shape, seed=k), _sim_wcs(shape, offset=(k, -k), rotation=0.1 * k))
        for k in range(4)
    ]
    serial = [reproject(img, w, w_out, shape, "bicubic", threads=1) for img, w in frames]
    threaded = run_in_threads(lambda f: reproject(f[0], f[1], w_out, shape, "bicubic"), frames)
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_band_threads_do_not_change_the_result(monkeypatch):
    shape = (120, 100)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, shape)
    image = _smooth_sky(shape)
    monkeypatch.setattr(warp, "_CPU_BAND_PIXELS", 500)  # 5 rows a band: many bands
    one = reproject(image, w_in, w_out, shape, "lanczos3", threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(
            reproject(image, w_in, w_out, shape, "lanczos3", threads=threads), one
        )


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
def test_cupy_matches_numpy(xp, order):
    shape = (300, 260)
    w_in = _sim_wcs(shape)
    w_out = _rotated_tan_like(w_in, shape)
    image = _smooth_sky(shape, seed=6)
    image[100, 120] = np.nan
    mask = np.zeros(shape, np.uint8)
    mask[50, 60] = MaskBit.BAD
    ref = reproject(image, w_in, w_out, shape, order, mask=mask, conserve_flux=True)
    got = reproject(
        xp.asarray(image), w_in, w_out, shape, order, mask=xp.asarray(mask), conserve_flux=True
    )
    assert type(got.image) is type(xp.asarray(image))
    np.testing.assert_allclose(to_host(got.image), ref.image, rtol=1e-5)
    np.testing.assert_array_equal(to_host(got.footprint), ref.footprint)
    np.testing.assert_array_equal(to_host(got.mask), ref.mask)
    matrix = np.array([[1.0, 0.02, 1.5], [-0.02, 1.0, -2.5], [0.0, 0.0, 1.0]])
    a = warp_affine(image, matrix, order=order)
    b = warp_affine(xp.asarray(image), matrix, order=order)
    np.testing.assert_allclose(to_host(b.image), a.image, rtol=1e-5)
