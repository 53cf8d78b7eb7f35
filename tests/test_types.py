"""Core records: errors, mask bits, Frame and Catalog."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.table import Table

from dagpre.types import META_KEYS, Catalog, DagpreError, Frame, InputError, MaskBit


def test_input_error_names_the_source_and_survives_pickling():
    err = InputError("night/frame_003.fits", "empty file (0 bytes)")
    assert str(err) == "night/frame_003.fits: empty file (0 bytes)"
    assert isinstance(err, DagpreError) and isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.source, again.reason) == (err.source, err.reason)


def test_mask_bits_are_distinct_single_bits_that_fit_uint8():
    values = [int(bit) for bit in MaskBit]
    assert len(set(values)) == len(values) == 8
    assert all(v & (v - 1) == 0 for v in values)
    assert np.uint8(sum(values)) == 255


def _frame(xp, **kw):
    data = xp.zeros((4, 6), dtype=xp.float32)
    mask = xp.zeros((4, 6), dtype=xp.uint8)
    return Frame(data=kw.pop("data", data), mask=kw.pop("mask", mask), **kw)


def test_frame_fills_meta_and_reports_device(xp):
    frame = _frame(xp, meta={"gain": 2.0, "path": "x.fits"})
    assert set(META_KEYS) <= set(frame.meta)
    assert frame.meta["gain"] == 2.0 and frame.meta["mjd"] is None
    assert frame.meta["path"] == "x.fits"
    assert frame.shape == (4, 6)
    assert frame.device == ("gpu" if xp.__name__ == "cupy" else "cpu")
    host = frame.to_device("cpu")
    assert type(host.data) is np.ndarray and host.meta == frame.meta


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"data": np.zeros((4, 6), np.float64)}, "data: expected float32"),
        ({"data": np.zeros(6, np.float32)}, "data: a Frame holds a 2-D image"),
        ({"mask": np.zeros((4, 5), np.uint8)}, r"mask: shape \(4, 5\) differs"),
        ({"mask": np.zeros((4, 6), bool)}, "mask: expected uint8"),
    ],
)
def test_frame_rejects_bad_arrays(kw, match):
    with pytest.raises(InputError, match=match):
        _frame(np, **kw)


def test_catalog_is_a_column_mapping_with_row_length(xp):
    cat = Catalog(
        {"x": xp.asarray([1.0, 2.0, 3.0]), "flux": xp.asarray([10.0, 20.0, 30.0])},
        meta={"units": {"flux": "adu"}, "step": "test"},
    )
    assert len(cat) == 3
    assert cat.colnames == ["x", "flux"]
    assert "flux" in cat
    table = cat.to_table()
    assert isinstance(table, Table)
    np.testing.assert_array_equal(table["flux"], [10.0, 20.0, 30.0])
    assert str(table["flux"].unit) == "adu"
    assert table.meta["step"] == "test"


def test_catalog_rejects_ragged_or_2d_columns():
    with pytest.raises(InputError, match="columns differ in length"):
        Catalog({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(InputError, match="column 'x': expected a 1-D array"):
        Catalog({"x": np.zeros((3, 2))})
    assert len(Catalog({})) == 0
