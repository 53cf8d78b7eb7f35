"""Core records shared by every layer: errors, mask bits, :class:`Frame`, :class:`Catalog`.

Pixel conventions used throughout dagpre: arrays are indexed ``[y, x]`` (row, column);
coordinates returned by steps are ``(x, y)`` pixel order with 0-based pixel centres, so the
centre of the first pixel is ``(0.0, 0.0)`` (FITS and SExtractor count from 1).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "META_KEYS",
    "BackendError",
    "Catalog",
    "DagpreError",
    "Frame",
    "InputError",
    "MaskBit",
]


# --------------------------------------------------------------------------- errors


class DagpreError(Exception):
    """Base class of every error dagpre raises on purpose."""


class InputError(DagpreError, ValueError):
    """Bad input: a file, an array or a parameter that a step cannot use.

    Parameters
    ----------
    source : str
        What was wrong: a file path, or a parameter name such as ``"box"``.
    reason : str
        One line saying what was found and what was expected.

    The message reads ``"<source>: <reason>"`` so a batch log names the culprit.
    """

    def __init__(self, source: Any, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # keep the two-argument form picklable (Dask ships errors)
        return (type(self), (self.source, self.reason))


class BackendError(InputError):
    """A device was requested that cannot be used (for example ``"gpu"`` with no GPU)."""


# --------------------------------------------------------------------------- mask bits


class MaskBit(enum.IntFlag):
    """Bit flags of the uint8 pixel masks (``Frame.mask`` and every mask product).

    A pixel is usable when its mask is 0. Bits combine with ``|``; test one with
    ``mask & MaskBit.SATURATED``.
    """

    BAD = 1  #: bad pixel from a bad-pixel map or a hot/dead pixel
    SATURATED = 2  #: at or above the saturation level, or grown around such a core
    BLEED = 4  #: part of a bleed trail along the readout axis
    COSMIC = 8  #: cosmic-ray hit
    NONFINITE = 16  #: NaN or infinite in the input (the data value was replaced by 0)
    OFF_FOOTPRINT = 32  #: outside the footprint after alignment (pixel pulled from outside)
    CONVOLVED = 64  #: within a kernel's reach of a masked pixel after convolution
    USER = 128  #: set by the user's own mask


# --------------------------------------------------------------------------- frame

#: Keys always present in ``Frame.meta`` (value ``None`` when the header lacks them).
META_KEYS = ("mjd", "exptime", "gain", "rdnoise", "saturate", "filter")


def _device_name(x: Any) -> str:
    return "gpu" if type(x).__module__.split(".", 1)[0] == "cupy" else "cpu"


@dataclass(frozen=True)
class Frame:
    """One image with its mask, header, WCS and observing metadata.

    Attributes
    ----------
    data : ndarray (ny, nx) float32
        Pixel values in ADU, NumPy or CuPy. Non-finite input pixels are 0 and flagged.
    mask : ndarray (ny, nx) uint8
        :class:`MaskBit` flags, on the same device as ``data``; 0 means good.
    header : astropy.io.fits.Header
        The header the frame was read with (a copy), for provenance and re-writing.
    wcs : astropy.wcs.WCS or None
        Celestial WCS (TAN, TAN-SIP, TPV, ...) or ``None`` when the header has none.
    meta : dict
        ``mjd`` (days), ``exptime`` (s), ``gain`` (e-/ADU), ``rdnoise`` (e-),
        ``saturate`` (ADU), ``filter`` (str); each ``None`` when not in the header.
        Readers may add more keys (``path``, ``hdu``).
    """

    data: Any
    mask: Any
    header: Any = None
    wcs: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = getattr(self.data, "shape", None)
        if shape is None or len(shape) != 2:
            raise InputError("data", f"a Frame holds a 2-D image, got shape {shape}")
        if self.data.dtype != np.float32:
            raise InputError("data", f"expected float32 pixels, got {self.data.dtype}")
        if getattr(self.mask, "shape", None) != shape:
            raise InputError(
                "mask", f"shape {getattr(self.mask, 'shape', None)} differs from data {shape}"
            )
        if self.mask.dtype != np.uint8:
            raise InputError("mask", f"expected uint8 bit flags, got {self.mask.dtype}")
        if _device_name(self.data) != _device_name(self.mask):
            raise InputError("mask", "data and mask must be on the same device")
        full = {key: None for key in META_KEYS}
        full.update(self.meta)
        object.__setattr__(self, "meta", full)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` in pixels."""
        return tuple(self.data.shape)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"gpu"``: where ``data`` and ``mask`` live."""
        return _device_name(self.data)

    def to_device(self, device: str = "auto") -> Frame:
        """A copy of this frame with ``data`` and ``mask`` on ``device``."""
        from dagpre.backend import to_device

        return Frame(
            data=to_device(self.data, device),
            mask=to_device(self.mask, device),
            header=self.header,
            wcs=self.wcs,
            meta=dict(self.meta),
        )


# --------------------------------------------------------------------------- catalog


class Catalog(Mapping):
    """Per-object measurements: a mapping of column name to 1-D arrays of equal length.

    Columns stay on the device of the step that made them (NumPy or CuPy);
    :meth:`to_table` brings them to the host as an :class:`astropy.table.Table`.
    Positions are ``(x, y)`` pixel order, 0-based pixel centres.

    Parameters
    ----------
    columns : mapping of str to 1-D array
        The columns, all the same length.
    meta : mapping, optional
        Provenance and units (``{"units": {"flux": "adu"}}``, parameters used, ...).

    Examples
    --------
    >>> import numpy as np
    >>> cat = Catalog({"x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])})
    >>> len(cat), list(cat)
    (2, ['x', 'y'])
    >>> cat.to_table()["y"][1]
    np.float64(4.0)
    """

    def __init__(self, columns: Mapping[str, Any], meta: Mapping | None = None) -> None:
        lengths = {}
        for name, values in columns.items():
            ndim = getattr(values, "ndim", None)
            if ndim != 1:
                raise InputError(f"column {name!r}", f"expected a 1-D array, got ndim={ndim}")
            lengths[name] = values.shape[0]
        if len(set(lengths.values())) > 1:
            raise InputError("columns", f"columns differ in length: {lengths}")
        self._columns = dict(columns)
        self._length = next(iter(lengths.values()), 0)
        self.meta = dict(meta or {})

    def __getitem__(self, name: str) -> Any:
        return self._columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        """Number of rows (objects), not of columns."""
        return self._length

    @property
    def colnames(self) -> list[str]:
        """Column names in order."""
        return list(self._columns)

    def __repr__(self) -> str:
        return f"Catalog({self._length} rows; columns: {', '.join(self._columns)})"

    def to_table(self):
        """The catalog as an :class:`astropy.table.Table` on the host."""
        from astropy.table import Table

        from dagpre.backend import to_host

        units = self.meta.get("units", {})
        table = Table({name: to_host(col) for name, col in self._columns.items()})
        for name, unit in units.items():
            if name in table.colnames:
                table[name].unit = unit
        table.meta.update({k: v for k, v in self.meta.items() if k != "units"})
        return table
