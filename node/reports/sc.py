"""Grad-CAM Secondary Capture (RGB), one per analysed image (output kind ``sc``).

The pixels are :func:`node.reports.sc_content.render_overlay`; this module makes the SOP
instance.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator

import highdicom as hd
from highdicom.enum import PatientSexValues
from highdicom.valuerep import _check_long_string, _check_specific_character_set
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import DA, TM

from node.reports import codes as C
from node.reports.common import acquisition_equipment, pixel_free, set_date_time, stamp_dates
from node.reports.context import ReportContext
from node.reports.images import AnalysedImage, ReportedStudy
from node.reports.sc_content import (
    BENIGN_RGB,
    MALIGNANT_RGB,
    MARK_RGB,
    pixel_buffer,
    render_overlay,
)

__all__ = ["BENIGN_RGB", "MALIGNANT_RGB", "MARK_RGB", "SC_SERIES_DESCRIPTION", "build_sc",
           "iter_sc_objects", "render_overlay", "sc_objects"]

log = logging.getLogger(__name__)

SC_SERIES_DESCRIPTION = "AI Grad-CAM"
_HIGHDICOM_IMPLEMENTATION = UID("1.2.826.0.1.3680043.9.7433.1.1")  # highdicom's, as it writes


def _sc_instance(header: Dataset, *, series_instance_uid: str, series_number: int,
                 sop_instance_uid: str, instance_number: int, manufacturer: str,
                 contributing_equipment: list[hd.ContributingEquipment] | None,
                 series_description: str, software_versions: str,
                 manufacturer_model_name: str, rows: int, columns: int) -> hd.sc.SCImage:
    """The RGB 8-bit Secondary Capture (without Pixel Data) that highdicom's
    ``SCImage.from_ref_dataset(header, ..., coordinate_system="PATIENT",
    patient_orientation=("A", "F"), transfer_syntax_uid=ExplicitVRLittleEndian)`` makes for
    these arguments: ``SOPClass.__init__`` and ``SCImage.__init__`` step by step, without the
    IOD table scans whose answers are fixed for this SOP class (ContentDate/ContentTime are in
    the SC IOD) and without encoding a pixel array. tests/test_sc_document.py compares the
    result with highdicom's, element by element and byte for byte."""
    if series_number < 1 or instance_number < 1:
        raise ValueError("series and instance numbers must be positive integers")
    for value in (series_description, manufacturer, manufacturer_model_name, software_versions):
        _check_long_string(value)
    sc = hd.sc.SCImage.__new__(hd.sc.SCImage)
    Dataset.__init__(sc)
    sc.preamble = b"\x00" * 128
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    meta.MediaStorageSOPClassUID = UID(SecondaryCaptureImageStorage)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = _HIGHDICOM_IMPLEMENTATION
    meta.ImplementationVersionName = f"highdicom{hd.__version__}"
    sc.file_meta = meta
    fp = DicomBytesIO()  # highdicom passes a BytesIO: the same bytes
    write_file_meta_info(fp, meta, enforce_standard=True)
    meta.FileMetaInformationGroupLength = len(fp.getvalue())
    sc.PatientID = getattr(header, "PatientID", None)
    sc.PatientName = getattr(header, "PatientName", None)
    sc.PatientBirthDate = DA(getattr(header, "PatientBirthDate", None))
    sex = getattr(header, "PatientSex", None)
    sc.PatientSex = PatientSexValues(sex).value if sex is not None and sex != "" else sex
    sc.StudyInstanceUID = str(header.StudyInstanceUID)
    sc.AccessionNumber = getattr(header, "AccessionNumber", None)
    sc.StudyID = getattr(header, "StudyID", None)
    study_date = getattr(header, "StudyDate", None)
    study_time = getattr(header, "StudyTime", None)
    sc.StudyDate = DA(study_date) if study_date is not None else None
    sc.StudyTime = TM(study_time) if study_time is not None else None
    sc.ReferringPhysicianName = getattr(header, "ReferringPhysicianName", None)
    sc.SeriesInstanceUID = str(series_instance_uid)
    sc.SeriesNumber = series_number
    sc.Modality = "OT"
    sc.SeriesDescription = series_description
    sc.Manufacturer = manufacturer
    sc.ManufacturerModelName = manufacturer_model_name
    sc.SoftwareVersions = software_versions
    sc.SOPInstanceUID = str(sop_instance_uid)
    sc.SOPClassUID = str(SecondaryCaptureImageStorage)
    sc.InstanceNumber = instance_number
    now = dt.datetime.now()
    sc.InstanceCreationDate = DA(now.date())
    sc.InstanceCreationTime = TM(now.time())
    charset = header.get("SpecificCharacterSet")
    if charset is not None:
        sc.SpecificCharacterSet = _check_specific_character_set(charset)
    sc.ContentDate = DA(now.date())
    sc.ContentTime = TM(now.time())
    sc._add_contributing_equipment(contributing_equipment)
    sc.PatientOrientation = ["A", "F"]
    sc.ConversionType = "DI"
    sc.DateOfSecondaryCapture = DA(now.date())
    sc.TimeOfSecondaryCapture = TM(now.time())
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.Rows = rows
    sc.Columns = columns
    sc.BitsAllocated = 8
    sc.HighBit = 7
    sc.BitsStored = 8
    sc.PixelRepresentation = 0
    sc.PhotometricInterpretation = "RGB"
    sc.SamplesPerPixel = 3
    sc.PlanarConfiguration = 0
    return sc


def build_sc(image: AnalysedImage, study: ReportedStudy, context: ReportContext) -> hd.sc.SCImage:
    """The RGB Grad-CAM Secondary Capture of one analysed image (new series, same study).

    Derived from the analysed instance (``image.source``: For Processing pixels stay For
    Processing). Patient and study attributes come from the study's identity, so that every
    object of a study agrees even when the sources don't. PatientOrientation is copied as it is
    when it is a legal two-valued value (any PS3.3 C.7.6.1.1.1 form, combined oblique values such
    as ``A\\FR`` included; else written empty, Type 2); laterality goes to ImageLaterality (the
    series holds both breasts); PixelSpacing is never written.
    """
    analysed, source, model = image.analysis, image.source, study.model
    pixels = pixel_buffer(analysed)
    rgb = render_overlay(analysed, threshold=float(context.threshold), model=model, into=pixels)
    uids = context.uids
    header = pixel_free(source)
    acquisition = acquisition_equipment(header)

    # What highdicom's SCImage.from_ref_dataset(header, rgb, ...) makes (_sc_instance), with
    # Pixel Data the rendering's own buffer: a memoryview, which pydicom keeps as it is and
    # writes unchanged (highdicom flattens and copies the whole array twice).
    sc = _sc_instance(
        header,
        series_instance_uid=uids.sc_series,
        series_number=context.series.sc,
        sop_instance_uid=uids.sc_instance(analysed.sop_instance_uid),
        instance_number=image.number,
        manufacturer=context.manufacturer,
        contributing_equipment=[acquisition] if acquisition is not None else None,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=context.software_version,
        manufacturer_model_name=model.name[:64],
        rows=int(rgb.shape[0]),
        columns=int(rgb.shape[1]),
    )
    sc.PixelData = memoryview(pixels)  # type: ignore[assignment]
    # The source's orientation as it is (e.g. A\FR for a left MLO); Type 2: empty rather than
    # a guess when the source has none or an illegal one.
    orientation = image.source_orientation
    sc.PatientOrientation = list(orientation) if orientation is not None else None  # type: ignore[assignment]
    # The SC series holds both breasts, so laterality is per image: ImageLaterality, and no
    # series Laterality (dciodvfy: Laterality must be absent when ImageLaterality is sent).
    # Unknown laterality: empty series Laterality (Type 2C, "unknown").
    if image.source_laterality:
        sc.ImageLaterality = image.source_laterality
    else:
        sc.Laterality = None  # type: ignore[assignment]
    # Identity: all Patient and Study module attributes of the study's identity image.
    sc.copy_patient_and_study_information(study.identity)
    # OT, never the source's MG: a mammography hanging protocol must not take the overlay for a
    # mammogram, and a PACS that routes MG back to the node must not feed it its own result.
    sc.Modality = "OT"
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.BodyPartExamined = "BREAST"
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    src_item = Dataset()
    src_item.ReferencedSOPClassUID = source.SOPClassUID
    src_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    src_item.PurposeOfReferenceCodeSequence = [C.SOURCE_IMAGE_FOR_PROCESSING]
    sc.SourceImageSequence = [src_item]
    n = len(analysed.findings)
    values = ("P(malignant) and benign/malignant call" if model.classification_validated
              else "cluster score (not validated for benign/malignant classification)")
    sc.DerivationDescription = (
        f"{analysed.cam_source} heat map ({model.name} {model.version}) blended over a display "
        "rendering;"
        f" {n} numbered calcification cluster outline(s) with {values} burned in"
    )[:1024]
    sc.ImageComments = (
        "NOT FOR DIAGNOSTIC USE. AI calcification analysis visualisation; "
        "the machine-readable result is the TID 1500 SR of this study."
    )
    stamp_dates(sc, context.created, "Content", "InstanceCreation", "Series")
    set_date_time(sc, context.created, "DateOfSecondaryCapture", "TimeOfSecondaryCapture")
    if "PixelSpacing" in sc:
        del sc.PixelSpacing
    log.info("built Grad-CAM SC: %dx%d, %d ROI(s)", rgb.shape[1], rgb.shape[0], n)
    return sc


def sc_objects(study: ReportedStudy, context: ReportContext) -> list[Dataset]:
    """The ``sc`` kind (:class:`node.reports.context.ReportBuilder`): one SC per analysed
    image, each of which must carry ``display`` and ``cam``."""
    return list(iter_sc_objects(study, context))


def iter_sc_objects(study: ReportedStudy, context: ReportContext) -> Iterator[Dataset]:
    """:func:`sc_objects` one SC at a time (every image is checked before the first is
    built): the caller writes each ~10 MB SC while the next one is rendered."""
    for image in study.images:
        if image.analysis.display is None or image.analysis.cam is None:
            raise ValueError(f"analysed image #{image.number} has no display image or "
                             "Grad-CAM map")
    for image in study.images:
        yield build_sc(image, study, context)
