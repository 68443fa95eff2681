"""TID 1500 Measurement Report (Comprehensive SR) for one study analysis."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis
from node.reports.common import (
    check_analysis,
    check_common_args,
    check_series_number,
    laterality_of,
    orientation_of,
    presentation_image_for,
)
from node.reports.labels import NOT_VALIDATED, cluster_score, is_malignant
from node.reports.sr_document import comprehensive_sr
from node.reports.uids import ResultUIDs

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "AI calcification analysis"
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
# Type 2 Patient/Study attributes highdicom reads from the first evidence dataset.
_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                   "ReferringPhysicianName")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer  # (111047, DCM)
CALCIFICATION_CLUSTER = codes.SCT.CalcificationCluster  # (129769006, SCT)
PATHOLOGY = codes.DCM.Pathology  # (111042, DCM)
MALIGNANT = codes.SCT.Malignant  # (21594007, SCT)
BENIGN = codes.SCT.Benign  # (30807003, SCT)
ABSENT = codes.SCT.Absent  # (272519000, SCT)
AREA = codes.SCT.Area  # (42798000, SCT)
COMMENT = codes.DCM.Comment  # (121106, DCM): the label OHIF shows
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: Tracking Identifier prefix that makes OHIF 3.x / @cornerstonejs/adapters rehydrate a group as a
#: PlanarFreehandROI measurement (``MeasurementReport.getAdapterForTrackingIdentifier`` accepts
#: the tool's identifier followed by ":" and anything).
OHIF_PLANAR_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
#: Said once per report when the model card does not validate the model for a Benign/Malignant
#: call (``ModelInfo.classification_validated``); no finding then carries a Pathology item.
NOT_VALIDATED_TEXT = "Model not validated for benign/malignant classification"
CERTAINTY_OF_FINDING = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")


def _header(ds: Dataset) -> Dataset:
    """A header-only view of ``ds`` (shares elements, never pixels) with empty Type 2
    identity attributes added where the source lacks them."""
    out = Dataset({elem.tag: elem for elem in ds if elem.keyword not in _PIXEL_KEYWORDS})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in _TYPE2_IDENTITY:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


# Image SOP classes highdicom's Image Library cannot code a modality for (it raises): the entry is
# built as the closest class it knows and the reference is set back to the real class after.
_LIBRARY_STAND_IN = {
    "1.2.840.10008.5.1.4.1.1.13.1.4": "1.2.840.10008.5.1.4.1.1.1.2",  # BPX -> MG Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5": "1.2.840.10008.5.1.4.1.1.1.2.1",  # BPX -> MG Processing
}


def _known_to_highdicom(sop_class_uid: str) -> bool:
    try:
        from highdicom.sr.templates import _get_coded_modality
    except ImportError:  # pragma: no cover - another highdicom layout: assume it knows
        return True
    try:
        _get_coded_modality(sop_class_uid)
    except ValueError:
        return False
    return True


def _restore_library_classes(item: Dataset, real: dict[str, str]) -> None:
    """Set the Image Library references built on a stand-in class back to the real class."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "IMAGE":
            ref = child.ReferencedSOPSequence[0]
            if str(ref.ReferencedSOPInstanceUID) in real:
                ref.ReferencedSOPClassUID = real[str(ref.ReferencedSOPInstanceUID)]
        _restore_library_classes(child, real)


def _library_view(ds: Dataset) -> Dataset:
    """What highdicom's Image Library entry needs from ``ds``.

    For projection modalities highdicom's TID 1603 descriptors require a two-valued
    PatientOrientation and ImagerPixelSpacing. Sources without them (e.g. digitised film stored
    as Secondary Capture) get an entry without those descriptors rather than invented values.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "Modality",
                    "PatientOrientation", "ImagerPixelSpacing", "FrameOfReferenceUID"):
        if keyword in ds and ds[keyword].value not in (None, ""):
            setattr(view, keyword, ds[keyword].value)
    view.Modality = str(ds.get("Modality", "") or "OT")
    sop_class = str(view.get("SOPClassUID", ""))
    if not _known_to_highdicom(sop_class):
        view.SOPClassUID = _LIBRARY_STAND_IN.get(sop_class, "1.2.840.10008.5.1.4.1.1.7")
    if view.Modality in _PROJECTION_MODALITIES:
        spacing = view.get("ImagerPixelSpacing")
        ok_spacing = spacing is not None and len(spacing) == 2
        orientation = orientation_of(ds)
        if not (ok_spacing and orientation is not None):
            view.Modality = "OT"  # only changes which descriptors highdicom emits
    return view


def _laterality_code(lat: str) -> hd.sr.CodedConcept | None:
    return {"L": codes.SCT.Left, "R": codes.SCT.Right}.get(lat)


def _finding_site(lat: str) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(anatomic_location=codes.SCT.Breast, laterality=_laterality_code(lat))


def algorithm_identification(analysis: StudyAnalysis) -> hd.sr.AlgorithmIdentification:
    """TID 4019 from the model card (name and version)."""
    model = analysis.model
    if not model.name or not model.version:
        raise ValueError("the model card must give a name and a version")
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


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


def _roi_group(
    finding: Finding,
    image: ImageAnalysis,
    reference: Dataset,
    *,
    uids: ResultUIDs,
    algo: hd.sr.AlgorithmIdentification,
    model: ModelInfo,
    threshold: float,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 Measurement Group of one calcification cluster.

    Laid out the way Cornerstone3D writes (and so OHIF reads back) a freehand ROI: the outline is
    a POLYLINE SCOORD that the Area and score NUMs (Probability of cancer or Certainty of
    Finding) are INFERRED FROM,
    selected from the (For Presentation) image; the Tracking Identifier names the
    PlanarFreehandROI adapter; the label is a Comment (121106, DCM) TEXT item. A TID 1410 group
    (outline at group level, NUM without SCOORD) is not rehydratable in OHIF 3.x: its adapter
    looks for the SCOORD under the first NUM of the group
    (``MeasurementReport.getSetupMeasurementData``).
    """
    lat = image.laterality or finding.laterality or laterality_of(reference)
    view = image.view or finding.view
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
    area = outline_area_mm2(finding, image)
    if area is not None:  # first: OHIF shows the first NUM's value as the outline's area
        measurements.append(hd.sr.Measurement(
            name=AREA, value=area, unit=codes.UCUM.SquareMillimeter, algorithm_id=algo,
            referenced_coordinates=[outline]))
    values, evaluations = _values(finding, algo, threshold, model.classification_validated,
                                  outline)
    measurements.extend(values)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking(finding.index),
            identifier=tracking_identifier_text(finding.index),
        ),
        finding_type=CALCIFICATION_CLUSTER,
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
        name=COMMENT,
        value=finding_label(finding, lat, view, model, threshold),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    return group


def _values(finding: Finding, algo: hd.sr.AlgorithmIdentification, threshold: float,
            validated: bool, outline: hd.sr.CoordinatesForMeasurement
            ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The label values of one ROI: Certainty of Finding (the detector's cluster score) always;
    Probability of cancer and Pathology = Malignant/Benign only for a validated classifier.
    Each NUM is inferred from the outline (OHIF reads the SCOORD under the first NUM)."""
    def percent(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=round(float(value) * 100.0, 2),
                                 unit=codes.UCUM.Percent, algorithm_id=algo,
                                 referenced_coordinates=[outline])

    if not validated:
        return [percent(CERTAINTY_OF_FINDING, cluster_score(finding))], []
    measurements = [percent(PROBABILITY_OF_CANCER, finding.probability)]
    if finding.detection_score is not None:
        measurements.append(percent(CERTAINTY_OF_FINDING, finding.detection_score))
    call = MALIGNANT if is_malignant(finding, threshold) else BENIGN
    return measurements, [hd.sr.QualitativeEvaluation(PATHOLOGY, call)]


def outline_area_mm2(finding: Finding, image: ImageAnalysis) -> float | None:
    """Area enclosed by the outline in mm2 (shoelace formula), or None when the pixel spacing
    was a fallback (an area in invented millimetres would mislead)."""
    if image.spacing_source == "fallback" or not image.pixel_spacing_mm > 0:
        return None
    pts = np.asarray(finding.outline_xy, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    pixels = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return round(pixels * float(image.pixel_spacing_mm) ** 2, 3)


def _absent_item(image: ImageAnalysis, reference: Dataset) -> hd.sr.CodeContentItem:
    """"Calcification Cluster = Absent" for an analysed image without ROI, inferred from that
    image (TID 1500 Qualitative Evaluations, row 13; the image reference is an extension).

    Not a measurement group: a group without coordinates makes OHIF 3.x's SR loader fail
    (``_checkIfCanAddMeasurementsToDisplaySet`` reads ``coords[0]``) and no finding shows.
    """
    item = hd.sr.CodeContentItem(
        name=CALCIFICATION_CLUSTER,
        value=ABSENT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = [hd.sr.ImageContentItem(
        name=codes.DCM.SourceOfMeasurement,
        referenced_sop_class_uid=reference.SOPClassUID,
        referenced_sop_instance_uid=reference.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )]
    return item


def _placeholder_group(uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(0), identifier="none"))


def _not_validated_item() -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=COMMENT,
        value=NOT_VALIDATED_TEXT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _qualitative_evaluations(items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = list(items)
    return container


def _set_dates(ds: Dataset, created: dt.datetime) -> None:
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    ds.ContentDate = ds.InstanceCreationDate = date
    ds.ContentTime = ds.InstanceCreationTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")


def build_sr(
    analysis: StudyAnalysis,
    sources: Mapping[str, Dataset],
    *,
    analysis_key: str,
    created: dt.datetime,
    manufacturer: str,
    series_number: int,
    threshold: float,
    software_version: str,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Comprehensive SR of one study analysis.

    ``sources`` maps SOP Instance UID to the study's source datasets (headers suffice: pixels are
    never read). Findings on a For Processing image are referenced on the matching For
    Presentation image when the study has one (same laterality, view, Rows and Columns).
    Sources must carry SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, Rows and
    Columns; missing Type 2 patient/study attributes are written empty.
    """
    check_common_args(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                      threshold=threshold, software_version=software_version)
    check_series_number("series_number", series_number)
    analysed = check_analysis(analysis, sources)
    uids = ResultUIDs(analysis_key)
    algo = algorithm_identification(analysis)

    references: list[Dataset] = []  # one per analysed image, in analysis order
    library: dict[str, Dataset] = {}
    for image in analysed:
        ref = presentation_image_for(image, sources)
        references.append(ref)
        library.setdefault(str(ref.SOPInstanceUID), ref)

    rois: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    absent: list[hd.sr.CodeContentItem] = []
    for image, ref in zip(analysed, references, strict=True):
        for finding in sorted(image.findings, key=lambda f: f.index):
            rois.append(_roi_group(finding, image, ref, uids=uids, algo=algo,
                                   model=analysis.model, threshold=float(threshold)))
        if not image.findings:
            absent.append(_absent_item(image, ref))

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.observer_device,
                name=analysis.model.name[:64],
                manufacturer_name=manufacturer,
                model_name=f"{analysis.model.name} {analysis.model.version}"[:64],
            ),
        )
    )
    headers = [_header(ds) for ds in library.values()]
    views = [_library_view(ds) for ds in headers]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.SCT.Mammography,
        # highdicom needs one group; a study without ROI then loses the (empty) container
        imaging_measurements=rois or [_placeholder_group(uids)],
        referenced_images=views,
    )
    root = report[0]
    stand_ins = {str(h.SOPInstanceUID): str(h.SOPClassUID) for h, v in zip(headers, views,
                                                                          strict=True)
                 if str(v.SOPClassUID) != str(h.SOPClassUID)}
    if stand_ins:
        _restore_library_classes(root, stand_ins)
    if not rois:
        root.ContentSequence = [item for item in root.ContentSequence
                                if item.ConceptNameCodeSequence[0].CodeValue
                                != codes.DCM.ImagingMeasurements.value]
    evaluations = [*absent] + ([] if analysis.model.classification_validated
                                else [_not_validated_item()])
    if evaluations:
        root.ContentSequence.append(_qualitative_evaluations(evaluations))
    sr = comprehensive_sr(  # highdicom's ComprehensiveSR, built once (sr_document)
        evidence=headers,
        content=root,
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=software_version,
        manufacturer_model_name=analysis.model.name[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        previous_versions=list(previous_versions) or None,
    )
    _set_dates(sr, created)
    log.info("built TID 1500 SR: %d ROI(s), %d image(s) without ROI, %d library image(s)",
             len(rois), len(absent), len(library))
    return sr
