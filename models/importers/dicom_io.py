"""Reading mammograms for the importers: DICOM (and PNG/JPEG/TIFF re-distributions) to the
float32 [0, 1] bright-is-dense image the node analyses, with the pixel size and the breast side.

Training must see the grey levels the node sees at inference, so the DICOM grayscale pipeline
here is the node's (``node.analysis.prepare.to_unit_range`` / ``pixel_spacing`` and
``node.dicom_header.laterality_and_view``), re-stated because ``models`` never imports
``node``; ``tests/test_models_import_dicom.py`` checks that both give identical results on the
standard's cases (rescale, window, VOI LUT, MONOCHROME1, For Processing, no VOI) and real
vendor headers. Order: Modality LUT (rescale), VOI (window / VOI LUT sequence), polarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsFloat

import cv2
import numpy as np

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm"}

FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image - For Processing
}
VIEW_CODES = {  # ViewCodeSequence (SNOMED CT / SRT) -> ViewPosition-style abbreviation
    "399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10236": "ML", "399352003": "LM", "R-10230": "LM",
    "399099002": "XCCL", "R-1024A": "XCCL", "399192003": "XCCM", "R-1024B": "XCCM",
    "441555000": "FB", "R-40AAA": "FB", "399196006": "SIO", "R-102D0": "SIO",
}
KNOWN_VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT", "CV"}


@dataclass
class Mammogram:
    """One decoded image. ``spacing_mm`` is None when the file does not say (raster files,
    DICOM without any pixel-spacing attribute): the importer then applies its dataset's
    documented default and says so."""

    image01: np.ndarray
    spacing_mm: float | None
    spacing_source: str
    laterality: str = ""
    view: str = ""
    patient_id: str = ""
    study_uid: str = ""
    sop_uid: str = ""
    accession: str = ""


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICM preamble marker (or a DICOM suffix and parses)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return path.suffix.lower() in (".dcm", ".dicom")


def read_header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def image_shape(path: Path) -> tuple[int, int] | None:
    """(rows, columns) without decoding the pixels; None when unreadable."""
    try:
        if path.suffix.lower() in RASTER_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                return im.size[1], im.size[0]
        ds = read_header(path)
        return int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 - any unreadable file is "no shape"
        return None


def read_mammogram(path: Path) -> Mammogram:
    """Decode ``path`` (DICOM by content, else a raster image). Raises ValueError with the
    reason when the file cannot be used (multi-frame, colour, undecodable)."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        from models.data import read_grey01

        return Mammogram(read_grey01(path), None, "none (raster file)")
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"not readable as DICOM: {exc}") from None
    if "PixelData" not in ds:
        raise ValueError("DICOM without pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("not a greyscale image (SamplesPerPixel != 1)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame image (tomosynthesis) not imported")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder, corrupt data
        raise ValueError(f"pixel data not decodable: {exc}") from None
    image01 = to_unit_range(raw, ds, for_presentation=not is_for_processing(ds))
    spacing, source = pixel_spacing(ds)
    lat, view = laterality_and_view(ds)
    return Mammogram(image01, spacing, source, lat, view,
                     str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "")),
                     str(ds.get("SOPInstanceUID", "")), str(ds.get("AccessionNumber", "") or ""))


def is_for_processing(ds) -> bool:
    if str(ds.get("SOPClassUID", "")) in FOR_PROCESSING_SOP_CLASSES:
        return True
    return str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING"


def _first(value: object) -> float:
    """The first value of a (possibly multi-valued) numeric DICOM attribute."""
    from pydicom.multival import MultiValue

    if isinstance(value, list | tuple | MultiValue):
        value = value[0]
    if isinstance(value, str | bytes | SupportsFloat):
        return float(value)
    raise TypeError(f"not a number: {type(value).__name__}")


def to_unit_range(raw: np.ndarray, ds, *, for_presentation: bool) -> np.ndarray:
    """Stored values -> float32 [0, 1], bright = dense (the node's pipeline, see module doc)."""
    x = raw.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0 or intercept != 0.0:
        x = x * np.float32(slope) + np.float32(intercept)
    mono1 = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1"
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    if not for_presentation:
        if str(ds.get("PixelIntensityRelationship", "")).upper() == "LIN":
            x = np.log1p(np.maximum(x - x.min(), 0.0))
        y = _percentile_stretch(x)
    elif has_lut and "WindowCenter" not in ds:
        y = _voi_lut(raw, x, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        y = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth),
                    str(ds.get("VOILUTFunction", "LINEAR")).upper())
    elif has_lut:
        y = _voi_lut(raw, x, ds)
    else:
        bits = int(ds.get("BitsStored", 16))
        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 1e-6:
            hi = lo + 1.0
        if hi - lo < 0.25 * ((1 << bits) - 1):
            y = (x - lo) / (hi - lo)
        else:
            lo = min(lo, 0.0) if slope == 1.0 and intercept == 0.0 else lo
            y = (x - lo) / max(hi - lo, 1e-6)
    y = y.astype(np.float32, copy=False)
    np.clip(y, 0.0, 1.0, out=y)
    if mono1:
        np.subtract(1.0, y, out=y)
    return y


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return (x - centre) / max(width, 1e-6) + 0.5
    return (x - (centre - 0.5)) / max(width - 1.0, 1e-6) + 0.5  # LINEAR, PS3.3 C.11.2.1.2.1


def _voi_lut(raw: np.ndarray, x: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_voi

    item = ds.VOILUTSequence[0]
    out = apply_voi(raw if "RescaleSlope" not in ds else x, ds, index=0).astype(np.float32)
    nbits = int(item.LUTDescriptor[2])
    if nbits not in range(8, 17):
        nbits = int(math.ceil(math.log2(max(float(out.max()), 1.0) + 1)))
    return out / float((1 << nbits) - 1)


def _percentile_stretch(x: np.ndarray) -> np.ndarray:
    sample = x[:: max(1, x.shape[0] // 512), :: max(1, x.shape[1] // 512)]
    fg = sample[sample > sample.min()]
    if fg.size < 16:
        fg = sample.ravel()
    lo, hi = np.percentile(fg, [0.5, 99.8])
    return (x - lo) / max(float(hi - lo), 1e-6)


def pixel_spacing(ds) -> tuple[float | None, str]:
    """Pixel size at the breast in mm and its source; (None, "none") when the file has none.

    PixelSpacing (already at the patient plane), else ImagerPixelSpacing divided by a sensible
    EstimatedRadiographicMagnificationFactor, else NominalScannedPixelSpacing (film scans).
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if not value:
            continue
        try:
            spacing = float(np.mean([float(v) for v in value]))
        except (TypeError, ValueError):
            continue
        if not 0.0 < spacing < 5.0:
            continue
        source = keyword
        if keyword == "ImagerPixelSpacing":
            try:
                f = float(ds.get("EstimatedRadiographicMagnificationFactor") or 1.0)
            except (TypeError, ValueError):
                f = 1.0
            if 1.0 < f <= 4.0:
                spacing /= f
                source = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        return spacing, source
    return None, "none"


def laterality_and_view(ds) -> tuple[str, str]:
    """("L"/"R"/"B"/"", "CC"/"MLO"/.../"") from ImageLaterality, Laterality, frame anatomy;
    ViewPosition, ViewCodeSequence, PatientOrientation (as the node reads them)."""
    laterality = ""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R", "B"):
            laterality = value
            break
    if not laterality:
        try:
            frame = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
            value = str(frame.FrameLaterality).upper()
            if value in ("L", "R", "B"):
                laterality = value
        except (AttributeError, IndexError, KeyError):
            pass
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view not in KNOWN_VIEWS:
        view = ""
        for item in ds.get("ViewCodeSequence", []) or []:
            code = str(item.get("CodeValue", ""))
            if code in VIEW_CODES:
                view = VIEW_CODES[code]
                break
    orientation = ds.get("PatientOrientation")
    if orientation and (not view or not laterality):
        values = [str(v).strip().upper() for v in
                  (orientation if isinstance(orientation, list)
                   or type(orientation).__name__ == "MultiValue" else [orientation])]
        for v in values:
            if not view and v in KNOWN_VIEWS:
                view = v
            if not laterality and v in ("L", "R") and len(values) == 1:
                laterality = v
    return laterality, view


def breast_box(image01: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the breast: the largest bright component of an Otsu
    threshold on a small copy (film labels and markers are smaller, separate blobs)."""
    rows, cols = image01.shape
    scale = min(1.0, 512.0 / max(rows, cols))
    small = cv2.resize(image01, (max(8, int(cols * scale)), max(8, int(rows * scale))),
                       interpolation=cv2.INTER_AREA)
    u8 = np.clip(cv2.GaussianBlur(small, (0, 0), 2.0) * 255, 0, 255).astype(np.uint8)
    thr, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = (u8 >= max(1, int(0.6 * thr))).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return 0, 0, rows, cols
    i = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[i, :4])
    return (int(y / scale), int(x / scale), min(rows, int(math.ceil((y + h) / scale))),
            min(cols, int(math.ceil((x + w) / scale))))
