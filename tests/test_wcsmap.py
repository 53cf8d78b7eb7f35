"""WCS pixel mapping (TAN, TAN-SIP, TPV) against astropy.wcs, and the coarse pixel map."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip
from conftest import SHARED_DATA, run_in_threads

from dagpre.backend import to_host
from dagpre.ops import wcsmap
from dagpre.ops.wcsmap import (
    TanWCS,
    parse_wcs,
    pixel_map,
    pixel_to_pixel,
    pixel_to_world,
    solve_pixel_map,
    world_to_pixel,
)
from dagpre.simulate import _camera_sip, _make_wcs
from dagpre.types import InputError

ATOL_PX = 1e-4  # the acceptance bound against astropy (we see ~1e-9 px)
DECAM = SHARED_DATA / "decam" / "input_data" / "DEC-OBS04a.mini.fits"
LCO = SHARED_DATA / "lco_bulge" / "lsc1m005-fl15-20170614-0130-e91_cropped_v2.fits.gz"


def _header(path):
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (../shared/data beside the checkout)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fits.getheader(path)


def _wcs(header):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header)


def _sim_wcs(shape, sip=True, offset=(3.2, -7.1), rotation=0.15, center=(150.0, -30.0)):
    w, _ = _make_wcs(shape, center, 0.4, offset, rotation, _camera_sip(shape) if sip else None)
    return w


def _with_inverse_sip(w, shape, order=4):
    """The same SIP WCS with AP/BP fitted by least squares (as a header would carry)."""
    ny, nx = shape
    v, u = np.mgrid[-0.6 * ny : 0.6 * ny : 40j, -0.6 * nx : 0.6 * nx : 40j]
    u, v = u.ravel(), v.ravel()
    fu, fv = w.sip_pix2foc(np.c_[u, v] + w.sip.crpix, 1).T - w.sip.crpix[:, None]
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1 - p)]
    design = np.stack([fu**p * fv**q for p, q in terms], axis=1)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    cu = np.linalg.lstsq(design, u - fu, rcond=None)[0]
    cv = np.linalg.lstsq(design, v - fv, rcond=None)[0]
    for (p, q), a, b in zip(terms, cu, cv, strict=True):
        ap[p, q], bp[p, q] = a, b
    out = w.deepcopy()
    out.sip = Sip(w.sip.a, w.sip.b, ap, bp, w.sip.crpix)
    return WCS(out.to_header(relax=True))


def _grid(shape, n=33):
    ny, nx = shape
    y, x = np.mgrid[-0.5 : ny - 0.5 : n * 1j, -0.5 : nx - 0.5 : n * 1j]
    return x.ravel(), y.ravel()


def _check_both_directions(w, shape):
    """pix -> world and world -> pix against astropy over the frame, in pixels."""
    swap = parse_wcs(w).lng_axis == 1  # astropy keeps header order; we return (lon, lat)

    def sky(a, b):
        return (b, a) if swap else (a, b)

    x, y = _grid(shape)
    ra, dec = pixel_to_world(w, x, y)
    ra_ref, dec_ref = sky(*w.all_pix2world(x, y, 0))
    # sky error expressed in pixels through astropy's own inverse
    xb, yb = w.all_world2pix(*sky(ra, dec), 0, tolerance=1e-12, maxiter=200)
    assert np.max(np.hypot(xb - x, yb - y)) < ATOL_PX
    assert np.max(np.abs(((ra - ra_ref + 180.0) % 360.0) - 180.0)) < 1e-9
    assert np.max(np.abs(dec - dec_ref)) < 1e-9
    xp_, yp_ = world_to_pixel(w, ra_ref, dec_ref)
    xa, ya = w.all_world2pix(*sky(ra_ref, dec_ref), 0, tolerance=1e-12, maxiter=200)
    err = max(np.max(np.abs(xp_ - xa)), np.max(np.abs(yp_ - ya)))
    assert err < ATOL_PX
    assert max(np.max(np.abs(xp_ - x)), np.max(np.abs(yp_ - y))) < ATOL_PX
    return err


# --------------------------------------------------------------------------- vs astropy


def test_tan_lco_header_both_directions():
    header = _header(LCO)
    w = _wcs(header)
    assert parse_wcs(w).kind == "TAN"
    _check_both_directions(w, (400, 400))
    # a header works as well as a WCS
    assert parse_wcs(header) == parse_wcs(w)


def test_tpv_decam_header_both_directions():
    header = _header(DECAM)
    w = _wcs(header)
    parsed = parse_wcs(w)
    assert parsed.kind == "TPV"
    assert len(parsed.tpv_lng) == 10 and len(parsed.tpv_lat) == 10
    _check_both_directions(w, (256, 256))


def test_tpv_with_radial_terms_and_swapped_axes():
    """TPV r, r^3 terms (their derivatives in Newton), and DEC before RA in the header."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    h["CRPIX1"], h["CRPIX2"] = 120.0, 80.0
    h["CRVAL1"], h["CRVAL2"] = 30.0, 60.0
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -2e-4, 1e-5, 1.2e-5, 2e-4
    for key, value in {
        "PV1_1": 1.001, "PV1_2": 0.002, "PV1_3": 1e-4, "PV1_4": 0.01, "PV1_7": 0.05,
        "PV1_11": 0.2, "PV2_1": 0.999, "PV2_2": -0.001, "PV2_5": 0.02, "PV2_11": -0.1,
    }.items():  # fmt: skip
        h[key] = value
    _check_both_directions(_wcs(h), (200, 240))
    s = h.copy()  # the same sky, latitude axis first
    s["CTYPE1"], s["CTYPE2"] = "DEC--TAN", "RA---TAN"
    for key in [k for k in s if k.startswith("PV")]:
        del s[key]
    s["CRVAL1"], s["CRVAL2"] = 60.0, 30.0
    w = _wcs(s)
    assert parse_wcs(w).lng_axis == 1
    _check_both_directions(w, (200, 240))


@pytest.mark.parametrize("shape", [(256, 256), (4096, 4096)], ids=["256", "4096"])
@pytest.mark.parametrize("kind", ["tan", "sip", "sip_inverse"])
def test_simulated_headers_both_directions(kind, shape):
    w = _sim_wcs(shape, sip=kind != "tan")
    if kind == "sip_inverse":
        w = _with_inverse_sip(w, shape)
        assert w.sip.ap is not None
        assert parse_wcs(w).sip_ap is not None
    assert parse_wcs(w).kind == ("TAN" if kind == "tan" else "TAN-SIP")
    _check_both_directions(w, shape)


def test_simulated_night_frame_wcs():
    import dagpre.simulate as sim

    night = sim.night(n_frames=1, shape=(128, 128), n_stars=20, seed=2, sip=True)
    w = night.frames[0].wcs
    assert parse_wcs(w).kind == "TAN-SIP"
    _check_both_directions(w, (128, 128))


def test_pixel_to_pixel_matches_astropy_including_a_frame_change():
    from astropy.wcs.utils import pixel_to_pixel as astropy_p2p

    shape = (300, 300)
    w_in = _sim_wcs(shape)
    gal = WCS(naxis=2)
    gal.wcs.ctype = ["GLON-TAN", "GLAT-TAN"]
    gal.wcs.crval = [262.96, 17.5]  # near (150, -30) ICRS
    gal.wcs.crpix = [150.5, 150.5]
    gal.wcs.cdelt = [-0.4 / 3600, 0.4 / 3600]
    gal.wcs.pc = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    x, y = _grid(shape, 15)
    for w_out in (_sim_wcs(shape, sip=False, offset=(10, 4), rotation=-0.3), gal):
        got = pixel_to_pixel(w_in, w_out, x, y)
        ref = astropy_p2p(w_in, w_out, x, y)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
        np.testing.assert_allclose(got[1], ref[1], atol=1e-6)


def test_scalars_and_shapes():
    w = _sim_wcs((64, 64))
    ra, dec = pixel_to_world(w, 10.0, 20.0)
    assert np.shape(ra) == () and np.shape(dec) == ()
    x, y = pixel_to_pixel(w, w, np.zeros((3, 4)), 5.0)
    assert x.shape == (3, 4) and y.shape == (3, 4)
    np.testing.assert_allclose(x, 0.0, atol=1e-9)
    np.testing.assert_allclose(y, 5.0, atol=1e-9)


def test_far_side_of_the_sky_is_nan():
    w = _sim_wcs((64, 64), sip=False)
    x, y = world_to_pixel(w, [150.0, 330.0], [-30.0, 30.0])  # the second is antipodal
    assert np.isfinite(x[0]) and np.isnan(x[1]) and np.isnan(y[1])


# --------------------------------------------------------------------------- parsing errors


def _plain(ctype=("RA---TAN", "DEC--TAN")):
    w = WCS(naxis=2)
    w.wcs.ctype = list(ctype)
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [50.5, 50.5]
    w.wcs.cdelt = [-1e-4, 1e-4]
    return w


@pytest.mark.parametrize("ctype", [("RA---SIN", "DEC--SIN"), ("RA---ZEA", "DEC--ZEA")])
def test_unsupported_projection_names_the_ctype(ctype):
    with pytest.raises(InputError, match=ctype[0][5:8]) as err:
        parse_wcs(_plain(ctype))
    assert "supported: TAN, TAN-SIP, TPV" in str(err.value)


def test_lookup_table_distortion_is_refused():
    from astropy.wcs import DistortionLookupTable

    w = _plain()
    w.cpdis1 = DistortionLookupTable(np.zeros((4, 4), np.float32), (1, 1), (0, 0), (1, 1))
    with pytest.raises(InputError, match="lookup-table distortion"):
        parse_wcs(w)


def test_no_celestial_axes_and_wrong_type():
    w = WCS(naxis=2)
    w.wcs.ctype = ["LINEAR", "LINEAR"]
    with pytest.raises(InputError, match="no celestial axes"):
        parse_wcs(w, "wcs_in")
    with pytest.raises(InputError, match="expected an astropy WCS"):
        parse_wcs("not a wcs")


def test_pv_cards_on_tan_are_refused():
    w = _plain()
    w.wcs.set_pv([(2, 1, 0.5)])
    with pytest.raises(InputError, match="PV cards on a TAN axis"):
        parse_wcs(w)


def test_parsed_record_is_hashable_and_reused():
    parsed = parse_wcs(_sim_wcs((64, 64)))
    assert isinstance(parsed, TanWCS)
    assert parse_wcs(parsed) is parsed
    assert hash(parsed) == hash(parse_wcs(_sim_wcs((64, 64))))


# --------------------------------------------------------------------------- pixel map


def test_pixel_map_error_is_bounded_and_measured():
    """Interpolated map vs the exact mapping at every pixel: within tol, and the measured
    error at the check points times the safety factor covers the true largest error."""
    shape = (1024, 1024)
    w_in = _sim_wcs(shape)
    w_out = _sim_wcs(shape, sip=False, offset=(0, 0), rotation=-0.1, center=(150.01, -30.01))
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ex, ey = pixel_to_pixel(w_out, w_in, x, y)
    for step in (32, 128):
        pmap = solve_pixel_map(w_in, w_out, shape, step=step, tol=1.0)
        assert pmap.step == step and not pmap.exact
        gx, gy = pmap.full()
        true = max(np.max(np.abs(gx - ex)), np.max(np.abs(gy - ey)))
        assert true <= wcsmap._SAFETY * pmap.max_error
    default = pixel_map(w_in, w_out, shape)
    assert max(np.max(np.abs(default[0] - ex)), np.max(np.abs(default[1] - ey))) < 1e-4


def test_pixel_map_refines_then_goes_exact():
    shape = (256, 200)
    w_in = _sim_wcs(shape)
    w_out = _sim_wcs(shape, sip=False, offset=(5, 5), rotation=1.0)
    refined = solve_pixel_map(w_in, w_out, shape, step=64, tol=1e-9)
    assert refined.step < 64 or refined.exact
    exact = solve_pixel_map(w_in, w_out, shape, step=8, tol=1e-300)
    assert exact.exact and exact.step == 0
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ex, ey = pixel_to_pixel(w_out, w_in, x, y)
    gx, gy = exact.full()
    np.testing.assert_array_equal(gx, ex)
    np.testing.assert_array_equal(gy, ey)


def test_pixel_map_with_undefined_nodes_is_exact():
    """An output grid reaching past 90 degrees from the input's tangent point."""
    w_in = _plain()
    w_out = _plain()
    w_out.wcs.cdelt = [-1.0, 1.0]  # 100 deg across
    w_out.wcs.crval = [150.0, 80.0]  # corners more than 90 deg from (150, 2)
    pmap = solve_pixel_map(w_in, w_out, (100, 100))
    assert pmap.exact
    x_in, _ = pmap.full()
    assert np.isnan(x_in).any() and np.isfinite(x_in).any()


def test_pixel_map_jacobian_matches_pixel_scale_ratio():
    shape = (128, 128)
    w_in = _sim_wcs(shape, sip=False)
    w_out = _sim_wcs((64, 64), sip=False)
    w_out.wcs.cdelt = w_out.wcs.cdelt * 2.0  # output pixels twice as large: 4 input pixels each
    pmap = solve_pixel_map(w_in, w_out, (64, 64), jacobian=True)
    _, _, det = pmap.full(jacobian=True)
    np.testing.assert_allclose(det, 4.0, rtol=1e-6)
    with pytest.raises(InputError, match="jacobian"):
        solve_pixel_map(w_in, w_out, (64, 64)).rows(0, 4, jacobian=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape_out": (0, 5)}, "shape_out"),
        ({"shape_out": (5,)}, "shape_out"),
        ({"step": 2}, "step"),
        ({"tol": 0.0}, "tol"),
    ],
)
def test_pixel_map_argument_errors(kwargs, match):
    w = _sim_wcs((64, 64))
    args = {"shape_out": (64, 64), **kwargs}
    shape_out = args.pop("shape_out")
    with pytest.raises(InputError, match=match):
        solve_pixel_map(w, w, shape_out, **args)


def test_records_pickle_for_dask():
    import pickle

    shape = (96, 80)
    pmap = solve_pixel_map(_sim_wcs(shape), _sim_wcs(shape, sip=False, rotation=0.3), shape)
    back = pickle.loads(pickle.dumps(pmap))
    assert back == pmap and back.wcs_in == pmap.wcs_in
    np.testing.assert_array_equal(back.full()[0], pmap.full()[0])


def test_threads_give_identical_maps():
    shape = (256, 256)
    w_in = _sim_wcs(shape)
    w_out = _sim_wcs(shape, sip=False, offset=(1, 2), rotation=0.2)
    expected = pixel_map(w_in, w_out, shape)
    for got in run_in_threads(lambda _: pixel_map(w_in, w_out, shape), range(4)):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_mapping_matches_numpy(xp):
    shape = (512, 512)
    w_in = _with_inverse_sip(_sim_wcs(shape), shape)
    w_out = _sim_wcs(shape, sip=False, offset=(3, -2), rotation=0.3)
    x, y = _grid(shape, 21)
    ref = pixel_to_pixel(w_out, w_in, x, y)
    got = pixel_to_pixel(w_out, w_in, xp.asarray(x), xp.asarray(y))
    assert type(got[0]) is type(xp.asarray(x))
    np.testing.assert_allclose(to_host(got[0]), ref[0], atol=1e-9)
    np.testing.assert_allclose(to_host(got[1]), ref[1], atol=1e-9)
    like = xp.zeros(1)
    gx, gy = pixel_map(w_in, w_out, shape, like=like)
    rx, ry = pixel_map(w_in, w_out, shape)
    np.testing.assert_allclose(to_host(gx), rx, atol=1e-9)
    np.testing.assert_allclose(to_host(gy), ry, atol=1e-9)
