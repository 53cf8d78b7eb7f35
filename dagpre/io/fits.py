"""Read and write FITS frames: :func:`read_fits` and :func:`write_fits`.

:func:`read_fits` turns one image HDU of a FITS file (plain, ``.fits.gz`` or tile-compressed
with fpack/RICE) into a :class:`dagpre.types.Frame`: float32 pixels in ADU, a uint8
:class:`~dagpre.types.MaskBit` mask, a copy of the header, the celestial WCS and the observing
metadata (``mjd``, ``exptime``, ``gain``, ``rdnoise``, ``saturate``, ``filter``). Every
problem with the file is reported as an :class:`~dagpre.types.InputError` whose message
starts with the path, so a batch log names the culprit.

:func:`write_fits` writes a frame (or a bare 2-D array) back, with its mask as an image
extension named ``MASK`` that :func:`read_fits` folds back into the mask.

Pixel conventions: arrays are indexed ``[y, x]``; WCS objects are astropy's, so callers use
``origin=0`` for 0-based pixel centres (the centre of the first pixel is ``(0.0, 0.0)``),
whereas FITS header cards such as ``CRPIX`` count from 1.

Astropy warns freely about real-world headers (non-standard cards, WCS fixes, truncated
files); both functions silence those warnings locally with :func:`warnings.catch_warnings`,
and the reader turns the one that matters (a truncated file) into an error. Note that
:func:`warnings.catch_warnings` swaps process-wide warning state; warnings raised by other
threads while a read is in progress may be swallowed with it.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.time import Time
from astropy.wcs import WCS

from dagpre.backend import resolve_device, to_device, to_host
from dagpre.types import BackendError, Frame, InputError, MaskBit

__all__ = ["read_fits", "write_fits"]

# Header aliases for the observing metadata, in order of preference.
_NUMBER_ALIASES = (
    ("exptime", ("EXPTIME", "EXPOSURE")),
    ("gain", ("GAIN", "EGAIN")),
    ("rdnoise", ("RDNOISE", "READNOIS", "RON", "READNOISE")),
    ("saturate", ("SATURATE", "SATLEVEL")),
)
_FILTER_ALIASES = ("FILTER", "FILTER1", "FILTNAME")
_MJD_KEYS = ("MJD-OBS", "MJD_OBS")
_TIME_KEYS = ("TIME-OBS", "UT")

# Errors astropy and the OS raise for a file that cannot be opened or parsed.
_OPEN_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    zlib.error,
    VerifyError,
)

# Cards that describe the data layout: astropy writes them itself from the array.
_STRUCTURAL_KEY = re.compile(
    r"(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|BSCALE|BZERO|BLANK|CHECKSUM"
    r"|DATASUM|THEAP|TFIELDS|T(TYPE|FORM|UNIT|DIM|NULL|SCAL|ZERO|DISP)\d+"
    r"|ZIMAGE|ZSIMPLE|ZTENSION|ZEXTEND|ZBLOCKED|ZCMPTYPE|ZBITPIX|ZNAXIS\d*|ZTILE\d+"
    r"|ZNAME\d+|ZVAL\d+|ZMASKCMP|ZQUANTIZ|ZDITHER0|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM"
    r"|ZBLANK|ZSCALE|ZZERO)"
)
# Cards of the primary WCS (linear part, projection, SIP, TPV/PV, lookup-table distortions).
_WCS_KEY = re.compile(
    r"(WCSAXES|WCSNAME|CTYPE\d+|CUNIT\d+|CRPIX\d+|CRVAL\d+|CDELT\d+|CROTA\d+|CD\d+_\d+"
    r"|PC\d+_\d+|PV\d+_\d+|PS\d+_\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH"
    r"|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_DMAX|B_DMAX|(A|B|AP|BP)_\d+_\d+"
    r"|(CPDIS|CQDIS|CPERR|CQERR|DP|DQ|D2IMDIS|D2IMERR|D2IM)\d+(\..*)?|D2IMEXT|AXISCORR)"
)
_OLD_FITS_DATE = re.compile(r"(\d{2})/(\d{2})/(\d{2})")  # DD/MM/YY, 19YY (pre-2000 FITS)


# =========================================================================== reading


def read_fits(
    path: str | os.PathLike,
    hdu: int | str | tuple[str, int] | None = None,
    device: str = "auto",
    plane: int | None = None,
) -> Frame:
    """Read one image HDU of a FITS file into a :class:`~dagpre.types.Frame`.

    Parameters
    ----------
    path : str or path-like
        A FITS file: plain, gzip-compressed (``.fits.gz``) or holding tile-compressed
        (fpack, ``CompImageHDU``) images.
    hdu : int, str, (str, int) or None
        The HDU to read: an index (negative counts from the end), an ``EXTNAME``, or
        ``(EXTNAME, EXTVER)``. ``None`` picks the first image HDU (primary, image or
        compressed image) that holds data.
    device : {"auto", "cpu", "gpu"}
        Where ``data`` and ``mask`` are returned (see :func:`dagpre.backend.resolve_device`).
    plane : int, optional
        For 3-D data (``NAXIS3`` planes), the 0-based index of the plane to read. Required
        for 3-D data; an error for 2-D data.

    Returns
    -------
    Frame
        ``data`` (ny, nx) float32 C-contiguous in ADU, with ``BSCALE``/``BZERO`` applied;
        non-finite pixels (NaN, inf, integer ``BLANK``, float64 values beyond the float32
        range) are set to 0.0 and flagged :attr:`MaskBit.NONFINITE`.
        ``mask`` (ny, nx) uint8, OR-ed with the file's ``MASK`` image extension when it has
        one of the same shape and an integer type (as :func:`write_fits` writes it).
        ``header`` a copy of the HDU's header. ``wcs`` the celestial
        :class:`astropy.wcs.WCS` (TAN, TAN-SIP, TPV, ...) or ``None``; use ``origin=0`` for
        0-based pixel centres. ``meta`` holds ``mjd`` (days, UTC), ``exptime`` (s),
        ``gain`` (e-/ADU), ``rdnoise`` (e-), ``saturate`` (ADU), ``filter`` (str), each
        looked up in the HDU's header and then the primary header and ``None`` when absent
        or unparseable, plus ``path`` (str), ``hdu`` (int, index read) and ``plane``
        (int, or ``None`` for 2-D data).

    Raises
    ------
    InputError
        Message ``"<path>: <reason>"`` for a missing, empty, non-FITS, truncated or corrupt
        file; no (such) image HDU; data that are not 2-D (or 3-D with ``plane``); a
        zero-size axis; an image with no finite pixel; an unparseable WCS.
    BackendError
        For an unknown ``device``, or ``"gpu"`` with no usable GPU.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from dagpre.io.fits import read_fits, write_fits
    >>> tmp = pathlib.Path(tempfile.mkdtemp()) / "f.fits"
    >>> _ = write_fits(tmp, np.array([[1.0, np.nan], [3.0, 4.0]], dtype=np.float32))
    >>> frame = read_fits(tmp, device="cpu")
    >>> frame.data.tolist(), frame.mask.tolist()
    ([[1.0, 0.0], [3.0, 4.0]], [[0, 16], [0, 0]])
    """
    source = _source_name(path)
    target = _resolve_device(source, device)
    _check_file(source)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data, mask, header, wcs, meta = _read(source, hdu, plane)
    except InputError:
        raise
    except _OPEN_ERRORS as exc:
        raise InputError(source, _open_failure(exc)) from exc
    truncated = _truncation_warning(caught)
    if truncated is not None:
        raise InputError(source, f"truncated file ({truncated})")
    return Frame(
        data=to_device(data, target),
        mask=to_device(mask, target),
        header=header,
        wcs=wcs,
        meta=meta,
    )


def _source_name(path: Any) -> str:
    try:
        return os.fspath(path)
    except TypeError as exc:
        raise InputError(repr(path), "expected a file path (str or os.PathLike)") from exc


def _resolve_device(source: str, device: str) -> str:
    try:
        return resolve_device(device)
    except BackendError as exc:
        raise BackendError(source, f"device: {exc.reason}") from exc


def _check_file(source: str) -> None:
    """Cheap checks that give clear reasons before astropy gets to see the path."""
    path = Path(source)
    if not path.exists():
        raise InputError(source, "no such file")
    if path.is_dir():
        raise InputError(source, "is a directory, not a FITS file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(source, f"cannot stat the file ({_one_line(exc)})") from exc
    if size == 0:
        raise InputError(source, "empty file (0 bytes)")


def _read(source: str, hdu: Any, plane: Any) -> tuple:
    """Open the file, pick the HDU, and read pixels, mask, header, WCS and metadata."""
    with fits.open(source, memmap=False) as hdul:
        index = _select_hdu(source, hdul, hdu)
        chosen = hdul[index]
        shape = _header_shape(chosen.header)
        _check_shape(source, shape, plane)
        pixels = _read_pixels(source, hdul, index)
        if pixels.ndim == 3:
            pixels = pixels[plane]
        data, mask = _finite_pixels(pixels, chosen.header)
        if mask.all():
            raise InputError(source, f"every pixel of HDU {index} is NaN, infinite or BLANK")
        extra = _mask_extension(source, hdul, index, data.shape)
        if extra is not None:
            mask |= extra
        header = chosen.header.copy()
        wcs = _celestial_wcs(source, chosen.header, hdul)
        headers = (chosen.header,) if index == 0 else (chosen.header, hdul[0].header)
        meta = _meta(headers)
    meta.update(path=source, hdu=index, plane=None if plane is None else int(plane))
    return data, mask, header, wcs, meta


def _is_image(hdu: Any) -> bool:
    images = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)
    return isinstance(hdu, images) and not isinstance(hdu, fits.GroupsHDU)


def _header_shape(header: fits.Header) -> tuple[int, ...]:
    """Data shape in NumPy (slowest-first) order from the NAXISn cards."""
    naxis = int(header.get("NAXIS", 0))
    return tuple(int(header.get(f"NAXIS{k}", 0)) for k in range(naxis, 0, -1))


def _describe_hdus(hdul: fits.HDUList) -> str:
    """``"0 PRIMARY (PrimaryHDU, 400x400), 1 CAT (BinTableHDU)"``; shapes in NumPy order."""
    parts = []
    for i, h in enumerate(hdul):
        kind = type(h).__name__
        if _is_image(h):
            shape = _header_shape(h.header)
            kind += ", " + ("x".join(map(str, shape)) if shape else "no data")
        parts.append(f"{i} {h.name} ({kind})")
    return ", ".join(parts)


def _select_hdu(source: str, hdul: fits.HDUList, hdu: Any) -> int:
    """Index of the HDU to read; an :class:`InputError` naming the HDUs when there is none."""
    if hdu is None:
        with_axes = [i for i, h in enumerate(hdul) if _is_image(h) and h.header.get("NAXIS", 0)]
        with_pixels = [i for i in with_axes if all(_header_shape(hdul[i].header))]
        if with_pixels or with_axes:  # a zero-size image is chosen only to say so
            return (with_pixels or with_axes)[0]
        raise InputError(source, f"no image HDU with data; HDUs are {_describe_hdus(hdul)}")
    if isinstance(hdu, (int, np.integer)) and not isinstance(hdu, bool):
        if not -len(hdul) <= hdu < len(hdul):
            raise InputError(source, f"no HDU {hdu}; HDUs are {_describe_hdus(hdul)}")
        index = int(hdu) % len(hdul)
    elif isinstance(hdu, str) or (
        isinstance(hdu, tuple)
        and len(hdu) == 2
        and isinstance(hdu[0], str)
        and isinstance(hdu[1], (int, np.integer))
    ):
        try:
            index = hdul.index_of(hdu)
        except KeyError:
            raise InputError(source, f"no HDU {hdu!r}; HDUs are {_describe_hdus(hdul)}") from None
    else:
        raise InputError(
            source, f"hdu must be an int index, an EXTNAME or (EXTNAME, EXTVER), got {hdu!r}"
        )
    chosen = hdul[index]
    if not _is_image(chosen):
        raise InputError(
            source,
            f"HDU {index} {chosen.name} is a {type(chosen).__name__}, not an image; "
            f"HDUs are {_describe_hdus(hdul)}",
        )
    if not chosen.header.get("NAXIS", 0):
        raise InputError(
            source, f"HDU {index} {chosen.name} has no data; HDUs are {_describe_hdus(hdul)}"
        )
    return index


def _check_shape(source: str, shape: tuple[int, ...], plane: Any) -> None:
    """Accept 2-D data, or 3-D data with a valid ``plane``; reject zero-size axes."""
    if len(shape) == 3:
        if plane is None:
            raise InputError(
                source,
                f"3-D data of shape {shape}; pass plane=<index> (0..{shape[0] - 1}) "
                "to read one plane",
            )
        valid = isinstance(plane, (int, np.integer)) and not isinstance(plane, bool)
        if not valid or not 0 <= plane < shape[0]:
            raise InputError(
                source,
                f"plane={plane!r} is not an index in 0..{shape[0] - 1} for 3-D data of "
                f"shape {shape}",
            )
    elif len(shape) == 2:
        if plane is not None:
            raise InputError(source, f"plane={plane!r} was given but the data are 2-D {shape}")
    else:
        raise InputError(source, f"expected a 2-D image, got {len(shape)}-D data of shape {shape}")
    if 0 in shape:
        raise InputError(source, f"zero-size axis: data of shape {shape} hold no pixels")


def _read_pixels(source: str, hdul: fits.HDUList, index: int) -> np.ndarray:
    """The (scaled) pixels of one HDU; decoding failures become an :class:`InputError`."""
    hdu = hdul[index]
    try:
        pixels = hdu.data
    except MemoryError:
        raise
    except Exception as exc:  # truncated data unit, corrupt compressed tile, bad scaling
        raise InputError(
            source,
            f"cannot read the pixels of HDU {index} {hdu.name} (truncated or corrupt data: "
            f"{_one_line(exc)})",
        ) from exc
    if pixels is None:
        raise InputError(source, f"HDU {index} {hdu.name} has no data")
    return np.asarray(pixels)


def _finite_pixels(pixels: np.ndarray, header: fits.Header) -> tuple[np.ndarray, np.ndarray]:
    """float32 C-contiguous copy with non-finite (and integer BLANK) pixels zeroed and flagged.

    Astropy already turns BLANK pixels into NaN when it scales; the explicit test covers
    integer data it returned unscaled.
    """
    blank = header.get("BLANK")
    bad = None
    if np.issubdtype(pixels.dtype, np.integer) and isinstance(blank, int):
        bad = pixels == blank
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 -> inf
        data = np.array(pixels, dtype=np.float32, order="C")
    nonfinite = ~np.isfinite(data)
    if bad is not None:
        nonfinite |= bad
    mask = np.zeros(data.shape, dtype=np.uint8)
    if nonfinite.any():
        data[nonfinite] = 0.0
        mask[nonfinite] = MaskBit.NONFINITE
    return data, mask


def _mask_extension(
    source: str, hdul: fits.HDUList, index: int, shape: tuple[int, ...]
) -> np.ndarray | None:
    """The first integer image extension named ``MASK`` of ``shape`` (not HDU ``index``)."""
    for i, h in enumerate(hdul):
        if i == index or h.name != "MASK" or not _is_image(h):
            continue
        if _header_shape(h.header) != shape:
            continue
        bits = _read_pixels(source, hdul, i)
        if not np.issubdtype(bits.dtype, np.integer):
            continue
        # values that do not fit in 8 bits still mark a pixel: flag those USER
        out_of_range = (bits < 0) | (bits > 255)
        return np.where(out_of_range, int(MaskBit.USER), bits).astype(np.uint8)
    return None


def _celestial_wcs(source: str, header: fits.Header, hdul: fits.HDUList) -> WCS | None:
    """The celestial part of the header's WCS, or ``None`` when it has none."""
    try:
        wcs = WCS(header, fobj=hdul, relax=True)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(source, f"the header's WCS cannot be parsed ({_one_line(exc)})") from exc
    return wcs.celestial if wcs.has_celestial else None


# --------------------------------------------------------------------------- metadata


def _meta(headers: tuple[fits.Header, ...]) -> dict:
    """Observing metadata: the first parseable alias in the first header that has one."""
    meta: dict[str, Any] = {"mjd": _mjd(headers)}
    for key, aliases in _NUMBER_ALIASES:
        meta[key] = _first(headers, aliases, _number)
    meta["filter"] = _first(headers, _FILTER_ALIASES, _text)
    return meta


def _first(headers: tuple[fits.Header, ...], aliases: tuple[str, ...], parse: Any) -> Any:
    for header in headers:
        for alias in aliases:
            value = parse(header.get(alias))
            if value is not None:
                return value
    return None


def _number(value: Any) -> float | None:
    """A finite float from a header value (number or numeric string), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, str)):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text or None


def _mjd(headers: tuple[fits.Header, ...]) -> float | None:
    """MJD (UTC days) from MJD-OBS, MJD_OBS, or DATE-OBS (+ TIME-OBS / UT), per header."""
    for header in headers:
        for key in _MJD_KEYS:
            value = _number(header.get(key))
            if value is not None:
                return value
        date = header.get("DATE-OBS")
        if isinstance(date, str):
            mjd = _date_to_mjd(date, header)
            if mjd is not None:
                return mjd
    return None


def _date_to_mjd(date: str, header: fits.Header) -> float | None:
    text = date.strip()
    old = _OLD_FITS_DATE.fullmatch(text)
    if old:  # the pre-2000 FITS form DD/MM/YY means 19YY
        day, month, year = old.groups()
        text = f"19{year}-{month}-{day}"
    if "T" not in text and " " not in text:  # a date alone: add the time of day if given
        for key in _TIME_KEYS:
            clock = header.get(key)
            if isinstance(clock, str) and clock.strip():
                text = f"{text}T{clock.strip()}"
                break
    for fmt in ("fits", "iso"):
        try:
            return float(Time(text, format=fmt, scale="utc").mjd)
        except (ValueError, TypeError):
            continue
    return None


# --------------------------------------------------------------------------- messages


def _one_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (wcslib puts the reason last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _open_failure(exc: BaseException) -> str:
    message = _one_line(exc)
    if isinstance(exc, OSError) and "SIMPLE" in message:
        return f"not a FITS file ({message})"
    if isinstance(exc, OSError) and "Empty or corrupt" in message:
        return f"not a FITS file or a corrupt header ({message})"
    return f"cannot read the file ({type(exc).__name__}: {message})"


def _truncation_warning(caught: list[warnings.WarningMessage]) -> str | None:
    for item in caught:
        message = str(item.message)
        if "truncated" in message.lower():
            return _one_line(Exception(message))
    return None


# =========================================================================== writing


def write_fits(
    path: str | os.PathLike,
    frame_or_array: Frame | Any,
    header: fits.Header | dict | None = None,
    wcs: WCS | None = None,
    mask: Any = None,
    overwrite: bool = False,
    compress: bool = False,
) -> Path:
    """Write a frame (or a 2-D array) to a FITS file that :func:`read_fits` reads back.

    Parameters
    ----------
    path : str or path-like
        Output file; a name ending in ``.gz`` is gzip-compressed as a whole.
    frame_or_array : Frame or array_like (ny, nx)
        A :class:`~dagpre.types.Frame` (its ``data``, ``mask``, ``header`` and ``wcs`` are
        written), or a 2-D NumPy/CuPy array of integers, booleans or floats (written with
        its own type; booleans as uint8, float16 as float32).
    header : astropy.io.fits.Header or dict, optional
        Cards to write; overrides a frame's header. Structural cards (``BITPIX``,
        ``NAXISn``, ``BSCALE``/``BZERO``/``BLANK``, checksums, compression cards) are
        dropped: astropy writes them from the array.
    wcs : astropy.wcs.WCS, optional
        WCS to write; overrides a frame's WCS. When the header already describes exactly
        this WCS its cards are kept byte for byte; otherwise the header's WCS cards
        (including SIP, ``PVi_j`` and distortion-table cards) are replaced by
        ``wcs.to_header(relax=True)``, which rounds values to about 13 significant digits
        (around 1e-13 deg). ``None`` leaves the header's WCS cards as they are.
    mask : array_like (ny, nx), optional
        :class:`~dagpre.types.MaskBit` flags (values 0..255); overrides a frame's mask.
        Written as an image extension named ``MASK`` only when some bit is set.
    overwrite : bool
        Replace an existing file; without it an existing ``path`` is an error.
    compress : bool
        Write a tile-compressed image (``CompImageHDU`` after an empty primary HDU).
        Integer data and the mask use ``RICE_1`` (lossless; 64-bit integers use ``GZIP_2``
        because RICE handles at most 32 bits). Float data use ``GZIP_2`` with
        ``quantize_level=0``, i.e. no quantization: lossless, NaN kept, at a modest
        compression ratio (RICE on floats would quantize them, losing precision).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    InputError
        When the file exists and ``overwrite`` is false, the data are not 2-D numbers, the
        mask does not match, or the file cannot be written.
    """
    source = _source_name(path)
    target = Path(source)
    if isinstance(frame_or_array, Frame):
        frame = frame_or_array
        data = frame.data
        header = frame.header if header is None else header
        wcs = frame.wcs if wcs is None else wcs
        mask = frame.mask if mask is None else mask
    else:
        data = frame_or_array
    pixels = _host_image(source, data)
    bits = None if mask is None else _host_mask(source, mask, pixels.shape)
    if target.is_dir():
        raise InputError(source, "is a directory, cannot write a FITS file there")
    if target.exists() and not overwrite:
        raise InputError(source, "file exists; pass overwrite=True to replace it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cards = _output_header(header, wcs)
            hdul = _output_hdus(pixels, cards, bits, compress)
            hdul.writeto(target, overwrite=overwrite, output_verify="silentfix")
    except (OSError, ValueError, TypeError, KeyError, VerifyError) as exc:
        raise InputError(source, f"cannot write the file ({_one_line(exc)})") from exc
    return target


def _host_image(source: str, data: Any) -> np.ndarray:
    pixels = np.asarray(to_host(data))
    if pixels.ndim != 2:
        raise InputError(source, f"data: expected a 2-D image, got shape {pixels.shape}")
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8)
    if pixels.dtype == np.float16:
        return pixels.astype(np.float32)
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise InputError(source, f"data: expected integer or float pixels, got {pixels.dtype}")
    return pixels


def _host_mask(source: str, mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask as uint8 on the host, or ``None`` when no bit is set."""
    bits = np.asarray(to_host(mask))
    if bits.shape != shape:
        raise InputError(source, f"mask: shape {bits.shape} differs from data {shape}")
    if bits.dtype == np.bool_:
        bits = bits.astype(np.uint8)
    if not np.issubdtype(bits.dtype, np.integer):
        raise InputError(source, f"mask: expected integer bit flags, got {bits.dtype}")
    if bits.size and (bits.min() < 0 or bits.max() > 255):
        raise InputError(source, "mask: values must fit in 8 bits (0..255)")
    bits = bits.astype(np.uint8)
    return bits if bits.any() else None


def _output_header(header: Any, wcs: WCS | None) -> fits.Header:
    """A copy of ``header`` without structural cards, with the WCS cards of ``wcs``."""
    if header is None:
        out = fits.Header()
    elif isinstance(header, fits.Header):
        out = header.copy()
    else:
        out = fits.Header()
        out.update(header)
    for key in set(out.keys()):
        if _STRUCTURAL_KEY.fullmatch(key):
            out.remove(key, remove_all=True)
    if str(out.get("EXTNAME", "")).strip().upper() == "MASK":
        out.remove("EXTNAME")
    if wcs is not None:
        _replace_wcs_cards(out, wcs)
    return out


def _replace_wcs_cards(header: fits.Header, wcs: WCS) -> None:
    current = _quiet_celestial_wcs(header)
    if current is not None and _same_wcs(current, wcs):
        return  # keep the original cards, which carry full precision
    for key in set(header.keys()):
        if _WCS_KEY.fullmatch(key):
            header.remove(key, remove_all=True)
    for card in wcs.to_header(relax=True).cards:
        # WCS cards replace; time and observatory cards only fill gaps (never rounded over)
        if _WCS_KEY.fullmatch(card.keyword) or card.keyword not in header:
            header[card.keyword] = (card.value, card.comment)


def _quiet_celestial_wcs(header: fits.Header) -> WCS | None:
    try:
        wcs = WCS(header, relax=True)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return wcs.celestial if wcs.has_celestial else None


def _same_wcs(a: WCS, b: WCS) -> bool:
    """Whether two WCS objects are exactly equal, distortions included."""
    try:
        if a.naxis != b.naxis or not a.wcs.compare(b.wcs):
            return False
    except (AttributeError, TypeError, ValueError):
        return False
    if (a.sip is None) != (b.sip is None):
        return False
    if a.sip is not None:
        for name in ("a", "b", "ap", "bp", "crpix"):
            x, y = getattr(a.sip, name), getattr(b.sip, name)
            if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
                return False
    tables = ("cpdis1", "cpdis2", "det2im1", "det2im2")
    return all(getattr(a, t) is None and getattr(b, t) is None for t in tables)


def _output_hdus(
    pixels: np.ndarray, header: fits.Header, bits: np.ndarray | None, compress: bool
) -> fits.HDUList:
    if compress:
        if np.issubdtype(pixels.dtype, np.floating):
            image = fits.CompImageHDU(
                pixels, header=header, compression_type="GZIP_2", quantize_level=0.0
            )
        else:
            kind = "GZIP_2" if pixels.dtype.itemsize > 4 else "RICE_1"
            image = fits.CompImageHDU(pixels, header=header, compression_type=kind)
        hdus = [fits.PrimaryHDU(), image]
    else:
        hdus = [fits.PrimaryHDU(pixels, header=header)]
    if bits is not None:
        if compress:
            mask_hdu = fits.CompImageHDU(bits, name="MASK", compression_type="RICE_1")
        else:
            mask_hdu = fits.ImageHDU(bits, name="MASK")
        flags = ", ".join(f"{int(bit)} {bit.name}" for bit in MaskBit)
        mask_hdu.header["COMMENT"] = f"dagpre MaskBit flags: {flags}"
        hdus.append(mask_hdu)
    return fits.HDUList(hdus)
