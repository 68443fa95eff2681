"""Helpers shared by the builders of every output kind: the analysis checks, header copies,
dates, the algorithm identification."""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import highdicom as hd
from highdicom._standard_utils import does_iod_have_pixel_data
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Type 2 Patient/Study attributes highdicom reads from the first evidence dataset.
TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                  "ReferringPhysicianName")


def pixel_free(ds: Dataset) -> Dataset:
    """A header-only view of ``ds``: shares its elements, never its pixels."""
    return Dataset({elem.tag: elem for elem in ds if elem.keyword not in PIXEL_KEYWORDS})


def evidence_header(ds: Dataset) -> Dataset:
    """A header-only view of ``ds`` (with its file meta) that has every Type 2 identity
    attribute an SR copies from its evidence (written empty where the source lacks it)."""
    out = pixel_free(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in TYPE2_IDENTITY:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def study_identity(ds: Dataset) -> dict[str, Any]:
    """The patient and study attributes a derived SOP instance copies from its first evidence
    image, as ``highdicom.SOPClass`` keyword arguments."""
    return {
        "study_instance_uid": ds.StudyInstanceUID,
        "patient_id": ds.PatientID,
        "patient_name": ds.PatientName,
        "patient_birth_date": ds.PatientBirthDate,
        "patient_sex": ds.PatientSex,
        "accession_number": ds.AccessionNumber,
        "study_id": ds.StudyID,
        "study_date": ds.StudyDate,
        "study_time": ds.StudyTime,
        "referring_physician_name": ds.get("ReferringPhysicianName"),
    }


@functools.lru_cache(maxsize=64)
def has_pixel_data(sop_class_uid: str) -> bool:
    """highdicom's ``does_iod_have_pixel_data`` (a scan of the IOD's module tables, ~2 ms),
    once per SOP class."""
    return bool(does_iod_have_pixel_data(sop_class_uid))


def warm_up(sop_class_uids: Iterable[str]) -> None:
    """Pay the report build's one-time costs before the first study: highdicom's first IOD
    check loads the standard's module tables (a JSON load, ~0.2-0.3 s on 2 cores) and each SOP
    class's scan is cached by :func:`has_pixel_data`. Called by the worker thread as it starts,
    so the first study after a restart is not slower than the others."""
    for uid in sop_class_uids:
        has_pixel_data(uid)


_ACQUISITION_EQUIPMENT = codes.DCM.AcquisitionEquipment


def acquisition_equipment(ds: Dataset) -> hd.ContributingEquipment | None:
    """The Contributing Equipment item highdicom's SOP constructors add for the source image
    ``ds`` (``ContributingEquipment.for_image_acquisition``, with its IOD check cached), or
    None where highdicom adds none (not an image, no Manufacturer, or a value it refuses)."""
    try:
        if not has_pixel_data(str(ds.SOPClassUID)):
            return None
        manufacturer = ds.get("Manufacturer")
        if manufacturer is None or manufacturer == "":
            return None
        when = ds.get("AcquisitionDateTime")
        if when is None:
            date, time = ds.get("AcquisitionDate"), ds.get("AcquisitionTime")
            if isinstance(date, dt.date) and isinstance(time, dt.time):
                when = dt.datetime.combine(ds.AcquisitionDate, ds.AcquisitionTime)
        return hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=_ACQUISITION_EQUIPMENT,
            manufacturer_model_name=ds.get("ManufacturerModelName"),
            software_versions=ds.get("SoftwareVersions"),
            device_serial_number=ds.get("DeviceSerialNumber"),
            institution_name=ds.get("InstitutionName"),
            institutional_department_name=ds.get("InstitutionalDepartmentName"),
            institution_address=ds.get("InstitutionAddress"),
            station_name=ds.get("StationName"),
            contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)",
        )
    except Exception:  # noqa: BLE001 - highdicom drops the item on any error too
        return None


def date_and_time(created: dt.datetime) -> tuple[str, str]:
    """``created`` as DICOM DA and TM values."""
    return created.strftime("%Y%m%d"), created.strftime("%H%M%S")


def stamp_contributions(ds: Dataset, created: dt.datetime) -> None:
    """The node's Contributing Equipment items carry ``created``, not the build's clock."""
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")


def stamp_dates(ds: Dataset, created: dt.datetime, *prefixes: str) -> None:
    """``<prefix>Date`` and ``<prefix>Time`` (e.g. "Content", "InstanceCreation") and the
    node's Contributing Equipment items carry ``created``."""
    for prefix in prefixes:
        set_date_time(ds, created, f"{prefix}Date", f"{prefix}Time")
    stamp_contributions(ds, created)


def set_date_time(ds: Dataset, created: dt.datetime, date_keyword: str, time_keyword: str
                  ) -> None:
    """One DA and one TM attribute from ``created``."""
    date, time = date_and_time(created)
    setattr(ds, date_keyword, date)
    setattr(ds, time_keyword, time)


def set_document_dates(ds: Dataset, created: dt.datetime) -> None:
    """Content and Instance Creation date/time of an SR document (and its contributions)."""
    stamp_dates(ds, created, "Content", "InstanceCreation")


def algorithm_identification(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 from the model card (name and version)."""
    if not model.name or not model.version:
        raise ValueError("the model card must give a name and a version")
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def percent(fraction: float) -> float:
    """A value in [0, 1] as the percentage the SRs write (two decimals)."""
    return round(float(fraction) * 100.0, 2)

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
