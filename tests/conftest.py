"""Test configuration: the ``gpu`` marker's skip, the ``xp`` fixture, shared data paths.

Shape taken from zarr-python: a GPU is present only when CuPy reports a device (importing
CuPy is not enough), GPU tests carry ``@pytest.mark.gpu`` and are skipped with the reason
shown, and the ``xp`` fixture runs one test body on ``numpy`` and on ``cupy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dagpre.backend import gpu_available

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NO_GPU_REASON = "no CUDA GPU usable through CuPy on this machine (gpu_available() is False)"


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(
    params=[
        pytest.param("numpy", id="numpy"),
        pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
    ]
)
def xp(request):
    """The array module to run a test body on: ``numpy``, then ``cupy`` (GPU only)."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout)")
    return SHARED_DATA
