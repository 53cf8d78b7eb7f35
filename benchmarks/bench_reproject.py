"""Time dp.reproject (and the WCS mapping alone) beside reproject.reproject_interp.

Usage: ``python benchmarks/bench_reproject.py [--sizes 2048 4096] [--repeat 5]
[--repeat-reference 1]``

For each size: one float32 frame (sky + noise + sources) on a TAN-SIP WCS (the simulator's
camera distortion, ~1.5 px at the corners, A/B only so astropy inverts it iteratively),
reprojected onto a TAN grid rotated by 0.25 deg and shifted by a few pixels, bilinear.
Rows: dagpre's reproject on every CPU and on one thread, the warp alone with the mapping
solved beforehand, the mapping alone (solving it; and producing the full-resolution
grids), bicubic and lanczos3 for scale, and reproject_interp with its default
(``roundtrip_coords=True``) and with ``roundtrip_coords=False``, plus astropy's
``pixel_to_pixel`` over the whole grid (reproject's coordinate step). Ratios are against
``reproject_interp`` with its defaults (smaller is faster). reproject_interp is timed
without a warm-up, ``--repeat-reference`` times (it takes seconds to tens of seconds).
The CuPy rows appear only where a GPU is usable.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _timing import median_seconds, noisy_frame, print_table

from dagpre.backend import gpu_available
from dagpre.ops.warp import reproject
from dagpre.ops.wcsmap import pixel_map, solve_pixel_map
from dagpre.simulate import _camera_sip, _make_wcs


def wcs_pair(size: int):
    shape = (size, size)
    w_in, _ = _make_wcs(shape, (150.0, -30.0), 0.4, (6.3, -4.1), 0.1, _camera_sip(shape))
    w_out, _ = _make_wcs(shape, (150.0, -30.0), 0.4, (-3.7, 2.2), 0.35, None)
    return w_in, w_out


def bench(size: int, repeat: int, repeat_ref: int) -> None:
    import reproject as reproject_pkg
    from astropy.wcs.utils import pixel_to_pixel
    from reproject import reproject_interp

    shape = (size, size)
    image = noisy_frame(size, sky=1000.0)
    w_in, w_out = wcs_pair(size)
    rows = []
    ncpu = os.cpu_count()
    rows.append(
        (
            f"dagpre reproject bilinear ({ncpu} threads)",
            median_seconds(lambda: reproject(image, w_in, w_out, shape), repeat),
        )
    )
    rows.append(
        (
            "dagpre reproject bilinear (1 thread)",
            median_seconds(lambda: reproject(image, w_in, w_out, shape, threads=1), repeat),
        )
    )
    mapping = solve_pixel_map(w_in, w_out, shape)
    rows.append(
        (
            "dagpre warp only, mapping solved beforehand",
            median_seconds(lambda: reproject(image, w_in, w_out, shape, mapping=mapping), repeat),
        )
    )
    rows.append(
        (
            f"dagpre mapping: solve_pixel_map (step {mapping.step}, "
            f"error {mapping.max_error:.1e} px)",
            median_seconds(lambda: solve_pixel_map(w_in, w_out, shape), repeat),
        )
    )
    rows.append(
        (
            "dagpre mapping: pixel_map, full-resolution grids",
            median_seconds(lambda: pixel_map(w_in, w_out, shape), repeat),
        )
    )
    for order in ("bicubic", "lanczos3"):
        rows.append(
            (
                f"dagpre reproject {order} ({ncpu} threads)",
                median_seconds(lambda o=order: reproject(image, w_in, w_out, shape, o), 1),
            )
        )

    def ref(roundtrip):
        return reproject_interp(
            (image, w_in),
            w_out,
            shape,
            order="bilinear",
            roundtrip_coords=roundtrip,
            return_footprint=False,
        )

    t_ref = median_seconds(lambda: ref(True), repeat_ref, warm_up=False)
    rows.append(("reproject_interp bilinear (default, roundtrip_coords=True)", t_ref))
    t_fast = median_seconds(lambda: ref(False), repeat_ref, warm_up=False)
    rows.append(("reproject_interp bilinear (roundtrip_coords=False)", t_fast))
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    rows.append(
        (
            "astropy pixel_to_pixel over the grid (reproject's mapping)",
            median_seconds(
                lambda: pixel_to_pixel(w_out, w_in, grid[1], grid[0]), repeat_ref, warm_up=False
            ),
        )
    )
    if gpu_available():
        import cupy

        dev = cupy.asarray(image)
        sync = cupy.cuda.Device().synchronize
        for order in ("bilinear", "bicubic", "lanczos3"):
            rows.append(
                (
                    f"dagpre cupy reproject {order}",
                    median_seconds(
                        lambda o=order: reproject(dev, w_in, w_out, shape, o), repeat, sync
                    ),
                )
            )
        dev_map = solve_pixel_map(w_in, w_out, shape, like=dev)
        rows.append(
            (
                "dagpre cupy warp only (bilinear, mapping solved beforehand)",
                median_seconds(
                    lambda: reproject(dev, w_in, w_out, shape, mapping=dev_map), repeat, sync
                ),
            )
        )
    print_table(
        f"reproject {reproject_pkg.__version__}; frame {size}x{size} float32, TAN-SIP -> TAN",
        "ratio to reproject_interp",
        [(name, seconds, t_ref) for name, seconds in rows],
    )
    ours = rows[0][1]
    print(
        f"dagpre reproject bilinear is {t_ref / ours:.1f}x faster than reproject_interp "
        f"(default) and {t_fast / ours:.1f}x faster than roundtrip_coords=False"
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repeat-reference", type=int, default=1)
    args = parser.parse_args()
    for size in args.sizes:
        bench(size, args.repeat, args.repeat_reference)


if __name__ == "__main__":
    main()
