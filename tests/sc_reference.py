"""The Grad-CAM Secondary Capture as node.reports.sc built it up to 667f167: highdicom's
``SCImage.from_ref_dataset`` around the full pixel array.

Kept as the reference node.reports.sc is compared with (tests/test_sc_document.py); not used by
the node.
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.reports import codes as C
from node.reports.common import pixel_free, set_date_time, stamp_dates
from node.reports.context import ReportContext
from node.reports.images import AnalysedImage, ReportedStudy
from node.reports.sc import SC_SERIES_DESCRIPTION
from node.reports.sc_content import (
    BENIGN_RGB,
    MALIGNANT_RGB,
    MARK_RGB,
    render_overlay,
)

__all__ = ["BENIGN_RGB", "MALIGNANT_RGB", "MARK_RGB", "SC_SERIES_DESCRIPTION", "build_sc",
           "render_overlay", "sc_objects"]

log = logging.getLogger(__name__)


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
    rgb = render_overlay(analysed, threshold=float(context.threshold), model=model)
    uids = context.uids
    header = pixel_free(source)

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series,
        series_number=context.series.sc,
        sop_instance_uid=uids.sc_instance(analysed.sop_instance_uid),
        instance_number=image.number,
        manufacturer=context.manufacturer,
        # highdicom validates against single-letter enums ("FL" is refused although PS3.3
        # C.7.6.1.1.1 allows it): a placeholder here, the source's own values below.
        patient_orientation=("A", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=context.software_version,
        manufacturer_model_name=model.name[:64],
    )
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
    for image in study.images:
        if image.analysis.display is None or image.analysis.cam is None:
            raise ValueError(f"analysed image #{image.number} has no display image or "
                             "Grad-CAM map")
    return [build_sc(image, study, context) for image in study.images]
