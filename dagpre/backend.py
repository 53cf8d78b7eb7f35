"""Array-module dispatch: NumPy on the host, CuPy on a GPU, chosen by the array's type.

A step never consults a global switch: it asks for the module that matches its input,

>>> import numpy as np
>>> from dagpre import backend
>>> image = np.zeros((4, 4), dtype=np.float32)
>>> backend.xp_of(image).__name__
'numpy'
>>> backend.ndimage_of(image).__name__
'scipy.ndimage'

and returns arrays on the device it was given. CuPy is imported only when a CuPy array is
actually handled, or when the caller asks for the GPU (``to_device(x, "gpu")``,
``gpu_available()``); importing :mod:`dagpre` never imports it.

Device names are ``"auto"``, ``"cpu"`` and ``"gpu"``. ``"auto"`` means the GPU when one is
usable, else the CPU; the environment variable ``DAGPRE_DEVICE`` (``cpu`` or ``gpu``)
overrides what ``"auto"`` resolves to, for example to keep a notebook on the CPU on a GPU
machine. An explicit ``"cpu"`` or ``"gpu"`` argument is never overridden.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np

from dagpre.types import BackendError

__all__ = [
    "DEVICES",
    "DEVICE_ENV_VAR",
    "fft_of",
    "gpu_available",
    "is_cupy_array",
    "linalg_of",
    "ndimage_of",
    "resolve_device",
    "signal_of",
    "to_device",
    "to_host",
    "xp_of",
]

DEVICE_ENV_VAR = "DAGPRE_DEVICE"
DEVICES = ("auto", "cpu", "gpu")

# The SciPy sub-module of each family and its CuPy counterpart (cupyx.scipy.*).
_SCIPY_FAMILIES = {
    "ndimage": ("scipy.ndimage", "cupyx.scipy.ndimage"),
    "signal": ("scipy.signal", "cupyx.scipy.signal"),
    "fft": ("scipy.fft", "cupyx.scipy.fft"),
    "linalg": ("scipy.linalg", "cupyx.scipy.linalg"),
}


def is_cupy_array(x: Any) -> bool:
    """Whether ``x`` is a CuPy array, decided without importing CuPy.

    The test is on the type's module name, so a machine without CuPy (or with CuPy but
    no GPU) never pays for, or fails on, ``import cupy``.
    """
    return type(x).__module__.split(".", 1)[0] == "cupy"


def xp_of(*arrays: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) for the given arrays.

    Parameters
    ----------
    *arrays
        Arrays (or scalars, or ``None``, which are ignored) that a step will combine.

    Returns
    -------
    module
        ``cupy`` if any argument is a CuPy array, else ``numpy``.
    """
    if any(is_cupy_array(a) for a in arrays):
        return importlib.import_module("cupy")
    return np


def _family_of(family: str, x: Any) -> ModuleType:
    cpu_name, gpu_name = _SCIPY_FAMILIES[family]
    return importlib.import_module(gpu_name if is_cupy_array(x) else cpu_name)


def ndimage_of(x: Any) -> ModuleType:
    """``scipy.ndimage`` for NumPy input, ``cupyx.scipy.ndimage`` for CuPy input."""
    return _family_of("ndimage", x)


def signal_of(x: Any) -> ModuleType:
    """``scipy.signal`` for NumPy input, ``cupyx.scipy.signal`` for CuPy input."""
    return _family_of("signal", x)


def fft_of(x: Any) -> ModuleType:
    """``scipy.fft`` for NumPy input, ``cupyx.scipy.fft`` for CuPy input."""
    return _family_of("fft", x)


def linalg_of(x: Any) -> ModuleType:
    """``scipy.linalg`` for NumPy input, ``cupyx.scipy.linalg`` for CuPy input."""
    return _family_of("linalg", x)


def gpu_available() -> bool:
    """Whether a CUDA GPU is usable through CuPy.

    Importing CuPy is not enough (it imports on machines without a GPU or driver); this asks
    the CUDA runtime for the device count. Any failure on the way means "no GPU".
    """
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return False
    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # CUDARuntimeError, driver missing, etc.: all mean no usable GPU
        return False


def resolve_device(device: str = "auto") -> str:
    """Turn a device request into ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}
        ``"auto"`` honours ``$DAGPRE_DEVICE`` when set, else picks the GPU if
        :func:`gpu_available`, else the CPU.

    Raises
    ------
    BackendError
        For an unknown device name (in the argument or the environment variable), or when
        ``"gpu"`` is asked for and no GPU is usable.
    """
    if device not in DEVICES:
        raise BackendError("device", f"expected one of {DEVICES}, got {device!r}")
    if device == "auto":
        env = os.environ.get(DEVICE_ENV_VAR, "").strip().lower()
        if env:
            if env not in DEVICES:
                raise BackendError(f"${DEVICE_ENV_VAR}", f"expected one of {DEVICES}, got {env!r}")
            if env != "auto":
                return resolve_device(env)
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise BackendError(
            "device",
            "'gpu' was requested but no CUDA GPU is usable through CuPy "
            "(install dagpre[gpu] on a machine with a GPU, or use device='cpu')",
        )
    return device


def to_host(x: Any) -> Any:
    """Return ``x`` as a NumPy array (copying from the GPU when it is a CuPy array).

    Non-array inputs (scalars, ``None``) are returned unchanged.
    """
    if is_cupy_array(x):
        return x.get()
    return x


def to_device(x: Any, device: str = "auto") -> Any:
    """Move an array to the CPU (NumPy) or the GPU (CuPy).

    Parameters
    ----------
    x : array_like
        NumPy or CuPy array.
    device : {"auto", "cpu", "gpu"}
        Target, resolved by :func:`resolve_device`.

    Returns
    -------
    array
        ``x`` itself when it is already on the target device, else a copy there.
    """
    target = resolve_device(device)
    if target == "cpu":
        return np.asarray(to_host(x))
    cupy = importlib.import_module("cupy")
    return cupy.asarray(x)
