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


def _numbers(value: object) -> list[float]:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [float(value)]  # type: ignore[arg-type]
    return [float(v) for v in value]  # type: ignore[union-attr]


def _lut_data(item: Dataset) -> np.ndarray:
    """LUT Data as uint16, whether it was read as OW (bytes) or US (a list of numbers)."""
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        bits = int(item.LUTDescriptor[2])
        dtype = np.uint8 if bits <= 8 and len(data) == int(item.LUTDescriptor[0] or 65536) \
            else np.dtype("<u2")
        return np.frombuffer(data, dtype=dtype).astype(np.uint16)
    return np.asarray(_numbers(data), dtype=np.uint16)


def _shared(ref: Dataset, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the Shared Functional Groups (enhanced images such as
    Breast Projection X-Ray keep rescale and VOI there), or None."""
    try:
        return ref.SharedFunctionalGroupsSequence[0][sequence][0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def modality_transformation(ref: Dataset) -> hd.ModalityLUTTransformation | None:
    """Rescale slope / intercept of the image (top level or shared functional groups)."""
    source = ref if "RescaleSlope" in ref else _shared(ref, "PixelValueTransformationSequence")
    if source is None or "RescaleSlope" not in source:
        return None
    return hd.ModalityLUTTransformation(
        rescale_intercept=float(source.get("RescaleIntercept", 0) or 0),
        rescale_slope=float(source.RescaleSlope or 1),
        rescale_type=str(source.get("RescaleType", "") or "US"))


def voi_transformations(ref: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The referenced image's VOI as the GSPS's Softcopy VOI LUT, so that it looks as without
    the marks: every window (the first is the default) with its VOI LUT Function (LINEAR,
    LINEAR_EXACT, SIGMOID), else its VOI LUT Sequence, else those of its shared functional
    groups (Frame VOI LUT), else None (no VOI: none is written).
    highdicom's own copy refuses images that
    carry both (GE sends both: the window wins, as it does in the analysis) and LUT Data read
    as US, so it is done here."""
    if "WindowCenter" not in ref and "VOILUTSequence" not in ref:
        frame_voi = _shared(ref, "FrameVOILUTSequence")
        if frame_voi is not None:
            ref = frame_voi
    if "WindowCenter" in ref and "WindowWidth" in ref:
        centres, widths = _numbers(ref.WindowCenter), _numbers(ref.WindowWidth)
        n = min(len(centres), len(widths))
        explanation = ref.get("WindowCenterWidthExplanation")
        explanations = None
        if explanation:
            values = [str(e) for e in (explanation if not isinstance(explanation, str)
                                       else [explanation])]
            explanations = values[:n] if len(values) >= n else None
        function = str(ref.get("VOILUTFunction", "") or "").upper() or None
        return [hd.pr.SoftcopyVOILUTTransformation(
            window_center=centres[:n] if n > 1 else centres[0],
            window_width=widths[:n] if n > 1 else widths[0],
            window_explanation=explanations if n > 1 or explanations is None
            else explanations[0],
            voi_lut_function=function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
            else None)]
    luts = []
    for item in ref.get("VOILUTSequence", []) or []:
        try:
            data = _lut_data(item)
            bits = int(item.LUTDescriptor[2])
            if bits != 16:  # a Softcopy VOI LUT has 8 or 16 output bits: written as 16
                data = np.round(data.astype(np.float64) * 65535.0 / ((1 << bits) - 1)
                                ).astype(np.uint16)
            lut = hd.VOILUT(first_mapped_value=int(item.LUTDescriptor[1]), lut_data=data,
                            lut_explanation=item.get("LUTExplanation"))
            luts.append(lut)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            log.warning("VOI LUT not carried into the GSPS: %s", exc)
    return [hd.pr.SoftcopyVOILUTTransformation(voi_luts=luts)] if luts else None


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
    if str(header.get("NumberOfFrames", "") or "") == "1":
        # One frame (e.g. a Breast Projection X-Ray image): presented as a single-frame
        # image; highdicom would otherwise ask for per-frame references.
        del header.NumberOfFrames
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
    voi = voi_transformations(ref)
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
        modality_lut_transformation=modality_transformation(ref),
        voi_lut_transformations=voi,
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
    # VOI LUT Function LINEAR is the default (absent means the same) and OHIF 3.13's image
    # loader misreads any value of it (cornerstonejs/cornerstone3D#2844): leave it out.
    for item in gsps.get("SoftcopyVOILUTSequence", []):
        if str(item.get("VOILUTFunction", "")).upper() == "LINEAR":
            del item.VOILUTFunction
    log.info("built GSPS: %d ROI(s)", len(image.findings))
    return gsps
