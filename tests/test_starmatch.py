"""find_transform and find_stars against simulated truth, astroalign and real frames."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import run_in_threads

from dagpre import simulate
from dagpre.ops.detect import detect_sources
from dagpre.ops.starmatch import Transform, find_stars, find_transform
from dagpre.simulate import render_sources
from dagpre.types import Catalog, Frame, InputError, MaskBit

SHAPE = (1024, 1024)
CENTRE = (511.5, 511.5)


# --------------------------------------------------------------------------- helpers


def _similarity(angle_deg, shift, scale=1.0, centre=CENTRE) -> np.ndarray:
    """Rotation by ``angle_deg`` (from +x towards +y) and scale about ``centre``, then shift."""
    t = math.radians(angle_deg)
    a = scale * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    c = np.asarray(centre, dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = c - a @ c + np.asarray(shift, dtype=np.float64)
    return m


def _apply(m, xy):
    return xy @ m[:2, :2].T + m[:2, 2]


def _grid_error(m1, m2, shape=SHAPE, n=33) -> tuple[float, float]:
    """RMS and largest distance (px) between two mappings on an n x n grid over the frame."""
    gx, gy = np.meshgrid(np.linspace(0, shape[1] - 1, n), np.linspace(0, shape[0] - 1, n))
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    d = np.hypot(*(_apply(m1, xy) - _apply(m2, xy)).T)
    return float(np.sqrt(np.mean(d**2))), float(d.max())


def _field(n_stars, seed, shape=SHAPE, margin=80):
    """Star positions over the frame and a margin around it, log-uniform fluxes (ADU)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n = int(n_stars * (nx + 2 * margin) * (ny + 2 * margin) / (nx * ny))
    xy = np.column_stack(
        [rng.uniform(-margin, nx + margin, n), rng.uniform(-margin, ny + margin, n)]
    )
    flux = np.exp(rng.uniform(math.log(300.0), math.log(3e5), n))
    return xy, flux


def _observe(xy, flux, fwhm, seed, shape=SHAPE, sky=300.0, gain=2.0, rdnoise=5.0):
    """One exposure as the simulator makes it: Moffat stars + sky, Poisson and read noise."""
    rng = np.random.default_rng(seed)
    lam = render_sources(shape, xy[:, 0], xy[:, 1], flux * gain, fwhm, "moffat", 3.0)
    lam += sky * gain
    electrons = rng.poisson(lam).astype(np.float32)
    electrons += rng.standard_normal(shape, dtype=np.float32) * np.float32(rdnoise)
    return electrons / np.float32(gain)


def _epoch_pair(matrix, seed, n_stars=700, fwhm=(2.8, 3.5), shape=SHAPE):
    """(source, target) images of one field: the target sees every star at matrix @ source."""
    xy, flux = _field(n_stars, seed, shape)
    source = _observe(xy, flux, fwhm[0], seed + 1, shape)
    target = _observe(_apply(matrix, xy), flux, fwhm[1], seed + 2, shape)
    return source, target


def _star_lists(matrix, seed, n=300, sigma=0.03, shape=(2048, 2048)):
    """(source, target) (N, 3) lists x, y, flux of the stars on each frame, noisy positions."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-60, shape[1] + 60, (n, 2))
    flux = np.exp(rng.uniform(6.0, 12.0, n))
    txy = _apply(matrix, xy)

    def on(p):
        return (p[:, 0] >= 0) & (p[:, 0] < shape[1]) & (p[:, 1] >= 0) & (p[:, 1] < shape[0])

    src = np.column_stack([xy + rng.normal(0, sigma, xy.shape), flux])[on(xy)]
    dst = np.column_stack([txy + rng.normal(0, sigma, xy.shape), flux])[on(txy)]
    return src, dst


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("angle", "shift", "seed"),
    [
        (0.0, (0.0, 0.0), 10),
        (0.3, (12.3, -7.8), 20),
        (-0.7, (-50.0, 35.2), 30),
        (1.0, (45.5, -49.2), 40),
        (-1.0, (3.7, 48.9), 50),
    ],
)
def test_similarity_within_0005_px_of_truth_across_the_frame(angle, shift, seed):
    """Simulated epochs (different seeing and noise): the mapping is within 0.005 px RMS."""
    truth = _similarity(angle, shift)
    source, target = _epoch_pair(truth, seed)
    tr = find_transform(source, target)
    rms, worst = _grid_error(tr.matrix, truth)
    assert rms < 0.005, (rms, worst, tr)
    assert worst < 0.01
    assert tr.model == "similarity" and tr.n_matches > 200
    assert tr.rms < 0.2  # residuals of single stars: centroid noise of both frames
    assert abs(tr.rotation - angle) < 1e-3 and abs(tr.scale - 1.0) < 1e-5


def test_simulated_night_frames_against_their_wcs():
    """Frames of dagpre.simulate.night are matched to 0.005 px RMS of their WCS truth.

    They have saturated stars with bleed trails, cosmic rays, hot pixels, PSF and sky changes
    and rotations up to 1 deg; two TAN WCS with one CRVAL make an exact similarity.
    """
    night = simulate.night(
        n_frames=2, shape=SHAPE, n_stars=1500, seed=7, max_offset=40.0, max_rotation=1.0
    )
    f0, f1 = night.frames
    a = np.linalg.solve(f1.wcs.pixel_scale_matrix, f0.wcs.pixel_scale_matrix)
    truth = np.eye(3)
    truth[:2, :2] = a
    truth[:2, 2] = (f1.wcs.wcs.crpix - 1.0) - a @ (f0.wcs.wcs.crpix - 1.0)  # 0-based pixels
    rotation = f1.conditions["rotation_deg"] - f0.conditions["rotation_deg"]
    assert abs(rotation) > 0.3
    for source, target in ((f0.data, f1.data), (f0.to_frame(truth_mask=True), f1.to_frame())):
        tr = find_transform(source, target)
        assert _grid_error(tr.matrix, truth)[0] < 0.005, tr
        assert tr.n_matches > 400


def test_affine_model_recovers_shear_that_a_similarity_cannot():
    truth = np.array([[1.0015, 0.0030, 21.25], [-0.0020, 0.9990, -14.5], [0.0, 0.0, 1.0]])
    source, target = _epoch_pair(truth, seed=60)
    affine = find_transform(source, target, model="affine")
    assert _grid_error(affine.matrix, truth)[0] < 0.005
    similar = find_transform(source, target, model="similarity")
    assert _grid_error(similar.matrix, truth)[0] > 0.3  # the model cannot follow the shear
    assert similar.rms > affine.rms


def test_shift_model_on_a_pure_translation():
    truth = _similarity(0.0, (-37.25, 18.5))
    source, target = _epoch_pair(truth, seed=70)
    tr = find_transform(source, target, model="shift")
    assert _grid_error(tr.matrix, truth)[0] < 0.005
    assert np.array_equal(tr.matrix[:2, :2], np.eye(2))


def test_scale_change_between_instruments():
    truth = _similarity(0.4, (5.0, -8.0), scale=1.02)
    source, target = _epoch_pair(truth, seed=80, fwhm=(3.0, 3.0))
    tr = find_transform(source, target)
    assert _grid_error(tr.matrix, truth)[0] < 0.005
    assert tr.scale == pytest.approx(1.02, abs=2e-6)


def test_windowed_positions_beat_isophotal_barycentres():
    xy, flux = _field(700, seed=90)
    image = _observe(xy, flux, 3.0, seed=91)
    stars = find_stars(image, gain=2.0, binning=1)  # isophotal positions at full resolution
    assert 300 < len(stars) <= 1000
    assert list(stars["flux"]) == sorted(stars["flux"], reverse=True)
    from scipy.spatial import cKDTree

    def errors(x, y):
        d, _ = cKDTree(xy).query(np.column_stack([x, y]))
        return d

    win = errors(stars["x"], stars["y"])
    iso = errors(stars["x_det"], stars["y_det"])
    assert np.median(win) < 0.7 * np.median(iso)
    # with the gain, the windowed variances describe the errors: a 2-D error of unit
    # variance per axis has a median length of sqrt(2 ln 2) = 1.18 (neighbours add a tail)
    z = win / np.sqrt(0.5 * (stars["errx2"] + stars["erry2"]))
    assert 0.9 < np.median(z) < 1.6


# --------------------------------------------------------------------------- star lists


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_astroalign_on_the_same_star_lists(seed):
    """Same lists: within 0.1 px of astroalign's matrix everywhere on a 2048^2 frame.

    astroalign fits its ~50 control stars only; we fit every matched star, so we are also
    closer to the truth.
    """
    aa = pytest.importorskip("astroalign")
    rng = np.random.default_rng(seed)
    truth = _similarity(rng.uniform(-1, 1), rng.uniform(-50, 50, 2), centre=(1023.5, 1023.5))
    src, dst = _star_lists(truth, seed)
    ours = find_transform(src, dst)
    theirs, _ = aa.find_transform(src[:, :2], dst[:, :2])  # lists already brightest first
    shape = (2048, 2048)
    assert _grid_error(ours.matrix, theirs.params, shape)[1] < 0.1
    assert _grid_error(ours.matrix, truth, shape)[0] <= _grid_error(theirs.params, truth, shape)[0]
    assert ours.n_matches > 200


def test_lists_with_missing_and_spurious_stars_give_the_right_pairs():
    rng = np.random.default_rng(5)
    truth = _similarity(0.8, (30.2, -41.7), scale=1.0005, centre=(1023.5, 1023.5))
    n = 400
    xy = rng.uniform(0, 2048, (n, 2))
    flux = np.exp(rng.uniform(5, 12, n))
    src = np.column_stack([xy + rng.normal(0, 0.02, xy.shape), flux])
    kept = rng.permutation(n)[:300]  # a quarter of the stars missing from the target
    common = np.column_stack(
        [_apply(truth, xy[kept]) + rng.normal(0, 0.02, (300, 2)), flux[kept] * 1.1]
    )
    spurious = np.column_stack([rng.uniform(0, 2048, (120, 2)), np.exp(rng.uniform(5, 12, 120))])
    rows = np.vstack([common, spurious])
    order = rng.permutation(rows.shape[0])
    dst = rows[order]
    tr = find_transform(src, dst)
    true_target = np.full(n, -1)
    true_target[kept] = np.argsort(order)[:300]  # row of each kept star in the shuffled list
    assert np.array_equal(tr.target_index, true_target[tr.source_index])
    assert tr.n_matches >= 295
    assert _grid_error(tr.matrix, truth, (2048, 2048))[0] < 0.005
    np.testing.assert_allclose(tr.source_xy, src[tr.source_index, :2])
    np.testing.assert_allclose(tr.target_xy, dst[tr.target_index, :2])


def test_partial_overlap():
    """The target sees only the right 40 % of the source field."""
    rng = np.random.default_rng(6)
    truth = _similarity(0.5, (-1200.0, 20.0), centre=(1023.5, 1023.5))
    xy = rng.uniform(0, 2048, (600, 2))
    flux = np.exp(rng.uniform(5, 12, 600))
    txy = _apply(truth, xy)
    on = (txy[:, 0] >= 0) & (txy[:, 0] < 2048) & (txy[:, 1] >= 0) & (txy[:, 1] < 2048)
    tr = find_transform(np.column_stack([xy, flux]), np.column_stack([txy[on], flux[on]]))
    assert tr.n_matches == on.sum()
    assert _grid_error(tr.matrix, truth, (2048, 2048))[1] < 1e-8


def test_catalog_inputs_and_weights():
    """A dagpre Catalog: x, y ranked by flux, weighted by errx2 + erry2, flagged rows skipped."""
    rng = np.random.default_rng(7)
    truth = _similarity(-0.2, (3.0, 4.0))
    xy = rng.uniform(0, 1024, (200, 2))
    flux = np.exp(rng.uniform(5, 12, 200))
    flag = np.zeros(200, dtype=np.int16)
    flag[:10] = 2  # truncated: not used
    err2 = np.full(200, 1e-4)
    src = Catalog({"x": xy[:, 0], "y": xy[:, 1], "flux": flux, "flag": flag})
    txy = _apply(truth, xy)
    dst = Catalog({"x": txy[:, 0], "y": txy[:, 1], "flux": flux, "errx2": err2, "erry2": err2})
    tr = find_transform(src, dst)
    assert tr.n_matches == 190
    assert not set(tr.source_index.tolist()) & set(range(10))
    assert _grid_error(tr.matrix, truth)[1] < 1e-8
    # a plain mapping, and (N, 2) rows without flux, work the same
    tr2 = find_transform({"x": xy[:, 0], "y": xy[:, 1]}, txy)
    assert tr2.n_matches == 200


def test_images_and_their_find_stars_catalogs_give_the_same_transform():
    truth = _similarity(0.6, (-20.0, 11.0))
    source, target = _epoch_pair(truth, seed=100, n_stars=400)
    from_images = find_transform(source, target)
    from_catalogs = find_transform(find_stars(source), find_stars(target))
    np.testing.assert_array_equal(from_images.matrix, from_catalogs.matrix)
    np.testing.assert_array_equal(from_images.source_index, from_catalogs.source_index)
    mixed = find_transform(source, find_stars(target))
    np.testing.assert_array_equal(from_images.matrix, mixed.matrix)


def test_frame_mask_removes_stars_and_raw_detection_catalogs_work():
    truth = _similarity(0.2, (9.0, -6.0))
    source, target = _epoch_pair(truth, seed=110, n_stars=400)
    stars = find_stars(source)
    x0, y0 = round(float(stars["x"][0])), round(float(stars["y"][0]))
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[y0, x0] = MaskBit.SATURATED
    masked = find_stars(Frame(source, mask, meta={"gain": 2.0}))
    assert np.min(np.hypot(masked["x"] - stars["x"][0], masked["y"] - stars["y"][0])) > 1.0
    tr = find_transform(Frame(source, mask), target)
    assert _grid_error(tr.matrix, truth)[0] < 0.005
    # a detect_sources catalog (isophotal positions, flags) as the target
    from dagpre.ops.background import estimate_background

    bkg = estimate_background(target)
    cat = detect_sources(bkg.subtract(target), thresh=5.0, err=bkg.global_rms, deblend_cont=1.0)
    tr = find_transform(stars, cat)
    assert _grid_error(tr.matrix, truth)[0] < 0.05  # isophotal barycentres: less precise


# --------------------------------------------------------------------------- behaviour


def test_two_runs_are_identical():
    src, dst = _star_lists(_similarity(0.9, (40.0, -10.0), centre=(1023.5, 1023.5)), seed=8)
    a = find_transform(src, dst)
    b = find_transform(src, dst)
    assert np.array_equal(a.matrix, b.matrix)
    assert np.array_equal(a.source_index, b.source_index)
    assert np.array_equal(a.target_index, b.target_index)
    assert a.rms == b.rms


def test_thread_safety():
    truth = _similarity(-0.4, (14.0, 27.0))
    source, target = _epoch_pair(truth, seed=120, n_stars=300, shape=(512, 512))
    serial = find_transform(source, target, threads=1)
    results = run_in_threads(lambda _: find_transform(source, target), list(range(4)))
    for r in results:
        assert np.array_equal(r.matrix, serial.matrix)
        assert np.array_equal(r.source_index, serial.source_index)


def test_transform_methods():
    truth = _similarity(0.7, (12.0, -3.0), scale=1.01)
    src, dst = _star_lists(truth, seed=9, sigma=0.0)
    tr = find_transform(src, dst)
    x, y = tr.apply(src[:, 0], src[:, 1])
    inv = tr.inverse()
    xb, yb = inv.apply(x, y)
    np.testing.assert_allclose(xb, src[:, 0], atol=1e-9)
    np.testing.assert_allclose(yb, src[:, 1], atol=1e-9)
    assert inv.n_matches == tr.n_matches
    assert np.array_equal(inv.source_index, tr.target_index)
    assert tr.rotation == pytest.approx(0.7, abs=1e-9)
    assert inv.rotation == pytest.approx(-0.7, abs=1e-9)
    assert tr.scale == pytest.approx(1.01, abs=1e-12)
    assert np.abs(tr.residuals).max() < 1e-9
    assert tr.rms < 1e-9 and inv.rms < 1e-9
    with pytest.raises(ValueError):
        tr.matrix[0, 0] = 2.0  # read-only
    t2 = Transform(truth[:2])  # a 2x3 matrix is completed
    assert t2.matrix.shape == (3, 3) and t2.n_matches == 0 and math.isnan(t2.rms)
    assert "similarity" in repr(tr)


# --------------------------------------------------------------------------- errors


def test_too_few_stars():
    src, dst = _star_lists(_similarity(0.1, (1.0, 2.0)), seed=11)
    with pytest.raises(InputError, match=r"^source: only 2 usable stars .*need >= 3"):
        find_transform(src[:2], dst)
    with pytest.raises(InputError, match=r"^target: only 5 usable stars .*need >= 6"):
        find_transform(src, dst[:5])
    # 8 stars each in a 2048 px frame, 3 of them common: too few matched
    with pytest.raises(InputError, match=r"stars? matched|no consistent transform"):
        find_transform(src[:8], np.vstack([dst[:3], src[100:105]]))


def test_blank_frame_is_named():
    truth = _similarity(0.0, (5.0, 5.0))
    source, _ = _epoch_pair(truth, seed=130, n_stars=200, shape=(256, 256))
    flat = np.full((256, 256), 100.0, dtype=np.float32)
    with pytest.raises(InputError, match=r"^target: no sources detected .*blank frame"):
        find_transform(source, flat)
    noise = np.random.default_rng(0).normal(100.0, 5.0, (256, 256)).astype(np.float32)
    with pytest.raises(InputError, match=r"^source: (no sources detected|only \d+ usable)"):
        find_transform(noise, source)


def test_no_overlap_is_reported():
    rng = np.random.default_rng(12)
    a = np.column_stack([rng.uniform(0, 2048, (400, 2)), np.exp(rng.uniform(5, 12, 400))])
    b = np.column_stack([rng.uniform(0, 2048, (400, 2)), np.exp(rng.uniform(5, 12, 400))])
    with pytest.raises(InputError, match=r"no consistent transform.*do the fields overlap"):
        find_transform(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "rigid"}, "model"),
        ({"pixel_tol": -1.0}, "pixel_tol"),
        ({"max_control_points": 2}, "max_control_points"),
        ({"min_matches": 2}, "min_matches"),
        ({"max_stars": 0}, "max_stars"),
        ({"invariant_tol": math.nan}, "invariant_tol"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, match):
    src, dst = _star_lists(_similarity(0.1, (1.0, 2.0)), seed=13)
    with pytest.raises(InputError, match=f"^{match}"):
        find_transform(src, dst, **kwargs)


def test_bad_inputs_name_the_input():
    src, _ = _star_lists(_similarity(0.1, (1.0, 2.0)), seed=14)
    with pytest.raises(InputError, match=r"^target: expected an image with both sides"):
        find_transform(src, np.zeros((100, 4)))
    with pytest.raises(InputError, match=r"^source: a catalog needs 'x' and 'y'"):
        find_transform({"ra": np.zeros(3)}, src)
    with pytest.raises(InputError, match=r"^target"):
        find_transform(src, np.zeros(5))


# --------------------------------------------------------------------------- devices, data


def test_backends_agree(xp):
    """The same images on NumPy and CuPy give the same stars and transform.

    Backgrounds and detections agree to float rounding, so a borderline star may come or
    go; positions of the stars both find agree to 1e-4 px and the mappings to 1e-3 px.
    """
    from scipy.spatial import cKDTree

    truth = _similarity(0.3, (-8.0, 15.0))
    source, target = _epoch_pair(truth, seed=140, n_stars=300, shape=(512, 512))
    reference = find_transform(source, target)
    tr = find_transform(xp.asarray(source), xp.asarray(target))
    assert _grid_error(tr.matrix, reference.matrix, (512, 512))[1] < 1e-3
    assert isinstance(tr.matrix, np.ndarray)
    xt, _ = tr.apply(xp.asarray([1.0, 2.0]), xp.asarray([3.0, 4.0]))
    assert type(xt) is type(xp.asarray([1.0]))
    on_device = find_stars(xp.asarray(source))
    on_host = find_stars(source)
    assert isinstance(on_device["x"], np.ndarray)
    assert abs(len(on_device) - len(on_host)) <= 0.01 * len(on_host)
    dist, _ = cKDTree(np.column_stack([on_host["x"], on_host["y"]])).query(
        np.column_stack([on_device["x"], on_device["y"]])
    )
    assert np.mean(dist < 1e-4) > 0.98


def test_crowded_real_frame_against_a_shifted_crop_of_itself(shared_data):
    """LCO bulge frame: two overlapping crops of the same pixels differ by a pure shift."""
    path = shared_data / "lco_bulge" / "lsc1m005-fl15-20170614-0130-e91_cropped_v2.fits.gz"
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent")
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = fits.getdata(path, 0).astype(np.float32)
    source = data[0:340, 0:340]
    target = data[23:363, 41:381]  # target pixel = source pixel - (41, 23)
    for model in ("similarity", "affine", "shift"):
        tr = find_transform(source, target, model=model)
        expected = _similarity(0.0, (-41.0, -23.0))
        # the same pixels: only the local sky differs (each crop has its own background map)
        assert _grid_error(tr.matrix, expected, (340, 340))[1] < 0.01
        assert tr.n_matches > 20  # few stars stand 5 sigma above the bulge's unresolved light
