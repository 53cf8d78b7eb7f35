"""``dagpre demo``: the main job on built-in data, with a summary checked against the truth.

Simulates a night (variable stars, transients, one cloudy frame), runs
``workflows/demo.yaml`` on it with a local cluster (GPU workers when a GPU is usable), prints
a summary whose numbers are compared with the simulator's truth tables, and writes
quicklook PNGs of the reference and of one aligned frame.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dagpre.types import InputError

__all__ = ["DEMO_WORKFLOW", "demo_summary", "run_demo"]

#: The demo workflow shipped with the repository.
DEMO_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "demo.yaml"


def run_demo(
    workdir: str | Path,
    *,
    n_frames: int = 20,
    size: int = 1024,
    n_stars: int = 2000,
    n_workers: int = 2,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """Simulate, run, summarise; returns the exit status (0 when every good frame is done)."""
    from dagpre import simulate
    from dagpre.io import store as zs
    from dagpre.ops.transforms import quicklook_png
    from dagpre.pipeline.run import run_workflow
    from dagpre.pipeline.workflow import load_workflow, parse_workflow

    workdir = Path(workdir)
    if not DEMO_WORKFLOW.is_file():
        raise InputError(str(DEMO_WORKFLOW), "the demo workflow is missing from this install")
    t0 = time.perf_counter()
    night = simulate.night(
        n_frames=n_frames, shape=(size, size), n_stars=n_stars, seed=seed,
        n_transients=3, bad_frames={n_frames // 2: "cloud"},
    )  # fmt: skip
    night.write(workdir / "frames", overwrite=True)
    print(
        f"dagpre demo: simulated {n_frames} frames of {size}x{size} px, {n_stars} stars, "
        f"3 transients -> {workdir / 'frames'} ({time.perf_counter() - t0:.1f} s)"
    )
    load_workflow(DEMO_WORKFLOW)  # the shipped file itself must be valid
    wf = parse_workflow(DEMO_WORKFLOW.read_text(), str(DEMO_WORKFLOW), base_dir=workdir)
    wf = dataclasses.replace(wf, cluster={**wf.cluster, "n_workers": n_workers})
    summary = run_workflow(wf, progress=say)
    root = zs.open_store(wf.store["path"], mode="r")
    numbers = demo_summary(root, night, summary)
    looks = workdir / "quicklook"
    looks.mkdir(exist_ok=True)
    quicklook_png(root["reference"]["image"][:], looks / "reference.png")
    done = zs.done_frames(root)
    if done.size:
        aligned = np.nan_to_num(root["aligned"][int(done[0])])
        quicklook_png(aligned, looks / f"aligned_{int(done[0]):03d}.png")
    print(_format(numbers, summary, looks))
    return 0 if numbers["frames_failed"] == 0 else 1


def demo_summary(root, night, summary) -> dict:
    """The summary's numbers, each from the store, with the truth they are held to.

    ``reference_sources_matched``: reference detections within 1.5 px of a true star's
    position on the reference frame (through the reference's WCS).
    """
    from dagpre.io import store as zs

    status = zs.frame_status(root)
    sources = root["reference"]["sources"]
    truth = night.truth_tables()["sources"]
    ref_wcs = _reference_wcs(root)
    tx, ty = ref_wcs.world_to_pixel_values(np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    sx, sy = sources["x"][:], sources["y"][:]
    matched = 0
    if sx.size and tx.size:
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([sx, sy]))
        matched = int((dist < 1.5).sum())
    lc_shape = root["lightcurves"]["flux"].shape if "lightcurves" in root else (0, 0)
    n_comp = len(summary.rows)
    return {
        "frames": int(status.size),
        "frames_done": int((status == "done").sum()),
        "frames_failed": int((status == "failed").sum()),
        "reference_sources": int(sx.size),
        "reference_sources_matched": matched,
        "true_stars": len(truth),
        "lightcurves": int(lc_shape[0]),
        "lightcurve_points": int(np.isfinite(root["lightcurves"]["flux"][:]).sum())
        if lc_shape[0]
        else 0,
        "transients_injected": len(night.truth_tables()["transients"]),
        **_found(root, truth, tx, ty, sx, sy),
        "seconds_per_frame": summary.seconds / n_comp if n_comp else math.nan,
    }


def _found(root, truth, tx, ty, sx, sy) -> dict:
    """Transients found among the candidates, variables flagged among matched sources.

    A transient is found when a candidate not marked as a bright-star residual lies within
    2 px of its true position; a candidate is real within 2 px of a transient or a variable
    star. A true variable star counts when a reference source lies within 1.5 px of it.
    """
    from scipy.spatial import cKDTree

    kinds = np.asarray(truth["kind"])
    out = {"transients_found": 0, "candidates": 0, "candidates_real": 0,
           "variables_matched": 0, "variables_flagged": 0, "constants_flagged": 0}  # fmt: skip
    if "candidates" in root and root["candidates"]["id"].shape[0]:
        cand = root["candidates"]
        keep = ~cand["residual"][:]
        xy = np.column_stack([cand["x"][:][keep], cand["y"][:][keep]])
        out["candidates"] = int(keep.sum())
        if xy.size:
            tree = cKDTree(xy)
            tr = kinds == "transient"
            out["transients_found"] = int((tree.query(np.column_stack([tx[tr], ty[tr]]))[0]
                                           < 2).sum())  # fmt: skip
            real = np.column_stack([tx[kinds != "star"], ty[kinds != "star"]])
            out["candidates_real"] = int((cKDTree(real).query(xy)[0] < 2).sum())
    src = root["reference"]["sources"]
    if "variable" in src and sx.size:
        dist, idx = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([sx, sy]))
        flagged = src["variable"][:]
        hit = dist < 1.5
        out["variables_matched"] = int((hit & (kinds[idx] == "variable")).sum())
        out["variables_flagged"] = int((hit & (kinds[idx] == "variable") & flagged).sum())
        out["constants_flagged"] = int((hit & (kinds[idx] == "star") & flagged).sum())
    return out


def _reference_wcs(root):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(root.attrs["wcs_header"]))


def _format(numbers: dict, summary, looks: Path) -> str:
    n = numbers
    lines = [
        "summary:",
        f"  frames: {n['frames_done']}/{n['frames']} done, {n['frames_failed']} failed",
        f"  reference: {n['reference_sources']} sources, {n['reference_sources_matched']} "
        f"within 1.5 px of one of the {n['true_stars']} simulated stars",
        f"  light curves: {n['lightcurves']} sources, {n['lightcurve_points']} points",
        f"  variables: {n['variables_flagged']} of the {n['variables_matched']} simulated "
        f"variables on the reference flagged; {n['constants_flagged']} constant stars flagged",
        f"  transients: {n['transients_found']} of {n['transients_injected']} injected found; "
        f"{n['candidates_real']} of {n['candidates']} candidates real (at a transient or a "
        "variable star)",
        f"  time: {n['seconds_per_frame']:.2f} s per frame ({summary.seconds:.1f} s in all)",
        f"  dashboard was: {summary.dashboard}",
        f"  quicklook PNGs: {looks}",
    ]
    lines += [f"  left out: {k}: {v}" for k, v in summary.missing_steps.items()]
    lines += [f"  failed: {r['path']}: {r['error']}" for r in summary.failed]
    return "\n".join(lines)
