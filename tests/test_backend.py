"""Backend dispatch: module choice by array type, device resolution, lazy CuPy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import scipy.ndimage
import scipy.signal

from dagpre import backend
from dagpre.types import BackendError, InputError


def test_xp_of_matches_the_array_type(xp):
    image = xp.zeros((3, 5), dtype=xp.float32)
    assert backend.xp_of(image) is xp
    # scalars and None never change the choice
    assert backend.xp_of(image, 1.0, None) is xp
    assert backend.xp_of(1.0, None) is np


def test_scipy_families_match_the_array_type(xp):
    image = xp.arange(25, dtype=xp.float32).reshape(5, 5)
    prefix = "cupyx.scipy" if xp.__name__ == "cupy" else "scipy"
    for getter, family in [
        (backend.ndimage_of, "ndimage"),
        (backend.signal_of, "signal"),
        (backend.fft_of, "fft"),
        (backend.linalg_of, "linalg"),
    ]:
        assert getter(image).__name__ == f"{prefix}.{family}"
    # and the chosen module computes on that device, returning the same type
    smoothed = backend.ndimage_of(image).uniform_filter(image, size=3)
    assert type(smoothed) is type(image)
    host = scipy.ndimage.uniform_filter(np.arange(25, dtype=np.float32).reshape(5, 5), size=3)
    np.testing.assert_allclose(backend.to_host(smoothed), host, rtol=1e-6)


def test_numpy_families_are_scipy_modules():
    a = np.ones(4)
    assert backend.ndimage_of(a) is scipy.ndimage
    assert backend.signal_of(a) is scipy.signal
    assert backend.fft_of(a) is scipy.fft
    assert backend.linalg_of(a) is scipy.linalg


def test_round_trip_through_device(xp):
    host = np.random.default_rng(1).normal(size=(7, 9)).astype(np.float32)
    device = "gpu" if xp.__name__ == "cupy" else "cpu"
    moved = backend.to_device(host, device)
    assert type(moved) is type(xp.asarray(host))
    assert backend.is_cupy_array(moved) == (device == "gpu")
    back = backend.to_host(moved)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, host)


def test_resolve_device_rejects_unknown_names():
    with pytest.raises(BackendError, match="device: expected one of"):
        backend.resolve_device("tpu")
    # BackendError is an InputError, so batch code can catch one family
    assert issubclass(BackendError, InputError)


def test_environment_override_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv(backend.DEVICE_ENV_VAR, "cpu")
    assert backend.resolve_device("auto") == "cpu"
    monkeypatch.setenv(backend.DEVICE_ENV_VAR, "banana")
    with pytest.raises(BackendError, match=r"\$DAGPRE_DEVICE: expected one of"):
        backend.resolve_device("auto")
    # an explicit argument is never overridden by the environment
    assert backend.resolve_device("cpu") == "cpu"


def test_auto_without_override_follows_gpu_availability(monkeypatch):
    monkeypatch.delenv(backend.DEVICE_ENV_VAR, raising=False)
    expected = "gpu" if backend.gpu_available() else "cpu"
    assert backend.resolve_device("auto") == expected


def test_gpu_request_without_gpu_fails_loudly(monkeypatch):
    if backend.gpu_available():
        pytest.skip("a GPU is usable here; this checks the no-GPU message")
    with pytest.raises(BackendError, match="no CUDA GPU is usable"):
        backend.resolve_device("gpu")
    with pytest.raises(BackendError, match="no CUDA GPU is usable"):
        backend.to_device(np.zeros(3), "gpu")
    monkeypatch.setenv(backend.DEVICE_ENV_VAR, "gpu")
    with pytest.raises(BackendError, match="no CUDA GPU is usable"):
        backend.resolve_device("auto")


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_nothing_imports_cupy_on_a_machine_without_it(tmp_path):
    """With CuPy made unimportable, dagpre imports, reports no GPU and runs on NumPy."""
    code = f"""
        import sys

        class NoCupy:
            # a meta-path finder that makes 'cupy' and 'cupyx' unimportable and counts tries
            tries = []
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("cupy", "cupyx"):
                    self.tries.append(name)
                    raise ImportError("cupy is blocked in this test")
                return None

        blocker = NoCupy()
        sys.meta_path.insert(0, blocker)

        import numpy as np
        import dagpre as dp
        from dagpre import backend
        assert blocker.tries == [], blocker.tries            # importing dagpre never tries
        night = dp.simulate.night(n_frames=1, shape=(64, 64), n_stars=20, seed=3)
        paths = night.write(r"{tmp_path}")
        frame = dp.read_fits(paths["frames"][0], device="cpu")
        assert type(frame.data) is np.ndarray
        assert backend.xp_of(frame.data) is np
        assert blocker.tries == [], blocker.tries            # neither does CPU work
        assert backend.gpu_available() is False              # the truthful answer
        assert backend.resolve_device("auto") == "cpu"
        frame = dp.read_fits(paths["frames"][0])             # device="auto" -> CPU
        assert type(frame.data) is np.ndarray
        assert "cupy" not in sys.modules
        print("ok")
    """
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_dagpre_does_not_import_heavy_modules():
    result = _run_python(
        """
        import sys
        import dagpre
        heavy = [m for m in ("cupy", "astropy", "dask", "zarr", "torch") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.gpu
def test_gpu_available_is_true_on_a_gpu_machine():
    import cupy

    assert backend.gpu_available() is True
    assert cupy.cuda.runtime.getDeviceCount() >= 1
