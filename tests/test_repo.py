"""The repository keeps its promises: README commands, CI script, notebooks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must open with a bash block holding the two commands"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_the_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "dagpre " in commands[0]  # the main job
    assert "pytest" in commands[1]  # the tests


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [_readme_commands()[1]]


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=str)
def test_notebooks_run(notebook, tmp_path, monkeypatch):
    """Execute each notebook's code cells in order, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(notebook), "exec"), namespace)


def test_every_public_name_resolves():
    """Each name in ``dagpre.__all__`` (the DESIGN.md contract so far) imports."""
    import dagpre

    for name in dagpre.__all__:
        assert getattr(dagpre, name) is not None, name
