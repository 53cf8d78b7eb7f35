"""The frame-quality model (``dagpre.ml.quality``) on simulated nights with planted bad frames.

Acceptance, measured in :func:`test_acceptance_on_held_apart_nights`: a model trained on the
good frames of 20 nights (4 frames each) classifies the frames of 30 other nights (other
fields, skies and seeings): one frame of each bad kind per night ("cloud", "shutter",
"defocus", "trailing", 120 in all) and 4 good frames per night (120). Frames are
128 x 128 px with 40 stars (about the simulator's default density) and carry the
saturation masks of :func:`dagpre.mask_saturation`, as the pipeline's frames do. The test
prints the recall of each kind, the false-alarm rate and the times.

Training (20 epochs, 5120 crops, ~66k weights) and scoring run on the CPU; the whole file
takes about 20-25 s on 2 cores. The network is trained once (module-scoped fixture).
"""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the quality model needs torch (the ml extra)")

from conftest import run_in_threads  # noqa: E402

import dagpre as dp  # noqa: E402
from dagpre.ml import quality as q  # noqa: E402
from dagpre.ml.quality import (  # noqa: E402
    FEATURES,
    QualityAlert,
    QualityModel,
    QualityResult,
    ValidationReport,
    score_frame,
)
from dagpre.types import InputError  # noqa: E402

KINDS = ("cloud", "shutter", "defocus", "trailing")
SHAPE = (128, 128)
N_STARS = 40
SATURATE = 50000.0  # the simulator's default saturation level, ADU
TRAIN_SEEDS = range(1000, 1020)  # 20 nights x 4 good frames
TEST_SEEDS = range(2000, 2030)  # 30 nights x (4 bad + 4 good) frames
EPOCHS = 20


def _frames(seed: int, n: int, bad: dict | None = None, **kwargs) -> list:
    night = dp.simulate.night(
        n_frames=n, shape=SHAPE, n_stars=N_STARS, seed=seed, bad_frames=bad, **kwargs
    )
    return [dp.Frame(f.data, dp.mask_saturation(f.data, SATURATE)) for f in night.frames]


@pytest.fixture(scope="module")
def nights() -> dict:
    """Training frames, and held-apart nights' good and bad frames."""
    train = [f for s in TRAIN_SEEDS for f in _frames(s, 4)]
    good, bad, whole = [], [], []
    for s in TEST_SEEDS:
        frames = _frames(s, 8, dict(enumerate(KINDS)))
        bad += list(zip(KINDS, frames[:4], strict=True))
        good += frames[4:]
        whole.append(frames)
    return {"train": train, "good": good, "bad": bad, "nights": whole}


@pytest.fixture(scope="module")
def trained(nights) -> tuple:
    start = time.perf_counter()
    model = QualityModel(seed=0).fit(nights["train"], epochs=EPOCHS, device="cpu")
    return model, time.perf_counter() - start


@pytest.fixture(scope="module")
def model(trained) -> QualityModel:
    return trained[0]


@pytest.fixture(scope="module")
def small_frames() -> list:
    """Six good frames for quick fits (one epoch)."""
    return [f for s in (3000, 3001) for f in _frames(s, 3)]


# --------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def classified(trained, nights) -> dict:
    """Every held-apart night classified once (``classify_night``), with the rates and times.

    ``alone``: the frames' verdicts from their tiles only (what :meth:`classify` gives)."""
    model, fit_seconds = trained
    start = time.perf_counter()
    # 128 px frames: 32 px background meshes (the default 64 would give 2 x 2)
    results = [model.classify_night(n, transmission={"box": 32}) for n in nights["nights"]]
    per_frame = (time.perf_counter() - start) / sum(len(n) for n in nights["nights"])
    bad = [(kind, r) for rs in results for kind, r in zip(KINDS, rs[:4], strict=True)]
    good = [r for rs in results for r in rs[4:]]

    def alone_bad(r):
        return not r.bad_fraction <= r.max_bad_fraction

    out = {
        "good": good,
        "bad": bad,
        "false_alarms": float(np.mean([not r.good for r in good])),
        "recall": {k: float(np.mean([not r.good for kind, r in bad if kind == k])) for k in KINDS},
        "overall": float(np.mean([not r.good for _, r in bad])),
        "alone": {
            "false_alarms": float(np.mean([alone_bad(r) for r in good])),
            "recall": {
                k: float(np.mean([alone_bad(r) for kind, r in bad if kind == k])) for k in KINDS
            },
            "overall": float(np.mean([alone_bad(r) for _, r in bad])),
        },
    }
    alone = out["alone"]
    print(
        f"\nquality model: {model.n_parameters} weights, fit {fit_seconds:.1f} s "
        f"({len(nights['train'])} frames, {EPOCHS} epochs), score {1e3 * per_frame:.1f} ms "
        f"per {SHAPE[0]}x{SHAPE[1]} frame with the night's transmission (CPU)\n"
        f"bad frames flagged: {out['overall']:.1%} of {len(bad)} ("
        + ", ".join(f"{k} {v:.0%}" for k, v in out["recall"].items())
        + f"); false alarms {out['false_alarms']:.1%} of {len(good)} good frames\n"
        f"tiles alone: {alone['overall']:.1%} ("
        + ", ".join(f"{k} {v:.0%}" for k, v in alone["recall"].items())
        + f"); false alarms {alone['false_alarms']:.1%}"
    )
    return out


def test_acceptance_on_held_apart_nights(classified):
    """>= 95 % of bad frames flagged, <= 5 % false alarms. Measured: 100 % of 120 bad frames
    (every kind), false alarms 3.3 % of 120 good frames (one of them a clear frame whose
    light came out at 0.61 of its night's: on 128 px frames few unsaturated stars carry
    it). Tiles alone: clouds 77 %, the other kinds 100 %, false alarms 2.5 %."""
    assert classified["false_alarms"] <= 0.05
    recall = classified["recall"]
    for kind in KINDS:
        assert recall[kind] >= 0.95, kind
    assert classified["overall"] >= 0.95
    # alone, a cloud frame whose sky stays within the training skies looks like a clear
    # frame of a sparser field (module docstring of dagpre.ml.quality): 70-90 % are caught
    alone = classified["alone"]
    assert alone["recall"]["cloud"] >= 0.7
    assert alone["false_alarms"] <= 0.05
    for kind in ("shutter", "defocus", "trailing"):
        assert alone["recall"][kind] >= 0.95, kind
    # what made the bad frames bad: the statistic meant for each defect
    worst = {
        k: {r.worst for kind, r in classified["bad"] if kind == k and not r.good} for k in KINDS
    }
    assert worst["shutter"] == {"sky_offset"}
    assert worst["defocus"] == worst["trailing"] == {"psf_size"}
    assert "transmission" in worst["cloud"]
    # a frame whose tiles failed by less than max_bad_fraction keeps that tile's feature
    assert worst["cloud"] <= {"sky_level", "contrast", "recon", "sky_offset", "transmission"}
    clouds = np.array([r.transmission for kind, r in classified["bad"] if kind == "cloud"])
    assert np.all(clouds < 0.8), clouds  # measured 0.45-0.76


def test_bad_area_of_a_shutter_shadow(model, nights):
    """A shutter shadow covers part of the frame (edge tiles), not all of it."""
    results = [model.classify(f) for kind, f in nights["bad"] if kind == "shutter"]
    fractions = np.array([r.bad_fraction for r in results])
    assert np.all(fractions > q.DEFAULT_MAX_BAD_FRACTION)
    assert np.median(fractions) < 0.7  # why the seed's 70 % would miss them


# --------------------------------------------------------------------------- validate


def test_validate_alerts_on_degraded_good_frames(model):
    # the "good" frames of a night whose focus has drifted: every star 7-9 px wide
    degraded = [f for s in (4000, 4001) for f in _frames(s, 5, seeing_fwhm=(7.0, 9.0))]
    with pytest.warns(QualityAlert, match="known-good frames fail"):
        report = model.validate(degraded)
    assert isinstance(report, ValidationReport)
    assert report.alert and report.n_frames == 10
    assert report.fail_fraction > report.max_fail_fraction
    assert report.n_failed == len(report.failed) == sum(not r.good for r in report.results)


def test_validate_passes_good_frames(model, nights):
    with warnings.catch_warnings():
        warnings.simplefilter("error", QualityAlert)
        report = model.validate(nights["good"][:40])
    assert not report.alert
    assert report.fail_fraction <= 0.05
    assert all(isinstance(r, QualityResult) for r in report.results)


# --------------------------------------------------------------------------- results


def test_score_maps_and_result(model, nights):
    frame = nights["good"][0]
    sc = model.score(frame)
    assert sc.anomaly.shape == sc.error.shape == (4, 4)
    assert set(sc.features) == set(sc.anomalies) == set(FEATURES)
    scored = np.isfinite(sc.anomaly)  # tiles mostly covered by a saturated star are not
    assert scored.sum() >= 12
    np.testing.assert_array_equal(np.isfinite(sc.error), scored)
    assert np.all(sc.error[scored] > 0)
    assert np.isfinite(sc.score) and sc.score >= 0
    res = model.classify(frame)
    assert res.good and res.bad_fraction == 0.0 and res.worst == ""
    np.testing.assert_array_equal(res.error_map, sc.anomaly)
    # a lower threshold or no allowance for bad area makes the same frame worse
    strict = model.classify(frame, threshold=0.2, max_bad_fraction=0.0)
    assert strict.bad_fraction >= res.bad_fraction


def test_score_frame_helper(model, nights):
    frame = nights["bad"][2][1]  # a defocused frame
    out = score_frame(model, frame.data, frame.mask)
    assert set(out) == {"quality", "bad_fraction", "good"}
    assert isinstance(out["quality"], float) and isinstance(out["good"], bool)
    res = model.classify(frame)
    assert out == {"quality": res.score, "bad_fraction": res.bad_fraction, "good": res.good}
    assert not out["good"]
    assert score_frame(model, frame.data, frame.mask, max_bad_fraction=1.0)["good"]


def test_partial_tiles_and_masks(model, nights):
    # a frame with no saturated star in the corner cut out
    frame = next(f for f in nights["good"] if not f.mask[:112, :80].any())
    data = frame.data[:112, :80].copy()
    mask = frame.mask[:112, :80].copy()  # the saturation mask, as for every frame
    mask[:, :35] = 1  # and the left 35 columns excluded
    data[:, :35] = np.nan  # where NaN would poison any statistic it entered
    sc = model.score(data, mask=mask)
    assert sc.anomaly.shape == (4, 3)  # ceil(112 / 32), ceil(80 / 32)
    assert np.all(np.isnan(sc.anomaly[:, 0]))  # tiles x 0-31: no usable pixel
    assert np.all(np.isfinite(sc.anomaly[:, 1:]))  # partial tiles (x 64-79, y 96-111) too
    assert np.isfinite(sc.score)
    assert model.classify(data, mask=mask).good


def test_thread_safe_scores(model, nights):
    frames = nights["good"][:4]
    alone = [model.score(f).anomaly for f in frames]
    threaded = run_in_threads(lambda f: model.score(f).anomaly, frames)
    for a, b in zip(alone, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- persistence


def test_save_load_roundtrip(model, nights, tmp_path):
    folder = model.save(tmp_path / "quality")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt"]
    doc = json.loads((folder / "config.json").read_text())
    assert doc["config"]["patch"] == model.config.patch
    assert set(doc["learnt"]["bounds"]) == set(FEATURES)
    state = torch.load(folder / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    loaded = QualityModel.load(folder, device="cpu")
    assert loaded.config == model.config and loaded.learnt == model.learnt
    for frame in (nights["good"][0], nights["bad"][1][1]):
        a, b = model.score(frame), loaded.score(frame)
        np.testing.assert_array_equal(a.anomaly, b.anomaly)
        np.testing.assert_array_equal(a.error, b.error)
        assert a.score == b.score


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(InputError, match="not a saved QualityModel"):
        QualityModel.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(InputError, match="format"):
        QualityModel.load(tmp_path)


# --------------------------------------------------------------------------- fit


def test_fit_is_silent_seeded_and_reports_progress(small_frames, capsys):
    calls = []
    a = QualityModel(seed=5).fit(
        small_frames, epochs=2, device="cpu", progress=lambda e, loss: calls.append((e, loss))
    )
    b = QualityModel(seed=5).fit(small_frames, epochs=2, device="cpu")
    assert capsys.readouterr() == ("", "")
    assert [e for e, _ in calls] == [1, 2] and all(loss > 0 for _, loss in calls)
    for (ka, va), (kb, vb) in zip(
        a.network.state_dict().items(), b.network.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    assert a.learnt == b.learnt
    c = QualityModel(seed=6).fit(small_frames, epochs=1, device="cpu")
    assert not torch.equal(
        next(iter(a.network.state_dict().values())), next(iter(c.network.state_dict().values()))
    )


def test_fit_from_a_pipeline_store(small_frames, tmp_path):
    from dagpre.io.store import create_store, set_frame_status, write_frame, write_frame_row

    n = len(small_frames) + 1
    root = create_store(tmp_path / "night.zarr", [f"f{i}.fits" for i in range(n)], SHAPE)
    for i, frame in enumerate(small_frames):
        sky = float(np.median(frame.data))
        write_frame(root, i, {"aligned": frame.data - sky, "mask": frame.mask})
        write_frame_row(root, i, {"background": sky})
        set_frame_status(root, i, "done")
    set_frame_status(root, n - 1, "failed", "no stars")  # not trained on
    model = QualityModel().fit(tmp_path / "night.zarr", epochs=1, device="cpu")
    assert model.learnt["n_frames"] == len(small_frames)
    # the background added back: the sky level learnt is the raw frames' one
    lo, hi = model.learnt["sky_range"]
    skies = [float(np.median(f.data[f.mask == 0])) for f in small_frames]
    assert lo == pytest.approx(min(skies), rel=0.01) and hi == pytest.approx(max(skies), rel=0.01)

    set_frame_status(root, 0, "pending")
    for i in range(1, n - 1):
        set_frame_status(root, i, "pending")
    with pytest.raises(InputError, match="no training frames"):
        QualityModel().fit(tmp_path / "night.zarr", epochs=1, device="cpu")


# --------------------------------------------------------------------------- input errors


def test_input_errors(model, small_frames):
    with pytest.raises(InputError, match="smaller than one 32 px patch"):
        model.score(np.zeros((16, 64), dtype=np.float32))
    with pytest.raises(InputError, match="2-D image"):
        model.score(np.zeros((2, 64, 64), dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        model.score(np.zeros((0, 0), dtype=np.float32))
    with pytest.raises(InputError, match="mask"):
        model.score(small_frames[0].data, mask=np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(InputError, match="usable pixels"):
        model.score(np.full((64, 64), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="no training frames"):
        QualityModel().fit([], device="cpu")
    with pytest.raises(InputError, match="one image"):
        QualityModel().fit(small_frames[0].data, device="cpu")
    with pytest.raises(InputError, match="not a store folder"):
        QualityModel().fit("frame_000.fits", device="cpu")
    with pytest.raises(InputError, match=r"frames\[1\].*smaller"):
        QualityModel().fit([small_frames[0], np.zeros((8, 8))], device="cpu")
    with pytest.raises(InputError, match="device"):
        QualityModel().fit(small_frames, device="tpu")
    with pytest.raises(InputError, match="epochs"):
        QualityModel().fit(small_frames, epochs=0, device="cpu")
    with pytest.raises(InputError, match="not fitted"):
        QualityModel().score(small_frames[0])
    with pytest.raises(InputError, match="patch"):
        QualityModel(patch=20)
    with pytest.raises(InputError, match="max_bad_fraction"):
        model.classify(small_frames[0], max_bad_fraction=1.5)
    with pytest.raises(InputError, match="no frames"):
        model.validate([])
    with pytest.raises(InputError, match="model"):
        score_frame("model.pt", small_frames[0].data)


def test_gpu_request_without_gpu(small_frames):
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    with pytest.raises(dp.types.BackendError, match="no CUDA GPU"):
        QualityModel().fit(small_frames, epochs=1, device="gpu")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_frames_through_dlpack(model, nights, tmp_path):
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy sees a GPU but torch has no CUDA")
    gpu_model = QualityModel.load(model.save(tmp_path / "m"), device="gpu")
    assert gpu_model.device.type == "cuda"
    for frame in (nights["good"][0], nights["bad"][2][1]):
        on_gpu = dp.Frame(cupy.asarray(frame.data), cupy.asarray(frame.mask))
        a, b = model.score(frame), gpu_model.score(on_gpu)
        np.testing.assert_allclose(b.anomaly, a.anomaly, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(b.error, a.error, rtol=1e-3, atol=1e-7)
        assert gpu_model.classify(on_gpu).good == model.classify(frame).good
    # the normalised frame reaches torch without leaving the GPU
    x = q._to_torch(cupy.arange(6, dtype=cupy.float32), gpu_model.device)
    assert x.is_cuda


# --------------------------------------------------------------------------- pipeline


def test_pipeline_quality_step_scores_frames_and_excludes_bad_ones(model, tmp_path):
    """A workflow naming the saved model: every frame's score and bad area go to the frames
    table; with ``exclude`` the shutter frame is recorded failed ('quality: bad frame') and
    left out of the reference, and the good frames are done."""
    from dagpre.io import store as zs
    from dagpre.pipeline.run import run_workflow
    from dagpre.pipeline.workflow import parse_workflow

    model_dir = model.save(tmp_path / "model")
    night = dp.simulate.night(n_frames=5, shape=(256, 256), n_stars=160, seed=5000,
                              bad_frames={1: "shutter"})  # fmt: skip
    night.write(tmp_path / "frames")
    text = f"""
inputs: {{paths: "frames/*.fits"}}
reference: {{select: best, n_best: 2}}
steps:
  quality: {{model: {model_dir}, exclude: true}}
  mask: {{}}
  background: {{box: 32}}
  align: {{method: wcs, order: lanczos3}}
  subtract: {{basis: gaussian}}
  photometry: {{radii: [4.0]}}
store: {{path: night.zarr}}
cluster: {{n_workers: 1, threads_per_worker: 2, dashboard_address: null}}
"""
    wf = parse_workflow(text, source=str(tmp_path / "w.yaml"), base_dir=tmp_path)
    summary = run_workflow(wf)
    root = zs.open_store(wf.store["path"], mode="r")
    status = zs.frame_status(root)
    errors = root["frames"]["error"][:].tolist()
    assert status[1] == "failed" and errors[1].startswith("quality: bad frame"), errors[1]
    assert (status[[0, 2, 3, 4]] == "done").all(), errors
    assert not root["frames"]["reference"][1]
    assert np.isfinite(root["frames"]["quality"][:]).all()
    bad_fraction = root["frames"]["bad_fraction"][:]
    assert bad_fraction[1] > q.DEFAULT_MAX_BAD_FRACTION >= bad_fraction[[0, 2, 3, 4]].max()
    assert summary.done == 4
