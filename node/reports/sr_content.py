"""The content tree of the TID 1500 Measurement Report: one ROI group per calcification cluster,
"Calcification Cluster = Absent" per image without one, and the Image Library.

:func:`measurement_report` returns the root item and the evidence headers; :mod:`node.reports.sr`
wraps them in the Comprehensive SR document. The tree is the one highdicom's templates
(``MeasurementReport``, ``MeasurementsAndQualitativeEvaluations``, ``ImageLibrary``, ...) make
for these arguments, item for item, but written straight to its encoded bytes
(:mod:`node.reports.sr_encode`): the root's Content Sequence is one raw element that pydicom
writes as it is. tests/tid1500_reference.py keeps the highdicom-template builder;
tests/test_sr_content_bytes.py checks that both give the same dataset and the same file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from node.analysis.result import Finding, ImageAnalysis, ModelInfo
from node.reports import codes as C
from node.reports import sr_encode as E
from node.reports.common import (
    algorithm_identification,
    evidence_header,
    has_pixel_data,
    percent,
)
from node.reports.context import ReportContext
from node.reports.images import AnalysedImage, ReportedStudy
from node.reports.labels import NOT_VALIDATED, cluster_score, is_malignant

RT = hd.sr.RelationshipTypeValues

_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
#: Tracking Identifier prefix that makes OHIF 3.x / @cornerstonejs/adapters rehydrate a group as a
#: PlanarFreehandROI measurement (``MeasurementReport.getAdapterForTrackingIdentifier`` accepts
#: the tool's identifier followed by ":" and anything).
OHIF_PLANAR_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
#: Said once per report when the model card does not validate the model for a Benign/Malignant
#: call (``ModelInfo.classification_validated``); no finding then carries a Pathology item.
NOT_VALIDATED_TEXT = "Model not validated for benign/malignant classification"

# Image SOP classes highdicom's Image Library cannot code a modality for (it raises): the entry is
# built as the closest class it knows and the reference is set back to the real class after.
_LIBRARY_STAND_IN: dict[str, str] = {
    BreastProjectionXRayImageStorageForPresentation:
        DigitalMammographyXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing:
        DigitalMammographyXRayImageStorageForProcessing,
}


@dataclass(frozen=True)
class MeasurementReportContent:
    """The root content item, the evidence headers (one per referenced image) and counts."""

    root: Dataset
    evidence: list[Dataset]
    rois: int
    absent: int
    #: SOP Instance UIDs the tree references (IMAGE items), for the evidence check
    references: frozenset[str] = field(default_factory=frozenset)


def _known_to_highdicom(sop_class_uid: str) -> bool:
    try:
        _coded_modality(sop_class_uid)
    except ValueError:
        return False
    return True


def _library_view(header: Dataset, image: AnalysedImage) -> Dataset:
    """What highdicom's Image Library entry needs from ``header``.

    For projection modalities highdicom's TID 1603 descriptors require a two-valued
    PatientOrientation and ImagerPixelSpacing. Sources without them (e.g. digitised film stored
    as Secondary Capture) get an entry without those descriptors rather than invented values.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "Modality",
                    "PatientOrientation", "ImagerPixelSpacing", "FrameOfReferenceUID"):
        if keyword in header and header[keyword].value not in (None, ""):
            setattr(view, keyword, header[keyword].value)
    view.Modality = str(header.get("Modality", "") or "OT")
    sop_class = str(view.get("SOPClassUID", ""))
    if not _known_to_highdicom(sop_class):
        view.SOPClassUID = _LIBRARY_STAND_IN.get(sop_class, SecondaryCaptureImageStorage)
    if view.Modality in _PROJECTION_MODALITIES:
        spacing = view.get("ImagerPixelSpacing")
        ok_spacing = spacing is not None and len(spacing) == 2
        if not (ok_spacing and image.orientation is not None):
            view.Modality = "OT"  # only changes which descriptors highdicom emits
    return view


def _finding_site(lat: str) -> hd.sr.FindingSite:
    side = {"L": C.LEFT, "R": C.RIGHT}.get(lat)
    return hd.sr.FindingSite(anatomic_location=C.BREAST, laterality=side)


def tracking_identifier_text(index: int) -> str:
    """The Tracking Identifier (112039, DCM) of finding ``index``: OHIF's adapter prefix, then
    the human-readable name every other reader shows."""
    return f"{OHIF_PLANAR_FREEHAND}:Calcification cluster {index}"


def finding_label(finding: Finding, lat: str, view: str, model: ModelInfo,
                  threshold: float) -> str:
    """The one-line label of a finding (viewers show it beside the outline, OHIF in its
    Measurements panel): cluster number, breast and view, then P(malignant) and the
    benign/malignant call when the model card validates the model for it, else the detector's
    cluster score and the words "not validated for benign/malignant classification"."""
    where = " ".join(p for p in (lat, view) if p)
    head = f"Cluster {finding.index}{' ' + where if where else ''}: "
    if model.classification_validated:
        call = "malignant" if is_malignant(finding, threshold) else "benign"
        return f"{head}P(malignant) {float(finding.probability) * 100:.0f} %, {call}"
    return f"{head}cluster score {cluster_score(finding) * 100:.0f} % (detection only, " \
           f"{NOT_VALIDATED})"


def outline_area_mm2(finding: Finding, image: ImageAnalysis) -> float | None:
    """Area enclosed by the outline in mm2 (shoelace formula), or None when the pixel spacing
    was a fallback (an area in invented millimetres would mislead)."""
    if image.spacing_source == "fallback" or not image.pixel_spacing_mm > 0:
        return None
    pts = np.asarray(finding.outline_xy, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    pixels = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return round(pixels * float(image.pixel_spacing_mm) ** 2, 3)


# --------------------------------------------------------------------------- encoded pieces
# Relationship types (PS3.3 C.17.3.2.4)
_CONTAINS = "CONTAINS"
_HAS_OBS_CONTEXT = "HAS OBS CONTEXT"
_HAS_ACQ_CONTEXT = "HAS ACQ CONTEXT"
_HAS_CONCEPT_MOD = "HAS CONCEPT MOD"
_INFERRED_FROM = "INFERRED FROM"
_SELECTED_FROM = "SELECTED FROM"
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
_PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
_MODALITY = codes.DCM.Modality
_FRAME_OF_REFERENCE_UID = codes.DCM.FrameOfReferenceUID
_PIXEL_DATA_ROWS = codes.DCM.PixelDataRows
_PIXEL_DATA_COLUMNS = codes.DCM.PixelDataColumns
_ORIENTATION_ROW = codes.DCM.PatientOrientationRow
_ORIENTATION_COLUMN = codes.DCM.PatientOrientationColumn
_HORIZONTAL_SPACING = codes.DCM.HorizontalPixelSpacing
_VERTICAL_SPACING = codes.DCM.VerticalPixelSpacing
_MILLIMETER = codes.UCUM.Millimeter
_IMAGE_LIBRARY = codes.DCM.ImageLibrary
_IMAGE_LIBRARY_GROUP = codes.DCM.ImageLibraryGroup
_PROCEDURE_REPORTED = codes.DCM.ProcedureReported
_TITLE = codes.cid7021.ImagingMeasurementReport
_MEASUREMENT_GROUP = hd.sr.CodedConcept("125007", "DCM", "Measurement Group")
_PROTO_UID = "1.2.3"
_CROSS_SECTIONAL = ("CT", "MR", "PT")


def _name(concept: C.Concept, enc: E.Encodings) -> bytes:
    """Concept Name Code Sequence of ``concept`` (pydicom-encoded once)."""
    return _code_sequence(E.CONCEPT_NAME_CODE_SEQUENCE, concept, enc)


_CODE_SEQUENCES: dict[tuple[int, int, E.Encodings], tuple[C.Concept, bytes]] = {}


def _code_sequence(tag: int, concept: C.Concept, enc: E.Encodings) -> bytes:
    """A one-item code sequence (``tag``) of ``concept``, pydicom-encoded once. Looked up by
    the concept object first (the node's concepts are module constants; the entry keeps the
    object alive, so its id is not reused), then by its code."""
    hit = _CODE_SEQUENCES.get((tag, id(concept), enc))
    if hit is not None and hit[0] is concept:
        return hit[1]
    key = (tag, concept.value, concept.scheme_designator, concept.meaning,
           concept.scheme_version)

    def make() -> tuple[Dataset, int]:
        ds = Dataset()
        coded = (concept if isinstance(concept, hd.sr.CodedConcept)
                 else hd.sr.CodedConcept.from_code(concept))
        ds.add_new(tag, "SQ", [coded])
        return ds, tag

    out = E.frozen_element(key, make, enc)
    if len(_CODE_SEQUENCES) < 4096:
        _CODE_SEQUENCES[(tag, id(concept), enc)] = (concept, out)
    return out


def _value(concept: C.Concept, enc: E.Encodings) -> bytes:
    return _code_sequence(E.CONCEPT_CODE_SEQUENCE, concept, enc)


def _unit(concept: C.Concept, enc: E.Encodings) -> bytes:
    return _code_sequence(E.MEASUREMENT_UNITS_CODE_SEQUENCE, concept, enc)


def _proto_name(key: str, make: object, enc: E.Encodings) -> bytes:
    """The concept name highdicom gives the item ``make()`` returns (its own constants)."""
    return E.concept_name(make, key, enc)  # type: ignore[arg-type]


def _tracking_names(enc: E.Encodings) -> tuple[bytes, bytes]:
    def proto(n: int) -> Dataset:
        return hd.sr.TrackingIdentifier(uid=_PROTO_UID, identifier="x")[n]

    return (_proto_name("tracking-id", lambda: proto(0), enc),
            _proto_name("tracking-uid", lambda: proto(1), enc))


def _observer_items(study: ReportedStudy, context: ReportContext, enc: E.Encodings
                    ) -> list[bytes]:
    """TID 1002 Observer Context of the node's device (highdicom's ``ObserverContext`` with
    ``DeviceObserverIdentifyingAttributes``: observer type, UID, name, manufacturer, model)."""
    model = study.model

    def proto() -> hd.sr.ObserverContext:
        return hd.sr.ObserverContext(
            observer_type=C.DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_PROTO_UID, name="n", manufacturer_name="m", model_name="mm"))

    observer_type = E.frozen("observer-type", lambda: proto()[:1], enc)
    names = [_proto_name(f"observer-{n}", lambda n=n: proto()[n], enc)
             for n in range(1, 5)]
    return [
        observer_type,
        E.uidref_item(_HAS_OBS_CONTEXT, names[0], context.uids.observer_device),
        E.text_item(_HAS_OBS_CONTEXT, names[1], model.name[:64], enc),
        E.text_item(_HAS_OBS_CONTEXT, names[2], context.manufacturer, enc),
        E.text_item(_HAS_OBS_CONTEXT, names[3], f"{model.name} {model.version}"[:64], enc),
    ]


def _algorithm(model: ModelInfo, enc: E.Encodings) -> bytes:
    return E.frozen(("algorithm", model.name, model.version),
                    lambda: algorithm_identification(model), enc)


def _num(name: C.Concept, value: float, unit: C.Concept, children: Sequence[bytes],
         enc: E.Encodings, relationship: str = _CONTAINS) -> bytes:
    return E.num_item(relationship, _name(name, enc), value, _unit(unit, enc), children)


def _outline(finding: Finding, reference: Dataset, enc: E.Encodings) -> bytes:
    """The POLYLINE SCOORD (highdicom's ``CoordinatesForMeasurement`` on a
    ``SourceImageForRegion``)."""
    selected = E.image_item(_SELECTED_FROM, _name(_SOURCE, enc), reference.SOPClassUID,
                            reference.SOPInstanceUID)
    data = np.asarray(finding.outline_xy, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] != 2:
        raise ValueError("Graphic data of a SCOORD must be multiple (column, row) pairs in "
                         "two-dimensional image coordinate space.")
    return E.scoord_item(_INFERRED_FROM, _name(_SOURCE, enc), "POLYLINE", data, [selected])


def _roi_group(finding: Finding, image: AnalysedImage, *, context: ReportContext,
               model: ModelInfo, threshold: float, enc: E.Encodings) -> bytes:
    """TID 1501 Measurement Group of one calcification cluster.

    Laid out the way Cornerstone3D writes (and so OHIF reads back) a freehand ROI: the outline is
    a POLYLINE SCOORD that the Area and score NUMs (Probability of cancer or Certainty of
    Finding) are INFERRED FROM, selected from the (For Presentation) image; the Tracking
    Identifier names the PlanarFreehandROI adapter; the label is a Comment (121106, DCM) TEXT
    item. A TID 1410 group (outline at group level, NUM without SCOORD) is not rehydratable in
    OHIF 3.x: its adapter looks for the SCOORD under the first NUM of the group
    (``MeasurementReport.getSetupMeasurementData``).
    """
    analysed, reference = image.analysis, image.reference
    lat = analysed.laterality or finding.laterality or image.header_laterality
    view = analysed.view or finding.view
    algo = _algorithm(model, enc)
    outline = _outline(finding, reference, enc)
    under_num = [outline, algo]
    tracking_id, tracking_uid = _tracking_names(enc)
    items = [
        E.text_item(_HAS_OBS_CONTEXT, tracking_id, tracking_identifier_text(finding.index), enc),
        E.uidref_item(_HAS_OBS_CONTEXT, tracking_uid, context.uids.tracking(finding.index)),
        E.frozen("finding-type", lambda: [hd.sr.CodeContentItem(
            name=_FINDING, value=C.CALCIFICATION_CLUSTER,
            relationship_type=RT.CONTAINS)], enc),
        E.frozen(("finding-site", lat if lat in ("L", "R") else None),
                 lambda: [_finding_site(lat)], enc),
        algo,
    ]
    area = outline_area_mm2(finding, analysed)
    if area is not None:  # first: OHIF shows the first NUM's value as the outline's area
        items.append(_num(C.AREA, area, C.SQUARE_MILLIMETER, under_num, enc))
    if not model.classification_validated:
        items.append(_num(C.CERTAINTY_OF_FINDING, percent(cluster_score(finding)), C.PERCENT,
                          under_num, enc))
    else:
        items.append(_num(C.PROBABILITY_OF_CANCER, percent(finding.probability), C.PERCENT,
                          under_num, enc))
        if finding.detection_score is not None:
            items.append(_num(C.CERTAINTY_OF_FINDING, percent(finding.detection_score),
                              C.PERCENT, under_num, enc))
        call = C.MALIGNANT if is_malignant(finding, threshold) else C.BENIGN
        items.append(E.frozen(("pathology", call.value, call.scheme_designator),
                              lambda: hd.sr.QualitativeEvaluation(C.PATHOLOGY, call), enc))
    items.append(E.image_item(_CONTAINS, _name(C.SOURCE_OF_MEASUREMENT, enc),
                              reference.SOPClassUID, reference.SOPInstanceUID))
    items.append(E.text_item(_CONTAINS, _name(C.COMMENT, enc),
                             finding_label(finding, lat, view, model, threshold), enc))
    return E.container_item(_CONTAINS, _name(_MEASUREMENT_GROUP, enc),
                            items, template_id="1501")


def _absent_item(image: AnalysedImage, enc: E.Encodings) -> bytes:
    """"Calcification Cluster = Absent" for an analysed image without ROI, inferred from that
    image (TID 1500 Qualitative Evaluations, row 13; the image reference is an extension).

    Not a measurement group: a group without coordinates makes OHIF 3.x's SR loader fail
    (``_checkIfCanAddMeasurementsToDisplaySet`` reads ``coords[0]``) and no finding shows.
    """
    source = E.image_item(_INFERRED_FROM, _name(C.SOURCE_OF_MEASUREMENT, enc),
                          image.reference.SOPClassUID, image.reference.SOPInstanceUID)
    return E.code_item(_CONTAINS, _name(C.CALCIFICATION_CLUSTER, enc), _value(C.ABSENT, enc),
                       [source])


def _not_validated_item() -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=C.COMMENT, value=NOT_VALIDATED_TEXT,
                                 relationship_type=RT.CONTAINS)


@functools.lru_cache(maxsize=64)
def _coded_modality(sop_class_uid: str) -> C.Concept:
    """highdicom's coded modality of an image SOP class (raises ``ValueError`` for one it
    does not know), one object per class."""
    from highdicom.sr.templates import _get_coded_modality

    return _get_coded_modality(sop_class_uid)


def _library_entry(header: Dataset, view: Dataset, enc: E.Encodings
                   ) -> tuple[tuple[object, ...], bytes]:
    """(group key, IMAGE item) of one Image Library entry: highdicom's ``ImageLibrary`` entry
    with its TID 1602/1603 descriptors for ``view`` (:func:`_library_view`), referencing the
    image's real SOP class."""
    modality = _coded_modality(str(view.SOPClassUID))
    if not has_pixel_data(str(view.SOPClassUID)):
        raise ValueError(f"Dataset with SOPInstanceUID {view.SOPInstanceUID}"
                         "is not a DICOM image")
    if view.Modality in _CROSS_SECTIONAL:  # never from _library_view's views: highdicom's
        items = [E.encode_items(hd.sr.ImageLibraryEntryDescriptors(view), enc)]
    else:
        items = [E.code_item(_HAS_ACQ_CONTEXT, _name(_MODALITY, enc),
                             _value(modality, enc))]
        if "FrameOfReferenceUID" in view:
            items.append(E.uidref_item(_HAS_ACQ_CONTEXT,
                                       _name(_FRAME_OF_REFERENCE_UID, enc),
                                       view.FrameOfReferenceUID))
        items.append(_num(_PIXEL_DATA_ROWS, view.Rows, _PIXELS, (), enc,
                          _HAS_ACQ_CONTEXT))
        items.append(_num(_PIXEL_DATA_COLUMNS, view.Columns, _PIXELS, (), enc,
                          _HAS_ACQ_CONTEXT))
        if view.Modality in _PROJECTION_MODALITIES:
            orientation, spacing = view.PatientOrientation, view.ImagerPixelSpacing
            items += [
                E.text_item(_HAS_ACQ_CONTEXT, _name(_ORIENTATION_ROW, enc),
                            orientation[0], enc),
                E.text_item(_HAS_ACQ_CONTEXT, _name(_ORIENTATION_COLUMN, enc),
                            orientation[1], enc),
                _num(_HORIZONTAL_SPACING, spacing[1], _MILLIMETER, (),
                     enc, _HAS_ACQ_CONTEXT),
                _num(_VERTICAL_SPACING, spacing[0], _MILLIMETER, (),
                     enc, _HAS_ACQ_CONTEXT),
            ]
    key = (modality.value, modality.scheme_designator, modality.meaning,
           *((view.FrameOfReferenceUID,) if "FrameOfReferenceUID" in view else ()))
    return key, E.image_item(_CONTAINS, _name(_SOURCE, enc), header.SOPClassUID,
                             header.SOPInstanceUID, items)


def _image_library(headers: Sequence[Dataset], views: Sequence[Dataset], enc: E.Encodings
                   ) -> bytes:
    """TID 1600 Image Library: one group per (modality, frame of reference), in first-seen
    order (highdicom's ``ImageLibrary``)."""
    groups: dict[tuple[object, ...], list[bytes]] = {}
    for header, view in zip(headers, views, strict=True):
        key, entry = _library_entry(header, view, enc)
        groups.setdefault(key, []).append(entry)
    group_name = _name(_IMAGE_LIBRARY_GROUP, enc)
    return E.container_item(_CONTAINS, _name(_IMAGE_LIBRARY, enc),
                            [E.container_item(_CONTAINS, group_name, entries)
                             for entries in groups.values()])


def _root() -> Dataset:
    """The root CONTAINER's own attributes (its Content Sequence is set by the caller)."""
    return hd.sr.ContainerContentItem(name=_TITLE,
                                      template_id="1500")


def measurement_report(study: ReportedStudy, context: ReportContext) -> MeasurementReportContent:
    """The TID 1500 root item of ``study`` and its evidence (headers of the referenced images,
    Image Library order)."""
    threshold = float(context.threshold)
    model = study.model
    library = study.library()
    headers = [evidence_header(image.reference) for image in library]
    if not headers:
        raise ValueError("Argument 'datasets' must contain at least one item.")
    enc = E.encodings_of(headers[0].get("SpecificCharacterSet"))
    algorithm_identification(model)  # the model card's name and version are checked first
    rois: list[bytes] = []
    absent: list[bytes] = []
    references: set[str] = set()
    for image in study.images:
        for finding in sorted(image.analysis.findings, key=lambda f: f.index):
            rois.append(_roi_group(finding, image, context=context, model=model,
                                   threshold=threshold, enc=enc))
        if not image.analysis.findings:
            absent.append(_absent_item(image, enc))
        references.add(str(image.reference.SOPInstanceUID))
    views = [_library_view(h, image) for h, image in zip(headers, library, strict=True)]
    references.update(str(h.SOPInstanceUID) for h in headers)

    items = [E.frozen("language", lambda: hd.sr.LanguageOfContentItemAndDescendants(
        hd.sr.templates.DEFAULT_LANGUAGE), enc)]
    items += _observer_items(study, context, enc)
    items.append(E.frozen(("procedure", C.MAMMOGRAPHY.value), lambda: [hd.sr.CodeContentItem(
        name=_PROCEDURE_REPORTED, value=C.MAMMOGRAPHY,
        relationship_type=RT.HAS_CONCEPT_MOD)], enc))
    items.append(_image_library(headers, views, enc))
    if rois:
        items.append(E.container_item(_CONTAINS, _name(C.IMAGING_MEASUREMENTS, enc), rois))
    evaluations = [*absent]
    if not model.classification_validated:
        evaluations.append(E.frozen("not-validated", lambda: [_not_validated_item()], enc))
    if evaluations:
        items.append(E.container_item(_CONTAINS, _name(C.QUALITATIVE_EVALUATIONS, enc),
                                      evaluations))
    root = _root()
    root[E.CONTENT_SEQUENCE] = E.raw_sequence(E.CONTENT_SEQUENCE, items)
    return MeasurementReportContent(root, headers, len(rois), len(absent),
                                    frozenset(references))
