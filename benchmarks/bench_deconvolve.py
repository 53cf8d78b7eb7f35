"""Benchmark the deblurring steps against their CPU references.

* ``richardson_lucy`` (dagpre, PSF transforms planned once) against
  ``skimage.restoration.richardson_lucy`` (``scipy.signal.convolve`` every iteration), on a
  float32 star field blurred by a 25x25 Gaussian PSF;
* ``median_flatten`` against the ``scipy.ndimage.median_filter`` call it is built on.

Each timing is the median of ``--repeats`` runs after one warm-up call (the warm-up of a
Richardson-Lucy row runs one iteration on the same frame, which builds the same FFT plans).
By default the reference RL runs on a 2048x2048 frame (a 30-iteration skimage run on
4096x4096 takes ~35 s on two cores; ``--ref-frame 4096`` runs it anyway), and the median
rows on 512x512 (SciPy's 31x31 median filter costs ~14 us per pixel, ~4 min on 4096x4096).
Every row says its frame size. On a machine where ``dagpre.backend.gpu_available()`` is
true a CuPy column is added, timed with a device synchronisation before and after each run.

Run from the repository root::

    python benchmarks/bench_deconvolve.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import numpy as np
import scipy.ndimage
import scipy.signal
from _timing import median_seconds
from scipy.special import erf

from dagpre.backend import gpu_available
from dagpre.ops.deconvolve import median_flatten, richardson_lucy


def gaussian_psf(size: int, fwhm: float) -> np.ndarray:
    """Pixel-integrated, centred, unit-sum Gaussian kernel (float32)."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    edges = np.arange(size + 1) - 0.5 - (size - 1) // 2
    line = np.diff(0.5 * (1.0 + erf(edges / (np.sqrt(2.0) * sigma))))
    psf = np.outer(line, line)
    return (psf / psf.sum()).astype(np.float32)


def star_field(n: int, psf: np.ndarray, seed: int = 0) -> np.ndarray:
    """n x n float32 frame: point stars blurred by ``psf`` + 100 ADU sky + Poisson noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((n, n), dtype=np.float32)
    count = n * n // 2000
    image[rng.integers(0, n, count), rng.integers(0, n, count)] = rng.uniform(1e3, 5e4, count)
    image = scipy.signal.fftconvolve(image, psf, mode="same") + 100.0
    return rng.poisson(np.clip(image, 0, None)).astype(np.float32)


def time_median(
    func: Callable[[], object],
    repeats: int,
    warmup: Callable[[], object],
    sync: Callable[[], None] = lambda: None,
) -> float:
    """Median wall time (s) of ``repeats`` calls of ``func`` after one call of ``warmup``."""
    warmup()
    sync()
    return median_seconds(func, repeats, sync=sync, warm_up=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, default=4096, help="RL frame side (px)")
    parser.add_argument(
        "--ref-frame", type=int, default=2048, help="frame side (px) of the ours-vs-skimage RL row"
    )
    parser.add_argument("--psf", type=int, default=25, help="PSF side (px)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--median-frame", type=int, default=512, help="median rows' frame (px)")
    parser.add_argument("--median-size", type=int, default=31, help="median window (px)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from skimage.restoration import richardson_lucy as skimage_rl

    psf = gaussian_psf(args.psf, fwhm=4.0)
    it, reps = args.iterations, args.repeats
    gpu = gpu_available()
    if gpu:
        import cupy

        def sync() -> None:
            cupy.cuda.Device().synchronize()

    rows = []  # (step, ours numpy, reference or None, cupy or None)

    def rl_row(n: int, with_reference: bool) -> None:
        image = star_field(n, psf)
        ours = time_median(
            lambda: richardson_lucy(image, psf, iterations=it),
            reps,
            lambda: richardson_lucy(image, psf, iterations=1),
        )
        ref = None
        if with_reference:
            ref = time_median(
                lambda: skimage_rl(image, psf, num_iter=it, clip=False),
                reps,
                lambda: skimage_rl(image, psf, num_iter=1, clip=False),
            )
        dev = None
        if gpu:
            d_image, d_psf = cupy.asarray(image), cupy.asarray(psf)
            dev = time_median(
                lambda: richardson_lucy(d_image, d_psf, iterations=it),
                reps,
                lambda: richardson_lucy(d_image, d_psf, iterations=1),
                sync,
            )
        step = f"richardson_lucy, {it} it, {n}x{n} float32, {args.psf}x{args.psf} PSF"
        rows.append((step, ours, ref, dev))

    rl_row(args.frame, with_reference=args.ref_frame == args.frame)
    if args.ref_frame != args.frame:
        rl_row(args.ref_frame, with_reference=True)

    m, size = args.median_frame, args.median_size
    image = star_field(m, psf, seed=1) + np.linspace(0, 50, m, dtype=np.float32)[None, :]
    small = image[: 4 * size, : 4 * size].copy()
    ours = time_median(
        lambda: median_flatten(image, size=size), reps, lambda: median_flatten(small, size=size)
    )
    ref = time_median(
        lambda: scipy.ndimage.median_filter(image, size=size, mode="reflect"),
        reps,
        lambda: scipy.ndimage.median_filter(small, size=size, mode="reflect"),
    )
    dev = None
    if gpu:
        d_image, d_small = cupy.asarray(image), cupy.asarray(small)
        dev = time_median(
            lambda: median_flatten(d_image, size=size),
            reps,
            lambda: median_flatten(d_small, size=size),
            sync,
        )
    rows.append(
        (f"median_flatten vs median_filter, {size}x{size}, {m}x{m} float32", ours, ref, dev)
    )

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    header = "| step | dagpre numpy (s) | reference (s) | ratio (ref / dagpre) |"
    rule = "| --- | ---: | ---: | ---: |"
    if gpu:
        header += " dagpre cupy (s) |"
        rule += " ---: |"
    print(header)
    print(rule)
    for step, ours, ref, dev in rows:
        ratio = "—" if ref is None else f"{ref / ours:.2f}"
        line = f"| {step} | {fmt(ours)} | {fmt(ref)} | {ratio} |"
        if gpu:
            line += f" {fmt(dev)} |"
        print(line)
    print()
    print(
        "reference: skimage.restoration.richardson_lucy (clip=False) for RL rows, "
        "scipy.ndimage.median_filter (mode='reflect') for the median row; "
        f"median of {reps} runs after a warm-up; '—': not run at that size"
    )
    print(
        f"machine: processor={platform.processor() or platform.machine()!r}, "
        f"os.cpu_count()={os.cpu_count()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}" + (", GPU: yes" if gpu else ", GPU: none")
    )


if __name__ == "__main__":
    main()
