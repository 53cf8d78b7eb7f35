"""dp.align: the three methods land a frame on the reference grid, masks travel with it."""

from __future__ import annotations

import numpy as np
import pytest

import dagpre.simulate as sim
from dagpre.ops.align import align
from dagpre.ops.starmatch import find_transform
from dagpre.types import Frame, InputError, MaskBit


@pytest.fixture(scope="module")
def pair():
    night = sim.night(n_frames=2, shape=(384, 384), n_stars=400, seed=8, n_transients=0)
    return [f.to_frame() for f in night.frames], night


@pytest.mark.parametrize("method", ["wcs", "stars"])
def test_stars_land_on_their_reference_positions(pair, method):
    """Aligned frame 1 shows each star where frame 0 has it (centroids within 0.05 px)."""
    from dagpre.ops.starmatch import find_stars

    (ref, img), _ = pair
    out = align(img, ref, method=method, order="lanczos3")
    assert out.image.shape == ref.data.shape
    assert out.method == method
    ref_stars = find_stars(ref.data - np.median(ref.data), max_stars=150)
    data = np.nan_to_num(out.image - np.nanmedian(out.image))
    got = find_stars(data, max_stars=150)
    tr = find_transform(got, ref_stars, model="shift")
    # the aligned frame's stars sit on the reference's: no residual shift
    assert abs(tr.matrix[0, 2]) < 0.05 and abs(tr.matrix[1, 2]) < 0.05
    assert tr.n_matches > 50
    # the footprint: 1 inside, 0 where the reference grid sees beyond frame 1
    assert 0.8 < float(out.footprint.mean()) <= 1.0  # offsets of up to 20 px
    off = out.footprint == 0
    assert np.all(out.mask[off] & MaskBit.OFF_FOOTPRINT)
    assert np.isnan(out.image[off]).all()


def test_xcorr_copies_pixels_for_a_whole_pixel_shift():
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 1, (200, 220)).astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:220]
    for x0, y0 in rng.uniform(20, 180, (40, 2)):
        ref += 200 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.0).astype(np.float32)
    img = np.zeros_like(ref)
    img[7:, :-12] = ref[:-7, 12:]  # image(x, y) = reference(x + 12, y - 7)
    mask = np.zeros(ref.shape, np.uint8)
    mask[50, 60] = MaskBit.COSMIC
    out = align(img, ref, method="xcorr", order="bicubic", mask=mask)
    assert (out.shift.dx, out.shift.dy) == (-12.0, 7.0)
    inside = out.footprint == 1
    np.testing.assert_array_equal(out.image[inside], ref[inside])  # copied, not interpolated
    assert out.mask[43, 72] & MaskBit.COSMIC  # image [50, 60] is reference [43, 72]
    assert int((out.mask & MaskBit.COSMIC).astype(bool).sum()) == 1


def test_errors_are_named(pair):
    (ref, img), _ = pair
    with pytest.raises(InputError, match="method: expected one of wcs, stars, xcorr"):
        align(img, ref, method="sift")
    with pytest.raises(InputError, match="wcs: method='wcs' needs a celestial WCS"):
        align(img.data, ref, method="wcs")
    with pytest.raises(InputError, match="image: expected a 2-D array or a Frame"):
        align([1, 2, 3], ref)
    blank = np.zeros_like(ref.data)
    with pytest.raises(InputError, match=r"blank|no sources"):
        align(blank, ref, method="stars")
    far = img.wcs.deepcopy()
    far.wcs.crval = [far.wcs.crval[0] + 30.0, far.wcs.crval[1]]
    moved = Frame(img.data, img.mask, img.header, far, img.meta)
    with pytest.raises(InputError, match="overlap"):
        align(moved, ref, method="wcs")
