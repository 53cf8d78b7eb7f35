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

from _timing import median_seconds, noisy_frame, print_table

from dagpre.backend import gpu_available
from dagpre.ops.background import estimate_background


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    image = noisy_frame(args.size, sky=1000.0)
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

    print_table(
        f"sep {sep.__version__}; frame {args.size}x{args.size} float32, box 64, filter 3",
        "ratio to SEP",
        [(name, seconds, t_sep) for name, seconds in rows],
    )


if __name__ == "__main__":
    main()
