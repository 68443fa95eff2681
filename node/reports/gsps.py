"""Grayscale Softcopy Presentation State (GSPS) with the ROI marks, one per analysed image.

Generic viewers (Weasis, most PACS viewers) draw a GSPS on the original image and let the reader
toggle it, which a Secondary Capture cannot offer. Each GSPS has one graphic layer holding, per
calcification cluster, its outline (POLYLINE, image pixels) and a numbered text label
(:func:`node.reports.labels.mark_label`: the cluster score, and P(malignant) with the call only
for a model validated for classification).
The referenced image's VOI (window or VOI LUT) and Modality LUT are carried over, so the image
looks as it does without the marks; MONOCHROME1 images get Presentation LUT Shape INVERSE (PS3.3
C.11.6: a GSPS presents P-values, so the inversion must be explicit).

The GSPS series are per breast (series Laterality is then true for every instance), both with
``series_number``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.analysis.result import Finding, ImageAnalysis, ModelInfo
from node.reports.common import (
    check_common_args,
    check_finding,
    check_series_number,
    laterality_of,
    presentation_image_for,
)
from node.reports.labels import legend, mark_label, site_name
from node.reports.uids import ResultUIDs

log = logging.getLogger(__name__)

GSPS_SERIES_DESCRIPTION = "AI calcification marks (GSPS)"
LAYER_NAME = "AI_CALC_CLUSTERS"
CONTENT_LABEL = "AI_CALC_MARKS"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Yellow (CIELab), visible on both bright and dark tissue.
LAYER_COLOUR = (97.0, -21.0, 94.0)


def label_for(finding: Finding, model: ModelInfo, threshold: float) -> str:
    return mark_label(finding, model, threshold)


def _text_anchor(outline: np.ndarray, columns: int, rows: int) -> tuple[float, float]:
    """Where the label points: the top-most outline point, kept inside the image."""
    top = outline[int(np.argmin(outline[:, 1]))]
    return (float(np.clip(top[0], 0.0, columns)), float(np.clip(top[1], 0.0, rows)))


def build_gsps(
    image: ImageAnalysis,
    sources: Mapping[str, Dataset],
    *,
    model: ModelInfo,
    analysis_key: str,
    created: dt.datetime,
    manufacturer: str,
    series_number: int,
    instance_number: int,
    software_version: str,
    identity: Dataset | None = None,
    threshold: float | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS presenting ``image``'s findings on the image the results reference.

    That image is the analysed one, or its For Presentation counterpart (see
    :func:`node.reports.common.presentation_image_for`); coordinates carry over unchanged.
    ``identity`` (default: the referenced image) gives the patient and study attributes, so that
    every object of a study agrees. Every GSPS carries one text line with the finding site and
    what the marks mean (or that no cluster was found). ``threshold`` is the P(malignant)
    decision threshold (default: the model's), used only by a validated classifier's labels.
    """
    threshold = model.threshold if threshold is None else float(threshold)
    check_common_args(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                      threshold=0.0, software_version=software_version)
    check_series_number("series_number", series_number)
    check_series_number("instance_number", instance_number)
    if not isinstance(image, ImageAnalysis):
        raise TypeError(f"image must be an ImageAnalysis, got {type(image).__name__}")
    if not image.analysed:
        raise ValueError("the image was skipped by the analysis: no presentation state")
    if image.sop_instance_uid not in sources:
        raise ValueError("the analysed image has no source dataset in `sources`")
    for finding in image.findings:
        check_finding(image, finding)
    ref = presentation_image_for(image, sources)
    header = Dataset({e.tag: e for e in ref if e.keyword not in _PIXEL_KEYWORDS})
    header.file_meta = getattr(ref, "file_meta", Dataset())
    for keyword in ("Rows", "Columns", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                    "SeriesInstanceUID"):
        if keyword not in header:
            raise ValueError(f"the referenced image lacks {keyword}")
    if identity is not None and identity.get("StudyInstanceUID") != ref.StudyInstanceUID:
        raise ValueError("identity belongs to another study than the image")

    layer = hd.pr.GraphicLayer(
        layer_name=LAYER_NAME, order=1,
        description=f"Calcification clusters found by {model.name} {model.version}"[:64],
        display_color=hd.color.CIELabColor(*LAYER_COLOUR),
    )
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    uids = ResultUIDs(analysis_key)
    for finding in sorted(image.findings, key=lambda f: f.index):
        outline = np.asarray(finding.outline_xy, dtype=np.float64)
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=outline,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=f"Calcification cluster {finding.index}",
            tracking_uid=uids.tracking(finding.index),
        ))
        texts.append(hd.pr.TextObject(
            text_value=label_for(finding, model, threshold),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=_text_anchor(outline, image.columns, image.rows),
            anchor_point_visible=True,
        ))
    w, h = float(image.columns), float(image.rows)
    site = site_name(image.laterality, image.view)
    note = (f"{site}: {legend(model, threshold)}" if image.findings
            else f"{site}: AI found no calcification cluster")
    texts.append(hd.pr.TextObject(
        text_value=note[:1024], units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(0.02 * w, 0.02 * h, 0.98 * w, 0.06 * h),
    ))
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[header], graphic_layer=layer,
        graphic_objects=graphics or None, text_objects=texts or None,
    )
    presentation_lut = None
    if str(ref.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        presentation_lut = hd.PresentationLUTTransformation(presentation_lut_shape="INVERSE")
    lat = laterality_of(ref) or (image.laterality if image.laterality in ("L", "R") else "")
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=uids.gsps_series(lat),
        series_number=series_number,
        sop_instance_uid=uids.gsps_instance(str(ref.SOPInstanceUID)),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name[:64],
        software_versions=software_version,
        device_serial_number="",
        content_label=CONTENT_LABEL,
        content_description=f"AI calcification marks, {model.name} {model.version}"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        presentation_lut_transformation=presentation_lut,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=GSPS_SERIES_DESCRIPTION,
    )
    gsps.copy_patient_and_study_information(header if identity is None else identity)
    gsps.Laterality = lat or None  # Type 2C in General Series: empty when unknown
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    gsps.PresentationCreationDate, gsps.PresentationCreationTime = date, time
    gsps.InstanceCreationDate, gsps.InstanceCreationTime = date, time
    gsps.SeriesDate, gsps.SeriesTime = date, time
    if "ContentDate" in gsps:
        gsps.ContentDate, gsps.ContentTime = date, time
    for item in gsps.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    log.info("built GSPS: %d ROI(s)", len(image.findings))
    return gsps
