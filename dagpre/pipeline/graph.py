"""Dask graphs of a night: one task per step per frame, named by step.

Keys read as the pipeline in the dashboard's task stream: ``read-12``, ``mask-12``,
``background-12``, ``align-12``, ``detect-12``, ``photometry-12``, ``write-12`` (the
quality pass uses ``quality-…``; the reference is the single task ``reference``). Building
a graph calls no step and reads no pixels: every step is a ``dask.delayed`` call, computed
only when the client asks (``tests/test_graph.py`` proves it with a scheduler that refuses
to run anything).

Steps not built yet are left out of the graph, and :func:`missing_steps` says which and why,
so a run prints it instead of pretending (the ``quality`` model; ``candidates`` wait for
issue 8). With ``subtract`` in the workflow, the ``difference`` cube is written, the
``variance`` and ``mask`` cubes are the difference's, and light curves are the reference's
aperture flux plus the difference's, on the reference's photometric scale.
"""

from __future__ import annotations

import importlib.util
import warnings
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
_PENDING = {
    "quality": ("dagpre.ml.quality", "the quality model (issue 9) is not in this build"),
}


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


def quality_graph(workflow: Workflow, paths: Sequence[str]) -> list:
    """Per frame: read, mask, background, detect, returning small quality rows (delayed)."""
    detect = workflow.steps.get("detect", {})
    return [
        dask.delayed(st.quality_step, pure=False)(
            _front(workflow, i, p, prefix="quality-"), detect, dask_key_name=f"quality-{i}"
        )
        for i, p in enumerate(paths)
    ]


def select_reference(workflow: Workflow, paths: Sequence[str], rows: Sequence[Any]) -> list:
    """Indices of the frames to build the reference from (best first).

    ``"first"``: frame 0. ``"frames"``: the named ones. ``"best"``: the ``n_best`` frames
    with the smallest FWHM, then the lowest noise, among the frames whose quality pass
    worked and found sources.
    """
    ref = workflow.reference
    if ref["select"] == "first":
        return [0]
    if ref["select"] == "frames":
        index = {str(p): i for i, p in enumerate(paths)}
        missing = [f for f in ref["frames"] if f not in index]
        if missing:
            raise InputError("reference.frames", f"not among the inputs: {', '.join(missing)}")
        return [index[f] for f in ref["frames"]]
    good = [
        r for r in rows if isinstance(r, Mapping) and r["n_sources"] > 0 and np.isfinite(r["fwhm"])
    ]
    if not good:
        reasons = "; ".join(str(r) for r in rows if isinstance(r, st.Failed))[:300]
        raise InputError("reference", f"no frame is usable as a reference ({reasons})")
    good.sort(key=lambda r: (round(r["fwhm"], 2), r["noise"], r["index"]))
    return [r["index"] for r in good[: ref["n_best"]]]


def build_reference(
    workflow: Workflow, paths: Sequence[str], indices: Sequence[int]
) -> st.Reference:
    """The reference: the chosen frames aligned onto the first, median-combined, detected.

    Frames are background-subtracted and aligned with the workflow's ``align`` settings;
    a pixel is the median of the frames covering it (NaN where none does, then flagged
    ``OFF_FOOTPRINT`` and set to 0). Sources are detected on it with the ``detect``
    settings (at least 5 sigma).
    """
    from dagpre.backend import to_host
    from dagpre.ops.detect import detect_sources
    from dagpre.ops.photometry import aperture_photometry
    from dagpre.types import MaskBit

    front = [
        st.background_step(
            st.mask_step(st.read_step(i, paths[i], workflow.hdu), workflow.steps.get("mask", {}))
            if "mask" in workflow.steps
            else st.read_step(i, paths[i], workflow.hdu),
            workflow.steps.get("background", {}),
        )
        for i in indices
    ]
    failed = [f for f in front if isinstance(f, st.Failed)]
    if failed:
        raise InputError("reference", f"a reference frame failed: {failed[0]}")
    base = front[0]
    stack = [np.where(to_host(base.frame.mask) == 0, to_host(base.frame.data), np.nan)]
    variances = [np.where(to_host(base.frame.mask) == 0, to_host(base.variance), np.nan)]
    align_params = workflow.steps.get("align", {})
    base_ref = st.Reference(base.frame.data, base.frame.mask, base.frame.wcs, {}, (), 0.0)
    for state in front[1:]:
        moved = st.align_step(state, base_ref, align_params)
        if isinstance(moved, st.Failed):
            raise InputError("reference", f"aligning a reference frame failed: {moved}")
        good = to_host(moved.frame.mask) == 0
        stack.append(np.where(good, to_host(moved.frame.data), np.nan))
        variances.append(np.where(good, to_host(moved.variance), np.nan))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: flagged below
        image = np.nanmedian(np.stack(stack), axis=0) if len(stack) > 1 else stack[0]
        count = np.sum(np.isfinite(np.stack(stack)), axis=0)
        # variance of a median of n values: pi/2 times that of their mean (n >= 3)
        mean_var = np.nanmean(np.stack(variances), axis=0) / np.maximum(count, 1)
        variance = mean_var * np.where(count >= 3, np.pi / 2, 1.0)
    empty = ~np.isfinite(image)
    mask = np.where(empty, np.uint8(MaskBit.OFF_FOOTPRINT), np.uint8(0))
    image = np.where(empty, 0.0, image).astype(np.float32)
    noise = float(np.median([s.metrics["noise"] for s in front])) / np.sqrt(len(front))
    detect = {"thresh": 5.0, **workflow.steps.get("detect", {})}
    cat = detect_sources(image, err=noise, mask=mask != 0, wcs=base.frame.wcs, **detect)
    sources = {k: np.asarray(to_host(v)) for k, v in cat.items()}
    variance = np.where(empty, np.inf, variance).astype(np.float32)
    radius = float(workflow.steps.get("photometry", {}).get("radii", [5.0])[0])
    phot = aperture_photometry(
        image, sources["x"], sources["y"], radius, err=np.sqrt(variance), mask=mask != 0
    )
    sources["flux_aper"] = np.asarray(phot.flux)
    sources["fluxerr_aper"] = np.asarray(phot.fluxerr)
    return st.Reference(
        image, mask, base.frame.wcs, sources, tuple(paths[i] for i in indices), noise, variance
    )


def reference_graph(workflow: Workflow, paths: Sequence[str], indices: Sequence[int]):
    """The single ``reference`` task (delayed)."""
    return dask.delayed(build_reference, pure=False)(
        workflow, list(paths), list(indices), dask_key_name="reference"
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
