"""What a GSPS presents: the ROI marks (graphic layer, outlines, numbered labels, the site line)
and the referenced image's own Modality LUT and VOI, so that it looks as without the marks.

:mod:`node.reports.gsps` wraps them in the presentation state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.analysis.result import ModelInfo
from node.reports.images import AnalysedImage
from node.reports.labels import legend, mark_label
from node.reports.uids import ResultUIDs

log = logging.getLogger(__name__)

LAYER_NAME = "AI_CALC_CLUSTERS"
# Yellow (CIELab), visible on both bright and dark tissue.
LAYER_COLOUR = (97.0, -21.0, 94.0)


def _numbers(value: object) -> list[float]:
    """A DS/IS value (one number or several) as floats."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [float(value)]  # type: ignore[arg-type]
    return [float(v) for v in value]


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


def graphic_layer(model: ModelInfo) -> hd.pr.GraphicLayer:
    return hd.pr.GraphicLayer(
        layer_name=LAYER_NAME, order=1,
        description=f"Calcification clusters found by {model.name} {model.version}"[:64],
        display_color=hd.color.CIELabColor(*LAYER_COLOUR),
    )


def marks(image: AnalysedImage, referenced: Dataset, layer: hd.pr.GraphicLayer, *,
          model: ModelInfo, threshold: float, uids: ResultUIDs) -> hd.pr.GraphicAnnotation:
    """Per calcification cluster its outline (POLYLINE, image pixels) and numbered label
    (:func:`node.reports.labels.mark_label`), and one line with the finding site and what the
    marks mean (or that no cluster was found)."""
    analysed = image.analysis
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    for finding in sorted(analysed.findings, key=lambda f: f.index):
        outline = np.asarray(finding.outline_xy, dtype=np.float64)
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=outline,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=f"Calcification cluster {finding.index}",
            tracking_uid=uids.tracking(finding.index),
        ))
        texts.append(hd.pr.TextObject(
            text_value=mark_label(finding, model, threshold),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=_text_anchor(outline, analysed.columns, analysed.rows),
            anchor_point_visible=True,
        ))
    w, h = float(analysed.columns), float(analysed.rows)
    note = (f"{image.site}: {legend(model, threshold)}" if analysed.findings
            else f"{image.site}: AI found no calcification cluster")
    texts.append(hd.pr.TextObject(
        text_value=note[:1024], units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(0.02 * w, 0.02 * h, 0.98 * w, 0.06 * h),
    ))
    return hd.pr.GraphicAnnotation(
        referenced_images=[referenced], graphic_layer=layer,
        graphic_objects=graphics or None, text_objects=texts or None,
    )
