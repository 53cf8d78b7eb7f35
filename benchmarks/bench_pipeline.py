"""Pipeline overhead: a plain loop over the eager steps vs the Dask pipeline on 1 and 2 workers.

Usage: ``python benchmarks/bench_pipeline.py [--frames 100] [--size 1024] [--stars 1500]``

One simulated night is written to a temporary folder; the same workflow runs (a) as a
plain Python loop calling the pipeline's step functions in this process, (b) on a 1-worker
and (c) on a 2-worker process ``LocalCluster`` (one thread each). Both do the same work:
the quality pass (read, mask, :func:`~dagpre.ops.quality.frame_quality` per frame), the
reference (``select: first``: one frame, its PSF model and photometry), then per frame read,
mask, background, WCS align, detect, aperture and PSF photometry and the write to Zarr. The
clusters' start is not timed. Prints the loop's parts, seconds per frame and the ratios:
the scheduler's overhead is (b) / (a) - 1 and the scaling is (b) / (c).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _timing import machine

import dagpre.simulate as sim
from dagpre.io import store as zs
from dagpre.pipeline import graph as gr
from dagpre.pipeline import steps as st
from dagpre.pipeline.cluster import start_client
from dagpre.pipeline.run import run_workflow
from dagpre.pipeline.workflow import parse_workflow

WORKFLOW = """
inputs: {{paths: "frames/*.fits"}}
reference: {{select: first}}
steps:
  read: {{}}
  mask: {{}}
  background: {{}}
  align: {{method: wcs}}
  detect: {{thresh: 5.0}}
  photometry: {{radii: [4.0]}}
store: {{path: {store}, overwrite: true}}
cluster: {{n_workers: {workers}, threads_per_worker: 1, dashboard_address: null}}
batch_size: {batch}
"""


def _loop(wf, paths, store_path) -> dict:
    """The pipeline's work as a plain loop in this process: seconds per part."""
    t0 = time.perf_counter()
    s = wf.steps
    params = gr._quality_params(wf)
    rows = [st.quality_step(st.mask_step(st.read_step(i, p), s["mask"]), params)
            for i, p in enumerate(paths)]  # fmt: skip
    t1 = time.perf_counter()
    indices = gr.select_reference(wf, paths, rows)
    reference = gr.build_reference(wf, paths, indices, rows)
    root = zs.create_store(store_path, paths, reference.image.shape, overwrite=True)
    zs.write_reference(root, reference.image, reference.mask, reference.sources,
                       psf=reference.psf, variance=reference.variance)  # fmt: skip
    t2 = time.perf_counter()
    for i, p in enumerate(paths):
        state = st.background_step(st.mask_step(st.read_step(i, p), s["mask"]), s["background"])
        state = st.align_step(state, reference, s["align"])
        found = st.detect_step(state, s["detect"])
        phot = st.photometry_step(state, reference, s["photometry"])
        st.write_step(store_path, i, state, found, phot)
    t3 = time.perf_counter()
    return {"quality": t1 - t0, "reference": t2 - t1, "frames": t3 - t2, "total": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--stars", type=int, default=1500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dagpre-bench-"))
    night = sim.night(
        n_frames=args.frames, shape=(args.size, args.size), n_stars=args.stars, seed=3
    )
    night.write(work / "frames")
    paths = sorted(str(p) for p in (work / "frames").glob("*.fits"))
    wf1 = parse_workflow(WORKFLOW.format(store="one.zarr", workers=1, batch=200), base_dir=work)
    parts = _loop(wf1, paths, str(work / "loop.zarr"))
    loop = parts["total"]
    rows = [("plain loop over the same steps (this process)", loop)]
    for workers in (1, 2):
        text = WORKFLOW.format(store=f"w{workers}.zarr", workers=workers, batch=200)
        wf = parse_workflow(text, base_dir=work)
        with start_client(wf.cluster) as client:
            summary = run_workflow(wf, client=client)
        assert summary.done == len(paths)
        rows.append((f"pipeline, {workers} process worker(s)", summary.seconds))
    print(machine())
    print(f"night: {args.frames} frames of {args.size}x{args.size}, {args.stars} stars")
    print("loop parts: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + "\n")
    print("| run | seconds | s/frame | vs plain loop |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / args.frames:.3f} | {seconds / loop:.2f} |")
    print(f"\n2 workers vs 1: {rows[1][1] / rows[2][1]:.2f}x")


if __name__ == "__main__":
    main()
