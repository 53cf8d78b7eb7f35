"""xcorr_shift on simulated star fields: exact integer shifts, subpixel truth, phase correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import run_in_threads

from dagpre import simulate
from dagpre.ops.xcorr import XcorrShift, xcorr_shift
from dagpre.simulate import render_sources
from dagpre.types import Frame, InputError

SHAPE = (768, 1024)  # (ny, nx): not square, so a swapped axis shows


def _field(n_stars, seed, shape=SHAPE, margin=700):
    """Stars over the frame and a wide margin (any shift keeps the frame filled)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n = int(n_stars * (nx + 2 * margin) * (ny + 2 * margin) / (nx * ny))
    x = rng.uniform(-margin, nx + margin, n)
    y = rng.uniform(-margin, ny + margin, n)
    flux = np.exp(rng.uniform(math.log(500.0), math.log(2e5), n))
    return x, y, flux


def _observe(x, y, flux, seed, shape=SHAPE, fwhm=3.0, sky=300.0, gain=2.0, rdnoise=5.0):
    """Moffat stars + sky through Poisson and read noise (ADU), as the simulator does."""
    rng = np.random.default_rng(seed)
    keep = (x > -30) & (x < shape[1] + 30) & (y > -30) & (y < shape[0] + 30)
    lam = render_sources(shape, x[keep], y[keep], flux[keep] * gain, fwhm, "moffat", 3.0)
    lam += sky * gain
    electrons = rng.poisson(lam).astype(np.float32)
    electrons += rng.standard_normal(shape, dtype=np.float32) * np.float32(rdnoise)
    return electrons / np.float32(gain)


def _pair(dx, dy, seed, n_stars=500, shape=SHAPE, image_shape=None, fwhm=(3.0, 3.4)):
    """(image, reference): the image sees every star at (x + dx, y + dy)."""
    x, y, flux = _field(n_stars, seed, shape)
    reference = _observe(x, y, flux, seed + 1, shape, fwhm[0])
    image = _observe(x + dx, y + dy, flux, seed + 2, image_shape or shape, fwhm[1])
    return image, reference


# --------------------------------------------------------------------------- truth


@pytest.mark.parametrize(
    ("dx", "dy"), [(0, 0), (174, 0), (-61, 250), (5, -3), (-300, -171), (0, -340)]
)
def test_integer_shifts_are_exact(dx, dy):
    image, reference = _pair(dx, dy, seed=abs(dx) + abs(dy))
    shift = xcorr_shift(image, reference)
    assert (shift.dx, shift.dy) == (dx, dy)
    assert not shift.subpixel
    assert shift.significance > 30 and shift.contrast < 0.7
    sub = xcorr_shift(image, reference, subpixel=True)
    assert abs(sub.dx - dx) < 0.03 and abs(sub.dy - dy) < 0.03


def test_sign_convention_on_one_star():
    """A star at (x, y) in the reference and at (x + dx, y + dy) in the image."""
    ref = render_sources((128, 160), [40.0], [70.0], [1e5], 3.0) + 10.0
    img = render_sources((128, 160), [40.0 + 23.0], [70.0 - 11.0], [1e5], 3.0) + 10.0
    noise = np.random.default_rng(0)
    ref = (ref + noise.normal(0.0, 1.0, ref.shape)).astype(np.float32)
    img = (img + noise.normal(0.0, 1.0, img.shape)).astype(np.float32)
    shift = xcorr_shift(img, ref)
    assert tuple(shift) == (23.0, -11.0)
    # matrix: image pixels -> reference pixels, as find_transform(image, reference).matrix
    np.testing.assert_allclose(shift.matrix @ [63.0, 59.0, 1.0], [40.0, 70.0, 1.0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_subpixel_shifts_against_truth(seed):
    rng = np.random.default_rng(seed)
    dx, dy = rng.uniform(-60, 60, 2)
    image, reference = _pair(dx, dy, seed=10 * seed, fwhm=(3.0, 3.0))
    shift = xcorr_shift(image, reference, subpixel=True)
    assert shift.subpixel
    assert abs(shift.dx - dx) < 0.03 and abs(shift.dy - dy) < 0.03
    whole = xcorr_shift(image, reference)
    assert (whole.dx, whole.dy) == (round(dx), round(dy))


def test_phase_correlation_locks_on_hot_pixels_and_we_do_not():
    """Simulated night frames (hot pixels, cosmic rays, seeing changes), pure pointing offset.

    skimage's phase correlation (default ``normalization="phase"``) whitens the spectrum, so
    the fixed pattern of hot pixels wins and it reports no shift at all; star light alone
    gives the true offset.
    """
    registration = pytest.importorskip("skimage.registration")
    night = simulate.night(
        n_frames=2,
        shape=(512, 512),
        n_stars=100,
        seed=1,
        max_offset=60.0,
        max_rotation=0.0,
        n_transients=0,
        n_hot_pixels=500,
        cosmic_rate=200.0,
    )
    f0, f1 = night.frames
    c0, c1 = f0.conditions, f1.conditions
    true = (c1["offset_x"] - c0["offset_x"], c1["offset_y"] - c0["offset_y"])  # frame 1 vs 0
    phase, _, _ = registration.phase_cross_correlation(f0.data, f1.data, upsample_factor=20)
    assert np.hypot(*phase) < 0.5 < np.hypot(*true) - 10  # reports ~(0, 0): wrong
    ours = xcorr_shift(f1.data, f0.data, subpixel=True)
    assert abs(ours.dx - true[0]) < 0.1 and abs(ours.dy - true[1]) < 0.1
    assert xcorr_shift(f1.data, f0.data).dx == round(true[0])


# --------------------------------------------------------------------------- options


def test_max_shift_pads_for_shifts_beyond_half_the_frame():
    image, reference = _pair(600, 20, seed=7, shape=(512, 1024))
    wrapped = xcorr_shift(image, reference)
    assert wrapped.dx != 600  # lags stop at half the FFT size without padding
    padded = xcorr_shift(image, reference, max_shift=650)
    assert (padded.dx, padded.dy) == (600, 20)
    limited = xcorr_shift(image, reference, max_shift=100)
    assert abs(limited.dx) <= 100 and abs(limited.dy) <= 100
    assert limited.significance < padded.significance


def test_frames_of_different_shapes_share_the_origin():
    image, reference = _pair(-35, 48, seed=8, shape=(600, 700), image_shape=(520, 640))
    assert (xcorr_shift(image, reference).dx, xcorr_shift(image, reference).dy) == (-35, 48)
    back = xcorr_shift(reference, image)
    assert (back.dx, back.dy) == (35, -48)


def test_masks_and_frames():
    image, reference = _pair(12, -9, seed=9)
    hot = np.zeros(SHAPE, dtype=np.uint8)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.integers(5, 760, 300), rng.integers(5, 1016, 300), strict=True):
        hot[y : y + 3, x : x + 3] = 1  # 3x3 hot blocks, at the same place in both frames
    image[hot > 0] = 6e4
    reference[hot > 0] = 6e4
    shift = xcorr_shift(Frame(image, hot), Frame(reference, hot))
    assert (shift.dx, shift.dy) == (12, -9)
    assert shift == xcorr_shift(image, reference, mask=hot, reference_mask=hot)
    everything = np.ones(SHAPE, dtype=bool)
    with pytest.raises(InputError, match=r"^image: no valid background mesh"):
        xcorr_shift(image, reference, mask=everything)
    with pytest.raises(InputError, match=r"^reference: no valid background mesh"):
        xcorr_shift(image, Frame(reference, everything.astype(np.uint8)))
    # masked hot blocks in a frame with no stars leave no star light at all
    flat = np.random.default_rng(1).normal(100.0, 3.0, SHAPE).astype(np.float32)
    flat[hot > 0] = 6e4
    with pytest.raises(InputError, match=r"^image: no star light"):
        xcorr_shift(flat, reference, mask=hot)


def test_deterministic_and_thread_safe():
    image, reference = _pair(-23, 31, seed=11, shape=(256, 384), n_stars=150)
    serial = xcorr_shift(image, reference, subpixel=True, threads=1)
    results = run_in_threads(lambda _: xcorr_shift(image, reference, subpixel=True), list(range(4)))
    assert all(r == serial for r in results)
    assert isinstance(serial, XcorrShift)


# --------------------------------------------------------------------------- errors


def test_blank_frames_are_named():
    _, reference = _pair(0, 0, seed=12, shape=(256, 256), n_stars=100)
    flat = np.full((256, 256), 100.0, dtype=np.float32)
    with pytest.raises(InputError, match=r"^image: no star light.*blank or flat"):
        xcorr_shift(flat, reference)
    with pytest.raises(InputError, match=r"^reference: no star light"):
        xcorr_shift(reference, np.zeros((256, 256), dtype=np.float32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upsample": 0}, "upsample"),
        ({"max_shift": -1.0}, "max_shift"),
        ({"clip": 0.0}, "clip"),
        ({"threshold": math.inf}, "threshold"),
        ({"taper": -2}, "taper"),
        ({"threads": 0}, "threads"),
        ({"mask": np.zeros((3, 3))}, "mask"),
        ({"reference_mask": np.zeros((3, 3))}, "reference_mask"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, match):
    image, reference = _pair(0, 0, seed=13, shape=(128, 128), n_stars=50)
    with pytest.raises(InputError, match=f"^{match}"):
        xcorr_shift(image, reference, **kwargs)


def test_bad_images_name_the_input():
    _, reference = _pair(0, 0, seed=14, shape=(128, 128), n_stars=50)
    with pytest.raises(InputError, match=r"^image"):
        xcorr_shift(np.zeros(10), reference)
    with pytest.raises(InputError, match=r"^reference"):
        xcorr_shift(reference, np.zeros((2, 3, 4)))


# --------------------------------------------------------------------------- devices


def test_backends_agree(xp):
    """NumPy and CuPy give the same whole-pixel shift, and subpixel shifts to 2e-3 px."""
    image, reference = _pair(-174, 57, seed=15)
    on_host = xcorr_shift(image, reference, subpixel=True)
    on_device = xcorr_shift(xp.asarray(image), xp.asarray(reference), subpixel=True)
    assert round(on_device.dx) == round(on_host.dx) == -174
    assert round(on_device.dy) == round(on_host.dy) == 57
    assert abs(on_device.dx - on_host.dx) < 2e-3 and abs(on_device.dy - on_host.dy) < 2e-3
    whole = xcorr_shift(xp.asarray(image), xp.asarray(reference), max_shift=200)
    assert (whole.dx, whole.dy) == (-174.0, 57.0)
    assert isinstance(whole.dx, float)
