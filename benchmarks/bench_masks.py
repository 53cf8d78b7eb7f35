"""Time dp.mask_saturation on a simulated 4096x4096 frame, and check it against the truth.

Usage: ``python benchmarks/bench_masks.py [--size 4096] [--stars 20000] [--saturated 40]
[--repeat 5]``

One frame from ``dagpre.simulate.night`` (Moffat PSF, saturation 50,000 ADU, ``--saturated``
stars peaking at 5-50 times it, with bleed trails along ``y``), median of ``--repeat`` runs
after one warm-up. Rows: the default call (grow 1, bleed trails), without trails, the
saturated pixels alone (``grow=0, bleed=False``), and two floors for scale: the bare
comparison ``image >= saturate``, and pyDIA's fixed growth (a radius-5 disk about every
saturated pixel) done with ``scipy.ndimage.binary_dilation``. The CuPy rows appear only where
a GPU is usable. Below the table: trail recall and false flags of the default call, as
``tests/test_masks.py`` defines them.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy
import scipy.ndimage as ndi
from _timing import median_seconds, print_table

from dagpre import simulate
from dagpre.backend import gpu_available
from dagpre.ops.masks import mask_saturation
from dagpre.types import MaskBit

SATURATE = 50000.0
SAT_OR_BLEED = int(MaskBit.SATURATED | MaskBit.BLEED)


def quality(sim, frame, flags) -> tuple[float, float]:
    """(trail recall, flagged fraction of unsaturated star pixels), as in the tests."""
    truth_bleed = (frame.truth_mask & MaskBit.BLEED) != 0
    recall = float(((flags & SAT_OR_BLEED) != 0)[truth_bleed].mean())
    ny, nx = frame.data.shape
    epochs = sim.epochs[np.asarray(sim.epochs["frame"]) == frame.index]
    epochs = epochs[~np.asarray(epochs["saturated"])]
    near = ndi.distance_transform_edt((frame.truth_mask & SAT_OR_BLEED) == 0) <= 15.0
    pixels = np.zeros((ny, nx), dtype=bool)
    for x, y, fwhm in zip(epochs["x"], epochs["y"], epochs["fwhm"], strict=True):
        r = 2.0 * fwhm
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, ny)
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        pixels[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    pixels &= ~near
    return recall, float((flags[pixels] != 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stars", type=int, default=20000)
    parser.add_argument("--saturated", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sim = simulate.night(
        n_frames=1,
        shape=(args.size, args.size),
        n_stars=args.stars,
        n_saturated=args.saturated,
        saturate=SATURATE,
        seed=0,
    )
    frame = sim.frames[0]
    image = frame.data
    rows = []

    def add(name, fn, repeat=args.repeat, sync=None):
        rows.append((name, median_seconds(fn, repeat, sync)))

    add("dagpre numpy (grow=1, bleed=True)", lambda: mask_saturation(image, SATURATE))
    add("dagpre numpy (bleed=False)", lambda: mask_saturation(image, SATURATE, bleed=False))
    add(
        "dagpre numpy (grow=0, bleed=False)",
        lambda: mask_saturation(image, SATURATE, grow=0, bleed=False),
    )
    add("floor: numpy `image >= saturate`", lambda: image >= SATURATE)
    yy, xx = np.mgrid[-5:6, -5:6]
    disk = yy**2 + xx**2 < 25  # pyDIA's radius-5 disk (strict <)
    add(
        "pyDIA fixed growth: scipy binary_dilation, radius-5 disk",
        lambda: ndi.binary_dilation(image >= SATURATE, structure=disk),
        repeat=max(1, min(args.repeat, 3)),
    )
    if gpu_available():
        import cupy

        dev = cupy.asarray(image)
        sync = cupy.cuda.Device().synchronize
        add("dagpre cupy (grow=1, bleed=True)", lambda: mask_saturation(dev, SATURATE), sync=sync)
        add(
            "dagpre cupy (grow=0, bleed=False)",
            lambda: mask_saturation(dev, SATURATE, grow=0, bleed=False),
            sync=sync,
        )

    flags = mask_saturation(image, SATURATE)
    n_sat = int(np.count_nonzero(image >= SATURATE))
    print_table(
        f"scipy {scipy.__version__}; frame {args.size}x{args.size} float32, {args.stars} "
        f"stars, {args.saturated} saturated ({n_sat} pixels >= saturate)",
        "",
        rows,
    )
    recall, false_flags = quality(sim, frame, flags)
    print(
        f"\ndefault call: trail recall {recall:.4f} (truth BLEED pixels flagged BLEED or "
        f"SATURATED), unsaturated star pixels flagged {false_flags:.5f}"
    )


if __name__ == "__main__":
    main()
