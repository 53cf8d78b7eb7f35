"""Run a workflow: expand inputs, pick and build the reference, stream frames in batches.

The order of a run, per store (one per night or field, or one in all):

1. Inputs are expanded (globs, sorted) and grouped; a store is created, or opened when it
   exists (resume): frames already ``done`` are skipped, the rest are recomputed.
2. Reference: read from the store when a previous run built it; else a quality pass
   (read, mask, background, detect per frame; small rows gathered) picks the best frames and
   the single ``reference`` task builds it; it is written to the store.
3. Frames not done are computed in batches of ``batch_size`` (one graph each, so memory does
   not grow with the night), with ``retries`` for lost workers. Each frame's write task
   records it ``done`` or ``failed`` with a one-line reason.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import as_completed

from dagpre.io import store as zs
from dagpre.pipeline import graph as gr
from dagpre.pipeline import steps as st
from dagpre.pipeline.workflow import Workflow
from dagpre.types import InputError

__all__ = ["RunSummary", "expand_inputs", "run_workflow"]


@dataclass
class RunSummary:
    """What a run did, per frame and in total."""

    stores: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # one dict per frame computed in this run
    skipped: int = 0  # frames already done (resume)
    missing_steps: dict = field(default_factory=dict)
    seconds: float = 0.0
    dashboard: str | None = None

    @property
    def done(self) -> int:
        return sum(r["status"] == "done" for r in self.rows)

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["status"] == "failed"]


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Every file matching the patterns (globs expanded, sorted, duplicates dropped)."""
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError("inputs.paths", f"no file matches {pattern!r}")
        found.extend(m for m in matches if m not in found)
    return found


def _groups(workflow: Workflow, paths: list[str]) -> dict[str, list[str]]:
    if workflow.group_by == "none":
        return {"": paths}
    from astropy.io import fits

    groups: dict[str, list[str]] = {}
    for p in paths:
        try:
            header = fits.getheader(p)
        except (OSError, ValueError) as err:
            reason = f"cannot read the header to group by {workflow.group_by}: {err}"
            raise InputError(p, reason) from None
        if workflow.group_by == "night":
            mjd = header.get("MJD-OBS")
            key = f"mjd{int(np.floor(mjd - 0.5)) + 1}" if mjd is not None else "unknown-night"
        else:
            key = str(header.get("OBJECT", "unknown-field")).strip().replace(" ", "_")
        groups.setdefault(key, []).append(p)
    return groups


def _load_reference(root) -> st.Reference | None:
    if "reference" not in root or "wcs_header" not in root.attrs:
        return None
    from astropy.io import fits
    from astropy.wcs import WCS

    ref = root["reference"]
    text = root.attrs["wcs_header"]
    wcs = WCS(fits.Header.fromstring(text)) if text else None
    sources = {k: ref["sources"][k][:] for k in ref["sources"].array_keys()}
    variance = ref["variance"][:] if "variance" in ref else None
    return st.Reference(
        ref["image"][:], ref["mask"][:], wcs, sources,
        tuple(root.attrs["reference_frames"]), float(root.attrs["reference_noise"]), variance,
        zs.read_psf_model(root),
    )  # fmt: skip


def run_workflow(
    workflow: Workflow,
    *,
    client: Any = None,
    scheduler: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``workflow`` on ``client`` (or on a cluster started from its settings).

    Parameters
    ----------
    workflow : Workflow
    client : distributed.Client, optional
        Use this client; else one is started (and closed) from ``workflow.cluster``.
    scheduler : str, optional
        Scheduler address overriding the workflow's cluster settings.
    progress : callable, optional
        Called with one line of text per event (frames done, failures, dashboard).

    Returns
    -------
    RunSummary
    """
    say = progress or (lambda text: None)
    summary = RunSummary(missing_steps=gr.missing_steps(workflow))
    for name, reason in summary.missing_steps.items():
        say(f"step '{name}' left out: {reason}")
    paths = expand_inputs(workflow.paths)
    groups = _groups(workflow, paths)
    start = time.perf_counter()
    if client is None:
        from dagpre.pipeline.cluster import start_client

        with start_client(workflow.cluster, scheduler) as own:
            summary.dashboard = own.dashboard_link
            say(f"dashboard: {own.dashboard_link}")
            for key, group in groups.items():
                _run_group(workflow, key, group, own, summary, say)
    else:
        summary.dashboard = getattr(client, "dashboard_link", None)
        for key, group in groups.items():
            _run_group(workflow, key, group, client, summary, say)
    summary.seconds = time.perf_counter() - start
    return summary


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = round(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames"


def _store_path(workflow: Workflow, key: str) -> str:
    base = Path(workflow.store["path"])
    return str(base / f"{key}.zarr") if key else str(base)


def _run_group(workflow, key, paths, client, summary, say) -> None:
    store_path = _store_path(workflow, key)
    exists = Path(store_path).exists()
    root = zs.open_store(store_path) if exists and not workflow.store["overwrite"] else None
    if root is not None:
        stored = [str(p) for p in root["frames"]["path"][:].tolist()]
        if stored != list(paths):
            raise InputError(
                store_path,
                f"holds {len(stored)} other frames; use a new store or store.overwrite: true",
            )
    reference = _load_reference(root) if root is not None else None
    if reference is None:
        say(f"quality pass over {len(paths)} frame(s)")
        rows = client.compute(gr.quality_graph(workflow, paths), sync=True)
        indices = gr.select_reference(workflow, paths, rows)
        reference = client.compute(gr.reference_graph(workflow, paths, indices, rows), sync=True)
        names = ", ".join(Path(p).name for p in reference.frames)
        say(f"reference from {len(reference.frames)} frame(s): {names}")
        for note in reference.notes:
            say(f"reference: {note}")
        root = zs.create_store(
            store_path, paths, reference.image.shape, products=workflow.products,
            chunks=workflow.store["chunks"], sharding=workflow.store["sharding"],
            workflow_text=workflow.text, overwrite=True,
        )  # fmt: skip
        zs.write_reference(
            root, reference.image, reference.mask, reference.sources, psf=reference.psf,
            frames=reference.frames, variance=reference.variance,
        )  # fmt: skip
        root.attrs["wcs_header"] = reference.wcs.to_header_string() if reference.wcs else ""
        root.attrs["reference_noise"] = reference.noise
        root.attrs["reference_notes"] = list(reference.notes)
        in_ref = set(reference.frames)
        for r in rows:
            if isinstance(r, dict):
                values = {k: v for k, v in r.items() if k in zs.FRAME_COLUMNS}
                zs.write_frame_row(root, r["index"], {**values, "reference": paths[r["index"]]
                                                      in in_ref})  # fmt: skip
        if workflow.steps.get("quality", {}).get("exclude"):
            for r in rows:
                if isinstance(r, dict) and not r.get("good", True):
                    reason = f"quality: bad frame (bad area {r.get('bad_fraction', 0):.0%})"
                    zs.set_frame_status(root, r["index"], "failed", reason)
                    say(f"frame {r['index']} excluded: {reason}")
    summary.stores.append(store_path)
    done = set(zs.done_frames(root).tolist())
    excluded = set()
    if workflow.steps.get("quality", {}).get("exclude"):
        errors = root["frames"]["error"][:]
        excluded = {i for i, e in enumerate(errors.tolist()) if str(e).startswith("quality:")}
    todo = [i for i in range(len(paths)) if i not in done and i not in excluded]
    summary.skipped += len(done)
    if done:
        say(f"{store_path}: {len(done)} frame(s) already done, {len(todo)} to compute")
    shared = client.scatter(reference, broadcast=True) if todo else None
    n_before = len(summary.rows)
    for lo in range(0, len(todo), workflow.batch_size):
        batch = todo[lo : lo + workflow.batch_size]
        rows = gr.frame_graph(workflow, paths, batch, shared, store_path)
        futures = client.compute(rows, retries=workflow.retries)
        for future in as_completed(futures):
            row = future.result()
            summary.rows.append({**row, "path": paths[row["index"]]})
            if row["status"] == "failed":
                say(f"frame {row['index']} failed: {row['error']}")
            say(_bar(len(summary.rows) - n_before, len(todo)))
    finish_store(root, workflow, reference, say)
    summary.rows.sort(key=lambda r: (r["path"], r["index"]))


def finish_store(root, workflow: Workflow, reference: st.Reference, say=print) -> None:
    """Night-wide products once the frames are done: variability, magnitudes, candidates.

    * :func:`~dagpre.ops.variability.variability` of every reference source's light curve
      (over the frames done) becomes columns of the reference's sources table;
    * with ``photometry.zero_point``, ``mag`` and ``mag_err`` planes
      (``zero_point - 2.5 log10(flux)``) join the light curves;
    * the frames' difference-image detections are matched into the ``candidates`` table
      (:func:`~dagpre.ops.candidates.match_candidates`).
    """
    from dagpre.ops.candidates import match_candidates
    from dagpre.ops.variability import variability

    phot = workflow.steps.get("photometry", {})
    done = zs.done_frames(root)
    if "lightcurves" in root and done.size:
        lc = root["lightcurves"]
        flux, err, flag = lc["flux"][:], lc["flux_err"][:], lc["flag"][:]
        use = np.zeros(flux.shape[1], dtype=bool)
        use[done] = True
        keys = ("false_alarm", "min_chi2_dof", "error_floor")
        stats = variability(
            flux[:, use], err[:, use], flag[:, use], **{k: phot[k] for k in keys if k in phot}
        )
        zs.write_source_columns(root, stats)
        say(f"variability: {int(stats['variable'].sum())} of {flux.shape[0]} sources flagged")
        if phot.get("zero_point") is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                mag = phot["zero_point"] - 2.5 * np.log10(flux)
                mag_err = 2.5 / np.log(10) * err / flux
            for name, plane in (("mag", mag), ("mag_err", mag_err)):
                arr = lc.create_array(
                    name, shape=plane.shape, dtype="float64", chunks=lc["flux"].chunks,
                    dimension_names=("source", "frame"), overwrite=True,
                )  # fmt: skip
                arr[:] = np.where(flux > 0, plane, np.nan)
            root.attrs["zero_point"] = float(phot["zero_point"])
    if "detections" in root:
        n = root["frames"]["path"].shape[0]
        finished = set(done.tolist())
        detections = [zs.read_detections(root, i) if i in finished else None for i in range(n)]
        params = workflow.steps.get("candidates", {})
        keys = ("min_detections", "radius", "source_radius", "residual_radius", "residual_ratio")
        src = reference.sources
        ref_flux = src["flux_psf"] if "flux_psf" in src else src.get("flux_aper")
        table = match_candidates(
            detections, reference_xy=(src["x"], src["y"]), wcs=reference.wcs,
            reference_flux=ref_flux,
            **{k: params[k] for k in keys if k in params},
        )  # fmt: skip
        zs.write_candidates(root, table)
        n_det = sum(len(d["x"]) for d in detections if d)
        say(f"candidates: {len(table['id'])} from {n_det} detections "
            f"({int(table['residual'].sum())} marked as bright-star residuals)")  # fmt: skip
