"""The grey pipeline's lookup table gives exactly the per-pixel result, on every VOI case.

``to_unit_range`` (For Presentation, 8/16-bit integer stored values) reads one float32 table
indexed by the stored value; ``to_unit_range_per_pixel`` is the per-pixel maths it replaced.
Both run on real mini-MIAS pixels (12 bits stored, and 16-bit signed with a rescale) under each
case the DICOM grayscale pipeline has, and on the VOI attributes of real GE and Hologic headers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.analysis.prepare import grey_lookup_table, to_unit_range, to_unit_range_per_pixel
from tests.testdata import mias_to_mg
from tests.tools import require_shared


def _voi_lut_item(first: int, n: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [n, first, bits]
    ramp = np.linspace(0, (1 << bits) - 1, n) ** 1.3 / ((1 << bits) - 1) ** 0.3
    item.LUTData = np.round(ramp).astype(np.uint16).tolist()
    return item


def _window(c: float, w: float, fn: str | None = None) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = c, w
        if fn:
            ds.VOILUTFunction = fn
    return apply


def _lut(bits: int, also_window: bool = False) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        for k in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            if k in ds and not also_window:
                delattr(ds, k)
        ds.VOILUTSequence = Sequence([_voi_lut_item(100, 3500, bits)])
    return apply


def _no_voi(ds: Dataset) -> None:
    for k in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if k in ds:
            delattr(ds, k)


def _rescale(slope: float, intercept: float) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    return apply


def _padding(value: int, limit: int | None = None) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.PixelPaddingValue = value
        if limit is not None:
            ds.PixelPaddingRangeLimit = limit
    return apply


def _mono1(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


CASES: dict[str, list[Callable[[Dataset], None]]] = {
    "linear": [_window(2047.5, 4096, "LINEAR")],
    "linear-default-function": [_window(1500, 1200)],
    "linear-narrow": [_window(1000, 400)],
    "linear-width-1": [_window(1200, 1)],
    "linear-exact": [_window(1600.25, 900.5, "LINEAR_EXACT")],
    "sigmoid": [_window(1800, 700, "SIGMOID")],
    "multi-valued-window": [_window(0, 0), lambda ds: setattr(ds, "WindowCenter", [1700, 1800]),
                            lambda ds: setattr(ds, "WindowWidth", [600, 900])],
    "voi-lut-12": [_lut(12)],
    "voi-lut-16": [_lut(16)],
    "voi-lut-8": [_lut(8)],
    "voi-lut-and-window": [_lut(12, also_window=True), _window(1700, 800)],
    "rescale": [_rescale(0.5, 100.0), _window(900, 700)],
    "rescale-negative-slope": [_rescale(-1.0, 4095.0), _window(2500, 1500)],
    "rescale-voi-lut": [_rescale(1.0, -50.0), _lut(12)],
    "monochrome1": [_mono1, _window(2047.5, 4096)],
    "monochrome1-sigmoid": [_mono1, _window(1800, 700, "SIGMOID")],
    "padding": [_padding(0), _window(1800, 1600)],
    "padding-range": [_padding(0, 300), _window(1800, 1600)],
    "padding-range-reversed": [_padding(300, 0), _window(1800, 1600)],
    "padding-absent-from-image": [_padding(4095), _window(1800, 1600)],
    "no-voi-full-range": [_no_voi],
    "no-voi-padding": [_no_voi, _padding(0, 500)],
    "no-voi-rescale": [_no_voi, _rescale(2.0, -1000.0)],
    "no-voi-narrow-data": [_no_voi, lambda ds: setattr(ds, "BitsStored", 16)],
}


def _assert_same(ds: Dataset, raw: np.ndarray, *, expect_table: bool = True) -> None:
    want = to_unit_range_per_pixel(raw, ds, for_presentation=True)
    table = grey_lookup_table(raw, ds)
    assert (table is not None) == expect_table
    got = to_unit_range(raw, ds, for_presentation=True)
    assert got.dtype == np.float32 and got.shape == raw.shape
    # bit for bit: every pixel of the table path is the per-pixel maths of its stored value
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_table_gives_the_per_pixel_result(case: str) -> None:
    ds = mias_to_mg("mdb219")  # 1024 x 1024, 12 bits stored (mini-MIAS, real film)
    for change in CASES[case]:
        change(ds)
    raw = ds.pixel_array
    if case == "padding":  # a real padded background: the film's darkest pixels
        raw = raw.copy()
        raw[raw < 200] = 0
    _assert_same(ds, raw)


def test_signed_stored_values_with_a_rescale() -> None:
    ds = mias_to_mg("mdb219")
    raw = (ds.pixel_array.astype(np.int32) - 2048).astype(np.int16)  # signed, centred on 0
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 2048.0
    ds.WindowCenter, ds.WindowWidth = 2000, 1800
    _assert_same(ds, raw)
    _no_voi(ds)
    ds.PixelPaddingValue = -2048
    raw[:40] = -2048
    _assert_same(ds, raw)


def test_8_bit_stored_values() -> None:
    ds = mias_to_mg("mdb219", to_16bit=False)
    raw = ds.pixel_array
    assert raw.dtype == np.uint8
    ds.WindowCenter, ds.WindowWidth = 120, 160
    _assert_same(ds, raw)


def test_cases_the_table_leaves_to_the_per_pixel_path() -> None:
    ds = mias_to_mg("mdb219")
    raw = ds.pixel_array
    ds.PixelPaddingValue = 0
    ds.PixelPaddingRangeLimit = 4095  # every pixel is padding
    _assert_same(ds, raw, expect_table=False)
    del ds.PixelPaddingValue, ds.PixelPaddingRangeLimit
    _lut(12)(ds)
    ds.VOILUTSequence[0].LUTDescriptor = [3500, 100, 20]  # not a legal entry size
    assert grey_lookup_table(raw, ds) is None
    with pytest.raises(NotImplementedError):  # pydicom's error, on both paths alike
        to_unit_range_per_pixel(raw, ds, for_presentation=True)
    with pytest.raises(NotImplementedError):
        to_unit_range(raw, ds, for_presentation=True)
    assert grey_lookup_table(raw.astype(np.uint32), ds) is None  # 32-bit stored values
    assert grey_lookup_table(raw.astype(np.float32), ds) is None


@pytest.mark.parametrize("name", ["MG-Im-GE_Seno_1_ForPresentation.dcm",
                                  "MG-Im-GE_Seno_2_ForPresentation.dcm",
                                  "MG-Im-Hologic-PropProj.dcm"])
def test_real_vendor_voi_attributes(name: str) -> None:
    """The grey-pipeline attributes of real GE (SIGMOID, three windows, VOI LUT Sequence,
    padding 0) and Hologic (MONOCHROME1, no rescale) headers on real pixels."""
    header = pydicom.dcmread(require_shared(f"vendor-headers/{name}"), stop_before_pixels=True,
                             force=True)
    ds = mias_to_mg("mdb219")
    raw = ds.pixel_array
    bits = int(header.BitsStored)
    if bits < 12:
        raw = raw >> (12 - bits)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "RescaleSlope",
                    "RescaleIntercept", "PhotometricInterpretation", "PixelPaddingValue",
                    "VOILUTSequence", "BitsStored"):
        if keyword in header:
            ds[keyword] = header[keyword]
        elif keyword in ds:
            delattr(ds, keyword)
    _assert_same(ds, raw)
    del ds.WindowCenter, ds.WindowWidth  # the VOI LUT Sequence alone where there is one
    _assert_same(ds, raw)
