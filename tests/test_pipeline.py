"""Pipeline end to end on a 2-worker process cluster: products, failures, resume, laziness."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import dagpre.simulate as sim
from dagpre.io import store as zs
from dagpre.pipeline import graph as gr
from dagpre.pipeline.run import run_workflow
from dagpre.pipeline.workflow import parse_workflow

distributed = pytest.importorskip("distributed")

N_FRAMES = 6
SHAPE = (256, 256)


def _workflow(folder: Path, store: str = "night.zarr", extra: str = "") -> object:
    text = f"""
inputs: {{paths: "frames/*.fits"}}
reference: {{select: best, n_best: 2}}
steps:
  read: {{}}
  mask: {{}}
  background: {{box: 32}}
  align: {{method: wcs, order: bilinear}}
  detect: {{thresh: 5.0}}
  photometry: {{radii: [4.0]}}
store: {{path: {store}}}
retries: 3
{extra}"""
    return parse_workflow(text, source=str(folder / "w.yaml"), base_dir=folder)


@pytest.fixture(scope="module")
def night_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("night")
    night = sim.night(n_frames=N_FRAMES, shape=SHAPE, n_stars=200, seed=21, n_transients=1)
    night.write(folder / "frames")
    return folder


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0",
    )  # fmt: skip
    with cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def full_run(night_dir, client):
    wf = _workflow(night_dir)
    summary = run_workflow(wf, client=client)
    return wf, summary


def _arrays(path) -> dict:
    root = zs.open_store(path, mode="r")
    out = {name: root[name][:] for name in ("aligned", "variance", "mask")}
    out["flux"] = root["lightcurves"]["flux"][:]
    out["status"] = zs.frame_status(root)
    return out


def test_every_frame_done_and_products_equal_the_eager_functions(full_run):
    from dagpre.io.fits import read_fits
    from dagpre.ops.align import align
    from dagpre.ops.background import estimate_background
    from dagpre.ops.masks import mask_saturation
    from dagpre.ops.photometry import aperture_photometry
    from dagpre.types import Frame, MaskBit

    wf, summary = full_run
    assert summary.done == N_FRAMES and not summary.failed
    root = zs.open_store(wf.store["path"], mode="r")
    ref_image = root["reference"]["image"][:]
    ref_wcs = gr_wcs(root)
    i = 3
    path = sorted(Path(wf.paths[0]).parent.glob("*.fits"))[i]
    frame = read_fits(path)
    frame = Frame(frame.data, frame.mask | mask_saturation(frame), frame.header, frame.wcs,
                  frame.meta)  # fmt: skip
    bkg = estimate_background(frame.data, box=32, mask=frame.mask != 0)
    data = bkg.subtract(frame.data)
    ref = Frame(ref_image, root["reference"]["mask"][:], wcs=ref_wcs)
    out = align(Frame(data, frame.mask, frame.header, frame.wcs, frame.meta), ref, method="wcs")
    off = out.footprint == 0
    aligned = np.where(off, 0, out.image).astype(np.float32)
    np.testing.assert_allclose(root["aligned"][i], aligned, rtol=1e-6, atol=1e-6)
    mask = out.mask | np.where(off, np.uint8(MaskBit.OFF_FOOTPRINT), 0).astype(np.uint8)
    np.testing.assert_array_equal(root["mask"][i], mask)
    var = bkg.rms**2 + np.maximum(data, 0) / np.float32(frame.meta["gain"])
    var_out = align(Frame(var.astype(np.float32), frame.mask, wcs=frame.wcs), ref).image
    # bilinear resampling averages 4 pixels: the variance scales by sum of squared weights
    fx, fy = (c - np.floor(c) for c in out.transform.full())
    var_out = var_out * (((1 - fx) ** 2 + fx**2) * ((1 - fy) ** 2 + fy**2)).astype(np.float32)
    got_var = root["variance"][i]
    np.testing.assert_allclose(got_var[~off], var_out[~off], rtol=1e-6)
    assert np.isnan(got_var[off]).all()
    src = root["reference"]["sources"]
    phot = aperture_photometry(
        aligned, src["x"][:], src["y"][:], 4.0, err=np.sqrt(np.where(off, np.inf, var_out)),
        mask=mask != 0, subpix=0,
    )  # fmt: skip
    np.testing.assert_allclose(root["lightcurves"]["flux"][:, i], phot.flux, rtol=1e-6)


def gr_wcs(root):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(root.attrs["wcs_header"]))


def test_xarray_reads_the_products_with_dimension_names(full_run):
    xr = pytest.importorskip("xarray")
    wf, _ = full_run
    cubes = xr.open_zarr(wf.store["path"], consolidated=False)
    for name in ("aligned", "variance", "mask"):
        assert cubes[name].dims == ("frame", "y", "x")
        assert cubes[name].shape == (N_FRAMES, *SHAPE)
    lc = xr.open_zarr(wf.store["path"], group="lightcurves", consolidated=False)
    assert lc["flux"].dims == ("source", "frame")
    assert np.isfinite(lc["flux"].values).mean() > 0.9


def test_resume_recomputes_only_unfinished_frames_byte_identical(full_run, night_dir, client):
    wf, _ = full_run
    want = _arrays(wf.store["path"])
    copy = night_dir / "interrupted.zarr"
    shutil.copytree(wf.store["path"], copy)
    root = zs.open_store(copy)
    for i in (1, 4):  # interrupted: data half written, status never reached "done"
        zs.set_frame_status(root, i, "pending")
        root["aligned"][i, :100] = -1.0
    again = run_workflow(_workflow(night_dir, store="interrupted.zarr"), client=client)
    assert sorted(r["index"] for r in again.rows) == [1, 4]
    assert again.skipped == N_FRAMES - 2
    got = _arrays(copy)
    for name in ("aligned", "variance", "mask", "flux"):
        assert got[name].tobytes() == want[name].tobytes(), name


def test_worker_killed_mid_night_gives_identical_products(full_run, night_dir, client):
    wf, _ = full_run
    want = _arrays(wf.store["path"])
    marker = night_dir / "killed-once"
    client.register_plugin(_KillOnce(str(marker), "align-3"), name="kill-once")
    summary = run_workflow(_workflow(night_dir, store="killed.zarr"), client=client)
    assert summary.done == N_FRAMES
    got = _arrays(night_dir / "killed.zarr")
    for name in ("aligned", "variance", "mask", "flux"):
        assert got[name].tobytes() == want[name].tobytes(), name
    assert marker.exists()  # a worker really died while running align-3
    client.unregister_worker_plugin("kill-once")
    client.wait_for_workers(2, timeout=60)


class _KillOnce(distributed.WorkerPlugin):
    """Kills its worker process the first time ``key`` starts executing (once per night)."""

    def __init__(self, marker: str, key: str) -> None:
        self.marker, self.key = marker, key

    def transition(self, key, start, finish, **kwargs):
        if key == self.key and finish == "executing" and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


def test_bad_inputs_are_recorded_and_good_frames_done(night_dir, client, tmp_path):
    frames = tmp_path / "frames"
    shutil.copytree(night_dir / "frames", frames)
    good = sorted(frames.glob("*.fits"))
    (frames / "z1_truncated.fits").write_bytes(good[0].read_bytes()[:5000])
    (frames / "z2_not_fits.fits").write_text("this is a log file, not an image\n")
    from astropy.io import fits

    data, header = fits.getdata(good[1], header=True)
    fits.writeto(frames / "z3_blank.fits", np.zeros_like(data), header)
    fits.writeto(frames / "z4_nan.fits", np.full_like(data, np.nan), header)
    other = header.copy()
    other["CRVAL1"] = (header["CRVAL1"] + 40.0) % 360  # another field: no overlap
    fits.writeto(frames / "z5_other_field.fits", data, other)
    with gzip.open(frames / "z6_gz_garbage.fits", "wb") as f:
        f.write(b"SIMPLE  = garbage")
    summary = run_workflow(_workflow(tmp_path), client=client)
    rows = {Path(r["path"]).name: r for r in summary.rows}
    for g in good:
        assert rows[g.name]["status"] == "done", rows[g.name]
    reasons = {name: rows[name]["error"] for name in rows if name.startswith("z")}
    assert len(reasons) == 6
    for name, reason in reasons.items():
        assert rows[name]["status"] == "failed", name
        assert reason and "\n" not in reason, (name, reason)
    assert "blank frame" in reasons["z3_blank.fits"]
    assert "NaN" in reasons["z4_nan.fits"]
    assert "overlap" in reasons["z5_other_field.fits"]
    assert reasons["z1_truncated.fits"].startswith("read:")
    assert reasons["z2_not_fits.fits"].startswith("read:")


def test_building_the_graph_computes_nothing_and_reads_no_pixels(night_dir, monkeypatch):
    import dask

    import dagpre.io.fits as fits_mod

    opened = []
    monkeypatch.setattr(fits_mod, "read_fits", lambda *a, **k: opened.append(a))

    def refuse(*args, **kwargs):
        raise AssertionError("the graph was computed while being built")

    wf = _workflow(night_dir)
    paths = sorted(str(p) for p in (night_dir / "frames").glob("*.fits"))
    with dask.config.set(scheduler=refuse):
        quality = gr.quality_graph(wf, paths)
        ref = gr.reference_graph(wf, paths, [0, 1])
        rows = gr.frame_graph(wf, paths, range(len(paths)), ref, str(night_dir / "x.zarr"))
    assert not opened
    assert len(quality) == len(rows) == N_FRAMES
    keys = set(dict(rows[2].__dask_graph__()))
    for step in ("read", "mask", "background", "align", "detect", "photometry", "write"):
        assert f"{step}-2" in keys, step
    assert "reference" in keys


def test_missing_steps_are_named_not_faked(night_dir):
    wf = _workflow(night_dir, extra="")
    wf2 = parse_workflow(
        wf.text.replace("  read: {}", "  read: {}\n  subtract: {basis: gaussian}"),
        base_dir=night_dir,
    )
    missing = gr.missing_steps(wf2)
    import importlib.util

    if importlib.util.find_spec("dagpre.ops.subtract") is None:
        assert "subtract" in missing and "not in this build" in missing["subtract"]
    else:
        assert "subtract" not in missing


def test_subtract_step_fills_the_difference_and_calibrated_light_curves(night_dir, client):
    """With ``subtract``: difference cube at the noise, light curves on the reference scale."""
    extra = "  subtract: {basis: gaussian, kernel_order: 1}\n"
    base = _workflow(night_dir, store="diff.zarr")
    wf = parse_workflow(
        base.text.replace("  detect:", extra + "  detect:"), source="w.yaml", base_dir=night_dir
    )
    assert "subtract" in wf.steps
    summary = run_workflow(wf, client=client)
    assert summary.done == N_FRAMES, summary.failed
    root = zs.open_store(wf.store["path"], mode="r")
    in_ref = {str(p) for p in root.attrs["reference_frames"]}
    paths = [str(p) for p in root["frames"]["path"][:].tolist()]
    ref_img, ref_var = root["reference"]["image"][:], root["reference"]["variance"][:]
    sky = np.abs(ref_img) < 3 * np.sqrt(ref_var)
    for i, path in enumerate(paths):
        if path in in_ref:  # its own noise is in the reference: D/sigma is smaller there
            continue
        diff, var, mask = root["difference"][i], root["variance"][i], root["mask"][i]
        good = (mask == 0) & np.isfinite(var) & (var > 0) & sky
        z = diff[good] / np.sqrt(var[good])
        assert abs(float(np.median(z))) < 0.1
        # measured 0.78-0.83: the variance map is ~1.5x the noise of these resampled,
        # median-combined and convolved pixels (pixel covariances are not tracked)
        assert 0.7 < 1.4826 * float(np.median(np.abs(z - np.median(z)))) < 1.2
    # constant, isolated, unflagged reference stars: flux scatter about their errors
    flux, err = root["lightcurves"]["flux"][:], root["lightcurves"]["flux_err"][:]
    src = root["reference"]["sources"]
    lc = root["lightcurves"]
    for total, reference in (("flux", "flux_psf"), ("flux_aper", "flux_aper")):
        flux = lc[total][:]
        ref_flux = src[reference][:]
        finite = np.all(np.isfinite(flux) & np.isfinite(err), axis=1)
        steady = finite & (src["flag"][:] == 0) & ~src["variable"][:]
        steady[steady] &= ref_flux[steady] > 50 * np.median(err[steady], axis=1)
        assert steady.sum() > 10
        ratio = np.median(flux[steady] / ref_flux[steady, None], axis=0)
        np.testing.assert_allclose(ratio, 1.0, atol=0.03)  # same scale as the reference


def test_started_workers_keep_glibcs_adaptive_malloc():
    """Workers get malloc thresholds that keep large temporaries on the heap (distributed's
    default MALLOC_TRIM_THRESHOLD_=65536 made the steps 1.8x slower in a worker)."""
    from dagpre.pipeline.cluster import start_client
    from dagpre.pipeline.workflow import DEFAULTS

    config = {**DEFAULTS["cluster"], "n_workers": 1, "dashboard_address": None}
    with start_client(config) as client:
        env = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        link = client.dashboard_link
    assert list(env.values()) == [str(32 * 2**20)]
    assert "127.0.0.1" in link  # the dashboard binds to localhost unless configured
