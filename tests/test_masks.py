"""mask_saturation: saturated cores, grown disks and bleed trails (oracle: simulate's truth).

Acceptance, on simulated nights (``dagpre.simulate.night``, saturation 50,000 ADU, bright
stars peaking at 5-50 times that, trails spilled along ``y``):

* trail recall: at least 99 % of the truth ``BLEED`` pixels carry ``BLEED`` or
  ``SATURATED`` in the mask;
* false flags: under 1 % of *unsaturated star pixels* carry any flag. Those are the pixels
  within 2 FWHM (the truth FWHM at the star) of the true position of a source whose
  noise-free peak plus sky stays below saturation in that frame
  (``epochs["saturated"]`` False), leaving out every pixel within 15 px of a truth
  ``SATURATED`` or ``BLEED`` pixel (the saturated stars, their trails and surroundings,
  which the mask is meant to cover).

The growth is held to an exact oracle (a Euclidean distance transform per object).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_in_threads
from scipy import ndimage

from dagpre import simulate
from dagpre.backend import to_host
from dagpre.ops.masks import mask_saturation
from dagpre.types import Frame, InputError, MaskBit

SATURATE = 50000.0
NEAR_SATURATED_PX = 15.0
SAT_OR_BLEED = int(MaskBit.SATURATED | MaskBit.BLEED)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def nights():
    """Three small simulated nights (two Moffat, one Gaussian), two frames each."""
    common = dict(n_frames=2, shape=(384, 384), n_stars=300, n_saturated=6, saturate=SATURATE)
    return [
        simulate.night(seed=11, **common),
        simulate.night(seed=12, **common),
        simulate.night(seed=13, psf="gaussian", **common),
    ]


def unsaturated_star_pixels(sim, frame) -> np.ndarray:
    """Boolean image of the "unsaturated star pixels" defined in the module docstring."""
    ny, nx = frame.data.shape
    epochs = sim.epochs[np.asarray(sim.epochs["frame"]) == frame.index]
    epochs = epochs[~np.asarray(epochs["saturated"])]
    near = ndimage.distance_transform_edt((frame.truth_mask & SAT_OR_BLEED) == 0)
    yy, xx = np.mgrid[:ny, :nx]
    pixels = np.zeros((ny, nx), dtype=bool)
    for x, y, fwhm in zip(epochs["x"], epochs["y"], epochs["fwhm"], strict=True):
        r = 2.0 * fwhm
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, ny)
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, nx)
        box = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= r * r
        pixels[y0:y1, x0:x1] |= box
    return pixels & (near > NEAR_SATURATED_PX)


def trail_recall(frame, flags) -> float:
    truth = (frame.truth_mask & MaskBit.BLEED) != 0
    return float(((flags & SAT_OR_BLEED) != 0)[truth].mean())


def blobs_image(shape=(160, 200)) -> np.ndarray:
    """Sky with saturated disks, trails, single pixels and objects on the image edges."""
    ny, nx = shape
    image = np.full(shape, 200.0, dtype=np.float32)
    yy, xx = np.mgrid[:ny, :nx]
    for cy, cx, r in [(40.3, 50.0, 4.2), (100.0, 120.5, 7.0), (0.0, 180.0, 3.0), (150.0, 2.0, 2.5)]:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = SATURATE
    image[20:40, 50] = SATURATE  # a thin trail up from the first disk
    image[85:120, 118:123] = SATURATE  # a wide one through the second
    image[130, 60] = SATURATE  # lone saturated pixels
    image[70, 199] = SATURATE
    image[5:9, 100:104] = SATURATE  # a 4x4 square
    return image


# --------------------------------------------------------------------------- acceptance


def test_trail_recall_and_false_flags_on_simulated_nights(nights):
    recalls, fractions = [], []
    for sim in nights:
        for frame in sim.frames:
            flags = mask_saturation(frame.data, SATURATE)
            recalls.append(trail_recall(frame, flags))
            pixels = unsaturated_star_pixels(sim, frame)
            assert pixels.sum() > 10_000  # the definition leaves plenty of star pixels
            fractions.append(float((flags[pixels] != 0).mean()))
    assert min(recalls) >= 0.99, recalls
    assert max(fractions) < 0.01, fractions


def test_bleed_detection_finds_the_partly_filled_trail_ends(nights):
    """Without growth, the trails' end pixels are found only by the bleed step."""
    for sim in nights:
        frame = sim.frames[0]
        with_bleed = mask_saturation(frame.data, SATURATE, grow=0)
        without = mask_saturation(frame.data, SATURATE, grow=0, bleed=False)
        assert trail_recall(frame, with_bleed) >= 0.99
        assert trail_recall(frame, without) < 0.97  # the ends read below saturation
        assert not np.any(without & MaskBit.BLEED)
        # every BLEED pixel lies in a column of a truth trail, next to it or on it
        truth = ndimage.binary_dilation((frame.truth_mask & SAT_OR_BLEED) != 0)
        assert np.all(truth[(with_bleed & MaskBit.BLEED) != 0])


def test_saturated_pixels_are_flagged_and_nothing_else_without_grow_or_bleed(nights):
    frame = nights[0].frames[1]
    flags = mask_saturation(frame.data, SATURATE, grow=0, bleed=False)
    np.testing.assert_array_equal(flags, np.where(frame.data >= SATURATE, 2, 0))
    truth_sat = (frame.truth_mask & MaskBit.SATURATED) != 0
    assert np.all(flags[truth_sat] == MaskBit.SATURATED)


# --------------------------------------------------------------------------- growth


def test_growth_is_a_dilation_by_the_documented_radius():
    """Oracle: per object, the pixels within grow * r_core of it (exact distance transform)."""
    image = blobs_image()
    grow = 1.5
    flags = mask_saturation(image, SATURATE, grow=grow, bleed=False)
    sat = image >= SATURATE
    labels, count = ndimage.label(sat, structure=np.ones((3, 3)))
    expected = sat.copy()
    for lab in range(1, count + 1):
        obj = labels == lab
        cols = np.flatnonzero(obj.any(axis=0))
        r_core = min(0.5 * (cols[-1] - cols[0] + 1), np.sqrt(obj.sum() / np.pi))
        radius = grow * r_core
        d2 = np.rint(ndimage.distance_transform_edt(~obj) ** 2)
        expected |= d2 <= np.floor(radius * radius)
    np.testing.assert_array_equal((flags & MaskBit.SATURATED) != 0, expected)
    assert count == 7  # two cores with trails, two on the edges, two lone pixels, a square


def test_grow_zero_and_max_radius():
    image = blobs_image()
    sat = image >= SATURATE
    none = mask_saturation(image, SATURATE, grow=0, bleed=False)
    np.testing.assert_array_equal(none != 0, sat)
    capped = mask_saturation(image, SATURATE, grow=10.0, max_radius=2.0, bleed=False)
    d2 = np.rint(ndimage.distance_transform_edt(~sat) ** 2)
    np.testing.assert_array_equal(capped != 0, d2 <= 4)


# --------------------------------------------------------------------------- bleed trails


def test_trail_below_saturation_is_found_only_when_joined_to_a_core():
    image = np.full((120, 60), 300.0, dtype=np.float32)
    image[60:65, 28:33] = SATURATE  # a 5x5 core
    image[20:60, 30] = 0.8 * SATURATE  # a trail reading below the nominal level
    image[19, 30] = 0.3 * SATURATE  # its partly filled end
    image[90:100, 45] = 0.8 * SATURATE  # the same ridge in another column, alone
    image[100:110, 30] = 0.6 * SATURATE  # ... and in the core's column, not joined to it
    flags = mask_saturation(image, SATURATE, grow=0)
    bleed = (flags & MaskBit.BLEED) != 0
    np.testing.assert_array_equal(np.flatnonzero(bleed[:, 30])[:41], np.arange(19, 60))
    assert not bleed[:19].any() and not bleed[66:].any()
    assert not bleed[:, 45].any()


def test_bright_unsaturated_star_in_a_trail_column_is_not_a_trail():
    yy, xx = np.mgrid[:200, :80]
    star = 0.9 * SATURATE * np.exp(-((yy - 150.0) ** 2 + (xx - 40.0) ** 2) / (2 * 1.2**2))
    image = (300.0 + star).astype(np.float32)
    image[40:46, 38:43] = SATURATE
    image[20:70, 40] = SATURATE
    flags = mask_saturation(image, SATURATE)
    assert not np.any(flags[120:], axis=None)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("seed_index", [0, 2])
def test_cupy_matches_numpy_exactly(xp, nights, seed_index):
    frame = nights[seed_index].frames[0]
    image = frame.data.copy()
    image[5, 7] = np.nan
    image[200, 9] = -np.inf
    bad = np.zeros(image.shape, dtype=bool)
    bad[(frame.truth_mask & MaskBit.BAD) != 0] = True
    expected = mask_saturation(image, SATURATE, bad_pixel_map=bad)
    got = mask_saturation(xp.asarray(image), SATURATE, bad_pixel_map=xp.asarray(bad))
    assert type(got) is type(xp.zeros(1))
    np.testing.assert_array_equal(to_host(got), expected)


def test_dtype_shape_and_device_are_kept(xp):
    image = xp.asarray(blobs_image())
    flags = mask_saturation(image, SATURATE)
    assert type(flags) is type(image)
    assert flags.dtype == np.uint8 and flags.shape == image.shape


def test_nothing_saturated_means_no_flags(xp):
    rng = np.random.default_rng(3)
    image = xp.asarray(rng.normal(1000.0, 30.0, (64, 96)).astype(np.float32))
    flags = mask_saturation(image, SATURATE)
    assert int(flags.max()) == 0


def test_same_result_from_several_threads(nights):
    data = nights[1].frames[0].data
    expected = mask_saturation(data, SATURATE)
    results = run_in_threads(lambda _: mask_saturation(data, SATURATE), range(4))
    for got in results:
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- folding in


def test_nonfinite_pixels_are_flagged_and_ignored():
    image = blobs_image()
    clean = mask_saturation(image, SATURATE)
    image[10, 10] = np.nan
    image[11, 150] = np.inf
    image[12, 151] = -np.inf
    flags = mask_saturation(image, SATURATE)
    for y, x in [(10, 10), (11, 150), (12, 151)]:
        assert flags[y, x] == MaskBit.NONFINITE  # +inf is not "saturated"
    flags[[10, 11, 12], [10, 150, 151]] = 0
    np.testing.assert_array_equal(flags, clean)


def test_bad_pixel_map_and_existing_mask_are_folded_in(xp):
    image = blobs_image()
    bad_bool = np.zeros(image.shape, dtype=bool)
    bad_bool[3, 4] = bad_bool[40, 50] = True
    bad_int = bad_bool.astype(np.int16) * 7
    existing = np.zeros(image.shape, dtype=np.uint8)
    existing[3, 4] = MaskBit.COSMIC
    existing[150, 150] = MaskBit.USER
    base = to_host(mask_saturation(xp.asarray(image), SATURATE))
    for bad in (bad_bool, bad_int, xp.asarray(bad_bool)):
        flags = to_host(mask_saturation(xp.asarray(image), SATURATE, bad_pixel_map=bad))
        assert flags[3, 4] == MaskBit.BAD
        assert flags[40, 50] == base[40, 50] | MaskBit.BAD
        changed = flags != base
        assert changed.sum() == 2
    flags = to_host(mask_saturation(xp.asarray(image), SATURATE, mask=existing))
    np.testing.assert_array_equal(flags, base | existing)
    flags = to_host(mask_saturation(xp.asarray(image), SATURATE, mask=existing.astype(np.int32)))
    np.testing.assert_array_equal(flags, base | existing)


def test_frame_gives_level_and_mask():
    image = blobs_image()
    existing = np.zeros(image.shape, dtype=np.uint8)
    existing[1, 1] = MaskBit.COSMIC
    frame = Frame(data=image, mask=existing, meta={"saturate": SATURATE})
    expected = mask_saturation(image, SATURATE) | existing
    np.testing.assert_array_equal(mask_saturation(frame), expected)
    # an explicit level wins over the frame's
    np.testing.assert_array_equal(mask_saturation(frame, 2.0 * SATURATE), existing)
    with pytest.raises(InputError, match=r"^saturate: no saturation level"):
        mask_saturation(Frame(data=image, mask=existing))


def test_integer_images_and_exact_levels():
    image = blobs_image()
    as_int = image.astype(np.uint16)
    np.testing.assert_array_equal(
        mask_saturation(as_int, SATURATE), mask_saturation(image, SATURATE)
    )
    # a level between two float32 numbers: only pixels at or above it are saturated
    level = 1000.3
    above = np.nextafter(np.float32(level), np.float32(np.inf))
    below = np.nextafter(above, np.float32(0))
    tiny = np.full((3, 3), 10.0, dtype=np.float32)
    tiny[1, 1], tiny[0, 0] = above, below
    flags = mask_saturation(tiny, level, grow=0, bleed=False)
    assert flags[1, 1] == MaskBit.SATURATED and flags[0, 0] == 0
    both = mask_saturation(tiny.astype(np.float64), float(below), grow=0, bleed=False)
    assert np.count_nonzero(both) == 2


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "source", "fragment"),
    [
        ({"image": np.zeros(5, dtype=np.float32)}, "image", "ndim=1"),
        ({"image": np.zeros((2, 3, 4))}, "image", "ndim=3"),
        ({"image": [[1.0, 2.0]]}, "image", "ndim=None"),
        ({"image": np.zeros((0, 4))}, "image", "non-empty"),
        ({"image": np.zeros((4, 4), dtype=complex)}, "image", "real numbers"),
        ({"image": np.zeros((4, 4), dtype=bool)}, "image", "real numbers"),
        ({"image": np.array([["a", "b"]])}, "image", "real numbers"),
        ({"saturate": None}, "saturate", "no saturation level"),
        ({"saturate": 0.0}, "saturate", "positive"),
        ({"saturate": -5}, "saturate", "positive"),
        ({"saturate": np.nan}, "saturate", "finite"),
        ({"saturate": np.inf}, "saturate", "finite"),
        ({"saturate": "50000"}, "saturate", "a number"),
        ({"saturate": True}, "saturate", "a number"),
        ({"grow": -1.0}, "grow", ">= 0"),
        ({"grow": np.nan}, "grow", "finite"),
        ({"bleed": 1}, "bleed", "True or False"),
        ({"bleed_threshold": 0}, "bleed_threshold", "positive"),
        ({"bleed_window": 4}, "bleed_window", "odd positive"),
        ({"bleed_window": 0}, "bleed_window", "odd positive"),
        ({"bleed_window": 3.0}, "bleed_window", "odd positive"),
        ({"max_radius": 0}, "max_radius", "positive"),
        ({"bad_pixel_map": np.zeros((3, 3), bool)}, "bad_pixel_map", "differs from image"),
        ({"bad_pixel_map": np.zeros((8, 8))}, "bad_pixel_map", "boolean or integer"),
        ({"mask": np.zeros((8, 8), bool)}, "mask", "integer bit flags"),
        ({"mask": np.full((8, 8), 256, np.int32)}, "mask", r"\[0, 255\]"),
        ({"mask": np.zeros((8, 9), np.uint8)}, "mask", "differs from image"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, source, fragment):
    args = {"image": np.zeros((8, 8), dtype=np.float32), "saturate": SATURATE, **kwargs}
    with pytest.raises(InputError, match=rf"^{source}: .*{fragment}") as info:
        mask_saturation(**args)
    assert info.value.source == source


def test_memory_layout_does_not_matter():
    image = blobs_image()
    expected = mask_saturation(image, SATURATE)
    np.testing.assert_array_equal(mask_saturation(np.asfortranarray(image), SATURATE), expected)
    wide = np.zeros((image.shape[0], 2 * image.shape[1]), dtype=np.float32)
    wide[:, ::2] = image
    np.testing.assert_array_equal(mask_saturation(wide[:, ::2], SATURATE), expected)
