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
