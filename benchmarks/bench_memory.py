"""Peak worker memory against the number of frames: does a night's length grow it?

Usage: ``python benchmarks/bench_memory.py [--frames 50 500] [--size 96] [--stars 40]``

For each frame count one simulated night is written to a temporary folder and the same
workflow (read, mask, background, WCS align, detect, aperture photometry, write to Zarr,
in batches of ``--batch`` frames) runs on a fresh 1-worker process ``LocalCluster``. A
thread samples the worker process's resident set size (RSS) every 50 ms; the peak is
printed with the ratio to the smallest night's peak (the issue's bar: 500 frames within
20 % of 50).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _timing import machine
from bench_pipeline import WORKFLOW

import dagpre.simulate as sim
from dagpre.pipeline.cluster import start_client
from dagpre.pipeline.run import run_workflow
from dagpre.pipeline.workflow import parse_workflow


def _sample(pids: list[int], stop: threading.Event, peak: dict) -> None:
    procs = [psutil.Process(p) for p in pids]
    while not stop.is_set():
        for p in procs:
            try:
                peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.NoSuchProcess:  # a restarted worker: its successor is not sampled
                peak["lost"] = p.pid
                return
        time.sleep(0.05)


def _peak(n_frames: int, size: int, stars: int, batch: int, folder: Path) -> tuple[float, float]:
    night = sim.night(n_frames=n_frames, shape=(size, size), n_stars=stars, seed=3,
                      n_transients=0)  # fmt: skip
    night.write(folder / "frames", overwrite=True)
    text = WORKFLOW.format(store="night.zarr", workers=1, batch=batch)
    wf = parse_workflow(text, source="bench", base_dir=folder)
    with start_client(wf.cluster) as client:
        pids = list(client.run(lambda: __import__("os").getpid()).values())
        stop, peak = threading.Event(), {}
        thread = threading.Thread(target=_sample, args=(pids, stop, peak), daemon=True)
        thread.start()
        t0 = time.perf_counter()
        summary = run_workflow(wf, client=client)
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
    if "lost" in peak:
        raise RuntimeError(f"worker process {peak['lost']} went away during the run")
    if summary.done != n_frames:
        raise RuntimeError(f"{summary.done} of {n_frames} frames done: {summary.failed[:3]}")
    return max(peak.values()) / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--stars", type=int, default=40)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    print(machine())
    first = None
    for n in args.frames:
        with tempfile.TemporaryDirectory() as tmp:
            mb, seconds = _peak(n, args.size, args.stars, args.batch, Path(tmp))
        first = first or mb
        print(f"{n:5d} frames of {args.size}^2: worker peak RSS {mb:7.1f} MiB "
              f"({mb / first:.2f}x the first), {seconds:6.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
