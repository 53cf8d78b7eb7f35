"""Time dp.subtract on simulated pairs beside SFFT's NumPy backend (and CuPy where a GPU is).

Run: ``PYTHONPATH=. python benchmarks/bench_subtract.py [--4k]``. Each pair is two frames
of ``simulate.night`` on one pointing (different seeing, sky and transparency). dagpre runs
its whole step (sky maps, stamp detection, fit, full-frame convolution and variance); SFFT
(``pip install sfft``) gets the same pair pre-masked (its ``SingleSFFTConfigure`` +
``GeneralSFFTSubtract`` array entry point, as ``sfft.CustomizedPacket`` calls them) with the
same kernel half-width, kernel and background orders; its one-off numba compilation is
timed apart and left out of the ratio.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

from _timing import median_seconds, print_table

import dagpre.simulate as sim
from dagpre.backend import gpu_available
from dagpre.ops.subtract import subtract


def _pair(size):
    night = sim.night(n_frames=2, shape=(size, size), n_stars=size * size // 500, seed=3,
                      max_offset=0.0, max_rotation=0.0, n_transients=0)  # fmt: skip
    return night.frames[1].data, night.frames[0].data


def _sfft(sci, ref, half, side, kernel_order, bg_order):
    """SFFT's NumPy backend on the pair, the convolved side as dagpre chose; None if absent."""
    try:
        from sfft.sfftcore.SFFTConfigure import SingleSFFTConfigure
        from sfft.sfftcore.SFFTSubtract import GeneralSFFTSubtract
    except ImportError:
        return None
    import numpy as np

    img_i, img_j = (ref, sci) if side == "reference" else (sci, ref)
    # SFFT works in (x, y) order on float64, sky-subtracted input
    pi = np.ascontiguousarray((img_i - np.median(img_i)).T, dtype=np.float64)
    pj = np.ascontiguousarray((img_j - np.median(img_j)).T, dtype=np.float64)
    threads = os.cpu_count() or 1
    quiet = contextlib.redirect_stdout(io.StringIO())
    t0 = time.perf_counter()
    with quiet:
        config = SingleSFFTConfigure.SSC(
            NX=pi.shape[0],
            NY=pi.shape[1],
            KerHW=half,
            KerPolyOrder=kernel_order,
            BGPolyOrder=bg_order,
            ConstPhotRatio=True,
            BACKEND_4SUBTRACT="Numpy",
            NUM_CPU_THREADS_4SUBTRACT=threads,
            VERBOSE_LEVEL=0,
        )
    compile_s = time.perf_counter() - t0

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            GeneralSFFTSubtract.GSS(PixA_I=pi, PixA_J=pj, PixA_mI=pi, PixA_mJ=pj,
                                    SFFTConfig=config, BACKEND_4SUBTRACT="Numpy",
                                    NUM_CPU_THREADS_4SUBTRACT=threads, VERBOSE_LEVEL=0)  # fmt: skip

    return compile_s, median_seconds(run, repeat=1)


def main() -> None:
    sizes = [1024, 2048] + ([4096] if "--4k" in sys.argv else [])
    rows = []
    notes = []
    for size in sizes:
        sci, ref = _pair(size)
        kw = dict(gain=2.0, rdnoise=5.0, saturation=50000.0)
        sub = subtract(sci, ref, **kw)
        repeat = 3 if size <= 1024 else 1
        t_np = median_seconds(lambda s=sci, r=ref, k=kw: subtract(s, r, **k), repeat=repeat)
        half = (sub.kernel_size - 1) // 2
        sf = _sfft(sci, ref, half, sub.convolved, sub.meta["kernel_order"], sub.meta["bg_order"])
        if sf is None:
            rows.append((f"subtract numpy {size}^2", t_np))
            notes.append("sfft is not installed (pip install sfft): no SFFT column")
        else:
            rows.append((f"subtract numpy {size}^2 (kernel {sub.kernel_size}^2)", t_np, sf[1]))
            notes.append(f"SFFT {size}^2: numba compilation {sf[0]:.1f} s (not in the ratio)")
        if gpu_available():
            import cupy

            dsci, dref = cupy.asarray(sci), cupy.asarray(ref)
            sync = cupy.cuda.Device().synchronize
            t_gpu = median_seconds(
                lambda a=dsci, b=dref, k=kw: subtract(a, b, **k), repeat=3, sync=sync
            )
            rows.append((f"subtract cupy {size}^2", t_gpu, sf[1] if sf else t_np))
    print_table("dp.subtract (gaussian basis, kernel_order 2, bg_order 1) vs SFFT NumPy backend "
                "(same kernel half-width and orders, delta basis, whole image)",
                "dagpre / SFFT", rows)  # fmt: skip
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
