"""Time dp.detect_sources beside sep.extract on the same 4096x4096 frame.

Usage: ``python benchmarks/bench_detect.py [--size 4096] [--stars 20000] [--repeat 3]``

One simulated frame (Moffat PSF, 20,000 stars), background from dp.estimate_background,
extraction at 1.5 sigma with SExtractor's defaults (3x3 filter, 32 levels, contrast 0.005,
cleaning on) in both tools; median of ``--repeat`` runs after one warm-up, the contenders
timed in turn so that a busy spell of a shared machine slows them alike. Prints a markdown
table with the machine; the CuPy row appears only where a GPU is usable.
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import interleaved_medians, median_seconds, print_table

import dagpre.simulate as sim
from dagpre.backend import gpu_available
from dagpre.ops.background import estimate_background
from dagpre.ops.detect import detect_sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stars", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    night = sim.night(
        n_frames=1, shape=(args.size, args.size), n_stars=args.stars, seed=1, n_transients=0
    )
    image = night.frames[0].data.astype(np.float32)
    bkg = estimate_background(image)
    data = (image - bkg.background).astype(np.float32)
    rms = float(bkg.global_rms)

    import sep

    n_ours = len(detect_sources(data, 1.5, err=rms))
    n_sep = len(sep.extract(data, 1.5, err=rms))
    medians = interleaved_medians(
        {
            f"dagpre numpy ({n_ours} objects)": lambda: detect_sources(data, 1.5, err=rms),
            "dagpre numpy, threads=1": lambda: detect_sources(data, 1.5, err=rms, threads=1),
            f"sep.extract ({n_sep} objects)": lambda: sep.extract(data, 1.5, err=rms),
        },
        args.repeat,
    )
    rows = list(medians.items())
    if gpu_available():
        import cupy

        dev = cupy.asarray(data)
        sync = cupy.cuda.Device().synchronize
        rows.append(
            (
                "dagpre cupy",
                median_seconds(lambda: detect_sources(dev, 1.5, err=rms), args.repeat, sync=sync),
            )
        )
    ref = rows[2][1]
    print_table(
        f"sep {sep.__version__}; frame {args.size}x{args.size}, {args.stars} stars",
        "vs sep.extract",
        [(name, seconds, ref) for name, seconds in rows],
    )


if __name__ == "__main__":
    main()
