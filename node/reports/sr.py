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

from node.analysis.result import Finding, ImageAnalysis, StudyAnalysis
from node.reports.common import (
    check_analysis,
    check_common_args,
    check_series_number,
    laterality_of,
    presentation_image_for,
    valid_patient_orientation,
)
from node.reports.labels import NOT_VALIDATED, cluster_score, is_malignant
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
CERTAINTY_OF_FINDING = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


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
    if view.Modality in _PROJECTION_MODALITIES:
        spacing = view.get("ImagerPixelSpacing")
        ok_spacing = spacing is not None and len(spacing) == 2
        orientation = valid_patient_orientation(view.get("PatientOrientation"))
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


def _roi_group(
    finding: Finding,
    image: ImageAnalysis,
    reference: Dataset,
    *,
    uids: ResultUIDs,
    algo: hd.sr.AlgorithmIdentification,
    threshold: float,
    validated: bool,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    lat = image.laterality or finding.laterality or laterality_of(reference)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(finding.outline_xy, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=reference.SOPClassUID,
            referenced_sop_instance_uid=reference.SOPInstanceUID,
        ),
    )
    measurements, evaluations = _values(finding, algo, threshold, validated)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking(finding.index),
            identifier=f"Calcification cluster {finding.index}",
        ),
        referenced_region=region,
        finding_type=CALCIFICATION_CLUSTER,
        finding_sites=[_finding_site(lat)],
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    if not validated:
        # TEXT qualitative evaluation (TID 1419 allows TEXT; highdicom writes CODE only)
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=f"Detection only: {NOT_VALIDATED}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _values(finding: Finding, algo: hd.sr.AlgorithmIdentification, threshold: float,
            validated: bool) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The label values of one ROI: Certainty of Finding (the detector's cluster score) always;
    Probability of cancer and Pathology = Malignant/Benign only for a validated classifier."""
    def percent(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=round(float(value) * 100.0, 2),
                                 unit=codes.UCUM.Percent, algorithm_id=algo)

    if not validated:
        return [percent(CERTAINTY_OF_FINDING, cluster_score(finding))], []
    measurements = [percent(PROBABILITY_OF_CANCER, finding.probability)]
    if finding.detection_score is not None:
        measurements.append(percent(CERTAINTY_OF_FINDING, finding.detection_score))
    call = MALIGNANT if is_malignant(finding, threshold) else BENIGN
    return measurements, [hd.sr.QualitativeEvaluation(PATHOLOGY, call)]


def _absent_group(
    image: ImageAnalysis,
    reference: Dataset,
    *,
    uids: ResultUIDs,
    algo: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for an analysed image without ROI: "Calcification Cluster = Absent"."""
    lat = image.laterality or laterality_of(reference)
    label = " ".join(p for p in (lat, image.view) if p) or "image"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_absent(image.sop_instance_uid),
            identifier=f"No calcification cluster found ({label})",
        ),
        finding_type=CALCIFICATION_CLUSTER,
        algorithm_id=algo,
        finding_sites=[_finding_site(lat)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(CALCIFICATION_CLUSTER, ABSENT)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=reference.SOPClassUID,
                referenced_sop_instance_uid=reference.SOPInstanceUID,
            )
        ],
    )


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

    rois: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    absent: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for image, ref in zip(analysed, references, strict=True):
        for finding in sorted(image.findings, key=lambda f: f.index):
            rois.append(_roi_group(finding, image, ref, uids=uids, algo=algo,
                                   threshold=float(threshold),
                                   validated=analysis.model.classification_validated))
        if not image.findings:
            absent.append(_absent_group(image, ref, uids=uids, algo=algo))

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
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=[*rois, *absent],
        referenced_images=[_library_view(ds) for ds in headers],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=headers,
        content=report[0],
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
