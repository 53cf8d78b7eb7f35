"""Time dp.aperture_photometry beside sep.sum_circle and photutils aperture_photometry.

Usage: ``python benchmarks/bench_photometry.py [--size 4096] [--n 100000] [--repeat 5]``

One ``--size`` x ``--size`` float32 frame (sky-subtracted noise plus a few thousand stars),
``--n`` circular apertures of radius 5 px at random positions (some cut by the edges), with
a scalar error so that the error sum is computed too. Exact overlap (``subpix=0``, SEP's
exact mode, photutils ``method="exact"``) and SEP's default 5x5 sub-pixel sampling; also
elliptical apertures (a=5, b=3, random angles) beside ``sep.sum_ellipse``. Median of
``--repeat`` runs after one warm-up (photutils: one run, it takes seconds). Prints a
markdown table with the machine; the CuPy rows appear only where a GPU is usable. Ratios
are against SEP in the same mode.
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import median_seconds, noisy_frame, print_table

from dagpre.backend import gpu_available
from dagpre.ops.photometry import aperture_photometry, ellipse_photometry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    image = noisy_frame(args.size)
    rng = np.random.default_rng(1)
    x = rng.uniform(-2.0, args.size + 1.0, args.n)
    y = rng.uniform(-2.0, args.size + 1.0, args.n)
    a, b, theta = 5.0, 3.0, rng.uniform(-np.pi / 2, np.pi / 2, args.n)
    err, r = 15.0, 5.0

    import sep

    rows = []  # (name, seconds, seconds of the SEP reference)
    sep_exact = median_seconds(
        lambda: sep.sum_circle(image, x, y, r, err=err, subpix=0), args.repeat
    )
    sep_sub5 = median_seconds(
        lambda: sep.sum_circle(image, x, y, r, err=err, subpix=5), args.repeat
    )
    sep_ell = median_seconds(
        lambda: sep.sum_ellipse(image, x, y, a, b, theta, 1.0, err=err, subpix=0), args.repeat
    )
    rows.append(("sep.sum_circle, exact", sep_exact, sep_exact))
    rows.append(
        (
            "dagpre numpy, circle exact",
            median_seconds(lambda: aperture_photometry(image, x, y, r, err=err), args.repeat),
            sep_exact,
        )
    )
    rows.append(
        (
            "dagpre numpy, circle exact, threads=2",
            median_seconds(
                lambda: aperture_photometry(image, x, y, r, err=err, threads=2), args.repeat
            ),
            sep_exact,
        )
    )

    from photutils.aperture import CircularAperture
    from photutils.aperture import aperture_photometry as pu_photometry

    apertures = CircularAperture(np.column_stack([x, y]), r=r)
    err_map = np.full_like(image, err)  # photutils takes the error as a map only
    rows.append(
        (
            "photutils aperture_photometry, exact",
            median_seconds(
                lambda: pu_photometry(image, apertures, error=err_map), 1, warm_up=False
            ),
            sep_exact,
        )
    )
    rows.append(("sep.sum_circle, subpix=5", sep_sub5, sep_sub5))
    rows.append(
        (
            "dagpre numpy, circle subpix=5",
            median_seconds(
                lambda: aperture_photometry(image, x, y, r, err=err, subpix=5), args.repeat
            ),
            sep_sub5,
        )
    )
    rows.append(("sep.sum_ellipse, exact", sep_ell, sep_ell))
    rows.append(
        (
            "dagpre numpy, ellipse exact",
            median_seconds(
                lambda: ellipse_photometry(image, x, y, a, b, theta, err=err), args.repeat
            ),
            sep_ell,
        )
    )

    if gpu_available():
        import cupy

        dev = cupy.asarray(image)
        xd, yd, td = cupy.asarray(x), cupy.asarray(y), cupy.asarray(theta)
        sync = cupy.cuda.Device().synchronize
        rows.append(
            (
                "dagpre cupy, circle exact",
                median_seconds(
                    lambda: aperture_photometry(dev, xd, yd, r, err=err), args.repeat, sync
                ),
                sep_exact,
            )
        )
        rows.append(
            (
                "dagpre cupy, circle subpix=5",
                median_seconds(
                    lambda: aperture_photometry(dev, xd, yd, r, err=err, subpix=5),
                    args.repeat,
                    sync,
                ),
                sep_sub5,
            )
        )
        rows.append(
            (
                "dagpre cupy, ellipse exact",
                median_seconds(
                    lambda: ellipse_photometry(dev, xd, yd, a, b, td, err=err), args.repeat, sync
                ),
                sep_ell,
            )
        )

    print_table(
        f"sep {sep.__version__}; frame {args.size}x{args.size} float32, "
        f"{args.n} apertures r={r:g} px",
        "ratio to SEP (same mode)",
        rows,
    )


if __name__ == "__main__":
    main()
