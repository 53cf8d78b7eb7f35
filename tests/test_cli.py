"""The ``dagpre`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dagpre import __version__
from dagpre.cli import main


def test_version_through_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "dagpre", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dagpre {__version__}"


def test_simulate_writes_and_lists_a_night(tmp_path, capsys):
    out = tmp_path / "night"
    status = main(
        [
            "simulate",
            str(out),
            "--frames",
            "3",
            "--size",
            "96",
            "--stars",
            "40",
            "--seed",
            "5",
            "--bad",
            "1:cloud",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    frames = sorted(out.glob("*.fits"))
    assert len(frames) == 3
    for path in frames:
        assert str(path) in printed
    assert "bad: cloud" in printed
    truth = sorted(p.name for p in (out / "truth").glob("*.ecsv"))
    assert truth == ["epochs.ecsv", "frames.ecsv", "sources.ecsv", "transients.ecsv"]


def test_simulate_refuses_to_overwrite_with_one_line_error(tmp_path, capsys):
    args = ["simulate", str(tmp_path), "--frames", "1", "--size", "64", "--stars", "10"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dagpre simulate: error: ")
    assert "frame_000.fits" in err and len(err.splitlines()) == 1
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "expected a positive integer, got '0'"),
        (["--bad", "2:fog"], "expected INDEX:KIND pairs"),
        (["--psf", "airy"], "invalid choice: 'airy'"),
    ],
)
def test_simulate_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_frame_index_beyond_the_night(tmp_path, capsys):
    status = main(["simulate", str(tmp_path), "--frames", "2", "--bad", "5:cloud"])
    assert status == 2
    assert "--bad: frame index 5 is beyond --frames 2" in capsys.readouterr().err


def test_demo_summary_is_true_against_the_simulator(tmp_path, capsys):
    """A small ``dagpre demo``: every frame done, numbers that match the truth tables."""
    import dagpre.simulate as sim
    from dagpre.io import store as zs
    from dagpre.pipeline.demo import demo_summary

    status = main(
        ["demo", "--workdir", str(tmp_path), "--frames", "4", "--size", "384",
         "--stars", "300", "--seed", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "frames: 4/4 done, 0 failed" in out
    assert (tmp_path / "quicklook" / "reference.png").is_file()
    root = zs.open_store(tmp_path / "demo.zarr", mode="r")
    night = sim.night(
        n_frames=4, shape=(384, 384), n_stars=300, seed=2, n_transients=3, bad_frames={2: "cloud"}
    )
    numbers = demo_summary(root, night, _Rows(4))
    assert f"reference: {numbers['reference_sources']} sources" in out
    assert numbers["reference_sources"] > 100
    assert f"{numbers['reference_sources_matched']} within 1.5 px" in out
    # measured 182 of 196: the rest are frame-edge objects and wing fragments of
    # saturated stars (their cores are masked), as SExtractor finds them too
    assert numbers["reference_sources_matched"] >= 0.9 * numbers["reference_sources"]
    assert numbers["lightcurves"] == numbers["reference_sources"]
    assert numbers["transients_injected"] == len(night.truth_tables()["transients"]) == 3
    # the info command reads the same store
    assert main(["info", str(tmp_path / "demo.zarr")]) == 0
    info = capsys.readouterr().out
    assert "done: 4" in info and "lightcurves:" in info
    assert "variability:" in info and "candidates:" in info and "quality: FWHM" in info


class _Rows:
    def __init__(self, n):
        self.rows = [{}] * n
        self.seconds = 1.0


def test_run_reports_a_bad_workflow_in_one_line(tmp_path, capsys):
    wf = tmp_path / "w.yaml"
    wf.write_text(
        "inputs: {paths: x.fits}\nstore: {path: s.zarr}\nsteps:\n  detect: {thresh: -1}\n"
    )
    assert main(["run", str(wf)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "dagpre run: error: steps.detect.thresh: expected a positive number, got -1 "
        "(w.yaml, line 4)"
    )
