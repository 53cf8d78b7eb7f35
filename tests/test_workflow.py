"""Workflow YAML: the shipped files validate; every mistake names its key, file and line."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from dagpre.pipeline.workflow import (
    STEP_ORDER,
    STEP_PARAMETERS,
    load_workflow,
    parse_workflow,
)
from dagpre.types import InputError

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
MINIMAL = "inputs: {paths: a/*.fits}\nstore: {path: out.zarr}\n"


@pytest.mark.parametrize("name", ["demo", "night", "archive"])
def test_shipped_workflows_validate(name):
    wf = load_workflow(WORKFLOWS / f"{name}.yaml")
    assert wf.name == name
    assert list(wf.steps) == [s for s in STEP_ORDER if s in wf.steps]
    assert all(Path(p).is_absolute() for p in wf.paths)
    assert Path(wf.store["path"]).is_absolute()
    assert wf.text == (WORKFLOWS / f"{name}.yaml").read_text()


def test_defaults_and_relative_paths(tmp_path):
    wf = parse_workflow(MINIMAL, source=str(tmp_path / "w.yaml"), base_dir=tmp_path)
    assert wf.paths == [str(tmp_path / "a/*.fits")]
    assert wf.store["path"] == str(tmp_path / "out.zarr")
    assert wf.steps == {}
    assert wf.cluster["host"] == "127.0.0.1"  # binds to localhost unless configured
    assert wf.cluster["dashboard_address"].startswith("127.0.0.1:")
    assert wf.retries == 2 and wf.batch_size == 64
    assert wf.name == "w"


def test_steps_run_in_pipeline_order_whatever_the_file_says():
    wf = parse_workflow(MINIMAL + "steps: {detect: {}, background: {box: 32}, read: null}\n")
    assert list(wf.steps) == ["read", "background", "detect"]
    assert wf.steps["background"] == {"box": 32}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "steps:\n  background:\n    box: big\n",
            "steps.background.box: expected a positive integer, got 'big' (w.yaml, line 3)",
        ),
        (
            "steps:\n  backgorund: {}\n",
            "steps.backgorund: unknown key; did you mean 'background'? (w.yaml, line 2)",
        ),
        (
            "steps:\n  detect:\n    thresh: 3\n    deblend_cont: 2\n",
            "steps.detect.deblend_cont: expected a number in [0, 1], got 2 (w.yaml, line 4)",
        ),
        (
            "steps:\n  align: {method: sift}\n",
            "steps.align.method: expected one of 'wcs', 'stars', 'xcorr', got 'sift' (w.yaml, "
            "line 2)",
        ),
        (
            "steps:\n  subtract: {kernel_size: 20}\n",
            "steps.subtract.kernel_size: expected an odd positive integer, got 20",
        ),
        (
            "steps:\n  photometry:\n    radii: [3.0, -1]\n",
            "steps.photometry.radii.1: expected a positive number, got -1 (w.yaml, line 3)",
        ),
        ("products: [aligned, stacks]\n", "products.1: expected one of 'aligned'"),
        ("retries: -1\n", "retries: expected an integer >= 0, got -1 (w.yaml, line 1)"),
        ("storage: {path: x}\n", "storage: unknown key; did you mean 'store'?"),
        ("wibble: 1\n", "wibble: unknown key; expected one of name, inputs, reference"),
        ("clean: true\n", "clean: unknown key"),
        ("steps: {detect: {clean: yes please}}\n", "steps.detect.clean: expected true or false"),
        ("cluster: {kind: address}\n", "cluster.address: missing"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, text, message):
    with pytest.raises(InputError) as info:
        parse_workflow(MINIMAL + text if "inputs" not in text else text, source="w.yaml")
    # the minimal header adds two lines before the text under test
    expected = re.sub(r"line (\d+)\)", lambda m: f"line {int(m[1]) + 2})", message)
    assert expected in str(info.value)


def test_missing_sections_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match=r"inputs\.paths: missing"):
        parse_workflow("store: {path: x.zarr}\n")
    with pytest.raises(InputError, match=r"store\.path: missing"):
        parse_workflow("inputs: {paths: a.fits}\n")
    with pytest.raises(InputError, match=r"reference\.frames: missing"):
        parse_workflow(MINIMAL + "reference: {select: frames}\n")
    with pytest.raises(InputError, match=r"not valid YAML.*line 3"):
        parse_workflow("steps:\n  - [unclosed\n", source="w.yaml")
    with pytest.raises(InputError, match="expected a mapping"):
        parse_workflow("- just\n- a list\n")
    with pytest.raises(InputError, match="cannot read the workflow"):
        load_workflow(tmp_path / "absent.yaml")


def test_step_parameters_are_the_eager_functions_keywords():
    """Every step parameter the schema accepts is a keyword of the eager function it feeds."""
    from dagpre.ops.background import estimate_background
    from dagpre.ops.detect import detect_sources
    from dagpre.ops.masks import mask_saturation

    for step, fn in (
        ("background", estimate_background),
        ("detect", detect_sources),
        ("mask", mask_saturation),
    ):
        accepted = set(inspect.signature(fn).parameters)
        assert set(STEP_PARAMETERS[step]) <= accepted, step
