"""Machine learning on dagpre products: the frame-quality autoencoder and training sets.

Torch is the ``ml`` extra; it is imported only when a name that needs it is used, so
``import dagpre.ml`` works without it and the export of cut-outs (Zarr only) does too.

* :class:`QualityModel` (``ml/quality.py``): a convolutional autoencoder that learns what
  good frames look like and scores frames by reconstruction error.
* :func:`export_training_set` (``ml/dataset.py``, ``dagpre export STORE OUT``): cut-out
  triplets and light-curve tensors from a store; :class:`CutoutDataset` and
  :class:`LightCurveDataset` read them lazily as torch datasets.
"""

from __future__ import annotations

import importlib

# public name -> "module:attribute", loaded on first access (torch only when needed)
_LAZY = {
    "QualityModel": "dagpre.ml.quality:QualityModel",
    "QualityAlert": "dagpre.ml.quality:QualityAlert",
    "export_training_set": "dagpre.ml.dataset:export_training_set",
    "CutoutDataset": "dagpre.ml.dataset:CutoutDataset",
    "LightCurveDataset": "dagpre.ml.dataset:LightCurveDataset",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        target = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dagpre.ml' has no attribute {name!r}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
