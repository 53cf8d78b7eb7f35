"""Tests of :mod:`dagpre.io.fits`: reading real and synthetic FITS files, every kind of bad
input, and write/read round trips. The oracle is astropy itself (shapes, scaled pixels, WCS).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dagpre.backend import BackendError
from dagpre.io.fits import read_fits, write_fits
from dagpre.types import META_KEYS, Frame, InputError, MaskBit

# Same folder as the `shared_data` fixture; used only to list parameters at collection time.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
_REAL_FILES = (
    sorted(
        str(p.relative_to(_SHARED))
        for pattern in ("*.fits", "*.fits.gz")
        for p in _SHARED.rglob(pattern)
    )
    if _SHARED.is_dir()
    else []
)
_LCO = "lco_bulge/lsc1m005-fl15-20170614-0130-e91_cropped_v2.fits.gz"
_DECAM = "decam/input_data/DEC-OBS04a.mini.fits"
_SEP = "sep/image.fits"

# header card -> meta key, for the checks on real headers
_META_CARDS = {
    "GAIN": "gain",
    "RDNOISE": "rdnoise",
    "SATURATE": "saturate",
    "EXPTIME": "exptime",
    "MJD-OBS": "mjd",
}


# --------------------------------------------------------------------------- helpers


def _write(path: Path, *hdus) -> Path:
    fits.HDUList(list(hdus)).writeto(path, overwrite=True)
    return path


def _image(shape=(20, 30), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 5.0, shape).astype(np.float32)


def _astropy_celestial(path: Path, index: int) -> WCS | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            wcs = WCS(hdul[index].header, fobj=hdul, relax=True)
    return wcs.celestial if wcs.has_celestial else None


def _open_fds_on(path: Path) -> int:
    """How many of this process's file descriptors point at ``path`` (Linux /proc)."""
    fd_dir = Path("/proc/self/fd")
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) == target:
                count += 1
        except OSError:
            continue
    return count


def _sip_wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [15.5, 10.5]
    wcs.wcs.cd = [[-7.5e-5, 1e-6], [2e-6, 7.5e-5]]
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1] = 1e-5, -2e-6, 3e-6
    b[2, 0], b[0, 2], b[3, 0] = 2e-6, 1e-5, 1e-8
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def _pixel_grid(shape, step=7):
    y, x = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    return x.ravel().astype(float), y.ravel().astype(float)


# =========================================================================== real data


@pytest.mark.parametrize(
    "relpath",
    _REAL_FILES
    or [pytest.param(None, marks=pytest.mark.skip(reason=f"real data folder {_SHARED} absent"))],
)
def test_real_file_reads_like_astropy(shared_data, relpath):
    """Every real file: shape and WCS agree with astropy, pixels float32, meta filled."""
    path = shared_data / relpath
    frame = read_fits(path, device="cpu")
    index = frame.meta["hdu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            expected = np.asarray(hdul[index].data, dtype=np.float64)
            header = hdul[index].header
    assert frame.shape == expected.shape
    assert frame.data.dtype == np.float32 and frame.data.flags.c_contiguous
    assert frame.mask.dtype == np.uint8
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(frame.data[finite], expected[finite].astype(np.float32))
    assert frame.meta["path"] == str(path)

    oracle = _astropy_celestial(path, index)
    if oracle is None:
        assert frame.wcs is None
    else:
        x, y = _pixel_grid(frame.shape, step=max(frame.shape) // 9)
        got = np.array(frame.wcs.all_pix2world(x, y, 0))
        want = np.array(oracle.all_pix2world(x, y, 0))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)

    for card, key in _META_CARDS.items():
        if card in header:
            assert frame.meta[key] == pytest.approx(float(header[card]), rel=1e-12), card
    if "FILTER" in header:
        assert frame.meta["filter"] == str(header["FILTER"]).strip()


def test_lco_default_read_is_the_400x400_primary(shared_data):
    """HDU 0 image, HDU 1 table, HDU 2 big image: the default is HDU 0 with its meta."""
    frame = read_fits(shared_data / _LCO, device="cpu")
    assert frame.shape == (400, 400)
    assert frame.meta["hdu"] == 0
    for key in ("gain", "saturate", "rdnoise", "mjd", "exptime"):
        assert isinstance(frame.meta[key], float), key
    assert frame.meta["filter"] == "ip"
    assert frame.wcs is not None and frame.wcs.wcs.ctype[0] == "RA---TAN"


def test_lco_table_hdu_is_refused_by_name(shared_data):
    path = shared_data / _LCO
    with pytest.raises(InputError, match=r"HDU 1 CAT is a BinTableHDU, not an image") as err:
        read_fits(path, hdu="CAT", device="cpu")
    assert str(path) in str(err.value)
    assert "2 BPM (ImageHDU, 4096x4096)" in str(err.value)


def test_decam_tpv_frame_meta_and_wcs(shared_data):
    frame = read_fits(shared_data / _DECAM, device="cpu")
    assert frame.meta["gain"] == pytest.approx(3.984046692260535)
    assert frame.meta["saturate"] == pytest.approx(46536.1041736873)
    assert frame.meta["rdnoise"] == pytest.approx(11.83702)
    assert frame.meta["mjd"] == pytest.approx(58334.39133794)
    assert "TPV" in frame.header["CTYPE1"]
    assert frame.wcs.has_celestial


def test_sep_image_with_eso_log_cards_reads_without_warnings(shared_data):
    path = shared_data / _SEP
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = read_fits(path, device="cpu")
    assert [str(w.message) for w in caught] == []
    assert frame.shape == (256, 256)
    assert frame.wcs is None  # pixel-only WCS (empty CTYPEs)
    assert frame.meta["exptime"] == 1200.0
    assert frame.meta["mjd"] == pytest.approx(48921.62787)
    # int16 with BSCALE/BZERO: the scaled values, as astropy gives them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy itself warns about the ESO-LOG cards
        with fits.open(path, memmap=False) as hdul:
            expected = hdul[0].data.astype(np.float32)
    np.testing.assert_array_equal(frame.data, expected)


def test_device_gives_arrays_of_xp(shared_data, xp):
    device = "cpu" if xp is np else "gpu"
    frame = read_fits(shared_data / _SEP, device=device)
    assert isinstance(frame.data, xp.ndarray)
    assert isinstance(frame.mask, xp.ndarray)
    assert frame.device == device


# =========================================================================== synthetic reads


def test_scaled_int16_becomes_float32(tmp_path):
    raw = np.arange(600, dtype=np.int16).reshape(20, 30)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    path = _write(tmp_path / "scaled.fits", hdu)
    frame = read_fits(path, device="cpu")
    assert frame.data.dtype == np.float32
    np.testing.assert_array_equal(frame.data, (raw * 0.5 + 100.0).astype(np.float32))
    assert not frame.mask.any()


def test_uint16_via_bzero_reads_exactly(tmp_path):
    raw = np.array([[0, 1, 40000], [65535, 7, 8]], dtype=np.uint16)
    path = _write(tmp_path / "u16.fits", fits.PrimaryHDU(raw))
    np.testing.assert_array_equal(read_fits(path, device="cpu").data, raw.astype(np.float32))


def test_integer_blank_pixels_are_flagged_nonfinite(tmp_path):
    raw = np.arange(25, dtype=np.int16).reshape(5, 5)
    raw[1, 2] = -999
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BLANK"] = -999
    frame = read_fits(_write(tmp_path / "blank.fits", hdu), device="cpu")
    assert frame.data[1, 2] == 0.0
    assert frame.mask[1, 2] == MaskBit.NONFINITE
    assert np.count_nonzero(frame.mask) == 1
    assert frame.data[4, 4] == 24.0


def test_nan_and_inf_are_zeroed_and_flagged(tmp_path):
    data = _image()
    data[0, 0], data[3, 4], data[5, 6] = np.nan, np.inf, -np.inf
    frame = read_fits(_write(tmp_path / "nan.fits", fits.PrimaryHDU(data)), device="cpu")
    bad = np.zeros(data.shape, bool)
    bad[0, 0] = bad[3, 4] = bad[5, 6] = True
    np.testing.assert_array_equal(frame.mask, np.where(bad, MaskBit.NONFINITE, 0))
    assert np.all(frame.data[bad] == 0.0)
    np.testing.assert_array_equal(frame.data[~bad], data[~bad])


def test_float64_beyond_float32_range_is_flagged(tmp_path):
    data = np.ones((4, 4))
    data[2, 2] = 1e300
    frame = read_fits(_write(tmp_path / "big.fits", fits.PrimaryHDU(data)), device="cpu")
    assert frame.mask[2, 2] == MaskBit.NONFINITE and frame.data[2, 2] == 0.0


def test_rice_compressed_extension_is_the_default_hdu(tmp_path):
    raw = np.random.default_rng(1).integers(0, 60000, (40, 50)).astype(np.int32)
    comp = fits.CompImageHDU(raw, compression_type="RICE_1", name="SCI")
    path = _write(tmp_path / "rice.fits.fz", fits.PrimaryHDU(), comp)
    frame = read_fits(path, device="cpu")
    assert frame.meta["hdu"] == 1
    np.testing.assert_array_equal(frame.data, raw.astype(np.float32))
    assert frame.header["NAXIS1"] == 50  # the image header, not the BINTABLE one


def test_gzipped_file_reads(tmp_path):
    data = _image()
    plain = _write(tmp_path / "plain.fits", fits.PrimaryHDU(data))
    packed = tmp_path / "plain.fits.gz"
    with open(plain, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    np.testing.assert_array_equal(read_fits(packed, device="cpu").data, data)


def test_hdu_by_index_name_tuple_and_negative_index(tmp_path):
    a, b = _image(seed=1), _image(seed=2)
    sci2 = fits.ImageHDU(b, name="SCI")
    sci2.header["EXTVER"] = 2
    path = _write(tmp_path / "mef.fits", fits.PrimaryHDU(), fits.ImageHDU(a, name="SCI"), sci2)
    np.testing.assert_array_equal(read_fits(path, device="cpu").data, a)
    np.testing.assert_array_equal(read_fits(path, hdu=2, device="cpu").data, b)
    np.testing.assert_array_equal(read_fits(path, hdu=("SCI", 2), device="cpu").data, b)
    np.testing.assert_array_equal(read_fits(path, hdu="sci", device="cpu").data, a)
    frame = read_fits(path, hdu=-1, device="cpu")
    assert frame.meta["hdu"] == 2


def test_header_is_a_copy(tmp_path):
    path = _write(tmp_path / "h.fits", fits.PrimaryHDU(_image()))
    frame = read_fits(path, device="cpu")
    frame.header["NEWCARD"] = 1
    assert "NEWCARD" not in read_fits(path, device="cpu").header


def test_third_plane_of_a_cube(tmp_path):
    cube = np.stack([_image(seed=k) for k in range(3)])
    path = _write(tmp_path / "cube.fits", fits.PrimaryHDU(cube))
    frame = read_fits(path, plane=2, device="cpu")
    np.testing.assert_array_equal(frame.data, cube[2])
    assert frame.data.flags.c_contiguous and frame.meta["plane"] == 2


@pytest.mark.parametrize("plane", [3, -1, 1.0, True])
def test_bad_plane_is_refused(tmp_path, plane):
    path = _write(tmp_path / "cube.fits", fits.PrimaryHDU(np.zeros((3, 4, 5), np.float32)))
    with pytest.raises(InputError, match=r"plane=.* not an index in 0\.\.2"):
        read_fits(path, plane=plane, device="cpu")


def test_plane_for_2d_data_is_refused(tmp_path):
    path = _write(tmp_path / "flat.fits", fits.PrimaryHDU(_image()))
    with pytest.raises(InputError, match="plane=0 was given but the data are 2-D"):
        read_fits(path, plane=0, device="cpu")


def test_4d_data_is_refused(tmp_path):
    path = _write(tmp_path / "4d.fits", fits.PrimaryHDU(np.zeros((1, 2, 4, 5), np.float32)))
    with pytest.raises(InputError, match=r"expected a 2-D image, got 4-D data of shape"):
        read_fits(path, device="cpu")


# --------------------------------------------------------------------------- mask extension


def test_mask_extension_is_ored_into_the_mask(tmp_path):
    data = _image()
    data[0, 1] = np.nan
    bits = np.zeros(data.shape, np.int16)
    bits[2, 3] = MaskBit.BAD
    bits[0, 1] = MaskBit.SATURATED
    bits[4, 4] = 300  # does not fit in 8 bits: still flagged (USER)
    path = _write(tmp_path / "m.fits", fits.PrimaryHDU(data), fits.ImageHDU(bits, name="MASK"))
    frame = read_fits(path, device="cpu")
    assert frame.mask[2, 3] == MaskBit.BAD
    assert frame.mask[0, 1] == MaskBit.SATURATED | MaskBit.NONFINITE
    assert frame.mask[4, 4] == MaskBit.USER
    assert np.count_nonzero(frame.mask) == 3
    # reading the MASK HDU itself does not OR it into itself
    own = read_fits(path, hdu="MASK", device="cpu")
    assert not own.mask.any() and own.data[2, 3] == 1.0


def test_mask_extension_of_other_shape_or_float_type_is_ignored(tmp_path):
    data = _image()
    path = _write(
        tmp_path / "m.fits",
        fits.PrimaryHDU(data),
        fits.ImageHDU(np.ones((3, 3), np.uint8), name="MASK"),
        fits.ImageHDU(np.ones(data.shape, np.float32), name="MASK"),
    )
    assert not read_fits(path, device="cpu").mask.any()


# --------------------------------------------------------------------------- metadata


def test_meta_aliases(tmp_path):
    hdu = fits.PrimaryHDU(_image())
    hdu.header.update(
        {
            "EGAIN": 1.5,
            "READNOIS": 4.0,
            "SATLEVEL": 6.0e4,
            "EXPOSURE": 30,
            "FILTER1": " r' ",
            "MJD_OBS": 59000.25,
        }
    )
    meta = read_fits(_write(tmp_path / "a.fits", hdu), device="cpu").meta
    assert meta["gain"] == 1.5 and meta["rdnoise"] == 4.0 and meta["saturate"] == 6.0e4
    assert meta["exptime"] == 30.0 and isinstance(meta["exptime"], float)
    assert meta["filter"] == "r'"
    assert meta["mjd"] == 59000.25
    assert set(META_KEYS) <= set(meta)


@pytest.mark.parametrize(
    ("cards", "mjd"),
    [
        ({"DATE-OBS": "2017-06-15T03:29:35.293"}, 57919.14554737268),
        ({"DATE-OBS": "2017-06-15", "TIME-OBS": "03:29:35.293"}, 57919.14554737268),
        ({"DATE-OBS": "2017-06-15", "UT": "06:00:00"}, 57919.25),
        ({"DATE-OBS": "26/10/92"}, 48921.0),  # the pre-2000 FITS form DD/MM/YY
        ({"DATE-OBS": "2017-06-15T03:29:35", "MJD-OBS": 57000.5}, 57000.5),
        ({"DATE-OBS": "last tuesday"}, None),
        ({"DATE-OBS": "2017-06-15T25:00:00"}, None),
    ],
)
def test_mjd_from_date_obs(tmp_path, cards, mjd):
    hdu = fits.PrimaryHDU(_image())
    hdu.header.update(cards)
    got = read_fits(_write(tmp_path / "d.fits", hdu), device="cpu").meta["mjd"]
    if mjd is None:
        assert got is None
    else:
        assert got == pytest.approx(mjd, abs=1e-9)


def test_unparseable_meta_values_are_none(tmp_path):
    hdu = fits.PrimaryHDU(_image())
    hdu.header.update(
        {"GAIN": "N/A", "RDNOISE": "", "SATURATE": True, "EXPTIME": "12.5", "FILTER": "  "}
    )
    meta = read_fits(_write(tmp_path / "u.fits", hdu), device="cpu").meta
    assert meta["gain"] is None and meta["rdnoise"] is None and meta["saturate"] is None
    assert meta["exptime"] == 12.5  # a numeric string is still a number
    assert meta["filter"] is None


def test_meta_from_extension_first_then_primary(tmp_path):
    primary = fits.PrimaryHDU()
    primary.header.update({"GAIN": 2.0, "MJD-OBS": 58000.0, "FILTER": "g", "EXPTIME": 10.0})
    ext = fits.ImageHDU(_image(), name="SCI")
    ext.header.update({"GAIN": 3.0, "RDNOISE": 5.0})
    meta = read_fits(_write(tmp_path / "x.fits", primary, ext), device="cpu").meta
    assert meta["gain"] == 3.0  # the extension wins
    assert meta["rdnoise"] == 5.0
    assert meta["mjd"] == 58000.0 and meta["filter"] == "g" and meta["exptime"] == 10.0
    assert meta["hdu"] == 1


# --------------------------------------------------------------------------- WCS


def test_sip_wcs_matches_astropy(tmp_path):
    wcs = _sip_wcs()
    hdu = fits.PrimaryHDU(_image(), header=wcs.to_header(relax=True))
    path = _write(tmp_path / "sip.fits", hdu)
    frame = read_fits(path, device="cpu")
    assert frame.wcs.sip is not None
    x, y = _pixel_grid(frame.shape, step=3)
    np.testing.assert_allclose(
        np.array(frame.wcs.all_pix2world(x, y, 0)),
        np.array(wcs.all_pix2world(x, y, 0)),
        rtol=0,
        atol=1e-10,
    )


def test_non_celestial_wcs_gives_none(tmp_path):
    hdu = fits.PrimaryHDU(_image())
    hdu.header.update({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CRPIX1": 1.0})
    assert read_fits(_write(tmp_path / "lin.fits", hdu), device="cpu").wcs is None


def test_broken_wcs_is_an_input_error(tmp_path):
    hdu = fits.PrimaryHDU(_image())
    hdu.header.update({"CTYPE1": "RA---TAN", "CTYPE2": "RA---TAN"})
    path = _write(tmp_path / "badwcs.fits", hdu)
    with pytest.raises(InputError, match="WCS cannot be parsed"):
        read_fits(path, device="cpu")


# =========================================================================== bad input


def _bad_missing(tmp_path):
    return tmp_path / "nothere.fits", {}, "no such file"


def _bad_directory(tmp_path):
    folder = tmp_path / "folder.fits"
    folder.mkdir()
    return folder, {}, "is a directory"


def _bad_empty(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    return path, {}, r"empty file \(0 bytes\)"


def _bad_not_fits(tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("these are observing notes, not a FITS file\n" * 100)
    return path, {}, "not a FITS file"


def _bad_truncated_data(tmp_path):
    path = _write(tmp_path / "trunc.fits", fits.PrimaryHDU(_image((100, 100))))
    path.write_bytes(path.read_bytes()[:-20000])
    return path, {}, "truncated or corrupt"


def _bad_truncated_padding(tmp_path):
    """Only the final block padding is missing: astropy reads the pixels and only warns."""
    path = _write(tmp_path / "trunc.fits", fits.PrimaryHDU(_image((100, 100))))
    path.write_bytes(path.read_bytes()[: 2880 + 100 * 100 * 4])
    return path, {}, "truncated file"


def _bad_no_image(tmp_path):
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])
    path = _write(tmp_path / "table.fits", fits.PrimaryHDU(), table)
    return path, {}, r"no image HDU with data; HDUs are 0 PRIMARY \(PrimaryHDU, no data\)"


def _bad_1d(tmp_path):
    path = _write(tmp_path / "spec.fits", fits.PrimaryHDU(np.arange(10.0)))
    return path, {}, r"expected a 2-D image, got 1-D data of shape \(10,\)"


def _bad_3d(tmp_path):
    path = _write(tmp_path / "cube.fits", fits.PrimaryHDU(np.zeros((3, 100, 100), np.float32)))
    return (
        path,
        {},
        (r"3-D data of shape \(3, 100, 100\); pass plane=<index> \(0\.\.2\) to read one plane"),
    )


def _bad_all_nan(tmp_path):
    path = _write(tmp_path / "nan.fits", fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32)))
    return path, {}, "every pixel of HDU 0 is NaN"


def _bad_zero_size(tmp_path):
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        "NAXIS   =                    2",
        "NAXIS1  =                    0",
        "NAXIS2  =                   10",
        "END",
    ]
    path = tmp_path / "zero.fits"
    path.write_bytes("".join(card.ljust(80) for card in cards).ljust(2880).encode("ascii"))
    return path, {}, r"zero-size axis: data of shape \(10, 0\)"


def _bad_compressed_tile(tmp_path):
    raw = np.random.default_rng(1).integers(0, 1000, (100, 100)).astype(np.int32)
    path = _write(tmp_path / "rice.fits", fits.PrimaryHDU(), fits.CompImageHDU(raw, name="SCI"))
    with fits.open(path, disable_image_compression=True) as hdul:
        info = hdul[1].fileinfo()
        heap = info["datLoc"] + hdul[1].header["NAXIS1"] * hdul[1].header["NAXIS2"]
    blob = bytearray(path.read_bytes())
    blob[heap : heap + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(blob))
    return path, {}, r"cannot read the pixels of HDU 1 SCI \(truncated or corrupt data"


def _bad_hdu_name(tmp_path):
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])
    table.name = "CAT"
    path = _write(tmp_path / "mef.fits", fits.PrimaryHDU(np.zeros((40, 40), np.float32)), table)
    return (
        path,
        {"hdu": "SCI"},
        (r"no HDU 'SCI'; HDUs are 0 PRIMARY \(PrimaryHDU, 40x40\), 1 CAT \(BinTableHDU\)"),
    )


def _bad_hdu_index(tmp_path):
    path = _write(tmp_path / "one.fits", fits.PrimaryHDU(_image()))
    return path, {"hdu": 3}, r"no HDU 3; HDUs are 0 PRIMARY \(PrimaryHDU, 20x30\)"


def _bad_hdu_type(tmp_path):
    path = _write(tmp_path / "one.fits", fits.PrimaryHDU(_image()))
    return path, {"hdu": 1.5}, "hdu must be an int index, an EXTNAME or"


def _bad_hdu_empty_primary(tmp_path):
    path = _write(tmp_path / "ext.fits", fits.PrimaryHDU(), fits.ImageHDU(_image()))
    return path, {"hdu": 0}, "HDU 0 PRIMARY has no data"


def _bad_device(tmp_path):
    path = _write(tmp_path / "one.fits", fits.PrimaryHDU(_image()))
    return path, {"device": "tpu"}, "device: expected one of"


_BAD_CASES = {
    "missing": _bad_missing,
    "directory": _bad_directory,
    "empty": _bad_empty,
    "not_fits": _bad_not_fits,
    "truncated_data": _bad_truncated_data,
    "truncated_padding": _bad_truncated_padding,
    "no_image_hdu": _bad_no_image,
    "1d": _bad_1d,
    "3d": _bad_3d,
    "all_nan": _bad_all_nan,
    "zero_size_axis": _bad_zero_size,
    "corrupt_compressed_tile": _bad_compressed_tile,
    "hdu_name": _bad_hdu_name,
    "hdu_index": _bad_hdu_index,
    "hdu_type": _bad_hdu_type,
    "hdu_without_data": _bad_hdu_empty_primary,
    "device": _bad_device,
}


@pytest.mark.parametrize("case", list(_BAD_CASES))
def test_bad_input_is_one_line_input_error_naming_the_path(tmp_path, case):
    path, kwargs, pattern = _BAD_CASES[case](tmp_path)
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(InputError, match=pattern) as err:
        read_fits(path, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    if case == "device":
        assert isinstance(err.value, BackendError)
    if path.is_file():
        assert _open_fds_on(path) == 0, "the file was left open"


def test_not_a_path_is_an_input_error():
    with pytest.raises(InputError, match="expected a file path"):
        read_fits(42, device="cpu")


# =========================================================================== writing


def _frame_with_sip() -> Frame:
    data = _image()
    data[1, 1] = np.nan
    wcs = _sip_wcs()
    header = wcs.to_header(relax=True)
    header.update(
        {
            "GAIN": 1.7,
            "RDNOISE": 3.5,
            "SATURATE": 6.5e4,
            "EXPTIME": 45.0,
            "FILTER": "i",
            "MJD-OBS": 59123.123456789012,
        }
    )
    path = Path(tempfile.mkdtemp()) / "src.fits"
    try:
        _write(path, fits.PrimaryHDU(data, header=header))
        frame = read_fits(path, device="cpu")
    finally:
        shutil.rmtree(path.parent)
    mask = frame.mask.copy()
    mask[3, 4] = MaskBit.COSMIC | MaskBit.BAD
    return Frame(frame.data, mask, frame.header, frame.wcs, frame.meta)


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_of_a_frame(tmp_path, compress):
    frame = _frame_with_sip()
    out = write_fits(tmp_path / "out.fits", frame, compress=compress)
    assert out == tmp_path / "out.fits"
    back = read_fits(out, device="cpu")
    np.testing.assert_array_equal(back.data, frame.data)
    np.testing.assert_array_equal(back.mask, frame.mask)
    assert {k: back.meta[k] for k in META_KEYS} == {k: frame.meta[k] for k in META_KEYS}
    assert back.wcs.wcs.compare(frame.wcs.wcs)
    assert back.wcs.to_header(relax=True) == frame.wcs.to_header(relax=True)
    np.testing.assert_array_equal(back.wcs.sip.a, frame.wcs.sip.a)
    assert back.meta["hdu"] == (1 if compress else 0)
    with fits.open(out, disable_image_compression=True) as hdul:
        assert hdul[-1].name == "MASK"
        if compress:
            assert hdul[1].header["ZCMPTYPE"] == "GZIP_2"  # lossless for floats
            assert hdul[2].header["ZCMPTYPE"] == "RICE_1"


def test_round_trip_of_a_real_frame_keeps_wcs_cards_exactly(shared_data, tmp_path):
    frame = read_fits(shared_data / _DECAM, device="cpu")
    back = read_fits(write_fits(tmp_path / "decam.fits", frame), device="cpu")
    np.testing.assert_array_equal(back.data, frame.data)
    assert {k: back.meta[k] for k in META_KEYS} == {k: frame.meta[k] for k in META_KEYS}
    assert back.wcs.wcs.compare(frame.wcs.wcs)
    for key in ("CRPIX2", "PV1_7", "PV2_10", "CRVAL1"):
        assert back.header[key] == frame.header[key]
    with fits.open(tmp_path / "decam.fits") as hdul:
        assert "MASK" not in [h.name for h in hdul]  # no bit set: no MASK extension


def test_new_wcs_replaces_all_old_wcs_cards(shared_data, tmp_path):
    """A TAN WCS written over a TPV header leaves no stale PV cards behind."""
    frame = read_fits(shared_data / _DECAM, device="cpu")
    tan = WCS(naxis=2)
    tan.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    tan.wcs.crval = [316.8, -65.9]
    tan.wcs.crpix = [128.5, 128.5]
    tan.wcs.cdelt = [-7.3e-5, 7.3e-5]
    out = write_fits(tmp_path / "tan.fits", frame, wcs=tan)
    back = read_fits(out, device="cpu")
    assert not [key for key in back.header if key.startswith("PV")]
    assert back.header["CTYPE1"] == "RA---TAN"
    assert back.meta["mjd"] == frame.meta["mjd"]  # not rounded by the WCS cards
    x, y = _pixel_grid(back.shape, step=32)
    np.testing.assert_allclose(
        np.array(back.wcs.all_pix2world(x, y, 0)),
        np.array(tan.all_pix2world(x, y, 0)),
        rtol=0,
        atol=1e-10,
    )


def test_write_array_with_header_wcs_and_mask(tmp_path):
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = True
    header = {"GAIN": 2.5, "BITPIX": 16, "NAXIS": 2}  # structural cards are dropped
    out = write_fits(tmp_path / "arr.fits", data, header=header, wcs=_sip_wcs(), mask=mask)
    back = read_fits(out, device="cpu")
    np.testing.assert_array_equal(back.data, data.astype(np.float32))
    assert back.mask[0, 0] == 1 and np.count_nonzero(back.mask) == 1
    assert back.meta["gain"] == 2.5
    assert back.wcs.sip is not None


def test_compressed_integer_write_is_lossless(tmp_path):
    raw = np.random.default_rng(3).integers(-(2**31), 2**31 - 1, (30, 40), dtype=np.int64)
    out = write_fits(tmp_path / "int.fits", raw, compress=True)
    with fits.open(out) as hdul:
        np.testing.assert_array_equal(hdul[1].data, raw)  # GZIP_2: RICE would cut to 32 bits
    small = raw.astype(np.int16)
    out = write_fits(tmp_path / "i16.fits", small, compress=True)
    with fits.open(out) as hdul:
        np.testing.assert_array_equal(hdul[1].data, small)
    with fits.open(out, disable_image_compression=True) as hdul:
        assert hdul[1].header["ZCMPTYPE"] == "RICE_1"


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = write_fits(tmp_path / "a.fits", _image())
    with pytest.raises(InputError, match="file exists; pass overwrite=True") as err:
        write_fits(path, _image(seed=5))
    assert str(path) in str(err.value)
    write_fits(path, _image(seed=5), overwrite=True)
    np.testing.assert_array_equal(read_fits(path, device="cpu").data, _image(seed=5))


@pytest.mark.parametrize(
    ("data", "mask", "pattern"),
    [
        (np.zeros((2, 3, 4), np.float32), None, "data: expected a 2-D image"),
        (np.zeros((3, 4), complex), None, "data: expected integer or float pixels"),
        (np.zeros((3, 4), np.float32), np.zeros((4, 3), np.uint8), "mask: shape"),
        (np.zeros((3, 4), np.float32), np.full((3, 4), 256), "mask: values must fit"),
        (np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32), "mask: expected integer"),
    ],
)
def test_write_refuses_bad_arrays(tmp_path, data, mask, pattern):
    with pytest.raises(InputError, match=pattern):
        write_fits(tmp_path / "bad.fits", data, mask=mask)
    assert not (tmp_path / "bad.fits").exists()


def test_write_into_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot write the file"):
        write_fits(tmp_path / "no" / "such" / "dir.fits", _image())


def test_write_gz_round_trip(tmp_path):
    data = _image()
    out = write_fits(tmp_path / "g.fits.gz", data)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_fits(out, device="cpu").data, data)


@settings(max_examples=25, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    compress=st.booleans(),
)
def test_property_write_read_keeps_finite_pixels_and_flags_the_rest(data, compress):
    finite = np.isfinite(data)
    if not finite.any():
        data = data.copy()
        data.flat[0] = 1.0
        finite = np.isfinite(data)
    with tempfile.TemporaryDirectory() as folder:
        out = write_fits(Path(folder) / "p.fits", data, compress=compress)
        frame = read_fits(out, device="cpu")
    np.testing.assert_array_equal(frame.data[finite], data[finite])
    np.testing.assert_array_equal(frame.mask, np.where(finite, 0, MaskBit.NONFINITE))
    assert np.all(frame.data[~finite] == 0.0)
