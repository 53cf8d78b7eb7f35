"""Time dp.align (stars, wcs, xcorr) beside astroalign.register on the same simulated pairs.

Usage: ``python benchmarks/bench_align.py [--sizes 2048 4096] [--repeat 3]``

Each pair is two frames of one simulated night (Moffat stars, pointing offsets up to 20 px,
rotations up to 0.2 deg, TAN WCS). Rows: ``dp.find_transform`` and ``astroalign.
find_transform`` (transform only); ``dp.align(method="stars")`` with bilinear and bicubic
warps and ``astroalign.register`` (its warp is scikit-image's order 3); ``dp.align`` by WCS
and by cross-correlation. Median of ``--repeat`` runs after one warm-up.
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import median_seconds, print_table

import dagpre.simulate as sim
from dagpre.ops.align import align
from dagpre.ops.starmatch import find_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import astroalign

    for size in args.sizes:
        _bench(size, args.repeat, astroalign)


def _bench(size: int, repeat: int, astroalign) -> None:
    night = sim.night(
        n_frames=2, shape=(size, size), n_stars=size * size // 700, seed=5, n_transients=0
    )
    ref, img = (f.to_frame() for f in night.frames)
    a, b = img.data, ref.data
    rows = [
        ("dp.find_transform", median_seconds(lambda: find_transform(a, b), repeat)),
        (
            "astroalign.find_transform",
            median_seconds(lambda: astroalign.find_transform(a, b), repeat),
        ),
        (
            "dp.align stars, bilinear",
            median_seconds(lambda: align(a, b, method="stars"), repeat),
        ),
        (
            "dp.align stars, bicubic",
            median_seconds(lambda: align(a, b, method="stars", order="bicubic"), repeat),
        ),
        ("astroalign.register", median_seconds(lambda: astroalign.register(a, b), repeat)),
        ("dp.align wcs, bilinear", median_seconds(lambda: align(img, ref), repeat)),
        ("dp.align xcorr", median_seconds(lambda: align(a, b, method="xcorr"), repeat)),
    ]
    ref_t = rows[4][1]
    print_table(
        f"astroalign {astroalign.__version__}; {size}x{size}, {size * size // 700} stars",
        "vs astroalign.register",
        [(name, seconds, ref_t) for name, seconds in rows],
    )
    print()
    assert np.isfinite(ref_t)


if __name__ == "__main__":
    main()
