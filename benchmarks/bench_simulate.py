"""Time dp.simulate.night on one big frame, and its vectorised renderer alone.

Usage: ``python benchmarks/bench_simulate.py [--size 4096] [--stars 20000] [--repeat 3]``

One frame of ``--size`` x ``--size`` pixels with ``--stars`` stars (the default n_saturated,
variables, transients, cosmic rays and hot pixels), for the Moffat and the Gaussian PSF:
the whole ``night(n_frames=1, ...)`` call (sources, WCS, rendering, Poisson and read noise,
cosmic rays, bleeding, tables) and ``render_sources`` alone on the same positions. Median of
``--repeat`` runs after one warm-up, on one CPU thread (OMP/MKL/OpenBLAS threads set to 1
before NumPy loads). The target is under 5 s per frame. A CuPy row of the renderer appears
only where a GPU is usable. Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform

from _timing import median_seconds

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _processor() -> str:
    name = platform.processor()
    if not name:
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stars", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for var in _THREAD_VARS:  # before NumPy is imported, so its BLAS starts single-threaded
        os.environ[var] = "1"

    import numpy as np

    from dagpre import simulate
    from dagpre.backend import gpu_available

    shape = (args.size, args.size)
    rows = []
    for psf in ("moffat", "gaussian"):

        def whole(psf=psf):
            return simulate.night(n_frames=1, shape=shape, n_stars=args.stars, seed=0, psf=psf)

        rows.append((f"night(n_frames=1) {psf}", "cpu", median_seconds(whole, args.repeat)))
        sim = whole()
        ep = sim.epochs
        frame = sim.frames[0]
        x, y = frame.wcs.all_world2pix(sim.sources["ra"], sim.sources["dec"], 0)
        flux = np.asarray(simulate.source_flux(sim.sources, frame.conditions["mjd"])) * 2.0
        fwhm = frame.fwhm_at(x, y)
        n_on = len(ep)

        def render(x=x, y=y, flux=flux, fwhm=fwhm, psf=psf):
            return simulate.render_sources(shape, x, y, flux, fwhm, psf=psf)

        rows.append((f"render_sources {psf} ({n_on} on frame)", "cpu", median_seconds(render, 3)))
        if gpu_available():
            import cupy

            dev = [cupy.asarray(v) for v in (x, y, flux, fwhm)]
            sync = cupy.cuda.Device().synchronize
            rows.append(
                (
                    f"render_sources {psf} ({n_on} on frame)",
                    "gpu",
                    median_seconds(
                        lambda dev=dev, psf=psf: simulate.render_sources(shape, *dev, psf=psf),
                        args.repeat,
                        sync,
                    ),
                )
            )

    machine = f"{_processor()} ({platform.machine()}), {os.cpu_count()} CPUs, 1 thread"
    print(
        f"machine: {machine}; numpy {np.__version__}; frame {args.size}x{args.size}, "
        f"{args.stars} stars, median of {args.repeat} after a warm-up"
    )
    print("| step | device | median time (s) | target | machine |")
    print("| --- | --- | ---: | --- | --- |")
    for name, device, seconds in rows:
        target = "< 5 s" if name.startswith("night") else ""
        print(f"| {name} | {device} | {seconds:.2f} | {target} | {machine} |")


if __name__ == "__main__":
    main()
