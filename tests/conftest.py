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

#: Columns of ``../shared/data/sep/image.cat`` as SEP's own test reads them (SExtractor's
#: positions are 1-based there).
IMAGECAT_DTYPE = [
    ("number", np.int64),
    ("x", np.float64),
    ("y", np.float64),
    ("xwin", np.float64),
    ("ywin", np.float64),
    ("x2", np.float64),
    ("y2", np.float64),
    ("xy", np.float64),
    ("errx2", np.float64),
    ("erry2", np.float64),
    ("errxy", np.float64),
    ("a", np.float64),
    ("flux_aper", np.float64),
    ("fluxerr_aper", np.float64),
    ("kron_radius", np.float64),
    ("flux_auto", np.float64),
    ("fluxerr_auto", np.float64),
    ("flux_radius", np.float64, (3,)),
    ("flags", np.int64),
]
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


def run_in_threads(fn, args: list) -> list:
    """``[fn(a) for a in args]``, each call in its own thread started together."""
    import threading

    results = [None] * len(args)

    def work(i):
        results[i] = fn(args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
