"""The TID 1500 content tree as node.reports.sr_content built it up to 667f167: with highdicom's
template objects (MeasurementReport, MeasurementsAndQualitativeEvaluations, ...).

Kept as the reference the byte-emitting builder is compared with (tests/test_sr_content_bytes.py).
Not used by the node.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.analysis.result import Finding, ModelInfo
from node.reports import codes as C
from node.reports.common import algorithm_identification, evidence_header, percent
from node.reports.context import ReportContext
from node.reports.images import AnalysedImage, ReportedStudy
from node.reports.labels import cluster_score, is_malignant
from node.reports.sr_content import (
    NOT_VALIDATED_TEXT,
    MeasurementReportContent,
    _finding_site,
    _library_view,
    finding_label,
    outline_area_mm2,
    tracking_identifier_text,
)
from node.reports.uids import ResultUIDs

RT = hd.sr.RelationshipTypeValues


def _restore_library_classes(item: Dataset, real: dict[str, str]) -> None:
    """Set the Image Library references built on a stand-in class back to the real class."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "IMAGE":
            ref = child.ReferencedSOPSequence[0]
            if str(ref.ReferencedSOPInstanceUID) in real:
                ref.ReferencedSOPClassUID = real[str(ref.ReferencedSOPInstanceUID)]
        _restore_library_classes(child, real)


def _roi_group(
    finding: Finding,
    image: AnalysedImage,
    *,
    uids: ResultUIDs,
    algo: hd.sr.AlgorithmIdentification,
    model: ModelInfo,
    threshold: float,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
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
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=reference.SOPClassUID,
        referenced_sop_instance_uid=reference.SOPInstanceUID,
    )
    outline = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(finding.outline_xy, dtype=np.float64),
        source_image=source,
    )
    measurements = []
    area = outline_area_mm2(finding, analysed)
    if area is not None:  # first: OHIF shows the first NUM's value as the outline's area
        measurements.append(hd.sr.Measurement(
            name=C.AREA, value=area, unit=C.SQUARE_MILLIMETER, algorithm_id=algo,
            referenced_coordinates=[outline]))
    values, evaluations = _values(finding, algo, threshold, model.classification_validated,
                                  outline)
    measurements.extend(values)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking(finding.index),
            identifier=tracking_identifier_text(finding.index),
        ),
        finding_type=C.CALCIFICATION_CLUSTER,
        finding_sites=[_finding_site(lat)],
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=reference.SOPClassUID,
                referenced_sop_instance_uid=reference.SOPInstanceUID,
            )
        ],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=C.COMMENT,
        value=finding_label(finding, lat, view, model, threshold),
        relationship_type=RT.CONTAINS,
    ))
    return group


def _values(finding: Finding, algo: hd.sr.AlgorithmIdentification, threshold: float,
            validated: bool, outline: hd.sr.CoordinatesForMeasurement
            ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The label values of one ROI: Certainty of Finding (the detector's cluster score) always;
    Probability of cancer and Pathology = Malignant/Benign only for a validated classifier.
    Each NUM is inferred from the outline (OHIF reads the SCOORD under the first NUM)."""
    def as_percent(name: C.Concept, value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=percent(value), unit=C.PERCENT,
                                 algorithm_id=algo, referenced_coordinates=[outline])

    if not validated:
        return [as_percent(C.CERTAINTY_OF_FINDING, cluster_score(finding))], []
    measurements = [as_percent(C.PROBABILITY_OF_CANCER, finding.probability)]
    if finding.detection_score is not None:
        measurements.append(as_percent(C.CERTAINTY_OF_FINDING, finding.detection_score))
    call = C.MALIGNANT if is_malignant(finding, threshold) else C.BENIGN
    return measurements, [hd.sr.QualitativeEvaluation(C.PATHOLOGY, call)]


def _absent_item(image: AnalysedImage) -> hd.sr.CodeContentItem:
    """"Calcification Cluster = Absent" for an analysed image without ROI, inferred from that
    image (TID 1500 Qualitative Evaluations, row 13; the image reference is an extension).

    Not a measurement group: a group without coordinates makes OHIF 3.x's SR loader fail
    (``_checkIfCanAddMeasurementsToDisplaySet`` reads ``coords[0]``) and no finding shows.
    """
    item = hd.sr.CodeContentItem(
        name=C.CALCIFICATION_CLUSTER,
        value=C.ABSENT,
        relationship_type=RT.CONTAINS,
    )
    item.ContentSequence = DicomSequence([hd.sr.ImageContentItem(
        name=C.SOURCE_OF_MEASUREMENT,
        referenced_sop_class_uid=image.reference.SOPClassUID,
        referenced_sop_instance_uid=image.reference.SOPInstanceUID,
        relationship_type=RT.INFERRED_FROM,
    )])
    return item


def _placeholder_group(uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(0), identifier="none"))


def _not_validated_item() -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=C.COMMENT, value=NOT_VALIDATED_TEXT,
                                 relationship_type=RT.CONTAINS)


def _qualitative_evaluations(items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=C.QUALITATIVE_EVALUATIONS,
                                           relationship_type=RT.CONTAINS)
    container.ContentSequence = DicomSequence(items)
    return container


def _observation_context(study: ReportedStudy, context: ReportContext,
                         uids: ResultUIDs) -> hd.sr.ObservationContext:
    model = study.model
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=C.DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.observer_device,
                name=model.name[:64],
                manufacturer_name=context.manufacturer,
                model_name=f"{model.name} {model.version}"[:64],
            ),
        )
    )


def measurement_report(study: ReportedStudy, context: ReportContext) -> MeasurementReportContent:
    """The TID 1500 root item of ``study`` and its evidence (headers of the referenced images,
    Image Library order)."""
    uids = context.uids
    algo = algorithm_identification(study.model)
    threshold = float(context.threshold)
    rois: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    absent: list[hd.sr.CodeContentItem] = []
    for image in study.images:
        for finding in sorted(image.analysis.findings, key=lambda f: f.index):
            rois.append(_roi_group(finding, image, uids=uids, algo=algo, model=study.model,
                                   threshold=threshold))
        if not image.analysis.findings:
            absent.append(_absent_item(image))

    library = study.library()
    headers = [evidence_header(image.reference) for image in library]
    views = [_library_view(h, image) for h, image in zip(headers, library, strict=True)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(study, context, uids),
        procedure_reported=C.MAMMOGRAPHY,
        # highdicom needs one group; a study without ROI then loses the (empty) container
        imaging_measurements=rois or [_placeholder_group(uids)],
        referenced_images=views,
    )
    root = report[0]
    stand_ins = {str(h.SOPInstanceUID): str(h.SOPClassUID)
                 for h, v in zip(headers, views, strict=True)
                 if str(v.SOPClassUID) != str(h.SOPClassUID)}
    if stand_ins:
        _restore_library_classes(root, stand_ins)
    if not rois:
        root.ContentSequence = [item for item in root.ContentSequence
                                if item.ConceptNameCodeSequence[0].CodeValue
                                != C.IMAGING_MEASUREMENTS.value]
    evaluations = [*absent] + ([] if study.model.classification_validated
                                else [_not_validated_item()])
    if evaluations:
        root.ContentSequence.append(_qualitative_evaluations(evaluations))
    return MeasurementReportContent(root, headers, len(rois), len(absent))
