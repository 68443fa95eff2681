"""Grayscale Softcopy Presentation State (GSPS) with the ROI marks, one per analysed image
(output kind ``gsps``).

Generic viewers (Weasis, most PACS viewers) draw a GSPS on the original image and let the reader
toggle it, which a Secondary Capture cannot offer. Each GSPS has one graphic layer holding, per
calcification cluster, its outline and a numbered text label (:mod:`node.reports.gsps_content`).
The referenced image's VOI (window or VOI LUT) and Modality LUT are carried over, so the image
looks as it does without the marks; MONOCHROME1 images get Presentation LUT Shape INVERSE (PS3.3
C.11.6: a GSPS presents P-values, so the inversion must be explicit).

The GSPS series are per breast (series Laterality is then true for every instance), both with
the ``gsps`` series number.
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node.reports.common import pixel_free, stamp_dates
from node.reports.context import ReportContext
from node.reports.gsps_content import (
    LAYER_NAME,
    graphic_layer,
    marks,
    modality_transformation,
    voi_transformations,
)
from node.reports.images import AnalysedImage, ReportedStudy

__all__ = ["CONTENT_LABEL", "GSPS_SERIES_DESCRIPTION", "LAYER_NAME", "build_gsps",
           "gsps_objects"]

log = logging.getLogger(__name__)

GSPS_SERIES_DESCRIPTION = "AI calcification marks (GSPS)"
CONTENT_LABEL = "AI_CALC_MARKS"


def _referenced_header(ref: Dataset) -> Dataset:
    header = pixel_free(ref)
    header.file_meta = getattr(ref, "file_meta", FileMetaDataset())
    if str(header.get("NumberOfFrames", "") or "") == "1":
        # One frame (e.g. a Breast Projection X-Ray image): presented as a single-frame
        # image; highdicom would otherwise ask for per-frame references.
        del header.NumberOfFrames
    for keyword in ("Rows", "Columns", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                    "SeriesInstanceUID"):
        if keyword not in header:
            raise ValueError(f"the referenced image lacks {keyword}")
    return header


def build_gsps(image: AnalysedImage, study: ReportedStudy, context: ReportContext
               ) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS presenting ``image``'s findings on the image the results reference (the
    analysed one or its For Presentation counterpart; coordinates carry over unchanged).
    Patient and study attributes come from the study's identity, so that every object of a
    study agrees. The context's threshold is used only by a validated classifier's labels."""
    ref, model = image.reference, study.model
    header = _referenced_header(ref)
    uids = context.uids
    layer = graphic_layer(model)
    annotation = marks(image, header, layer, model=model, threshold=float(context.threshold),
                       uids=uids)
    presentation_lut = None
    if str(ref.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        presentation_lut = hd.PresentationLUTTransformation(presentation_lut_shape="INVERSE")
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=uids.gsps_series(image.laterality),
        series_number=context.series.gsps,
        sop_instance_uid=uids.gsps_instance(image.reference_uid),
        instance_number=image.number,
        manufacturer=context.manufacturer,
        manufacturer_model_name=model.name[:64],
        software_versions=context.software_version,
        device_serial_number="",
        content_label=CONTENT_LABEL,
        content_description=f"AI calcification marks, {model.name} {model.version}"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        presentation_lut_transformation=presentation_lut,
        modality_lut_transformation=modality_transformation(ref),
        voi_lut_transformations=voi_transformations(ref),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=GSPS_SERIES_DESCRIPTION,
    )
    gsps.copy_patient_and_study_information(study.identity)
    gsps.Laterality = image.laterality or None  # Type 2C in General Series: empty when unknown
    stamp_dates(gsps, context.created, "PresentationCreation", "InstanceCreation", "Series",
                *(("Content",) if "ContentDate" in gsps else ()))
    # VOI LUT Function LINEAR is the default (absent means the same) and OHIF 3.13's image
    # loader misreads any value of it (cornerstonejs/cornerstone3D#2844): leave it out.
    for item in gsps.get("SoftcopyVOILUTSequence", []):
        if str(item.get("VOILUTFunction", "")).upper() == "LINEAR":
            del item.VOILUTFunction
    log.info("built GSPS: %d ROI(s)", len(image.analysis.findings))
    return gsps


def gsps_objects(study: ReportedStudy, context: ReportContext) -> list[Dataset]:
    """The ``gsps`` kind (:class:`node.reports.context.ReportBuilder`): one GSPS per analysed
    image."""
    return [build_gsps(image, study, context) for image in study.images]
