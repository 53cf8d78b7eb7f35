"""The Zarr v3 store of one night (or field): cubes, tables, status, provenance.

Layout (DESIGN.md)::

    reference/   image, mask, variance (y, x), psf (v, u), sources table (source)
    frames/      table (frame): path, mjd, exptime, fwhm, ellipticity, background, noise,
                 n_sources, saturated_fraction, nonuniformity, quality, bad_fraction,
                 reference (used in the reference), status, error
    reference/psf_model/  the PSF model's arrays (:meth:`PSFModel.to_arrays`)
    aligned      (frame, y, x) float32     difference (frame, y, x) float32
    variance     (frame, y, x) float32     mask       (frame, y, x) uint8
    lightcurves/ flux, flux_err, flag, flux_aper, fluxerr_aper (source, frame)
    detections/  per frame ``{index}/`` the difference-image detections (x, y, flux, snr, ...)
    candidates/  table (candidate): id, x, y, ra, dec, frame, peak_frame, flux, snr, sign,
                 n_detections, source, on_source

Every array carries ``dimension_names``, so ``xarray.open_zarr(path)`` gives labelled cubes
and ``xarray.open_zarr(path, group="frames")`` the frames table.

Concurrency rules (the Zarr pitfalls in ``notes/alignment-dask-zarr.md``): a cube's chunks
never span two frames and a frame's tasks write whole chunks (all of a frame's tiles), so
two workers never write the same chunk; with sharding on, one shard holds exactly one frame
and is written whole. Per-frame table entries are chunks of one element. A frame's status
becomes ``"done"`` only after all of its products are written, so an interrupted run never
leaves a half-written frame marked done, and a resumed run recomputes exactly the frames
not done.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dagpre._version import __version__
from dagpre.backend import to_host
from dagpre.types import InputError

__all__ = [
    "CUBES",
    "FRAME_COLUMNS",
    "LIGHTCURVE_COLUMNS",
    "create_store",
    "done_frames",
    "frame_status",
    "open_store",
    "read_detections",
    "read_psf_model",
    "set_frame_status",
    "write_candidates",
    "write_detections",
    "write_frame",
    "write_frame_row",
    "write_lightcurve_column",
    "write_reference",
    "write_source_columns",
]

#: Per-frame image cubes: name -> dtype.
CUBES = {"aligned": "float32", "difference": "float32", "variance": "float32", "mask": "uint8"}
#: The frames table's columns: name -> (dtype, fill).
FRAME_COLUMNS = {
    "path": (str, ""),
    "mjd": ("float64", np.nan),
    "exptime": ("float64", np.nan),
    "fwhm": ("float64", np.nan),
    "ellipticity": ("float64", np.nan),
    "background": ("float64", np.nan),
    "noise": ("float64", np.nan),
    "n_sources": ("int64", -1),
    "saturated_fraction": ("float64", np.nan),
    "nonuniformity": ("float64", np.nan),
    "quality": ("float64", np.nan),
    "bad_fraction": ("float64", np.nan),
    "reference": ("bool", False),
    "status": (str, "pending"),
    "error": (str, ""),
}
#: Light-curve planes: name -> (dtype, fill).
LIGHTCURVE_COLUMNS = {
    "flux": ("float64", np.nan),
    "flux_err": ("float64", np.nan),
    "flag": ("int32", -1),
    "flux_aper": ("float64", np.nan),
    "fluxerr_aper": ("float64", np.nan),
}
STATUSES = ("pending", "done", "failed")


def create_store(
    path: str | Path,
    paths: Sequence[str],
    shape: tuple[int, int],
    *,
    products: Sequence[str] = tuple(CUBES),
    n_sources: int = 0,
    chunks: tuple[int, int] | None = None,
    sharding: bool = False,
    workflow_text: str = "",
    overwrite: bool = False,
) -> zarr.Group:
    """Create a night's store: empty cubes, a frames table of ``pending`` rows, provenance.

    Parameters
    ----------
    path : str or Path
        Folder of the Zarr v3 store (created).
    paths : sequence of str
        The frames, in frame order (the frame index of every array is this order).
    shape : (ny, nx)
        Shape of the aligned frames (the reference grid), pixels.
    products : sequence of str
        Which of :data:`CUBES` to create.
    n_sources : int
        Reference sources (rows of the light-curve planes); 0 creates none yet.
    chunks : (cy, cx), optional
        Spatial tile of the cubes (default: the whole frame). A chunk never spans frames.
    sharding : bool
        Store each frame's tiles in one shard (one file per frame); written whole by the
        frame's task, never partially.
    workflow_text : str
        The workflow as run, kept in the provenance attributes.
    overwrite : bool
        Replace an existing store; without it an existing store is an error (open it with
        :func:`open_store` to resume).

    Returns
    -------
    zarr.Group
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(str(path), "store exists; open it to resume, or pass overwrite=True")
    ny, nx = (int(v) for v in shape)
    cy, cx = chunks if chunks is not None else (ny, nx)
    n = len(paths)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update(
        {
            "dagpre_version": __version__,
            "workflow": workflow_text,
            "reference_frames": [],
            "frame_shape": [ny, nx],
            "units": {"aligned": "ADU", "difference": "ADU", "variance": "ADU^2"},
        }
    )
    for name in products:
        if name not in CUBES:
            continue
        kwargs = {"chunks": (1, cy, cx)}
        if sharding:
            kwargs = {"shards": (1, ny, nx), "chunks": (1, cy, cx)}
        root.create_array(
            name,
            shape=(n, ny, nx),
            dtype=CUBES[name],
            fill_value=0 if name == "mask" else np.nan,
            dimension_names=("frame", "y", "x"),
            **kwargs,
        )
    frames = root.create_group("frames")
    for name, (dtype, fill) in FRAME_COLUMNS.items():
        frames.create_array(
            name, shape=(n,), dtype=dtype, chunks=(1,), fill_value=fill,
            dimension_names=("frame",),
        )  # fmt: skip
    frames["path"][:] = np.asarray([str(p) for p in paths], dtype=object)
    if n_sources:
        _create_lightcurves(root, n_sources, n)
    return root


def _create_lightcurves(root: zarr.Group, n_sources: int, n_frames: int) -> None:
    lc = root.require_group("lightcurves")
    for name, (dtype, fill) in LIGHTCURVE_COLUMNS.items():
        lc.create_array(
            name, shape=(n_sources, n_frames), dtype=dtype, chunks=(n_sources, 1),
            fill_value=fill, dimension_names=("source", "frame"), overwrite=True,
        )  # fmt: skip


def open_store(path: str | Path, mode: str = "r+") -> zarr.Group:
    """Open an existing store (``mode="r"`` read-only), checking that it is a dagpre store."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "no store here")
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as err:  # zarr raises several types for a folder that is not a store
        raise InputError(str(path), f"not a Zarr v3 store: {err}") from None
    if "frames" not in root or "dagpre_version" not in root.attrs:
        raise InputError(str(path), "not a dagpre store (no frames table or provenance)")
    return root


def write_frame(root: zarr.Group, index: int, products: Mapping[str, Any]) -> None:
    """Write one frame's cubes (whole chunks: every tile of frame ``index``).

    Does not change the frame's status: call :func:`set_frame_status` once every product
    of the frame is written.
    """
    for name, value in products.items():
        if name not in root:
            continue
        arr = root[name]
        data = np.asarray(to_host(value), dtype=arr.dtype)
        if data.shape != arr.shape[1:]:
            raise InputError(name, f"expected a frame of shape {arr.shape[1:]}, got {data.shape}")
        arr[index] = data


def write_frame_row(root: zarr.Group, index: int, values: Mapping[str, Any]) -> None:
    """Set frame ``index``'s metrics in the frames table (``fwhm``, ``background``, ...)."""
    frames = root["frames"]
    for name, value in values.items():
        if name not in FRAME_COLUMNS or name in ("status", "error"):
            raise InputError(name, f"not a frames-table metric; expected one of {_metrics()}")
        frames[name][index] = value


def _metrics() -> str:
    return ", ".join(k for k in FRAME_COLUMNS if k not in ("status", "error", "path"))


def set_frame_status(root: zarr.Group, index: int, status: str, error: str = "") -> None:
    """Mark frame ``index`` done or failed (with a one-line reason), or pending again."""
    if status not in STATUSES:
        raise InputError("status", f"expected one of {', '.join(STATUSES)}, got {status!r}")
    reason = " ".join(str(error).split())  # one line
    root["frames"]["error"][index] = reason
    root["frames"]["status"][index] = status


def frame_status(root: zarr.Group) -> np.ndarray:
    """Status of every frame (``"pending"``, ``"done"`` or ``"failed"``), frame order."""
    return np.asarray(root["frames"]["status"][:].tolist(), dtype=str)


def done_frames(root: zarr.Group) -> np.ndarray:
    """Indices of the frames already done (a resumed run skips them)."""
    return np.flatnonzero(frame_status(root) == "done")


def write_lightcurve_column(root: zarr.Group, index: int, columns: Mapping[str, Any]) -> None:
    """Write frame ``index``'s column of the light-curve planes (one whole chunk each)."""
    lc = root["lightcurves"]
    for name, value in columns.items():
        lc[name][:, index] = np.asarray(to_host(value), dtype=lc[name].dtype)


def write_reference(
    root: zarr.Group,
    image: Any,
    mask: Any,
    sources: Mapping[str, Any],
    *,
    psf: Any = None,
    frames: Sequence[str] = (),
    variance: Any = None,
) -> None:
    """Write the reference image, mask, variance, PSF and sources; size the light curves."""
    ref = root.require_group("reference")
    image = np.asarray(to_host(image), dtype=np.float32)
    planes = [("image", image, "float32"), ("mask", mask, "uint8")]
    if variance is not None:
        planes.append(("variance", variance, "float32"))
    for name, value, dtype in planes:
        arr = ref.create_array(
            name, shape=image.shape, dtype=dtype, chunks=image.shape,
            dimension_names=("y", "x"), overwrite=True,
        )  # fmt: skip
        arr[:] = np.asarray(to_host(value), dtype=dtype)
    if psf is not None and hasattr(psf, "to_arrays"):  # a PSF model: its arrays, and a stamp
        model = ref.require_group("psf_model")
        scalars = {}
        for name, value in psf.to_arrays().items():
            v = np.asarray(to_host(value))
            if v.ndim == 0:  # Zarr arrays need a dimension: scalars go to the attributes
                scalars[name] = v.item()
                continue
            arr = model.create_array(name, shape=v.shape, dtype=v.dtype, chunks=v.shape,
                                     overwrite=True)  # fmt: skip
            arr[...] = v
        model.attrs["scalars"] = scalars
        psf = psf.stamp()
    if psf is not None:
        p = np.asarray(to_host(psf), dtype=np.float32)
        arr = ref.create_array(
            "psf", shape=p.shape, dtype="float32", chunks=p.shape,
            dimension_names=("v", "u"), overwrite=True,
        )  # fmt: skip
        arr[:] = p
    _write_table(ref.require_group("sources"), sources, "source")
    n_src = len(to_host(next(iter(sources.values())))) if sources else 0
    root.attrs["reference_frames"] = [str(f) for f in frames]
    n_frames = root["frames"]["path"].shape[0]
    if n_src and "lightcurves" not in root:
        _create_lightcurves(root, n_src, n_frames)


def _write_table(group: zarr.Group, columns: Mapping[str, Any], dim: str, rows=None) -> None:
    """Write 1-D columns into ``group`` (one chunk each; empty columns get a 1-element chunk)."""
    for name, value in columns.items():
        col = np.asarray(to_host(value))
        if rows is not None and col.shape[:1] != (rows,):
            raise InputError(name, f"expected {rows} rows (one per {dim}), got {col.shape}")
        arr = group.create_array(
            name, shape=col.shape, dtype=col.dtype, chunks=(max(col.shape[0], 1),),
            dimension_names=(dim,), overwrite=True,
        )  # fmt: skip
        arr[:] = col


def write_candidates(root: zarr.Group, table: Mapping[str, Any]) -> None:
    """Write the candidates table (gathered on the client: small, variable length)."""
    _write_table(root.require_group("candidates"), table, "candidate")


def write_source_columns(root: zarr.Group, columns: Mapping[str, Any]) -> None:
    """Add or replace columns of the reference's sources table (e.g. variability)."""
    table = root["reference"]["sources"]
    keys = list(table.array_keys())
    _write_table(table, columns, "source", rows=table[keys[0]].shape[0] if keys else None)


def write_detections(root: zarr.Group, index: int, columns: Mapping[str, Any]) -> None:
    """Write frame ``index``'s difference-image detections (its own group: no shared chunk)."""
    _write_table(root.require_group("detections").require_group(str(index)), columns, "detection")


def read_detections(root: zarr.Group, index: int) -> dict | None:
    """Frame ``index``'s detections (None when the frame has none written)."""
    if "detections" not in root or str(index) not in root["detections"]:
        return None
    group = root["detections"][str(index)]
    return {k: group[k][:] for k in group.array_keys()}


def read_psf_model(root: zarr.Group):
    """The reference's PSF model (:class:`~dagpre.ops.psf.PSFModel`), or None."""
    if "reference" not in root or "psf_model" not in root["reference"]:
        return None
    from dagpre.ops.psf import PSFModel

    group = root["reference"]["psf_model"]
    arrays = {k: group[k][...] for k in group.array_keys()}
    arrays.update({k: np.asarray(v) for k, v in group.attrs.get("scalars", {}).items()})
    return PSFModel.from_arrays(arrays)


def provenance(root: zarr.Group) -> dict:
    """The store's provenance attributes (dagpre version, workflow, reference frames)."""
    return json.loads(json.dumps(dict(root.attrs)))
