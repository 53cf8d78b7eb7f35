"""The night store: layout with dimension names, whole-chunk frame writes, status, resume."""

from __future__ import annotations

import numpy as np
import pytest

from dagpre.io.store import (
    create_store,
    done_frames,
    frame_status,
    open_store,
    provenance,
    set_frame_status,
    write_candidates,
    write_frame,
    write_frame_row,
    write_lightcurve_column,
    write_reference,
)
from dagpre.types import InputError

xr = pytest.importorskip("xarray")

PATHS = ["f0.fits", "f1.fits", "f2.fits", "f3.fits"]


@pytest.fixture
def store(tmp_path):
    return create_store(
        tmp_path / "night.zarr", PATHS, (40, 30), chunks=(20, 30), workflow_text="name: t\n"
    )


def test_layout_reads_in_xarray_with_dimension_names(store, tmp_path):
    rng = np.random.default_rng(0)
    frame = rng.normal(size=(40, 30)).astype(np.float32)
    write_frame(store, 2, {"aligned": frame, "difference": -frame, "mask": np.ones((40, 30))})
    write_frame_row(store, 2, {"fwhm": 3.5, "n_sources": 12})
    write_reference(
        store, frame, np.zeros((40, 30)), {"x": np.arange(6.0), "y": np.arange(6.0)},
        psf=np.ones((5, 5)), frames=["f1.fits"],
    )  # fmt: skip
    write_lightcurve_column(store, 2, {"flux": np.arange(6.0), "flag": np.zeros(6)})
    write_candidates(store, {"frame": np.array([2]), "snr": np.array([7.5])})
    path = tmp_path / "night.zarr"
    cubes = xr.open_zarr(path, consolidated=False)
    assert cubes["aligned"].dims == ("frame", "y", "x")
    np.testing.assert_array_equal(cubes["aligned"][2].values, frame)
    np.testing.assert_array_equal(cubes["difference"][2].values, -frame)
    assert np.isnan(cubes["aligned"][0].values).all()  # not written: NaN, not zeros
    assert cubes["mask"].dtype == np.uint8 and int(cubes["mask"][2].sum()) == 1200
    frames = xr.open_zarr(path, group="frames", consolidated=False)
    assert frames["fwhm"].dims == ("frame",)
    assert float(frames["fwhm"][2]) == 3.5 and int(frames["n_sources"][2]) == 12
    assert list(frames["path"].values) == PATHS
    lc = xr.open_zarr(path, group="lightcurves", consolidated=False)
    assert lc["flux"].dims == ("source", "frame")
    np.testing.assert_array_equal(lc["flux"][:, 2].values, np.arange(6.0))
    assert np.isnan(lc["flux"][:, 0].values).all()
    ref = xr.open_zarr(path, group="reference", consolidated=False)
    assert ref["image"].dims == ("y", "x") and ref["psf"].dims == ("v", "u")
    cand = xr.open_zarr(path, group="candidates", consolidated=False)
    assert cand["snr"].dims == ("candidate",)
    prov = provenance(store)
    assert prov["workflow"] == "name: t\n" and prov["reference_frames"] == ["f1.fits"]
    assert prov["dagpre_version"]


def test_chunks_never_span_frames(store):
    for name in ("aligned", "difference", "variance", "mask"):
        assert store[name].chunks[0] == 1, name
    assert store["frames"]["status"].chunks == (1,)
    write_reference(store, np.zeros((40, 30)), np.zeros((40, 30)), {"x": np.arange(3.0)})
    assert store["lightcurves"]["flux"].chunks == (3, 1)


def test_sharded_store_holds_one_frame_per_shard(tmp_path):
    root = create_store(tmp_path / "s.zarr", PATHS, (40, 30), chunks=(20, 15), sharding=True)
    assert root["aligned"].shards == (1, 40, 30)
    write_frame(root, 1, {"aligned": np.full((40, 30), 2.0)})
    assert float(open_store(tmp_path / "s.zarr", "r")["aligned"][1].mean()) == 2.0


def test_status_resume_and_one_line_errors(store, tmp_path):
    assert list(frame_status(store)) == ["pending"] * 4
    set_frame_status(store, 0, "done")
    set_frame_status(store, 3, "failed", "no stars found:\n  0 detections above 5 sigma")
    again = open_store(tmp_path / "night.zarr")
    assert list(done_frames(again)) == [0]
    assert frame_status(again)[3] == "failed"
    assert again["frames"]["error"][3] == "no stars found: 0 detections above 5 sigma"
    with pytest.raises(InputError, match="status: expected one of pending, done, failed"):
        set_frame_status(store, 1, "finished")


def test_bad_uses_are_named(store, tmp_path):
    with pytest.raises(InputError, match="store exists"):
        create_store(tmp_path / "night.zarr", PATHS, (40, 30))
    with pytest.raises(InputError, match=r"aligned: expected a frame of shape \(40, 30\)"):
        write_frame(store, 0, {"aligned": np.zeros((30, 40))})
    with pytest.raises(InputError, match="status: not a frames-table metric"):
        write_frame_row(store, 0, {"status": "done"})
    with pytest.raises(InputError, match="no store here"):
        open_store(tmp_path / "absent.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a"):
        open_store(tmp_path / "plain")
