"""Helpers shared by the SR and SC builders: argument checks and source-image lookup."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping

from pydicom.dataset import Dataset
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation

from node.analysis.result import Finding, ImageAnalysis, StudyAnalysis
from node.dicom_header import is_for_processing, laterality_and_view, patient_orientation

FOR_PRESENTATION_MG = {
    DigitalMammographyXRayImageStorageForPresentation,
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray - For Presentation
}

def check_common_args(
    *,
    analysis_key: str,
    created: dt.datetime,
    manufacturer: str,
    threshold: float,
    software_version: str,
) -> None:
    if not isinstance(analysis_key, str) or not analysis_key.strip():
        raise ValueError("analysis_key must be a non-empty string")
    if not isinstance(created, dt.datetime):
        raise TypeError(f"created must be a datetime.datetime, got {type(created).__name__}")
    if not isinstance(manufacturer, str) or not manufacturer.strip():
        raise ValueError("manufacturer must be a non-empty string")
    if len(manufacturer) > 64:
        raise ValueError("manufacturer must be at most 64 characters (LO)")
    if not isinstance(software_version, str) or not software_version.strip():
        raise ValueError("software_version must be a non-empty string")
    if len(software_version) > 64:
        raise ValueError("software_version must be at most 64 characters (LO)")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not (0.0 <= float(threshold) <= 1.0) or math.isnan(threshold):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def check_series_number(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= 2**31 - 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def check_finding(image: ImageAnalysis, finding: Finding) -> None:
    """Raise ``ValueError`` naming the problem when a finding breaks the seam's contract."""
    where = f"finding {finding.index}"
    if finding.sop_instance_uid != image.sop_instance_uid:
        raise ValueError(f"{where} refers to another image than the one it is listed under")
    if not isinstance(finding.index, int) or finding.index < 1:
        raise ValueError(f"{where}: index must be a positive integer")
    p = finding.probability
    if not isinstance(p, int | float) or math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: probability must be in [0, 1], got {p!r}")
    pts = finding.outline_xy
    if len(pts) < 4:
        raise ValueError(f"{where}: outline needs at least 3 distinct points plus the closing one")
    if tuple(pts[0]) != tuple(pts[-1]):
        raise ValueError(f"{where}: outline must be closed (first point == last point)")
    for x, y in (*pts, finding.centre_xy):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{where}: coordinates must be finite")
        if not (0.0 <= x <= image.columns and 0.0 <= y <= image.rows):
            raise ValueError(
                f"{where}: point ({x:.1f}, {y:.1f}) lies outside the "
                f"{image.columns}x{image.rows} image"
            )


def check_analysis(analysis: StudyAnalysis, sources: Mapping[str, Dataset]) -> list[ImageAnalysis]:
    """Validate the analysis against the sources; return the analysed images."""
    if not isinstance(analysis, StudyAnalysis):
        raise TypeError(f"analysis must be a StudyAnalysis, got {type(analysis).__name__}")
    if not isinstance(sources, Mapping):
        raise TypeError("sources must be a mapping of SOP Instance UID to pydicom Dataset")
    analysed = [im for im in analysis.images if im.analysed]
    if not analysed:
        raise ValueError("the analysis has no analysed image: there is no result to report")
    indices: set[int] = set()
    for n, image in enumerate(analysed, start=1):
        src = sources.get(image.sop_instance_uid)
        if src is None:
            raise ValueError(f"analysed image #{n} has no source dataset in `sources`")
        if not isinstance(src, Dataset):
            raise TypeError(f"source of analysed image #{n} is not a pydicom Dataset")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
            if keyword not in src:
                raise ValueError(f"source of analysed image #{n} lacks {keyword}")
        if src.StudyInstanceUID != analysis.study_instance_uid:
            raise ValueError(f"source of analysed image #{n} belongs to another study")
        if (int(src.Rows), int(src.Columns)) != (image.rows, image.columns):
            raise ValueError(
                f"analysed image #{n}: Rows/Columns {image.rows}x{image.columns} differ from "
                f"the source's {src.Rows}x{src.Columns}"
            )
        for finding in image.findings:
            check_finding(image, finding)
            if finding.index in indices:
                raise ValueError(f"finding index {finding.index} is used twice")
            indices.add(finding.index)
    return analysed


def laterality_of(ds: Dataset) -> str:
    """"L", "R" or "" (bilateral or unknown) from the header."""
    lat = laterality_and_view(ds)[0]
    return lat if lat in ("L", "R") else ""


def view_of(ds: Dataset) -> str:
    return laterality_and_view(ds)[1]


def presentation_image_for(
    image: ImageAnalysis, sources: Mapping[str, Dataset]
) -> Dataset:
    """The dataset whose SOP instance the results should reference for ``image``.

    The analysed instance itself, unless it is For Processing and the study has a For
    Presentation image of the same laterality and view with the same Rows/Columns (then the
    coordinates carry over unchanged). Among several candidates, one that names the analysed
    image in its SourceImageSequence wins, else the lowest SOP Instance UID (deterministic).
    """
    src = sources[image.sop_instance_uid]
    if not is_for_processing(src):
        return src
    lat = laterality_of(src) or image.laterality
    view = view_of(src) or image.view
    candidates = []
    for uid, ds in sources.items():
        if uid == image.sop_instance_uid or "SOPClassUID" not in ds:
            continue
        if is_for_processing(ds) or str(ds.SOPClassUID) not in FOR_PRESENTATION_MG:
            continue
        if ds.get("StudyInstanceUID") != src.StudyInstanceUID:
            continue
        if (ds.get("Rows"), ds.get("Columns")) != (src.Rows, src.Columns):
            continue
        if not lat or laterality_of(ds) != lat or not view or view_of(ds) != view:
            continue
        names_source = any(
            item.get("ReferencedSOPInstanceUID") == image.sop_instance_uid
            for item in ds.get("SourceImageSequence", [])
        )
        candidates.append((not names_source, str(ds.SOPInstanceUID), ds))
    if not candidates:
        return src
    candidates.sort(key=lambda c: (c[0], c[1]))
    return candidates[0][2]


def orientation_of(ds: Dataset) -> list[str] | None:
    """The source's two Patient Orientation values when they are legal (PS3.3 C.7.6.1.1.1,
    combined values such as ``A\\FR`` included), else None.

    Digitised-film archives put view names ("CC") there; those must not be copied on. The
    values are copied as they are: highdicom's enumeration takes single letters only, so the
    builders set the attribute themselves (see :mod:`node.reports.sc`)."""
    value = patient_orientation(ds)
    return list(value) if value is not None else None
