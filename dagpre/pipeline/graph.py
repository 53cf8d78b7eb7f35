"""Dask graphs of a night: one task per step per frame, named by step.

Keys read as the pipeline in the dashboard's task stream: ``read-12``, ``mask-12``,
``background-12``, ``align-12``, ``detect-12``, ``photometry-12``, ``write-12`` (the
quality pass uses ``quality-…``; the reference is the single task ``reference``). Building
a graph calls no step and reads no pixels: every step is a ``dask.delayed`` call, computed
only when the client asks (``tests/test_graph.py`` proves it with a scheduler that refuses
to run anything).

Steps not built yet would be left out of the graph, and :func:`missing_steps` says which and
why, so a run prints it instead of pretending (none today). With ``subtract`` in the
workflow, the ``difference`` cube is written, the ``variance`` and ``mask`` cubes are the
difference's, light curves are the reference's PSF flux plus the difference's PSF flux, on
the reference's photometric scale, and (with the ``candidates`` product) the ``detect`` task
finds the difference image's detections, matched over frames into candidates at the end of
the run (:mod:`dagpre.pipeline.run`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import numpy as np

from dagpre.pipeline import steps as st
from dagpre.pipeline.workflow import Workflow
from dagpre.types import InputError

__all__ = [
    "build_reference",
    "frame_graph",
    "missing_steps",
    "quality_graph",
    "reference_graph",
    "select_reference",
]

#: Steps whose module is not in this build yet, with what is missing.
_PENDING: dict[str, tuple[str, str]] = {}


def missing_steps(workflow: Workflow) -> dict[str, str]:
    """Steps the workflow asks for that this build cannot run: name -> reason."""
    out = {}
    for name, (module, reason) in _PENDING.items():
        if name in workflow.steps and importlib.util.find_spec(module) is None:
            out[name] = reason
    return out


def _front(workflow: Workflow, index: int, path: str, prefix: str = ""):
    """read -> mask -> background for one frame (delayed)."""
    steps = workflow.steps
    device = steps.get("read", {}).get("device", "auto")
    hdu = steps.get("read", {}).get("hdu", workflow.hdu)
    state = dask.delayed(st.read_step, pure=False)(
        index, path, hdu, device, dask_key_name=f"{prefix}read-{index}"
    )
    if "mask" in steps:
        state = dask.delayed(st.mask_step, pure=False)(
            state, steps["mask"], dask_key_name=f"{prefix}mask-{index}"
        )
    return dask.delayed(st.background_step, pure=False)(
        state, steps.get("background", {}), dask_key_name=f"{prefix}background-{index}"
    )


def _quality_params(workflow: Workflow) -> dict:
    steps = workflow.steps
    params = {"background": steps.get("background", {}), "detect": steps.get("detect", {})}
    return {**params, **steps.get("quality", {})}


def quality_graph(workflow: Workflow, paths: Sequence[str]) -> list:
    """Per frame: read, mask, then the quality row (delayed; small rows for the client).

    The row is :func:`~dagpre.ops.quality.frame_quality`'s, plus the quality model's score
    when the workflow's ``quality`` step names a model.
    """
    steps = workflow.steps
    device = steps.get("read", {}).get("device", "auto")
    hdu = steps.get("read", {}).get("hdu", workflow.hdu)
    params = _quality_params(workflow)
    rows = []
    for i, p in enumerate(paths):
        state = dask.delayed(st.read_step, pure=False)(
            i, p, hdu, device, dask_key_name=f"quality-read-{i}"
        )
        if "mask" in steps:
            state = dask.delayed(st.mask_step, pure=False)(
                state, steps["mask"], dask_key_name=f"quality-mask-{i}"
            )
        rows.append(
            dask.delayed(st.quality_step, pure=False)(state, params, dask_key_name=f"quality-{i}")
        )
    return rows


def select_reference(workflow: Workflow, paths: Sequence[str], rows: Sequence[Any]) -> list:
    """Indices of the frames the reference may be built from, best first.

    ``"first"``: frame 0. ``"frames"``: the named ones. ``"best"``: every usable frame by
    :func:`~dagpre.ops.reference.rank_frames` (smallest FWHM, then lowest background; frames
    with a non-uniform sky, trailed stars or that the quality model calls bad are left out);
    the reference task combines the first ``n_best`` of them that agree in photometric scale.
    """
    from dagpre.ops.reference import rank_frames

    ref = workflow.reference
    if ref["select"] == "first":
        return [0]
    if ref["select"] == "frames":
        index = {str(p): i for i, p in enumerate(paths)}
        missing = [f for f in ref["frames"] if f not in index]
        if missing:
            raise InputError("reference.frames", f"not among the inputs: {', '.join(missing)}")
        return [index[f] for f in ref["frames"]]
    usable = [
        r if isinstance(r, Mapping) and r.get("good", True) and r["n_sources"] > 0 else None
        for r in rows
    ]
    ranked = rank_frames(usable)
    if not ranked:
        reasons = "; ".join(str(r) for r in rows if isinstance(r, st.Failed))[:300]
        raise InputError("reference", f"no frame is usable as a reference ({reasons})")
    return ranked


def build_reference(
    workflow: Workflow, paths: Sequence[str], indices: Sequence[int], rows: Sequence[Any] = ()
) -> st.Reference:
    """The reference (:func:`dagpre.ops.reference.build_reference`) with the workflow's settings.

    ``indices`` are the candidate frames best first (:func:`select_reference`); with
    ``select: best`` the first ``n_best`` that agree in photometric scale are combined,
    otherwise exactly the named ones. Frames are masked and background-subtracted with the
    workflow's ``mask`` and ``background`` settings and aligned with its ``align`` method
    (Lanczos-3 resampling unless the workflow names an order: the reference is resampled
    once and should stay sharp); sources are detected with the ``detect`` settings (at least
    5 sigma) or placed from ``reference.catalog``.
    """
    from dagpre.ops.reference import build_reference as build

    ref = workflow.reference
    steps = workflow.steps
    chosen = [paths[i] for i in indices]
    select = None if ref["select"] == "best" else list(range(len(chosen)))
    quality = None
    if select is None:
        by_index = {r["index"]: r for r in rows if isinstance(r, Mapping)}
        quality = [by_index.get(i) for i in indices]
    align = {"method": "wcs", "order": "lanczos3", **steps.get("align", {})}
    catalog = _read_catalog(ref["catalog"]) if ref.get("catalog") else None
    radius = float(steps.get("photometry", {}).get("radii", [5.0])[0])
    out = build(
        chosen, n_best=ref["n_best"] if select is None else len(chosen),
        combine=ref["combine"], select=select, quality=quality,
        mask=steps.get("mask") if "mask" in steps else None,
        background=steps.get("background", {}), align=align,
        detect={"thresh": 5.0, **steps.get("detect", {})}, catalog=catalog,
        aperture_radius=radius, hdu=workflow.hdu, psf="auto",
    )  # fmt: skip
    return dataclasses.replace(out, frames=tuple(chosen[i] for i in out.frames))  # as paths


def _read_catalog(path: str) -> dict:
    """An external source list (any table astropy reads: ECSV, FITS, CSV) with ra, dec."""
    from astropy.table import Table

    try:
        table = Table.read(path)
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read the reference catalog: {err}") from None
    cols = {name.lower(): name for name in table.colnames}
    missing = [c for c in ("ra", "dec") if c not in cols]
    if missing:
        raise InputError(path, f"the reference catalog has no {' or '.join(missing)} column")
    return {low: np.asarray(table[name]) for low, name in cols.items()
            if table[name].ndim == 1 and table[name].dtype.kind in "biuf"}  # fmt: skip


def reference_graph(
    workflow: Workflow, paths: Sequence[str], indices: Sequence[int], rows: Sequence[Any] = ()
):
    """The single ``reference`` task (delayed)."""
    return dask.delayed(build_reference, pure=False)(
        workflow, list(paths), list(indices), list(rows), dask_key_name="reference"
    )


def frame_graph(
    workflow: Workflow,
    paths: Sequence[str],
    indices: Sequence[int],
    reference: Any,
    store_path: str,
) -> list:
    """Per frame: read, mask, background, align, detect, photometry, write (delayed rows).

    ``reference`` is a :class:`~dagpre.pipeline.steps.Reference` or a delayed one (the
    same object for every frame: built once, shared).
    """
    steps = workflow.steps
    rows = []
    for i in indices:
        state = _front(workflow, i, paths[i])
        state = dask.delayed(st.align_step, pure=False)(
            state, reference, steps.get("align", {}), dask_key_name=f"align-{i}"
        )
        if "subtract" in steps and "subtract" not in missing_steps(workflow):
            state = dask.delayed(st.subtract_step, pure=False)(
                state, reference, steps["subtract"], dask_key_name=f"subtract-{i}"
            )
        if "subtract" in steps and ("candidates" in steps or "candidates" in workflow.products):
            found = dask.delayed(st.candidates_step, pure=False)(
                state, reference, steps.get("candidates", {}), dask_key_name=f"detect-{i}"
            )
        else:
            found = dask.delayed(st.detect_step, pure=False)(
                state, steps.get("detect", {}), dask_key_name=f"detect-{i}"
            )
        phot = None
        if "photometry" in steps:
            phot = dask.delayed(st.photometry_step, pure=False)(
                state, reference, steps["photometry"], dask_key_name=f"photometry-{i}"
            )
        rows.append(
            dask.delayed(st.write_step, pure=False)(
                store_path, i, state, found, phot, dask_key_name=f"write-{i}"
            )
        )
    return rows
