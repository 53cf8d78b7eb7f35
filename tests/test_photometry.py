"""Photometry held to SEP (same input, stated tolerances), to SExtractor's own catalog of the
SEP test image, to geometry and to simulated truth.

Tolerances: against SEP ``rtol=1e-5`` on fluxes and errors (SEP sums float32 pixels and
float32 variances, so agreement is ~1e-7 in practice), ``1e-5`` on Kron radii and flux radii,
``1e-5`` px on windowed positions; flags equal bit for bit, except that dagpre adds
``APER_ALLMASKED`` where SEP returns NaN for a wholly masked aperture. Against SExtractor's
catalog the tolerances are those of SEP's own ``test.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from conftest import IMAGECAT_DTYPE, run_in_threads

from dagpre.backend import to_host
from dagpre.ops.photometry import (
    APER_ALLMASKED,
    APER_HASMASKED,
    APER_NONPOSITIVE,
    APER_TRUNC,
    Photometry,
    aperture_photometry,
    ellipse_photometry,
    flux_radius,
    isophotal_photometry,
    kron_photometry,
    kron_radius,
    winpos,
)
from dagpre.types import Catalog, InputError

sep = pytest.importorskip("sep")

RTOL = 1e-5
# SEP test.py's dtype for data/image.cat (SExtractor 2.8.6, columns as in its header)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sep_field(shared_data):
    """SEP's test image, background-subtracted by sep.Background as image.cat's settings
    (BACK_SIZE 64, BACK_FILTERSIZE 3), and its objects from sep.extract with image.cat's
    detection settings (1.5 sigma, minarea 5, deblending off), sorted by y."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ESO-LOG cards in the SEP image
        data = fits.getdata(shared_data / "sep" / "image.fits").astype(np.float32)
    bkg = sep.Background(data, bw=64, bh=64, fw=3, fh=3)
    bkg.subfrom(data)
    objs, segmap = sep.extract(
        data, 1.5, err=bkg.globalrms, minarea=5, deblend_cont=1.0, segmentation_map=True
    )
    order = np.argsort(objs["y"], kind="stable")
    ref = np.sort(np.loadtxt(shared_data / "sep" / "image.cat", dtype=IMAGECAT_DTYPE), order="y")
    return {
        "data": data,
        "rms": bkg.rms(),
        "globalrms": bkg.globalrms,
        "objs": objs[order],
        "labels": order + 1,
        "segmap": segmap,
        "ref": ref,
    }


@pytest.fixture(scope="module")
def sim_frame():
    """One simulated 256x256 frame (Moffat stars on sky, Poisson + read noise), its
    background-subtracted image, noise map, gain and true star positions and fluxes."""
    from dagpre import simulate

    sim = simulate.night(
        n_frames=1,
        shape=(256, 256),
        n_stars=80,
        seed=3,
        n_saturated=0,
        n_transients=0,
        cosmic_rate=0.0,
    )
    frame = sim.frames[0]
    data = frame.data.copy()
    bkg = sep.Background(data, bw=32, bh=32)
    bkg.subfrom(data)
    gain = float(frame.header["GAIN"])
    truth = sim.epochs[sim.epochs["frame"] == 0]
    return {
        "data": data,
        "rms": bkg.rms(),
        "gain": gain,
        "x": np.asarray(truth["x"], dtype=float),
        "y": np.asarray(truth["y"], dtype=float),
        "flux": np.asarray(truth["flux"], dtype=float),
        "mask": frame.truth_mask,
    }


def _random_field(shape=(120, 150), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(15):
        x0, y0 = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        image += rng.uniform(20, 500) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.0)
    return image.astype(np.float32)


def _random_apertures(n, shape, seed=1, rmax=9.0):
    """Positions anywhere from beyond the edges to the interior, radii 0.3..rmax."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4.0, shape[1] + 3.0, n)
    y = rng.uniform(-4.0, shape[0] + 3.0, n)
    return x, y, rng.uniform(0.3, rmax, n)


def _assert_flags(ours, theirs):
    """Flags equal bit for bit apart from dagpre's extra APER_ALLMASKED."""
    np.testing.assert_array_equal(np.asarray(ours) & ~APER_ALLMASKED, theirs)


# --------------------------------------------------------------------------- SEP oracle


@pytest.mark.parametrize("subpix", [0, 1, 5])
def test_sum_circle_matches_sep_with_error_map_gain_and_edges(sep_field, subpix):
    data, rms = sep_field["data"], sep_field["rms"]
    x, y, r = _random_apertures(400, data.shape, seed=subpix)
    ours = aperture_photometry(data, x, y, r, err=rms, gain=2.5, subpix=subpix)
    flux, fluxerr, flag = sep.sum_circle(data, x, y, r, err=rms, gain=2.5, subpix=subpix)
    np.testing.assert_allclose(ours.flux, flux, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
    np.testing.assert_array_equal(ours.flag, flag)
    assert int(((flag & APER_TRUNC) != 0).sum()) > 20  # the edges are exercised
    # the SEP objects themselves, scalar err, no gain
    objs = sep_field["objs"]
    ours = aperture_photometry(data, objs["x"], objs["y"], 4.0, err=3.0, subpix=subpix)
    flux, fluxerr, flag = sep.sum_circle(data, objs["x"], objs["y"], 4.0, err=3.0, subpix=subpix)
    np.testing.assert_allclose(ours.flux, flux, rtol=RTOL)
    np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
    np.testing.assert_array_equal(ours.flag, flag)


@pytest.mark.parametrize("subpix", [0, 5])
def test_masked_apertures_match_sep(sep_field, subpix):
    data, rms = sep_field["data"], sep_field["rms"]
    rng = np.random.default_rng(7)
    mask = rng.random(data.shape) < 0.05
    mask[100:130, 40:90] = True  # a block that swallows whole apertures
    x, y, r = _random_apertures(400, data.shape, seed=10 + subpix)
    x[:3], y[:3], r[:3] = 60.0, 115.0, 3.0  # wholly masked
    ours = aperture_photometry(data, x, y, r, err=rms, mask=mask, gain=1.5, subpix=subpix)
    flux, fluxerr, flag = sep.sum_circle(data, x, y, r, err=rms, mask=mask, gain=1.5, subpix=subpix)
    # SEP also gives NaN (0/0) for an aperture wholly off the image when a mask is given;
    # dagpre keeps 0 with APER_TRUNC there, as SEP does without a mask
    on_image = ours.area > 0
    finite = np.isfinite(flux)
    np.testing.assert_array_equal(np.isfinite(ours.flux), finite | ~on_image)
    np.testing.assert_allclose(ours.flux[finite], flux[finite], rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(ours.fluxerr[finite], fluxerr[finite], rtol=RTOL)
    _assert_flags(ours.flag, flag)
    allmasked = (ours.flag & APER_ALLMASKED) != 0
    assert allmasked[:3].all() and np.array_equal(allmasked, on_image & ~finite)
    assert (ours.flag[allmasked] & APER_HASMASKED).all()


@pytest.mark.parametrize("subpix", [0, 1, 5])
def test_sum_ellipse_matches_sep(sep_field, subpix):
    data, rms = sep_field["data"], sep_field["rms"]
    objs = sep_field["objs"]
    mask = np.zeros(data.shape, dtype=bool)
    mask[::7, ::3] = True
    for r in (1.0, 2.5, 6.0):
        args = (objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], r)
        ours = ellipse_photometry(data, *args, err=rms, gain=3.0, mask=mask, subpix=subpix)
        flux, fluxerr, flag = sep.sum_ellipse(
            data, *args, err=rms, gain=3.0, mask=mask, subpix=subpix
        )
        np.testing.assert_allclose(ours.flux, flux, rtol=RTOL)
        np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
        np.testing.assert_array_equal(ours.flag, flag)
    # random ellipses, including thin ones and the edges
    rng = np.random.default_rng(subpix)
    x, y, _ = _random_apertures(300, data.shape, seed=20 + subpix)
    a = rng.uniform(0.5, 6.0, x.size)
    b = a * rng.uniform(0.15, 1.0, x.size)
    theta = rng.uniform(-np.pi / 2, np.pi / 2, x.size)
    scale = rng.uniform(0.0, 3.0, x.size)
    ours = ellipse_photometry(data, x, y, a, b, theta, scale, err=2.0, subpix=subpix)
    flux, fluxerr, flag = sep.sum_ellipse(data, x, y, a, b, theta, scale, err=2.0, subpix=subpix)
    np.testing.assert_allclose(ours.flux, flux, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
    np.testing.assert_array_equal(ours.flag, flag)


def test_background_annulus_plain_mean_matches_sep(sep_field):
    """``bkg_sigma=None`` is SEP's bkgann exactly: circles (mean of unmasked pixels whose
    centres lie in the annulus) and ellipses (overlap-weighted, same subpix)."""
    data, rms = sep_field["data"], sep_field["rms"]
    rng = np.random.default_rng(3)
    mask = rng.random(data.shape) < 0.05
    x = rng.uniform(8.0, data.shape[1] - 8.0, 200)
    y = rng.uniform(8.0, data.shape[0] - 8.0, 200)
    r = rng.uniform(1.0, 6.0, 200)
    for subpix in (0, 5):
        kw = {"err": rms, "gain": 2.0, "mask": mask, "subpix": subpix}
        ours = aperture_photometry(data, x, y, r, bkgann=(r + 2, r + 6), bkg_sigma=None, **kw)
        flux, fluxerr, flag = sep.sum_circle(data, x, y, r, bkgann=(r + 2, r + 6), **kw)
        np.testing.assert_allclose(ours.flux, flux, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
        _assert_flags(ours.flag, flag)
        objs = sep_field["objs"]
        args = (objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 2.0)
        ours = ellipse_photometry(data, *args, bkgann=(3.0, 5.0), bkg_sigma=None, **kw)
        flux, fluxerr, flag = sep.sum_ellipse(data, *args, bkgann=(3.0, 5.0), **kw)
        np.testing.assert_allclose(ours.flux, flux, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
        _assert_flags(ours.flag, flag)


def test_kron_radius_matches_sep(sep_field):
    data, objs = sep_field["data"], sep_field["objs"]
    args = (objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"])
    mask = np.zeros(data.shape, dtype=np.uint8)
    mask[60:90, :] = 4
    for kw in ({}, {"mask": mask}):
        for r in (6.0, 3.0):
            ours = kron_radius(data, *args, r, **kw)
            kr, flag = sep.kron_radius(data, *args, r, **kw)
            np.testing.assert_allclose(ours.radius, kr, rtol=1e-5, atol=1e-12)
            np.testing.assert_array_equal(ours.flag, flag)
    # an all-negative patch gives APER_NONPOSITIVE and radius 0, as in SEP
    neg = -np.abs(data)
    ours = kron_radius(neg, *args, 6.0)
    kr, flag = sep.kron_radius(neg, *args, 6.0)
    np.testing.assert_array_equal(ours.flag, flag)
    assert (ours.flag & APER_NONPOSITIVE).all() and not ours.radius.any()


def test_flux_radius_matches_sep(sep_field):
    data, objs = sep_field["data"], sep_field["objs"]
    x, y, rmax = objs["x"], objs["y"], 6.0 * objs["a"]
    frac = [0.1, 0.5, 0.6, 0.99]
    mask = np.zeros(data.shape, dtype=bool)
    mask[::5, ::4] = True
    for subpix in (1, 5):
        for kw in ({}, {"normflux": np.abs(objs["flux"])}, {"mask": mask}):
            ours = flux_radius(data, x, y, rmax, frac, subpix=subpix, **kw)
            radius, flag = sep.flux_radius(data, x, y, rmax, frac, subpix=subpix, **kw)
            assert ours.radius.shape == radius.shape == (len(x), 4)
            np.testing.assert_allclose(ours.radius, radius, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(ours.flag, flag)
    # a large rmax (bins wider than a pixel: whole pixels away from bin edges)
    ours = flux_radius(data, x, y, 60.0 * objs["a"], 0.5)
    radius, flag = sep.flux_radius(data, x, y, 60.0 * objs["a"], 0.5)
    np.testing.assert_allclose(ours.radius, radius, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.flag, flag)


@pytest.mark.parametrize("subpix", [11, 0, 4])
def test_winpos_matches_sep(sep_field, subpix):
    data, objs = sep_field["data"], sep_field["objs"]
    r50, _ = sep.flux_radius(data, objs["x"], objs["y"], 6.0 * objs["a"], 0.5)
    sig = 2.0 / 2.35 * r50
    mask = np.zeros(data.shape, dtype=bool)
    mask[::6, ::5] = True
    for kw in ({}, {"mask": mask}):
        ours = winpos(data, objs["x"], objs["y"], sig, subpix=subpix, **kw)
        xw, yw, flag = sep.winpos(data, objs["x"], objs["y"], sig, subpix=subpix, **kw)
        np.testing.assert_allclose(ours.x, xw, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours.y, yw, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ours.flag, flag)


def test_isophotal_flux_matches_sep_extract(sep_field):
    """sep.extract's ``flux`` is the sum of the (unfiltered) pixels of each segment."""
    objs, segmap, labels = sep_field["objs"], sep_field["segmap"], sep_field["labels"]
    iso = isophotal_photometry(sep_field["data"], segmap, labels)
    np.testing.assert_allclose(iso.flux, objs["flux"], rtol=RTOL)
    np.testing.assert_array_equal(iso.area, objs["npix"])
    np.testing.assert_array_equal(iso.label, labels)
    assert not iso.flag.any()


# --------------------------------------------------------------------------- SExtractor


def test_sep_test_py_checks_against_sextractor_catalog(sep_field):
    """SEP's test_vs_sextractor, with dagpre's photometry on sep.extract's objects.

    Tolerances as SEP's test.py: FLUX_APER rtol 2e-4 (FLUXERR_APER 1e-5), FLUX_AUTO and its
    error rtol 5e-4, KRON_RADIUS atol 0.01 (printed to 0.01), FLUX_RADIUS rtol 0.04 atol
    0.01, XWIN/YWIN atol 1.5e-3 px. The catalog was made with PHOT_AUTOPARAMS 2.5, 0.0 and
    PHOT_AUTOAPERS 0.0, 0.0: ``min_kron=0, r_min=0``.
    """
    data, objs, ref = sep_field["data"], sep_field["objs"], sep_field["ref"]
    rms = sep_field["globalrms"]
    assert len(objs) == len(ref) == 65
    np.testing.assert_allclose(objs["x"], ref["x"] - 1.0, atol=1e-3)  # same objects

    flux, fluxerr, flag = aperture_photometry(data, objs["x"], objs["y"], 5.0, err=rms, subpix=5)
    np.testing.assert_allclose(flux, ref["flux_aper"], rtol=2e-4)
    np.testing.assert_allclose(fluxerr, ref["fluxerr_aper"], rtol=1e-5)
    assert int(((flag & APER_TRUNC) != 0).sum()) == 4
    assert int(((flag & APER_HASMASKED) != 0).sum()) == 0

    auto = kron_photometry(data, objs, min_kron=0.0, r_min=0.0, err=rms)
    # SEP's test zeroes object 56 by hand (kron radius 0.08 in SEP, 0 in SExtractor); here
    # kron_factor is SExtractor's KRON_RADIUS, 0 where the AUTO flux is not positive
    np.testing.assert_allclose(auto.kron_factor, ref["kron_radius"], rtol=0, atol=0.01)
    np.testing.assert_allclose(auto.flux, ref["flux_auto"], rtol=5e-4)
    np.testing.assert_allclose(auto.fluxerr, ref["fluxerr_auto"], rtol=5e-4)

    fr, _ = flux_radius(
        data, objs["x"], objs["y"], 6.0 * ref["a"], [0.1, 0.5, 0.6], normflux=ref["flux_auto"]
    )
    np.testing.assert_allclose(fr, ref["flux_radius"], rtol=0.04, atol=0.01)

    xw, yw, _ = winpos(data, objs["x"], objs["y"], 2.0 / 2.35 * fr[:, 1])
    np.testing.assert_allclose(xw, ref["xwin"] - 1.0, rtol=0, atol=1.5e-3)
    np.testing.assert_allclose(yw, ref["ywin"] - 1.0, rtol=0, atol=1.5e-3)


def test_kron_photometry_is_seps_recipe(sep_field):
    """``min_kron=0, r_min=0``: sep.kron_radius + sep.sum_ellipse(r=2.5 kr, subpix=1), flags
    OR-ed; small ellipses fall back to sep.sum_circle(r_min, subpix=1)."""
    data, objs, rms = sep_field["data"], sep_field["objs"], sep_field["rms"]
    args = (objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"])
    kr, kflag = sep.kron_radius(data, *args, 6.0)
    flux, fluxerr, flag = sep.sum_ellipse(data, *args, 2.5 * kr, err=rms, gain=4.0, subpix=1)
    auto = kron_photometry(data, objs, min_kron=0.0, r_min=0.0, err=rms, gain=4.0)
    np.testing.assert_allclose(auto.flux, flux, rtol=RTOL)
    np.testing.assert_allclose(auto.fluxerr, fluxerr, rtol=RTOL)
    np.testing.assert_array_equal(auto.flag, flag | kflag)
    np.testing.assert_allclose(auto.kron_radius, kr, rtol=1e-5, atol=1e-12)

    # SExtractor's defaults: scale max(2.5 kr, 3.5); circle of r_min where it is small
    scale = np.maximum(2.5 * kr, 3.5)
    r_min = 3.0
    circular = scale * np.sqrt(objs["a"] * objs["b"]) <= r_min
    assert 0 < circular.sum() < len(objs)
    flux, fluxerr, flag = sep.sum_ellipse(data, *args, scale, err=rms, subpix=1)
    cflux, cfluxerr, cflag = sep.sum_circle(data, objs["x"], objs["y"], r_min, err=rms, subpix=1)
    flux, fluxerr, flag = (
        np.where(circular, c, e) for c, e in ((cflux, flux), (cfluxerr, fluxerr), (cflag, flag))
    )
    auto = kron_photometry(data, objs, r_min=r_min, err=rms)
    np.testing.assert_array_equal(auto.circular, circular)
    np.testing.assert_allclose(auto.flux, flux, rtol=RTOL)
    np.testing.assert_allclose(auto.fluxerr, fluxerr, rtol=RTOL)
    np.testing.assert_array_equal(auto.flag, flag | kflag)
    np.testing.assert_allclose(auto.kron_factor, np.where(circular | (flux <= 0), 0.0, scale))


def test_kron_photometry_accepts_catalogs_mappings_and_arrays(sep_field):
    data, objs = sep_field["data"], sep_field["objs"]
    cols = {k: np.asarray(objs[k], dtype=float) for k in ("x", "y", "a", "b", "theta")}
    results = [
        kron_photometry(data, objs),
        kron_photometry(data, cols),
        kron_photometry(data, Catalog(cols)),
        kron_photometry(data, cols["x"], cols["y"], cols["a"], cols["b"], cols["theta"]),
    ]
    for res in results[1:]:
        np.testing.assert_array_equal(res.flux, results[0].flux)
        np.testing.assert_array_equal(res.flag, results[0].flag)
    cat = results[0].to_catalog(prefix="auto_")
    assert len(cat) == len(objs) and {"auto_flux", "auto_kron_factor"} <= set(cat)


# --------------------------------------------------------------------------- simulated data


def test_simulated_frame_matches_sep_and_truth(sim_frame):
    data, rms, gain = sim_frame["data"], sim_frame["rms"], sim_frame["gain"]
    x, y = sim_frame["x"], sim_frame["y"]
    for subpix in (0, 5):
        ours = aperture_photometry(data, x, y, 6.0, err=rms, gain=gain, subpix=subpix)
        flux, fluxerr, flag = sep.sum_circle(data, x, y, 6.0, err=rms, gain=gain, subpix=subpix)
        np.testing.assert_allclose(ours.flux, flux, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(ours.fluxerr, fluxerr, rtol=RTOL)
        np.testing.assert_array_equal(ours.flag, flag)
    # the frame's defect mask, including saturation/bleed/hot-pixel bits
    mask = sim_frame["mask"]
    ours = aperture_photometry(data, x, y, 4.0, err=rms, mask=mask)
    flux, fluxerr, flag = sep.sum_circle(data, x, y, 4.0, err=rms, mask=mask, subpix=0)
    finite = np.isfinite(flux)
    np.testing.assert_allclose(ours.flux[finite], flux[finite], rtol=RTOL, atol=1e-6)
    _assert_flags(ours.flag, flag)
    # windowed positions stay on the true positions of bright stars (neighbours aside)
    r50, _ = flux_radius(data, x, y, 15.0, 0.5)
    xw, yw, wflag = winpos(data, x, y, 2.0 / 2.35 * r50)
    sxw, syw, _ = sep.winpos(data, x, y, 2.0 / 2.35 * r50)
    np.testing.assert_allclose(xw, sxw, atol=1e-5)
    np.testing.assert_allclose(yw, syw, atol=1e-5)
    bright = (sim_frame["flux"] > 3e4) & (wflag == 0)
    assert bright.sum() >= 5
    assert np.median(np.hypot(xw - x, yw - y)[bright]) < 0.02
    # a large aperture on an isolated bright star holds most of the true flux
    big = aperture_photometry(data, x, y, 12.0).flux
    assert np.median(big[bright] / sim_frame["flux"][bright]) == pytest.approx(0.97, abs=0.04)


# --------------------------------------------------------------------------- geometry


def test_exact_overlap_areas_are_geometric():
    image = np.ones((64, 64))
    rng = np.random.default_rng(4)
    x, y = rng.uniform(20, 44, 50), rng.uniform(20, 44, 50)
    r = rng.uniform(0.1, 15.0, 50)
    res = aperture_photometry(image, x, y, r)
    np.testing.assert_allclose(res.area, np.pi * r * r, rtol=1e-12)
    np.testing.assert_allclose(res.flux, np.pi * r * r, rtol=1e-12)
    a, b = rng.uniform(1, 8, 50), rng.uniform(0.2, 1, 50)
    res = ellipse_photometry(image, x, y, a, a * b, rng.uniform(-3, 3, 50), 1.3)
    np.testing.assert_allclose(res.area, np.pi * a * a * b * 1.3**2, rtol=1e-12)
    # a < b is the same ellipse as (b, a) turned by 90 degrees (SEP insists on a >= b)
    for subpix in (0, 5):
        turned = ellipse_photometry(image, x, y, a * b, a, np.pi / 2 + 0.3, subpix=subpix)
        same = ellipse_photometry(image, x, y, a, a * b, 0.3, subpix=subpix)
        np.testing.assert_allclose(turned.flux, same.flux, rtol=1e-12)
    # half a disc on the image's edge (x = -0.5): the cut is exact too
    res = aperture_photometry(image, -0.5, 30.2, 7.0)
    assert float(res.flux) == pytest.approx(np.pi * 49 / 2, rel=1e-12)
    assert int(res.flag) == APER_TRUNC


def test_broadcasting_scalars_and_per_source_radii():
    image = _random_field()
    x, y, r = _random_apertures(30, image.shape, seed=5)
    radii = np.array([1.0, 2.5, 4.0])
    many = aperture_photometry(image, x[:, None], y[:, None], radii)
    assert many.flux.shape == many.flag.shape == (30, 3)
    for j, rj in enumerate(radii):
        one = aperture_photometry(image, x, y, rj)
        np.testing.assert_allclose(many.flux[:, j], one.flux, rtol=1e-12)
    single = aperture_photometry(image, float(x[0]), float(y[0]), float(r[0]))
    assert single.flux.shape == ()
    assert float(single.flux) == pytest.approx(
        aperture_photometry(image, x, y, r).flux[0], rel=1e-12
    )
    # integer positions and radii (sub-pixel samples tie with the circle): SEP's sums exactly
    xi, yi = np.array([50.0, 60.5, 70.0]), np.array([40.0, 40.0, 60.5])
    for subpix in (1, 3, 5):
        ours = aperture_photometry(image, xi, yi, 5.0, subpix=subpix).flux
        flux, _, _ = sep.sum_circle(image, xi, yi, 5.0, subpix=subpix)
        np.testing.assert_allclose(ours, flux, rtol=1e-12)


def test_clipped_median_background_ignores_a_neighbour():
    from astropy.stats import sigma_clipped_stats

    rng = np.random.default_rng(6)
    image = rng.normal(100.0, 5.0, (80, 80))
    yy, xx = np.mgrid[:80, :80]
    image += 3000.0 * np.exp(-((xx - 52.0) ** 2 + (yy - 40.0) ** 2) / 3.0)  # in the annulus
    x, y = np.array([40.3, 20.0]), np.array([40.1, 20.0])
    res = aperture_photometry(image, x, y, 3.0, bkgann=(8.0, 14.0), err=5.0)
    ring = (np.hypot(xx - x[0], yy - y[0]) > 8.0) & (np.hypot(xx - x[0], yy - y[0]) < 14.0)
    _, median, _ = sigma_clipped_stats(image[ring], sigma=3.0, maxiters=5)
    assert float(res.bkg[0]) == pytest.approx(median, rel=1e-12)
    assert abs(float(res.bkg[0]) - 100.0) < 1.0  # the plain mean is pulled up by the star
    mean = aperture_photometry(image, x, y, 3.0, bkgann=(8.0, 14.0), bkg_sigma=None)
    assert float(mean.bkg[0]) > 105.0
    assert abs(float(res.flux[0])) < 5.0 * float(res.fluxerr[0])
    assert res.bkg_area[0] < ring.sum() and res.bkg_area[1] == pytest.approx(
        ((np.hypot(xx - 20, yy - 20) > 8) & (np.hypot(xx - 20, yy - 20) < 14)).sum(), abs=3
    )


def test_isophotal_photometry_by_hand():
    rng = np.random.default_rng(8)
    image = rng.normal(0, 1, (40, 50))
    err = rng.uniform(0.5, 2.0, image.shape)
    seg = rng.integers(0, 6, image.shape)
    mask = np.zeros(image.shape, dtype=bool)
    mask[seg == 5] = True
    mask[0, :] = True
    labels = np.array([3, 1, 5, 9])
    iso = isophotal_photometry(image, seg, labels, err=err, mask=mask, gain=2.0)
    for i, lab in enumerate(labels[:2]):
        use = (seg == lab) & ~mask
        flux = image[use].sum()
        assert iso.flux[i] == pytest.approx(flux, rel=1e-12)
        var = (err[use] ** 2).sum() + max(flux, 0.0) / 2.0
        assert iso.fluxerr[i] == pytest.approx(np.sqrt(var), rel=1e-12)
        assert iso.area[i] == use.sum() and iso.flag[i] == APER_HASMASKED
    assert np.isnan(iso.flux[2]) and iso.flag[2] == APER_HASMASKED | APER_ALLMASKED
    assert iso.flux[3] == 0.0 and iso.area[3] == 0 and iso.flag[3] == 0
    default = isophotal_photometry(image, seg)
    np.testing.assert_array_equal(default.label, [1, 2, 3, 4, 5])


def test_results_unpack_and_make_catalogs():
    image = _random_field()
    res = aperture_photometry(image, [10.0, 20.0], [30.0, 40.0], 3.0, bkgann=(5.0, 8.0))
    assert isinstance(res, Photometry)
    flux, _, flag = res
    assert flux is res.flux and flag.dtype == np.int16
    cat = res.to_catalog()
    assert cat.colnames == ["flux", "fluxerr", "flag", "area", "bkg", "bkg_area"]
    assert len(cat) == 2


def test_threads_give_identical_results():
    image = _random_field()
    x, y, r = _random_apertures(3000, image.shape, seed=9)
    ref = aperture_photometry(image, x, y, r, err=1.0, threads=1)
    # each caller also splits its chunks over its own threads
    out = run_in_threads(
        lambda _: aperture_photometry(image, x, y, r, err=1.0, threads=2), range(4)
    )
    assert len(out) == 4
    for res in out:
        np.testing.assert_array_equal(res.flux, ref.flux)
        np.testing.assert_array_equal(res.flag, ref.flag)


# --------------------------------------------------------------------------- devices


def test_cupy_gives_the_same_as_numpy(xp):
    """The same calls on the image's device; CuPy results held to NumPy's at 1e-10."""
    image = _random_field()
    rng = np.random.default_rng(11)
    x, y, r = _random_apertures(200, image.shape, seed=11)
    a = rng.uniform(0.8, 4.0, 200)
    b, theta = a * rng.uniform(0.3, 1.0, 200), rng.uniform(-1.5, 1.5, 200)
    err = rng.uniform(0.5, 2.0, image.shape)
    mask = rng.random(image.shape) < 0.03
    seg = (image > 30).astype(np.int32) * rng.integers(1, 4, image.shape, dtype=np.int32)
    dev = xp.asarray(image)

    def both(fn, *args, **kw):
        host = fn(image, *args, **kw)
        on = fn(
            dev,
            *(xp.asarray(v) if isinstance(v, np.ndarray) else v for v in args),
            **{k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()},
        )
        return host, on

    cases = [
        both(aperture_photometry, x, y, r, err=err, mask=mask, gain=2.0),
        both(aperture_photometry, x, y, r, subpix=5, bkgann=(r + 2, r + 5)),
        both(ellipse_photometry, x, y, a, b, theta, 2.0, err=1.5, subpix=0),
        both(
            ellipse_photometry, x, y, a, b, theta, 2.0, subpix=5, bkgann=(3.0, 4.0), bkg_sigma=None
        ),
        both(kron_radius, x, y, a, b, theta, 6.0, mask=mask),
        both(flux_radius, x, y, 5.0 * a, np.array([0.2, 0.5])),
        both(winpos, x, y, 0.5 * a, mask=mask),
        both(isophotal_photometry, seg, None, err),
    ]
    for host, on in cases:
        for h, d in zip(host, on, strict=True):
            assert type(d).__module__.split(".")[0] == xp.__name__
            np.testing.assert_allclose(to_host(d), h, rtol=1e-10, atol=1e-10)
    auto_h = kron_photometry(image, {"x": x, "y": y, "a": a, "b": b, "theta": theta}, err=err)
    auto_d = kron_photometry(
        dev,
        {k: xp.asarray(v) for k, v in (("x", x), ("y", y), ("a", a), ("b", b), ("theta", theta))},
        err=xp.asarray(err),
    )
    np.testing.assert_allclose(to_host(auto_d.flux), auto_h.flux, rtol=1e-10)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda im: aperture_photometry(im[0], 1.0, 1.0, 2.0), "image: expected a 2-D"),
        (lambda im: aperture_photometry(im, [1.0, 2.0], [1.0, 2.0, 3.0], 2.0), "x, y, r: shapes"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, -2.0), "r: expected values >= 0"),
        (lambda im: aperture_photometry(im, np.nan, 1.0, 2.0), "x: holds NaN"),
        (lambda im: aperture_photometry(im, 1.0, np.inf, 2.0), "y: holds NaN"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, err=np.ones((3, 3))), "err: shape"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, err=-1.0), "err: expected"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, mask=np.ones(5)), "mask: shape"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, gain=-1.0), "gain: expected"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, subpix=-1), "subpix: expected"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, subpix=2.5), "subpix: expected"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, bkgann=(5.0, 4.0)), "bkgann: expected"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, bkgann=5.0), "bkgann: expected a pair"),
        (
            lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, bkgann=(1, 2), bkg_sigma=0),
            "bkg_sigma",
        ),
        (lambda im: aperture_photometry(im, "a", 1.0, 2.0), "x: expected real numbers"),
        (lambda im: aperture_photometry(im, 1.0, 1.0, 2.0, threads=0), "threads"),
        (lambda im: ellipse_photometry(im, 1.0, 1.0, 2.0, 0.0, 0.0), "b: expected values > 0"),
        (lambda im: ellipse_photometry(im, 1.0, 1.0, 2.0, 1.0, np.nan), "theta: holds NaN"),
        (lambda im: kron_radius(im, [1.0, 2.0], [1.0, 2.0], [2.0, 3.0, 4.0], 1.0, 0.0), "shapes"),
        (lambda im: kron_photometry(im, {"x": [1.0], "y": [1.0]}), "catalog: has no column"),
        (lambda im: kron_photometry(im, [1.0], [1.0]), "give all four"),
        (
            lambda im: kron_photometry(im, {k: [1.0] for k in ("x", "y", "a", "b", "theta")}, k=-1),
            "k:",
        ),
        (lambda im: flux_radius(im, [1.0], [1.0], [0.0], 0.5), "rmax: expected values > 0"),
        (lambda im: flux_radius(im, [1.0], [1.0], [3.0], 0.5, subpix=0), "subpix"),
        (lambda im: winpos(im, [1.0], [1.0], [-1.0]), "sig: expected"),
        (lambda im: isophotal_photometry(im, np.zeros((3, 3), int)), "segmap: shape"),
        (lambda im: isophotal_photometry(im, np.zeros(im.shape)), "segmap: expected integer"),
        (lambda im: isophotal_photometry(im, np.zeros(im.shape, int), [0, 1]), "labels"),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    image = np.zeros((20, 30), dtype=np.float32)
    with pytest.raises(InputError, match=match):
        call(image)
