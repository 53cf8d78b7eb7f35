"""Time dp.estimate_background beside sep.Background and photutils Background2D.

Usage: ``python benchmarks/bench_background.py [--size 4096] [--repeat 5]``

One 4096x4096 float32 frame (sky + noise + a few thousand sources), SExtractor settings
(box 64, 3x3 mesh filter), median of ``--repeat`` runs after one warm-up, each tool
producing the full-resolution background and RMS maps. Prints a markdown table with the
machine; the CuPy row appears only where a GPU is usable. Ratios are against SEP.

dagpre's CPU path runs blocks of mesh rows on a thread pool (``threads=None``: every CPU);
SEP is single-threaded, so a ``threads=1`` row is timed beside it too.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
from _timing import median_seconds

from dagpre.backend import gpu_available
from dagpre.ops.background import estimate_background


def _frame(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(1000.0, 15.0, (size, size)).astype(np.float32)
    n = size * size // 5000
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    image[ys, xs] += rng.pareto(1.5, n).astype(np.float32) * 500.0
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    image = _frame(args.size)
    rows = []

    def ours():
        b = estimate_background(image, box=64, filter_size=3)
        return b.background, b.rms

    t_ours = median_seconds(ours, args.repeat)
    rows.append((f"dagpre numpy (sextractor, {os.cpu_count()} threads)", t_ours))

    def ours_one_thread():
        b = estimate_background(image, box=64, filter_size=3, threads=1)
        return b.background, b.rms

    rows.append(
        ("dagpre numpy (sextractor, 1 thread)", median_seconds(ours_one_thread, args.repeat))
    )
    t_med = median_seconds(
        lambda: estimate_background(image, box=64, filter_size=3, estimator="median"), args.repeat
    )
    rows.append(("dagpre numpy (median)", t_med))

    import sep

    def sep_run():
        b = sep.Background(image, bw=64, bh=64, fw=3, fh=3)
        return b.back(), b.rms()

    t_sep = median_seconds(sep_run, args.repeat)
    rows.append(("sep.Background (back + rms)", t_sep))

    from astropy.stats import SigmaClip
    from photutils.background import Background2D, SExtractorBackground

    def phot():
        b = Background2D(
            image,
            64,
            filter_size=3,
            sigma_clip=SigmaClip(sigma=3, maxiters=5),
            bkg_estimator=SExtractorBackground(),
        )
        return b.background, b.background_rms

    rows.append(("photutils Background2D (SExtractorBackground)", median_seconds(phot, 3)))

    if gpu_available():
        import cupy

        dev = cupy.asarray(image)
        sync = cupy.cuda.Device().synchronize
        rows.append(
            (
                "dagpre cupy (sextractor)",
                median_seconds(lambda: estimate_background(dev), args.repeat, sync),
            )
        )

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, sep {sep.__version__}; "
        f"frame {args.size}x{args.size} float32, box 64, filter 3"
    )
    print("| step | median time (ms) | ratio to SEP |")
    print("| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / t_sep:.2f} |")


if __name__ == "__main__":
    main()
