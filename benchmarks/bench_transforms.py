"""Time dp.zscale, dp.stretch and dp.histeq beside astropy.visualization.

Usage: ``python benchmarks/bench_transforms.py [--size 4096] [--repeat 5] [--histeq-repeat 1]``

One float32 frame (sky + Gaussian noise + a few thousand Gaussian blobs), median of
``--repeat`` runs after one warm-up for every step, except astropy's ``HistEqStretch``,
which takes tens of seconds on a 4096² frame and is timed ``--histeq-repeat`` times (no
warm-up: it sorts the whole frame on every call, nothing is cached). Each stretch row is the
full job from raw pixels: MinMax normalisation then the stretch, as
``Stretch()(MinMaxInterval()(image))`` in astropy. Prints a markdown table with the machine;
the CuPy column appears only where a GPU is usable (device synchronised around each run).
"speed-up" is astropy's time over dagpre's NumPy time.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
from _timing import median_seconds

from dagpre.backend import gpu_available
from dagpre.ops.transforms import histeq, interval, stretch, zscale


def _frame(size: int, n_blobs: int = 3000, seed: int = 0) -> tuple[np.ndarray, str]:
    """Sky 1000 ADU, noise 15 ADU, ``n_blobs`` Gaussian sources (sigma 1-4 px).

    Drawn with ``dagpre.simulate.render_sources`` where it exists, else stamped here.
    """
    rng = np.random.default_rng(seed)
    image = rng.normal(1000.0, 15.0, (size, size)).astype(np.float32)
    ys = rng.uniform(12, size - 12, n_blobs)
    xs = rng.uniform(12, size - 12, n_blobs)
    sigmas = rng.uniform(1.0, 4.0, n_blobs)
    peaks = 50.0 * rng.pareto(1.2, n_blobs) + 20.0
    try:
        from dagpre.simulate import render_sources
    except ImportError:
        render_sources = None
    if render_sources is not None:
        flux = peaks * 2.0 * np.pi * sigmas**2
        fwhm = sigmas * 2.0 * np.sqrt(2.0 * np.log(2.0))
        sources = render_sources((size, size), xs, ys, flux, fwhm, psf="gaussian")
        return image + sources.astype(np.float32), "dagpre.simulate.render_sources"
    half = 12
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for y, x, s, p in zip(ys.astype(int), xs.astype(int), sigmas, peaks, strict=True):
        blob = p * np.exp(-(yy**2 + xx**2) / (2.0 * s * s))
        image[y - half : y + half + 1, x - half : x + half + 1] += blob.astype(np.float32)
    return image, "Gaussian stamps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--histeq-repeat", type=int, default=1)
    args = parser.parse_args()

    from astropy import __version__ as astropy_version
    from astropy import visualization as av

    image, made_by = _frame(args.size)
    use_gpu = gpu_available()
    if use_gpu:
        import cupy

        device_image = cupy.asarray(image)
        sync = cupy.cuda.Device().synchronize
    a_power = 2.0
    astropy_stretch = {
        "linear": av.LinearStretch(),
        "sqrt": av.SqrtStretch(),
        "squared": av.SquaredStretch(),
        "power": av.PowerStretch(a_power),
        "log": av.LogStretch(),
        "asinh": av.AsinhStretch(),
        "sinh": av.SinhStretch(),
        "exp": av.PowerDistStretch(),
    }
    # step name -> (dagpre call on an array, astropy call)
    steps = {
        "zscale limits": (zscale, lambda: av.ZScaleInterval().get_limits(image)),
        "percentile limits (99.5)": (
            lambda im: interval(im, "percentile", percentile=99.5),
            lambda: av.PercentileInterval(99.5).get_limits(image),
        ),
    }
    for kind, oracle in astropy_stretch.items():
        a = a_power if kind == "power" else None
        steps[f"minmax + {kind}"] = (
            lambda im, kind=kind, a=a: stretch(im, kind, a=a),
            lambda oracle=oracle: oracle(av.MinMaxInterval()(image)),
        )
    steps["zscale + asinh"] = (
        lambda im: stretch(im, "asinh", interval="zscale"),
        lambda: av.AsinhStretch()(av.ZScaleInterval()(image)),
    )
    steps["histeq (65536 bins)"] = (
        histeq,
        lambda: av.HistEqStretch(image)(av.MinMaxInterval()(image)),
    )

    rows = []
    for name, (ours, theirs) in steps.items():
        t_ours = median_seconds(lambda ours=ours: ours(image), args.repeat)
        t_gpu = None
        if use_gpu:
            t_gpu = median_seconds(lambda ours=ours: ours(device_image), args.repeat, sync)
        if name.startswith("histeq"):
            t_theirs = median_seconds(theirs, args.histeq_repeat, warm_up=False)
        else:
            t_theirs = median_seconds(theirs, args.repeat)
        rows.append((name, t_ours, t_theirs, t_gpu))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"astropy {astropy_version}"
    )
    print(
        f"frame: {args.size}x{args.size} float32 ({made_by}), "
        f"median of {args.repeat} after a warm-up "
        f"(astropy HistEqStretch: {args.histeq_repeat} run(s), no warm-up)\n"
    )
    header = "| step | dagpre numpy (ms) | astropy (ms) | speed-up (astropy / dagpre) |"
    rule = "|---|---:|---:|---:|"
    if use_gpu:
        header += " dagpre cupy (ms) |"
        rule += "---:|"
    print(header)
    print(rule)
    for name, t_ours, t_theirs, t_gpu in rows:
        line = f"| {name} | {t_ours * 1e3:.1f} | {t_theirs * 1e3:.1f} | {t_theirs / t_ours:.1f}x |"
        if use_gpu:
            line += f" {t_gpu * 1e3:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
