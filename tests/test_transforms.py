"""Gray-scale transforms held to astropy.visualization on real frames.

Tolerances (each asserted below):

* intervals (minmax, percentile, asymmetric percentile, manual): 1e-6 relative;
* zscale limits: 1e-4 relative (they agree to ~1e-15 on the frames here);
* every stretch after every interval: ``|ours - astropy| <= 1e-6 + 1e-6 |astropy|``
  (astropy's float result cast to float32, as ours is);
* histeq: per pixel within one histogram bin of ``HistEqStretch``, i.e.
  ``|ours - astropy| <= (count[k] - 1) / (N - 1) + 1e-6`` with ``count[k]`` the pixels in
  that pixel's bin (the larger of it and its two neighbours, to be indifferent to which
  side of an edge float32 and float64 put a pixel); exact (1e-6) when no two pixels share
  a bin;
* CuPy (``xp`` fixture) against NumPy: 1e-6, same test body.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy import visualization as av
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dagpre.backend import to_host
from dagpre.ops import transforms as tr
from dagpre.ops.transforms import histeq, interval, quicklook_png, stretch, zscale
from dagpre.types import InputError

FRAMES = [
    "sep/image.fits",
    "decam/input_data/DEC-OBS04a.mini.fits",
    "lco_bulge/lsc1m005-fl15-20170614-0130-e91_cropped_v2.fits.gz",
    "ztf_alerts/472263571115115000_cutoutScience.fits",
    "ztf_alerts/2019_01_10_739260766315010006_cutoutDifference.fits",
]
FRAME_IDS = ["sep", "decam", "lco", "ztf-sci", "ztf-diff"]

# stretch kind -> (our a, astropy's stretch object)
STRETCHES = {
    "linear": (None, av.LinearStretch()),
    "sqrt": (None, av.SqrtStretch()),
    "squared": (None, av.SquaredStretch()),
    "power": (0.6, av.PowerStretch(0.6)),
    "log": (None, av.LogStretch()),
    "asinh": (None, av.AsinhStretch()),
    "sinh": (None, av.SinhStretch()),
    "exp": (None, av.PowerDistStretch()),
    "powerdist": (30.0, av.PowerDistStretch(30.0)),
}

# our interval arguments -> astropy's interval object
INTERVALS = [
    ({"interval": "minmax"}, av.MinMaxInterval()),
    ({"interval": "zscale"}, av.ZScaleInterval()),
    ({"interval": "percentile", "percentile": 99.5}, av.PercentileInterval(99.5)),
    (
        {"interval": "asymmetric_percentile", "lower_percentile": 1, "upper_percentile": 99.9},
        av.AsymmetricPercentileInterval(1, 99.9),
    ),
    ({"interval": "manual", "vmin": 100.0}, av.ManualInterval(vmin=100.0)),
]


@functools.cache
def _read(path: Path) -> np.ndarray:
    """HDU 0 of a shared frame, in native byte order (read-only: tests must not modify)."""
    # the SEP frame's non-standard ESO-LOG cards make astropy warn; not our concern here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        with fits.open(path, memmap=False) as hdus:
            data = np.array(hdus[0].data)
    data = data.astype(data.dtype.newbyteorder("="), copy=True)
    data.setflags(write=False)
    return data


@pytest.fixture(params=FRAMES, ids=FRAME_IDS)
def frame(request, shared_data) -> np.ndarray:
    return _read(shared_data / request.param)


def _rel(ours: float, ref: float) -> float:
    return abs(ours - float(ref)) / max(abs(float(ref)), 1e-300)


def _assert_close_to_astropy(ours: np.ndarray, ref: np.ndarray) -> None:
    """The stated stretch tolerance: 1e-6 relative, 1e-6 absolute near 0."""
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.astype(np.float32), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- intervals


def test_intervals_match_astropy(frame):
    for kwargs, oracle in INTERVALS:
        kwargs = dict(kwargs)
        kind = kwargs.pop("interval")
        lo, hi = interval(frame, kind, **kwargs)
        ref_lo, ref_hi = oracle.get_limits(frame)
        tol = 1e-4 if kind == "zscale" else 1e-6
        assert _rel(lo, ref_lo) <= tol, (kind, lo, ref_lo)
        assert _rel(hi, ref_hi) <= tol, (kind, hi, ref_hi)
        assert isinstance(lo, float) and isinstance(hi, float)


def test_zscale_matches_astropy(frame):
    lo, hi = zscale(frame)
    ref_lo, ref_hi = av.ZScaleInterval().get_limits(frame)
    assert _rel(lo, ref_lo) <= 1e-4 and _rel(hi, ref_hi) <= 1e-4
    # the device (CuPy) sampling, which never compacts the image, run here on NumPy
    params = dict(tr._ZSCALE_DEFAULTS)
    assert tr._zscale_limits(frame, None, np, params, gather="ranked") == pytest.approx(
        (lo, hi), rel=1e-12
    )


@pytest.mark.parametrize(
    "params",
    [
        {"n_samples": 50},
        {"contrast": 0.05},
        {"contrast": 1.0, "krej": 1.5},
        {"max_reject": 0.9, "max_iterations": 1},
        {"max_reject": 0.999, "krej": 0.5},  # rejects too much: falls back to the extremes
        {"n_samples": 1000000},
    ],
)
def test_zscale_parameters_match_astropy(shared_data, params):
    image = _read(shared_data / FRAMES[2])
    lo, hi = zscale(image, **params)
    ref_lo, ref_hi = av.ZScaleInterval(**params).get_limits(image)
    assert _rel(lo, ref_lo) <= 1e-4 and _rel(hi, ref_hi) <= 1e-4


def test_zscale_ignores_nan_and_mask_like_astropy(shared_data):
    image = _read(shared_data / FRAMES[0]).copy()
    rng = np.random.default_rng(3)
    image[rng.random(image.shape) < 0.05] = np.nan
    image[10:20, :] = np.inf
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[100:180, 50:200] = 4  # any non-zero bit excludes the pixel
    # astropy >= 6 drops non-finite values itself, and honours a masked array's mask
    ref = av.ZScaleInterval().get_limits(np.ma.MaskedArray(image, mask=mask != 0))
    for gather in ("compact", "ranked"):
        arr, _, m = tr._prepare_image(image, mask)
        got = tr._zscale_limits(arr, m, np, dict(tr._ZSCALE_DEFAULTS), gather=gather)
        assert got == pytest.approx(ref, rel=1e-4)
    assert zscale(image, mask=mask) == pytest.approx(ref, rel=1e-4)
    assert zscale(np.ma.MaskedArray(image, mask=mask != 0)) == pytest.approx(ref, rel=1e-4)
    assert interval(image, "zscale", mask=mask) == pytest.approx(ref, rel=1e-4)


def test_integer_images_match_astropy(shared_data):
    image = np.round(_read(shared_data / FRAMES[2])).astype(np.uint16)
    for kwargs, oracle in INTERVALS:
        kwargs = dict(kwargs)
        kind = kwargs.pop("interval")
        got = interval(image, kind, **kwargs)
        ref = oracle.get_limits(image)
        assert got == pytest.approx([float(r) for r in ref], rel=1e-4 if kind == "zscale" else 1e-6)
    for kind, (a, oracle) in STRETCHES.items():
        ref = oracle(av.ZScaleInterval()(image))
        _assert_close_to_astropy(stretch(image, kind, a=a, interval="zscale"), ref)


def test_mask_leaves_pixels_out_of_the_limits():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (64, 80))
    image[5, 5] = 1e6
    mask = np.zeros(image.shape, dtype=bool)
    mask[5, 5] = True
    assert interval(image, mask=mask) == (image[~mask].min(), image[~mask].max())
    lo, hi = interval(image, "percentile", percentile=90, mask=mask)
    assert (lo, hi) == tuple(np.percentile(image[~mask], [5, 95]))
    assert interval(np.ma.MaskedArray(image, mask=mask)) == (
        image[~mask].min(),
        image[~mask].max(),
    )


def test_percentile_without_compaction_matches_numpy():
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64, np.int32):
        image = (rng.normal(0, 50, (37, 41)) * 10).astype(dtype)
        ok = rng.random(image.shape) > 0.3
        for pcts in ((0.0, 100.0), (0.25, 99.75), (5.0, 50.0), (33.3, 66.6)):
            ref = np.percentile(image[ok], pcts)
            got = tr._percentiles_sorted(image, ok, int(ok.sum()), pcts, np)
            np.testing.assert_allclose(got, ref, rtol=1e-12)


# --------------------------------------------------------------------------- stretches


@pytest.mark.parametrize("kind", list(STRETCHES))
def test_stretches_match_astropy(frame, kind):
    a, oracle = STRETCHES[kind]
    for kwargs, astropy_interval in INTERVALS:
        ref = oracle(astropy_interval(frame))
        _assert_close_to_astropy(stretch(frame, kind, a=a, **kwargs), ref)


@pytest.mark.parametrize("kind", list(STRETCHES))
def test_stretches_without_clipping_match_astropy(shared_data, kind):
    image = _read(shared_data / FRAMES[3])
    a, oracle = STRETCHES[kind]
    with np.errstate(all="ignore"):  # astropy warns on sqrt/log of negatives, overflow
        ref = oracle(av.PercentileInterval(95.0)(image, clip=False), clip=False)
    got = stretch(image, kind, a=a, interval="percentile", percentile=95.0, clip=False)
    _assert_close_to_astropy(got, ref)


@pytest.mark.parametrize(
    ("kind", "a", "oracle"),
    [
        ("log", 10.0, av.LogStretch(10.0)),
        ("asinh", 0.02, av.AsinhStretch(0.02)),
        ("sinh", 0.9, av.SinhStretch(0.9)),
        ("power", 2.5, av.PowerStretch(2.5)),
        ("exp", 0.05, av.PowerDistStretch(0.05)),
    ],
)
def test_stretch_parameter_a_matches_astropy(shared_data, kind, a, oracle):
    image = _read(shared_data / FRAMES[1])
    ref = oracle(av.ZScaleInterval()(image))
    _assert_close_to_astropy(stretch(image, kind, a=a, interval="zscale"), ref)


def test_linear_slope_and_intercept_match_astropy(shared_data):
    image = _read(shared_data / FRAMES[0])
    ref = av.LinearStretch(slope=1.4, intercept=-0.2)(av.MinMaxInterval()(image))
    _assert_close_to_astropy(stretch(image, "linear", slope=1.4, intercept=-0.2), ref)


def test_equal_limits_skip_the_division_like_astropy():
    constant = np.full((8, 9), 7.0, dtype=np.float32)
    assert interval(constant) == (7.0, 7.0)
    ramp = np.linspace(0.0, 10.0, 50).reshape(5, 10)
    for kind, (a, oracle) in STRETCHES.items():
        _assert_close_to_astropy(
            stretch(constant, kind, a=a), oracle(av.MinMaxInterval()(constant))
        )
        ref = oracle(av.ManualInterval(5.0, 5.0)(ramp))
        _assert_close_to_astropy(stretch(ramp, kind, a=a, vmin=5.0, vmax=5.0), ref)
    assert not np.any(stretch(constant, "log"))


def test_nan_pixels_stay_nan_or_become_zero():
    image = np.arange(20.0, dtype=np.float32).reshape(4, 5)
    image[1, 2] = np.nan
    image[3, 4] = np.inf
    assert interval(image) == (0.0, 18.0)
    out = stretch(image)
    assert np.isnan(out[1, 2]) and out[3, 4] == 1.0
    assert np.isfinite(out).sum() == image.size - 1
    ref = av.LinearStretch()(av.MinMaxInterval()(image))
    _assert_close_to_astropy(out, ref)
    as_bytes = stretch(image, out="uint8")
    assert as_bytes.dtype == np.uint8 and as_bytes[1, 2] == 0 and as_bytes[3, 4] == 255


def test_integer_outputs_round_the_float_output(shared_data):
    image = _read(shared_data / FRAMES[4])
    for kind in ("linear", "asinh"):
        full = stretch(image, kind, interval="zscale")
        for out, top, dtype in (("uint8", 255, np.uint8), ("uint16", 65535, np.uint16)):
            got = stretch(image, kind, interval="zscale", out=out)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, np.rint(full * np.float32(top)).astype(dtype))
    assert histeq(image, out="uint8").max() == 255


def test_big_endian_input_gives_the_same_result(shared_data):
    image = _read(shared_data / FRAMES[2])
    swapped = image.astype(image.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(stretch(swapped, "asinh"), stretch(image, "asinh"))
    assert zscale(swapped) == zscale(image)


# --------------------------------------------------------------------------- histeq


def _bin_share(values: np.ndarray, nbins: int) -> np.ndarray:
    """Per pixel: (count - 1) / (N - 1) of its bin, the largest among it and its neighbours."""
    lo, hi = values.min(), values.max()
    k = np.clip(np.floor((values - lo) / (hi - lo) * nbins), 0, nbins - 1).astype(np.intp)
    counts = np.bincount(k.ravel(), minlength=nbins).astype(np.float64)
    padded = np.concatenate([[0.0], counts, [0.0]])
    widest = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])
    return (np.maximum(widest - 1, 0) / (values.size - 1))[k]


@pytest.mark.parametrize("nbins", [65536, 4096])
def test_histeq_within_one_bin_of_astropy(frame, nbins):
    ref = av.HistEqStretch(frame)(av.MinMaxInterval()(frame))
    got = histeq(frame, nbins=nbins)
    assert got.dtype == np.float32 and got.shape == frame.shape
    allowed = _bin_share(frame.astype(np.float64), nbins) + 1e-6
    excess = np.abs(got - ref) - allowed
    assert excess.max() <= 0, f"worst pixel exceeds its bin's share by {excess.max():.3g}"
    assert got.min() == 0.0 and got.max() == 1.0


def test_histeq_is_exact_when_no_two_pixels_share_a_bin():
    rng = np.random.default_rng(5)
    values = np.cumsum(rng.uniform(1.0, 2.0, 400))  # gaps > one bin of 1024 over the range
    image = rng.permutation(values).reshape(20, 20)
    ref = av.HistEqStretch(image)(av.MinMaxInterval()(image))
    np.testing.assert_allclose(histeq(image, nbins=1 << 16), ref, rtol=0, atol=1e-6)


def test_histeq_nan_mask_and_constant():
    rng = np.random.default_rng(2)
    image = rng.normal(0.0, 1.0, (50, 60))
    image[0, :5] = np.nan
    got = histeq(image)
    assert np.isnan(got[0, :5]).all() and np.isfinite(got[1:]).all()
    finite = np.isfinite(image)
    ref = av.HistEqStretch(image[finite])(av.MinMaxInterval()(image[finite]))
    assert np.abs(got[finite] - ref).max() <= 0.01
    # masked pixels leave the histogram but are still mapped (clipped beyond the range)
    image = rng.normal(0.0, 1.0, (50, 60))
    image[3, 3] = 1e9
    mask = np.zeros(image.shape, dtype=bool)
    mask[3, 3] = True
    with_mask = histeq(image, mask=mask)
    assert with_mask[3, 3] == 1.0
    np.testing.assert_allclose(with_mask[~mask], histeq(image[~mask]), atol=1e-6)
    assert not histeq(np.full((4, 4), 3.0)).any()
    assert histeq(np.array([5.0]))[0] == 0.0
    # ranges of a few subnormals, where 1 / range overflows
    np.testing.assert_array_equal(histeq(np.array([0, 1e-45, 1e-45], np.float32)), [0, 1, 1])
    np.testing.assert_array_equal(histeq(np.array([0.0, 5e-324, 1e-323])), [0, 0.5, 1])


# --------------------------------------------------------------------------- devices


def test_results_on_device_match_numpy(xp, shared_data):
    host = _read(shared_data / FRAMES[0]).copy()
    host[0, :7] = np.nan
    mask = np.zeros(host.shape, dtype=np.uint8)
    mask[40:60, 40:90] = 1
    device = xp.asarray(host)
    device_mask = xp.asarray(mask)

    def same_device(result):
        assert type(result).__module__.split(".")[0] == xp.__name__

    for kind in tr.INTERVALS:
        kwargs = {"percentile": 98.0} if kind == "percentile" else {}
        got = interval(device, kind, mask=device_mask, **kwargs)
        ref = interval(host, kind, mask=mask, **kwargs)
        assert got == pytest.approx(ref, rel=1e-6)
    assert zscale(device) == pytest.approx(zscale(host), rel=1e-6)
    for kind, (a, _) in STRETCHES.items():
        for interval_kind in ("minmax", "zscale", "percentile"):
            kwargs = {"percentile": 99.0} if interval_kind == "percentile" else {}
            got = stretch(device, kind, a=a, interval=interval_kind, mask=device_mask, **kwargs)
            same_device(got)
            ref = stretch(host, kind, a=a, interval=interval_kind, mask=mask, **kwargs)
            np.testing.assert_allclose(to_host(got), ref, rtol=1e-6, atol=1e-6)
    got = histeq(device, mask=device_mask)
    same_device(got)
    np.testing.assert_allclose(to_host(got), histeq(host, mask=mask), rtol=1e-6, atol=1e-6)
    got = stretch(device, "asinh", out="uint8")
    same_device(got)
    assert np.abs(to_host(got).astype(int) - stretch(host, "asinh", out="uint8")).max() <= 1


class _DeviceLikeNumpy(types.ModuleType):
    """NumPy under another identity, so ``xp is np`` is False: runs the CuPy code paths
    (no boolean compaction, limits read back in one transfer) on a machine without a GPU."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_device_code_paths_match_the_host_paths(shared_data):
    shim = _DeviceLikeNumpy("numpy_as_device")
    image = _read(shared_data / FRAMES[2]).copy()
    image[::7, ::5] = np.nan
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[:30] = 2
    for xp in (np, shim):
        ok, n = tr._valid_pixels(image, mask, xp)
        assert int(n) == int((np.isfinite(image) & (mask == 0)).sum())
    ok, n = tr._valid_pixels(image, mask, shim)
    assert tr._min_max(image, ok, n, shim) == tr._min_max(
        image, *tr._valid_pixels(image, mask, np), np
    )
    np.testing.assert_array_equal(
        tr._histeq(image, mask, shim, 4096), tr._histeq(image, mask, np, 4096)
    )
    params = dict(tr._ZSCALE_DEFAULTS)
    assert tr._zscale_limits(image, mask, shim, params) == pytest.approx(
        tr._zscale_limits(image, mask, np, params), rel=1e-12
    )
    for kind in ("minmax", "percentile", "zscale"):
        args = (kind, 99.0 if kind == "percentile" else None, None, None, None, None, params)
        got = tr._interval_limits(image, mask, shim, *args)
        assert got[:2] == pytest.approx(tr._interval_limits(image, mask, np, *args)[:2], rel=1e-12)


def test_threads_get_identical_results(shared_data):
    image = _read(shared_data / FRAMES[2])
    expected = (zscale(image), histeq(image), stretch(image, "log", interval="zscale"))
    results = [None] * 6

    def work(i):
        results[i] = (zscale(image), histeq(image), stretch(image, "log", interval="zscale"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert got[0] == expected[0]
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[2], expected[2])


# --------------------------------------------------------------------------- properties

_unit_arrays = hnp.arrays(
    np.float64,
    st.integers(2, 200),
    elements=st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False),
)
_a_values = {
    "power": st.floats(0.05, 8.0),
    "log": st.floats(0.01, 1e5),
    "asinh": st.floats(0.001, 10.0),
    "sinh": st.floats(0.05, 10.0),
    "exp": st.floats(0.001, 1e4).filter(lambda v: abs(v - 1.0) > 1e-3),
}
_a_values["powerdist"] = _a_values["exp"]


@settings(max_examples=60, deadline=None)
@given(values=_unit_arrays, kind=st.sampled_from(list(STRETCHES)), data=st.data())
def test_stretches_are_monotonic_into_unit_interval(values, kind, data):
    a = data.draw(_a_values[kind]) if kind in _a_values else None
    ordered = np.sort(values)
    got = stretch(ordered, kind, a=a, vmin=0.0, vmax=1.0)
    assert np.all((got >= 0.0) & (got <= 1.0))
    # float32 transcendental functions are monotone to a few ulps
    assert np.all(np.diff(got.astype(np.float64)) >= -1e-6)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32),
    ),
    nbins=st.sampled_from([1, 7, 256, 65536]),
)
def test_histeq_is_monotonic_into_unit_interval(values, nbins):
    order = np.argsort(values, kind="stable")
    got = histeq(values, nbins=nbins)[order].astype(np.float64)
    assert np.all((got >= 0.0) & (got <= 1.0))
    assert np.all(np.diff(got) >= -1e-6)
    if values.size > 1 and values.min() < values.max():
        ref = av.HistEqStretch(values)(av.MinMaxInterval()(values))
        allowed = _bin_share(values.astype(np.float64), nbins) + 1e-6
        assert np.all(np.abs(histeq(values, nbins=nbins) - ref) <= allowed)


@settings(max_examples=40, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.integers(5, 400),
        elements=st.floats(-1e4, 1e4, allow_nan=False),
        unique=True,  # see the zscale Notes: astropy differs on exactly constant samples
    )
)
def test_zscale_matches_astropy_on_random_data(values):
    ref = av.ZScaleInterval().get_limits(values)
    assert zscale(values) == pytest.approx([float(r) for r in ref], rel=1e-6, abs=1e-9)
    assert tr._zscale_limits(values, None, np, dict(tr._ZSCALE_DEFAULTS), "ranked") == (
        pytest.approx(zscale(values), rel=1e-12, abs=1e-12)
    )


# --------------------------------------------------------------------------- quicklook


def test_quicklook_png_origin_at_the_bottom(tmp_path):
    from PIL import Image

    image = np.zeros((30, 40), dtype=np.float32)
    image[0, :] = 100.0  # first row: y = 0, the bottom of the picture
    image[:, 39] = 50.0
    path = quicklook_png(image, tmp_path / "look.png", interval="minmax")
    assert path == tmp_path / "look.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L" and png.size == (40, 30)
        pixels = np.asarray(png)
    np.testing.assert_array_equal(pixels, stretch(image, interval="minmax", out="uint8")[::-1])
    assert pixels[-1, 0] == 255 and pixels[0, 0] == 0 and pixels[0, 39] == 128


def test_quicklook_png_zscale_histeq_and_options(tmp_path, shared_data):
    from PIL import Image

    image = _read(shared_data / FRAMES[0])
    for name, kwargs in [
        ("z.png", {}),
        ("h.png", {"stretch": "histeq", "nbins": 1024}),
        ("a.png", {"stretch": "asinh", "a": 0.05, "interval": "percentile", "percentile": 99}),
    ]:
        path = quicklook_png(image, str(tmp_path / name), **kwargs)
        with Image.open(path) as png:
            assert png.size == (image.shape[1], image.shape[0])
    with Image.open(tmp_path / "z.png") as png:
        np.testing.assert_array_equal(
            np.asarray(png), stretch(image, interval="zscale", out="uint8")[::-1]
        )


def test_quicklook_png_errors(tmp_path, monkeypatch):
    image = np.ones((4, 4))
    with pytest.raises(InputError, match="does not exist"):
        quicklook_png(image, tmp_path / "missing" / "x.png")
    with pytest.raises(InputError, match="2-D"):
        quicklook_png(np.ones((2, 3, 4)), tmp_path / "x.png")
    with pytest.raises(InputError, match="stretch"):
        quicklook_png(image, tmp_path / "x.png", stretch="cubic")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(InputError, match="pip install pillow"):
        quicklook_png(image, tmp_path / "x.png")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda im: interval(im, "median"), r"interval: expected one of \('minmax'"),
        (lambda im: stretch(im, "cubic"), r"kind: expected one of \('linear'"),
        (lambda im: stretch(im, interval="iraf"), "interval: expected one of"),
        (lambda im: stretch(im, out="int8"), r"out: expected one of \('float', 'uint8'"),
        (lambda im: histeq(im, out="png"), "out: expected one of"),
        (lambda im: histeq(im, nbins=0), "nbins"),
        (lambda im: stretch(im, "power"), "needs the exponent a"),
        (lambda im: stretch(im, "log", a=-1.0), "a > 0"),
        (lambda im: stretch(im, "exp", a=1.0), "a != 1"),
        (lambda im: stretch(im, "sqrt", a=2.0), "a: does not apply"),
        (lambda im: stretch(im, "log", slope=2.0), "slope/intercept"),
        (lambda im: interval(im, "percentile"), "percentile"),
        (lambda im: interval(im, "percentile", percentile=120), r"\[0, 100\]"),
        (lambda im: interval(im, "minmax", percentile=90), "applies to interval 'percentile'"),
        (lambda im: interval(im, "minmax", contrast=0.1), "apply to interval 'zscale'"),
        (lambda im: interval(im, "zscale", nsamples=10), "unknown keyword"),
        (lambda im: zscale(im, max_iterations=0), "max_iterations"),
        (lambda im: zscale(im, n_samples=0), "n_samples"),
        (lambda im: zscale(im, mask=np.ones((2, 2), bool)), "mask: shape"),
        (lambda im: interval(im, vmin=np.nan), "vmin"),
    ],
)
def test_bad_arguments_raise_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call(np.ones((5, 6), dtype=np.float32))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 5)),
        np.full((4, 4), np.nan),
        np.array([[np.inf, -np.inf]]),
        np.ones((3, 3), dtype=np.complex64),
    ],
    ids=["empty", "all-nan", "all-inf", "complex"],
)
@pytest.mark.parametrize(
    "call",
    [
        zscale,
        interval,
        lambda im: interval(im, "percentile", percentile=50),
        stretch,
        histeq,
    ],
    ids=["zscale", "minmax", "percentile", "stretch", "histeq"],
)
def test_unusable_images_raise_input_error(image, call):
    with pytest.raises(InputError, match="image"):
        call(image)


def test_everything_masked_raises_and_manual_limits_skip_the_data():
    image = np.arange(12.0).reshape(3, 4)
    with pytest.raises(InputError, match="no finite, unmasked pixel"):
        histeq(image, mask=np.ones(image.shape, dtype=bool))
    assert interval(image, "manual", vmin=2, vmax=4) == (2.0, 4.0)
    assert interval(image, "manual", vmin=2) == (2.0, 11.0)
    assert interval(image, "zscale", vmax=4.5)[1] == 4.5
    # with both limits fixed an all-NaN image is stretched, not refused
    assert np.isnan(stretch(np.full((2, 2), np.nan), vmin=0.0, vmax=1.0)).all()
