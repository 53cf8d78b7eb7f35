"""dagpre.simulate: determinism, WCS truth, truth tables, rendering, noise and defects."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import dagpre as dp
from dagpre import simulate
from dagpre.backend import to_host
from dagpre.types import InputError, MaskBit

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


# --------------------------------------------------------------------------- helpers


def assert_tables_equal(a, b):
    """Same columns, dtypes, units, values (NaN == NaN) and meta."""
    assert a.colnames == b.colnames
    assert len(a) == len(b)
    for name in a.colnames:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].unit == b[name].unit, name
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    assert dict(a.meta) == dict(b.meta)


def epochs_with_sky(sim, frame_index):
    """Epoch rows of one frame joined with their sources' RA/Dec."""
    ep = sim.epochs[sim.epochs["frame"] == frame_index]
    rows = np.searchsorted(sim.sources["id"], ep["source_id"])
    return ep, sim.sources["ra"][rows], sim.sources["dec"][rows]


def brute_force(shape, x, y, flux, fwhm, psf, beta=3.0, n=32):
    """Pixel integral of the continuous profile by n x n midpoint sampling."""
    ny, nx = shape
    sub = (np.arange(n) + 0.5) / n - 0.5
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    image = np.zeros(shape)
    for sy in sub:
        for sx in sub:
            r2 = (xx + sx - x) ** 2 + (yy + sy - y) ** 2
            if psf == "gaussian":
                sigma = fwhm / FWHM_PER_SIGMA
                image += np.exp(-0.5 * r2 / sigma**2) / (2 * np.pi * sigma**2)
            else:
                alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
                image += (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
    return image * flux / n**2


def moments(image, x0, y0, half):
    """Flux-weighted centroid and second moments in a (2 half + 1) box about (x0, y0)."""
    ix, iy = round(x0), round(y0)
    cut = image[iy - half : iy + half + 1, ix - half : ix + half + 1]
    yy, xx = np.mgrid[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(float)
    total = cut.sum()
    cx, cy = (cut * xx).sum() / total, (cut * yy).sum() / total
    mxx = (cut * (xx - cx) ** 2).sum() / total
    myy = (cut * (yy - cy) ** 2).sum() / total
    mxy = (cut * (xx - cx) * (yy - cy)).sum() / total
    return cx, cy, mxx, myy, mxy


def sky_model(row, shape):
    """Noise-free sky (ADU) of a frames_table row, without the shutter ramp."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    return (
        row["sky"]
        + row["sky_grad_x"] * (xx - 0.5 * (nx - 1))
        + row["sky_grad_y"] * (yy - 0.5 * (ny - 1))
    )


@pytest.fixture(scope="module")
def small_night():
    return simulate.night(n_frames=3, shape=(160, 192), n_stars=150, seed=11)


@pytest.fixture(scope="module")
def bad_pair():
    """The same night clear and with one bad frame of each kind (frame 0 clear in both)."""
    kwargs = dict(
        n_frames=5,
        shape=(192, 192),
        n_stars=120,
        seed=5,
        n_transients=0,
        variable_fraction=0.0,
        n_saturated=0,
        cosmic_rate=0.0,
        n_hot_pixels=0,
    )
    clear = simulate.night(**kwargs)
    bad = simulate.night(
        **kwargs, bad_frames={1: "cloud", 2: "shutter", 3: "defocus", 4: "trailing"}
    )
    return clear, bad


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_night_and_different_seed_does_not(small_night):
    again = simulate.night(n_frames=3, shape=(160, 192), n_stars=150, seed=11)
    for a, b in zip(small_night.frames, again.frames, strict=True):
        assert np.array_equal(a.data, b.data)
        assert np.array_equal(a.truth_mask, b.truth_mask)
        assert a.header == b.header
        assert a.data.dtype == np.float32 and a.truth_mask.dtype == np.uint8
    for name in ("sources", "epochs", "frames_table", "transients"):
        assert_tables_equal(getattr(small_night, name), getattr(again, name))
    other = simulate.night(n_frames=3, shape=(160, 192), n_stars=150, seed=12)
    assert not np.array_equal(small_night.frames[0].data, other.frames[0].data)
    assert not np.array_equal(small_night.sources["ra"], other.sources["ra"])


def test_frame_k_does_not_depend_on_n_frames():
    kwargs = dict(shape=(64, 80), n_stars=40, seed=2, n_transients=0)
    short = simulate.night(n_frames=2, **kwargs)
    long = simulate.night(n_frames=4, **kwargs)
    assert np.array_equal(short.frames[1].data, long.frames[1].data)


def test_threads_give_identical_nights():
    results = [None, None]

    def work(i):
        results[i] = simulate.night(n_frames=1, shape=(64, 64), n_stars=30, seed=9)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(results[0].frames[0].data, results[1].frames[0].data)


# --------------------------------------------------------------------------- WCS truth


@pytest.mark.parametrize("sip", [False, True], ids=["tan", "tan-sip"])
def test_true_sky_positions_map_to_true_pixels_through_the_written_header(tmp_path, sip):
    sim = simulate.night(
        n_frames=3, shape=(200, 240), n_stars=120, seed=4, sip=sip, max_rotation=1.0
    )
    paths = sim.write(tmp_path)
    for k, path in enumerate(paths["frames"]):
        header = fits.getheader(path)
        assert header["CTYPE1"] == ("RA---TAN-SIP" if sip else "RA---TAN")
        assert ("A_ORDER" in header) is sip
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the header parses without any fix-up
            wcs = WCS(header)
        ep, ra, dec = epochs_with_sky(sim, k)
        assert len(ep) > 50
        x, y = wcs.all_world2pix(ra, dec, 0)
        assert np.abs(x - ep["x"]).max() < 1e-3
        assert np.abs(y - ep["y"]).max() < 1e-3
        assert header["SIMFRAME"] == k and header["SIMSEED"] == 4
        assert header["MJD-OBS"] == pytest.approx(60000.1 + k * 600.0 / 86400.0, abs=1e-9)
        for key in ("GAIN", "RDNOISE", "SATURATE", "EXPTIME", "DATE-OBS", "FILTER"):
            assert key in header
    if sip:  # the distortion is real: ~1 px at a corner against the pure TAN
        wcs = sim.frames[0].wcs
        ra, dec = wcs.all_pix2world([0.0], [0.0], 0)
        x, y = wcs.wcs_world2pix(ra, dec, 0)
        assert 0.3 < np.hypot(x[0], y[0]) < 3.0


def test_read_fits_gives_back_the_frame_and_its_wcs(tmp_path):
    sim = simulate.night(n_frames=2, shape=(96, 96), n_stars=60, seed=8, sip=True)
    paths = sim.write(tmp_path)
    for k, path in enumerate(paths["frames"]):
        frame = dp.read_fits(path)
        assert np.array_equal(frame.data, sim.frames[k].data)
        assert frame.meta["gain"] == 2.0 and frame.meta["saturate"] == 50000.0
        assert frame.meta["mjd"] == pytest.approx(sim.frames_table["mjd"][k], abs=1e-9)
        ep, ra, dec = epochs_with_sky(sim, k)
        x, y = frame.wcs.all_world2pix(ra, dec, 0)
        assert np.hypot(x - ep["x"], y - ep["y"]).max() < 1e-3


# --------------------------------------------------------------------------- truth files


def test_truth_tables_round_trip_through_ecsv(tmp_path):
    sim = simulate.night(
        n_frames=3,
        shape=(96, 128),
        n_stars=80,
        seed=6,
        variable_fraction=0.2,
        bad_frames={1: "shutter"},
    )
    paths = sim.write(tmp_path)
    assert [p.name for p in paths["frames"]] == [
        "frame_000.fits",
        "frame_001.fits",
        "frame_002.fits",
    ]
    truth = simulate.read_truth(tmp_path)
    assert set(truth) == {"sources", "epochs", "frames", "transients"}
    assert_tables_equal(truth["sources"], sim.sources)
    assert_tables_equal(truth["epochs"], sim.epochs)
    assert_tables_equal(truth["frames"], sim.frames_table)
    assert_tables_equal(truth["transients"], sim.transients)
    assert_tables_equal(simulate.read_truth(tmp_path / "truth")["sources"], sim.sources)
    mask = fits.getdata(tmp_path / "truth" / "truthmask_001.fits")
    assert mask.dtype == np.uint8 and np.array_equal(mask, sim.frames[1].truth_mask)
    assert np.array_equal(fits.getdata(paths["frames"][2]), sim.frames[2].data)


def test_truth_round_trip_with_no_transients_and_no_bad_frames(tmp_path):
    sim = simulate.night(n_frames=1, shape=(48, 48), n_stars=10, seed=1, n_transients=0)
    sim.write(tmp_path)
    truth = simulate.read_truth(tmp_path)
    assert len(truth["transients"]) == 0
    assert_tables_equal(truth["transients"], sim.transients)
    assert_tables_equal(truth["frames"], sim.frames_table)


def test_write_refuses_to_overwrite(tmp_path):
    sim = simulate.night(n_frames=1, shape=(48, 48), n_stars=10, seed=1)
    sim.write(tmp_path)
    before = (tmp_path / "frame_000.fits").stat().st_mtime_ns
    with pytest.raises(InputError, match=r"frame_000\.fits") as info:
        sim.write(tmp_path)
    assert "overwrite=True" in str(info.value)
    assert (tmp_path / "frame_000.fits").stat().st_mtime_ns == before
    sim.write(tmp_path, overwrite=True)
    (tmp_path / "frame_000.fits").unlink()
    with pytest.raises(InputError, match=r"sources\.ecsv"):  # any existing target blocks
        sim.write(tmp_path)


def test_read_truth_names_a_missing_table(tmp_path):
    with pytest.raises(InputError, match=r"sources\.ecsv"):
        simulate.read_truth(tmp_path)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_render_conserves_flux_and_centroid(psf):
    rng = np.random.default_rng(0)
    n = 16
    x = 40.0 + 80.0 * (np.arange(n) % 4) + rng.uniform(-0.5, 0.5, n)
    y = 40.0 + 80.0 * (np.arange(n) // 4) + rng.uniform(-0.5, 0.5, n)
    flux = rng.uniform(1e3, 1e5, n)
    fwhm = rng.uniform(2.2, 4.0, n)
    image, peak = simulate.render_sources(
        (320, 320), x, y, flux, fwhm, psf=psf, beta=2.5, return_peak=True
    )
    assert image.dtype == np.float64
    assert image.sum() == pytest.approx(flux.sum(), rel=1e-9)
    for i in range(n):
        cx, cy, *_ = moments(image, x[i], y[i], 39)
        box = image[round(y[i]) - 39 : round(y[i]) + 40, round(x[i]) - 39 : round(x[i]) + 40]
        assert box.sum() == pytest.approx(flux[i], rel=1e-6)
        assert abs(cx - x[i]) < 0.01 and abs(cy - y[i]) < 0.01
        assert peak[i] == pytest.approx(box.max(), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    dx=st.floats(-0.5, 0.5),
    dy=st.floats(-0.5, 0.5),
    fwhm=st.floats(1.5, 6.0),
    psf=st.sampled_from(["gaussian", "moffat"]),
    beta=st.floats(2.5, 6.0),
    flux=st.floats(10.0, 1e7),
)
def test_render_conserves_flux_and_centroid_anywhere(dx, dy, fwhm, psf, beta, flux):
    x, y = 60.0 + dx, 60.0 + dy
    image = simulate.render_sources(
        (121, 121), [x], [y], [flux], [fwhm], psf=psf, beta=beta, max_radius=59
    )
    assert image.sum() == pytest.approx(flux, rel=1e-9)
    cx, cy, *_ = moments(image, x, y, 60)
    assert abs(cx - x) < 0.01 and abs(cy - y) < 0.01


def test_gaussian_fwhm_from_second_moments():
    rng = np.random.default_rng(1)
    for fwhm in (2.0, 3.0, 5.0):
        x, y = 30 + rng.uniform(-0.5, 0.5, 2)
        image = simulate.render_sources((61, 61), [x], [y], [1e4], [fwhm], psf="gaussian")
        _, _, mxx, myy, mxy = moments(image, x, y, 28)
        # pixel integration adds 1/12 px^2 to the variance of each axis
        measured = FWHM_PER_SIGMA * np.sqrt(0.5 * (mxx + myy) - 1.0 / 12.0)
        assert measured == pytest.approx(fwhm, rel=0.02)
        assert abs(mxy) < 1e-6


@pytest.mark.parametrize(("psf", "tol"), [("gaussian", 2e-4), ("moffat", 2e-3)])
def test_render_matches_brute_force_integration(psf, tol):
    x, y, fwhm = 15.37, 14.81, 2.6
    image = simulate.render_sources((31, 31), [x], [y], [1e4], [fwhm], psf=psf, radius=15)
    reference = brute_force((31, 31), x, y, 1e4, fwhm, psf)
    reference *= 1e4 / reference.sum()  # same truncation-and-normalise convention
    assert np.abs(image - reference).max() < tol * reference.max()


def test_moffat_fwhm_from_a_profile_fit():
    from scipy.optimize import least_squares

    x, y, fwhm, beta = 30.3, 29.6, 6.0, 3.0
    image = simulate.render_sources((61, 61), [x], [y], [1e5], [fwhm], beta=beta, radius=30)
    yy, xx = np.mgrid[0:61, 0:61].astype(float)
    r2 = (xx - x) ** 2 + (yy - y) ** 2
    near = r2 < (2 * fwhm) ** 2

    def residual(params):
        amp, width = params
        alpha = width / (2 * np.sqrt(2 ** (1 / beta) - 1))
        return (amp * (1 + r2[near] / alpha**2) ** -beta - image[near]) / image.max()

    _, measured = least_squares(residual, [image.max(), 5.0]).x
    assert measured == pytest.approx(fwhm, rel=0.02)


def test_trail_elongates_along_its_angle():
    image = simulate.render_sources(
        (81, 81), [40.2], [39.7], [1e4], [3.0], psf="gaussian", trail=(16.0, 30.0)
    )
    assert image.sum() == pytest.approx(1e4, rel=1e-9)
    _, _, mxx, myy, mxy = moments(image, 40.2, 39.7, 38)
    angle = 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy))
    assert angle == pytest.approx(30.0, abs=1.0)
    major = 0.5 * (mxx + myy) + np.hypot(0.5 * (mxx - myy), mxy)
    minor = 0.5 * (mxx + myy) - np.hypot(0.5 * (mxx - myy), mxy)
    assert major / minor > 4.0


def test_render_is_device_agnostic(xp):
    """The same sources rendered from ``xp`` arrays agree with the NumPy render."""
    rng = np.random.default_rng(3)
    n = 300
    cols = {
        "x": rng.uniform(-5, 133, n),
        "y": rng.uniform(-5, 101, n),
        "flux": 10 ** rng.uniform(2, 5, n),
        "fwhm": rng.uniform(2.0, 4.0, n),
    }
    for psf in ("gaussian", "moffat"):
        reference, ref_peak = simulate.render_sources(
            (96, 128), *cols.values(), psf=psf, return_peak=True
        )
        image, peak = simulate.render_sources(
            (96, 128), *(xp.asarray(v) for v in cols.values()), psf=psf, return_peak=True
        )
        assert type(image) is type(xp.zeros(1))  # made on the inputs' device
        host = to_host(image)
        assert host.shape == (96, 128) and host.dtype == np.float64
        np.testing.assert_allclose(host, reference, rtol=1e-9, atol=1e-9 * reference.max())
        np.testing.assert_allclose(to_host(peak), ref_peak, rtol=1e-9)
        assert float(xp.sum(image)) == pytest.approx(float(reference.sum()), rel=1e-9)
    # a simulated frame moved to the device keeps its sums
    frame = simulate.night(n_frames=1, shape=(64, 64), n_stars=30, seed=0).frames[0]
    on_device = xp.asarray(frame.data)
    assert float(xp.sum(on_device, dtype=xp.float64)) == pytest.approx(
        float(frame.data.sum(dtype=np.float64)), rel=1e-12
    )


# --------------------------------------------------------------------------- sky, noise, PSF


def test_psf_width_varies_across_the_field_and_between_frames(small_night):
    table = small_night.frames_table
    medians = []
    for k, frame in enumerate(small_night.frames):
        ep = small_night.epochs[small_night.epochs["frame"] == k]
        fwhm = np.asarray(ep["fwhm"])
        seeing = table["seeing_fwhm"][k]
        assert 2.5 <= seeing <= 4.0
        assert np.all(np.abs(fwhm / seeing - 1.0) <= 0.1 + 1e-9)
        assert fwhm.max() / fwhm.min() > 1.03  # varies across the field
        np.testing.assert_allclose(frame.fwhm_at(ep["x"], ep["y"]), fwhm, rtol=1e-12)
        medians.append(np.median(fwhm))
    assert np.ptp(medians) > 0.05  # and from frame to frame


def test_sky_level_and_gradient_as_recorded():
    sim = simulate.night(
        n_frames=2,
        shape=(200, 200),
        n_stars=60,
        seed=21,
        sky_gradient=0.2,
        n_saturated=0,
        n_transients=0,
    )
    for k, frame in enumerate(sim.frames):
        row = sim.frames_table[k]
        # mask every source's light, as rendered from the truth, down to 1 % of the noise
        x, y = frame.wcs.all_world2pix(sim.sources["ra"], sim.sources["dec"], 0)
        flux = simulate.source_flux(sim.sources, row["mjd"]) * row["transmission"]
        model = simulate.render_sources(frame.data.shape, x, y, flux, frame.fwhm_at(x, y))
        sigma = np.sqrt(row["sky"] * row["gain"] + row["rdnoise"] ** 2) / row["gain"]
        use = (model < 0.01 * sigma) & (frame.truth_mask == 0)
        yy, xx = np.mgrid[0:200, 0:200].astype(float)
        design = np.column_stack([np.ones(use.sum()), xx[use] - 99.5, yy[use] - 99.5])
        level, gx, gy = np.linalg.lstsq(design, frame.data[use].astype(float), rcond=None)[0]
        n = use.sum()
        assert n > 10000
        assert level == pytest.approx(row["sky"], abs=5 * sigma / np.sqrt(n))
        slope_err = 5 * sigma / np.sqrt(n) / (200 / np.sqrt(12))
        assert gx == pytest.approx(row["sky_grad_x"], abs=slope_err)
        assert gy == pytest.approx(row["sky_grad_y"], abs=slope_err)
        assert abs(row["sky_grad_x"]) > 3 * slope_err or abs(row["sky_grad_y"]) > 3 * slope_err


def test_noise_is_poisson_plus_read_noise():
    sim = simulate.night(
        n_frames=2,
        shape=(256, 256),
        n_stars=0,
        seed=3,
        n_saturated=0,
        n_transients=0,
        cosmic_rate=0.0,
        n_hot_pixels=0,
        sky_gradient=0.0,
        gain=1.7,
        rdnoise=8.0,
        sky=(50.0, 400.0),
    )
    for k, frame in enumerate(sim.frames):
        row = sim.frames_table[k]
        data = frame.data.astype(float)
        expected = (row["sky"] * row["gain"] + row["rdnoise"] ** 2) / row["gain"] ** 2
        assert data.var() == pytest.approx(expected, rel=0.05)
        assert data.mean() == pytest.approx(row["sky"], abs=5 * np.sqrt(expected / data.size))


def test_fluxes_are_adu_in_the_image():
    """Aperture sums of isolated unsaturated stars give the epochs flux."""
    sim = simulate.night(
        n_frames=1,
        shape=(256, 256),
        n_stars=60,
        seed=13,
        psf="gaussian",
        n_saturated=0,
        n_transients=0,
        cosmic_rate=0.0,
        n_hot_pixels=0,
    )
    frame, row = sim.frames[0], sim.frames_table[0]
    ep = sim.epochs
    xs, ys = frame.wcs.all_world2pix(sim.sources["ra"], sim.sources["dec"], 0)
    sky = sky_model(row, frame.data.shape)
    yy, xx = np.mgrid[0:256, 0:256].astype(float)
    checked = 0
    for star in ep[(ep["flux"] > 3000) & ~ep["saturated"]]:
        radius = 3.0 * star["fwhm"]
        others = np.hypot(xs - star["x"], ys - star["y"])
        if np.sort(others)[1] < 2 * radius + 4 or not (
            radius < star["x"] < 255 - radius and radius < star["y"] < 255 - radius
        ):
            continue
        inside = np.hypot(xx - star["x"], yy - star["y"]) <= radius
        measured = (frame.data[inside] - sky[inside]).sum()
        noise = np.sqrt(inside.sum() * (row["sky"] * 2.0 + 25.0) + star["flux"] * 2.0) / 2.0
        assert measured == pytest.approx(star["flux"], abs=5 * noise + 0.002 * star["flux"])
        checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------- defects


def test_saturated_stars_bleed_along_columns():
    sim = simulate.night(n_frames=2, shape=(256, 256), n_stars=100, seed=7, n_saturated=3)
    assert np.all(sim.sources["saturated"][:3])
    for frame in sim.frames:
        mask, data = frame.truth_mask, frame.data
        sat = (mask & MaskBit.SATURATED) > 0
        bleed = (mask & MaskBit.BLEED) > 0
        assert sat.sum() >= 3 and bleed.sum() > sat.sum() / 4
        assert np.all(data[sat] == np.float32(50000.0))
        assert np.mean(data[bleed] == np.float32(50000.0)) > 0.8  # trail ends are partial
        assert np.all((data == np.float32(50000.0)) <= (sat | bleed))
        assert data.max() == np.float32(50000.0)
        # every vertical run of affected pixels that holds BLEED also holds SATURATED
        runs, _ = ndimage.label(sat | bleed, structure=[[0, 1, 0], [0, 1, 0], [0, 1, 0]])
        for i in np.unique(runs[bleed]):
            assert sat[runs == i].any()
        # trails are tall and narrow: along array axis 0
        regions, _ = ndimage.label(sat | bleed)
        for i in np.unique(regions[bleed]):
            rows, cols = np.nonzero(regions == i)
            assert np.ptp(rows) > np.ptp(cols)


def test_cosmic_rays_and_hot_pixels_are_flagged():
    sim = simulate.night(
        n_frames=3,
        shape=(128, 128),
        n_stars=30,
        seed=17,
        cosmic_rate=3000.0,
        n_hot_pixels=12,
        n_saturated=0,
    )
    hot = [(f.truth_mask & MaskBit.BAD) > 0 for f in sim.frames]
    assert hot[0].sum() == 12
    assert all(np.array_equal(hot[0], h) for h in hot)
    for k, frame in enumerate(sim.frames):
        row = sim.frames_table[k]
        sigma = np.sqrt(row["sky"] * 2.0 + 25.0) / 2.0
        assert np.all(frame.data[hot[k]] > row["sky"] + 10 * sigma)
        cosmic = (frame.truth_mask & MaskBit.COSMIC) > 0
        assert row["n_cosmic"] > 20
        assert row["n_cosmic"] <= cosmic.sum() <= 6 * row["n_cosmic"]
        assert np.median(frame.data[cosmic]) > row["sky"] + 20 * sigma
        assert frame.conditions["n_cosmic"] == row["n_cosmic"]
    n_default = simulate.night(n_frames=1, shape=(64, 64), n_stars=5, seed=1)
    assert ((n_default.frames[0].truth_mask & MaskBit.BAD) > 0).sum() == 5


def test_variables_and_transients_follow_their_light_curves():
    sim = simulate.night(
        n_frames=6,
        shape=(200, 200),
        n_stars=200,
        seed=19,
        variable_fraction=0.3,
        n_transients=4,
        cadence=1800.0,
    )
    sources, epochs, table = sim.sources, sim.epochs, sim.frames_table
    for k in range(6):
        ep = epochs[epochs["frame"] == k]
        rows = np.searchsorted(sources["id"], ep["source_id"])
        expected = simulate.source_flux(sources[rows], table["mjd"][k]) * table["transmission"][k]
        np.testing.assert_allclose(ep["flux"], expected, rtol=1e-12)
    var = sources[sources["kind"] == "variable"]
    assert len(var) == round(0.3 * (200 - 3))
    assert np.all((var["period"] >= 0.02) & (var["period"] <= 0.5))
    assert np.all((var["amplitude"] >= 0.1) & (var["amplitude"] <= 0.5))
    trans = sim.transients
    assert len(trans) == 4 and np.all(trans["kind"] == "transient")
    mjd = np.asarray(table["mjd"])
    assert np.all((trans["t_peak"] > mjd[0]) & (trans["t_peak"] < mjd[-1] + 60 / 86400))
    for source in trans:
        ep = epochs[epochs["source_id"] == source["id"]]
        peak_frame = np.argmin(np.abs(mjd - source["t_peak"]))
        assert peak_frame in ep["frame"]
        flux = ep["flux"] / table["transmission"][ep["frame"]]
        assert flux.max() <= source["flux"] * (1 + 1e-12)
        assert flux.min() < 0.9 * flux.max()  # it rises and/or fades within the night
    # transients sit on clear sky: no other source within 2 seeing FWHM
    ep0 = epochs[epochs["frame"] == 0]
    stars = ep0[np.isin(ep0["source_id"], sources["id"][sources["kind"] != "transient"])]
    for t in ep0[np.isin(ep0["source_id"], trans["id"])]:
        assert np.hypot(stars["x"] - t["x"], stars["y"] - t["y"]).min() > 2 * 4.0
    # variables do vary
    ratios = []
    for sid in var["id"][:20]:
        f = (
            epochs["flux"][epochs["source_id"] == sid]
            / table["transmission"][epochs["frame"][epochs["source_id"] == sid]]
        )
        ratios.append(f.max() / f.min())
    assert max(ratios) > 1.1


def test_bad_frames_change_what_they_should(bad_pair):
    clear, bad = bad_pair
    assert list(bad.frames_table["bad"]) == ["", "cloud", "shutter", "defocus", "trailing"]
    assert list(clear.frames_table["bad"]) == [""] * 5
    assert np.array_equal(clear.frames[0].data, bad.frames[0].data)
    assert bad.frames[1].header["SIMBAD"] == "cloud"

    def epochs_of(sim, k):
        return sim.epochs[sim.epochs["frame"] == k]

    # cloud: less star light, with a gradient across the frame, and a brighter sky
    ec, eb = epochs_of(clear, 1), epochs_of(bad, 1)
    row = bad.frames_table[1]
    ratio = eb["flux"] / ec["flux"] * clear.frames_table["transmission"][1]
    assert eb["flux"].sum() < 0.95 * ec["flux"].sum()
    assert ratio.min() > 0.29 and ratio.max() < 0.91 and np.ptp(ratio) > 0.2
    design = np.column_stack([np.ones(len(eb)), eb["x"] - 95.5, eb["y"] - 95.5])
    level, gx, gy = np.linalg.lstsq(design, ratio, rcond=None)[0]
    assert (level, gx, gy) == pytest.approx(
        (row["transmission"], row["trans_grad_x"], row["trans_grad_y"]), abs=1e-9
    )
    assert 1.3 <= row["sky"] / clear.frames_table["sky"][1] <= 2.0
    assert np.median(bad.frames[1].data) > np.median(clear.frames[1].data)

    # shutter: the image is darker towards one edge, down to shutter_min
    row = bad.frames_table[2]
    axis = 1 if row["shutter_axis"] == "x" else 0
    ratio_profile = np.median(bad.frames[2].data, axis=1 - axis) / np.median(
        clear.frames[2].data, axis=1 - axis
    )
    if row["shutter_edge"] == "high":
        ratio_profile = ratio_profile[::-1]
    assert ratio_profile[:3].mean() == pytest.approx(row["shutter_min"], abs=0.03)
    assert ratio_profile[-60:].mean() == pytest.approx(1.0, abs=0.01)
    assert np.all(np.diff(ratio_profile[:40]) > -0.02)  # a ramp up from the edge

    # defocus: FWHM x 2.5 everywhere, and so wider stars in the image
    ec, eb = epochs_of(clear, 3), epochs_of(bad, 3)
    np.testing.assert_allclose(eb["fwhm"] / ec["fwhm"], 2.5, rtol=1e-12)
    assert bad.frames_table["seeing_fwhm"][3] == pytest.approx(
        2.5 * clear.frames_table["seeing_fwhm"][3]
    )
    assert np.all(eb["peak"] < 0.3 * ec["peak"])

    # trailing: stars stretched along the recorded angle, flux kept
    row = bad.frames_table[4]
    assert 10 <= row["trail_length"] <= 20
    eb = epochs_of(bad, 4)
    np.testing.assert_allclose(eb["flux"], epochs_of(clear, 4)["flux"], rtol=1e-12)
    clear_ep = epochs_of(clear, 4)
    assert np.all(eb["peak"] < 0.6 * clear_ep["peak"])  # the light is spread out


def test_trailed_stars_are_stretched_along_the_recorded_angle():
    kwargs = dict(
        n_frames=1,
        shape=(160, 160),
        n_stars=8,
        seed=23,
        psf="gaussian",
        n_saturated=0,
        n_transients=0,
        cosmic_rate=0.0,
        n_hot_pixels=0,
    )
    sim = simulate.night(**kwargs, bad_frames={0: "trailing"})
    row, ep = sim.frames_table[0], sim.epochs
    data = sim.frames[0].data - sky_model(row, (160, 160))
    inner = (ep["x"] > 25) & (ep["x"] < 134) & (ep["y"] > 25) & (ep["y"] < 134)
    star = ep[inner][np.argmax(ep["flux"][inner])]
    _, _, mxx, myy, mxy = moments(data, star["x"], star["y"], 20)
    major = 0.5 * (mxx + myy) + np.hypot(0.5 * (mxx - myy), mxy)
    minor = 0.5 * (mxx + myy) - np.hypot(0.5 * (mxx - myy), mxy)
    assert major / minor > 3.0
    angle = 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy)) % 180.0
    diff = abs(angle - row["trail_angle_deg"])
    assert min(diff, 180.0 - diff) < 5.0
    # the trail's length shows in the variance along it: L^2 / 12 on top of the PSF's
    sigma2 = (star["fwhm"] / FWHM_PER_SIGMA) ** 2 + 1.0 / 12.0
    assert np.sqrt(12 * (major - sigma2)) == pytest.approx(row["trail_length"], rel=0.1)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n_frames", -1),
        ("n_frames", 2.5),
        ("shape", (0, 64)),
        ("shape", 64),
        ("n_stars", -3),
        ("seed", -1),
        ("seed", "zero"),
        ("psf", "airy"),
        ("moffat_beta", 1.0),
        ("seeing_fwhm", (4.0, 2.0)),
        ("seeing_fwhm", (0.0, 2.0)),
        ("psf_variation", 0.7),
        ("sky", (-1.0, 10.0)),
        ("gain", 0.0),
        ("rdnoise", float("nan")),
        ("saturate", -1.0),
        ("exptime", 0.0),
        ("center", (10.0, 95.0)),
        ("max_offset", -1.0),
        ("sip", "yes"),
        ("n_saturated", 500),
        ("variable_fraction", 1.5),
        ("n_transients", -1),
        ("cosmic_rate", -2.0),
        ("n_hot_pixels", -1),
        ("bad_frames", {9: "cloud"}),
        ("bad_frames", {0: "rain"}),
        ("bad_frames", [1, 2]),
        ("transmission", (0.5, 1.5)),
    ],
)
def test_night_rejects_bad_parameters_by_name(name, value):
    kwargs = dict(n_frames=2, shape=(32, 32), n_stars=10, seed=0)
    kwargs[name] = value
    with pytest.raises(InputError) as info:
        simulate.night(**kwargs)
    assert info.value.source == name
    assert str(info.value).startswith(f"{name}: ")


def test_negative_n_frames_message():
    with pytest.raises(InputError, match=r"^n_frames: expected a positive integer, got -1$"):
        simulate.night(n_frames=-1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"psf": "airy"}, "psf"),
        ({"fwhm": [-1.0]}, "fwhm"),
        ({"x": [1.0, 2.0], "y": [1.0, 2.0, 3.0]}, "x"),
        ({"flux": [np.inf]}, "flux"),
        ({"shape": (4, 4)}, "shape"),
        ({"beta": 0.5}, "beta"),
    ],
)
def test_render_rejects_bad_input_by_name(kwargs, name):
    args = {"shape": (32, 32), "x": [5.0], "y": [5.0], "flux": [1.0], "fwhm": [2.0]}
    args.update(kwargs)
    with pytest.raises(InputError) as info:
        simulate.render_sources(**args)
    assert info.value.source == name


def test_frame_converts_to_a_dagpre_frame(small_night):
    sim_frame = small_night.frames[1]
    frame = sim_frame.to_frame(truth_mask=True)
    assert isinstance(frame, dp.Frame)
    assert frame.meta["exptime"] == 60.0 and frame.meta["filter"] == "r"
    assert np.array_equal(frame.mask, sim_frame.truth_mask)
    assert sim_frame.index == 1
    assert not sim_frame.to_frame().mask.any()
