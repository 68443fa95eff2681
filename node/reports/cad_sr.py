"""Mammography CAD SR (PS3.16 TID 4000, SOP class 1.2.840.10008.5.1.4.1.1.88.50) for one study.

Mammography workstations (SecurView, Sectra, ...) draw CAD marks from this object. highdicom has
no class for it, and its content-tree classes can express neither an IMAGE item without a concept
name (the TID 4020 Image Library entry) nor by-reference relationships (SCOORD "SELECTED FROM" an
Image Library entry). So this module builds the leaves with highdicom's content items (they encode
values, codes, units and coordinates correctly), and assembles the tree with :class:`_Node`, a
small builder that also numbers the by-reference targets (ReferencedContentItemIdentifier).

The tree (``dsrdump`` view; one Individual Impression per calcification cluster)::

    CONTAINER Mammography CAD Report  [TID 4000, DCMR]
      has concept mod  CODE Language of Content Item and Descendants = English (United States)
      contains  CONTAINER Image Library
        contains  IMAGE (each analysed image, For Presentation when the study has it)  [TID 4020]
          has acq context  CODE Image Laterality, CODE Image View, TEXT Patient Orientation
                           Row/Column, DATE Study Date, NUM Horizontal/Vertical Pixel Spacing (um)
      contains  CODE CAD Processing and Findings Summary = All algorithms succeeded; with(out)
                findings  [TID 4001]
        inferred from  CONTAINER Individual Impression/Recommendation  [TID 4003]
          has concept mod  CODE Rendering Intent = Presentation Required | Optional
          contains  CODE Single Image Finding = Calcification Cluster  [TID 4006]
            has concept mod  CODE Rendering Intent (same value)
            has properties   TEXT Algorithm Name, TEXT Algorithm Version, TEXT Algorithm
                             Parameters  [TID 4019]
            has properties   TEXT Tracking Identifier, UIDREF Tracking Unique Identifier
            has properties   NUM Certainty of Finding (%), [NUM Probability of cancer (%)]
            has properties   SCOORD Center (POINT)      -> selected from (by reference) the IMAGE
            has properties   SCOORD Outline (POLYLINE)  -> selected from (by reference) the IMAGE
      contains  CODE Summary of Detections = Succeeded
        inferred from  CONTAINER Successful Detections  [TID 4015]
          contains  CODE Detection Performed = Calcification Cluster  [TID 4017]
            has properties TID 4019; inferred from (by reference) every Image Library IMAGE
      contains  CODE Summary of Analyses = Succeeded
        inferred from  CONTAINER Successful Analyses  [TID 4016]
          contains  CODE Analysis Performed = Individual Impression/Recommendation Analysis
            has properties TID 4019; inferred from (by reference) every Image Library IMAGE

Rendering Intent (PS3.4 O.2.2.1) follows the CAD operating point: clusters whose P(malignant)
(for a model validated for classification; the cluster score otherwise) is at or above it are
"Presentation Required", the others "Presentation Optional". Probability of cancer is written
only for a validated model (node.reports.labels); Certainty of Finding is the cluster score.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from node.analysis.result import Finding, ImageAnalysis, StudyAnalysis
from node.dicom_header import (
    Code,
    mammo_view,
    modifier_term_for_code,
    term_code,
    view_term,
)
from node.reports.common import (
    check_analysis,
    check_common_args,
    check_series_number,
    laterality_of,
    orientation_of,
    presentation_image_for,
)
from node.reports.kinds import MAMMOGRAPHY_CAD_SR
from node.reports.labels import NOT_VALIDATED, cluster_score
from node.reports.sr import _header, _set_dates, algorithm_identification
from node.reports.uids import ResultUIDs

log = logging.getLogger(__name__)

CAD_SR_SERIES_DESCRIPTION = "AI calcification CAD marks"

_C = hd.sr.CodedConcept
MAMMOGRAPHY_CAD_REPORT = _C("111036", "DCM", "Mammography CAD Report")
IMAGE_LIBRARY = _C("111028", "DCM", "Image Library")
CAD_SUMMARY = _C("111017", "DCM", "CAD Processing and Findings Summary")
WITH_FINDINGS = _C("111242", "DCM", "All algorithms succeeded; with findings")
WITHOUT_FINDINGS = _C("111241", "DCM", "All algorithms succeeded; without findings")
# pydicom's meaning of these two holds a zero-width space (U+200B): written by hand.
INDIVIDUAL_IMPRESSION = _C("111034", "DCM", "Individual Impression/Recommendation")
IMPRESSION_ANALYSIS = _C("111233", "DCM", "Individual Impression/Recommendation Analysis")
RENDERING_INTENT = _C("111056", "DCM", "Rendering Intent")
PRESENTATION_REQUIRED = _C("111150", "DCM",
                           "Presentation Required: Rendering device is expected to present")
PRESENTATION_OPTIONAL = _C("111151", "DCM", "Presentation Optional: Rendering device may present")
SINGLE_IMAGE_FINDING = _C("111059", "DCM", "Single Image Finding")
CALCIFICATION_CLUSTER = _C("129769006", "SCT", "Calcification Cluster")
CERTAINTY_OF_FINDING = _C("111012", "DCM", "Certainty of Finding")
PROBABILITY_OF_CANCER = _C("111047", "DCM", "Probability of cancer")
TRACKING_IDENTIFIER = _C("112039", "DCM", "Tracking Identifier")
TRACKING_UID = _C("112040", "DCM", "Tracking Unique Identifier")
CENTER = _C("111010", "DCM", "Center")
OUTLINE = _C("111041", "DCM", "Outline")
ALGORITHM_NAME = _C("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = _C("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = _C("111002", "DCM", "Algorithm Parameters")
SUMMARY_OF_DETECTIONS = _C("111064", "DCM", "Summary of Detections")
SUMMARY_OF_ANALYSES = _C("111065", "DCM", "Summary of Analyses")
SUCCEEDED = _C("111222", "DCM", "Succeeded")
SUCCESSFUL_DETECTIONS = _C("111063", "DCM", "Successful Detections")
SUCCESSFUL_ANALYSES = _C("111062", "DCM", "Successful Analyses")
DETECTION_PERFORMED = _C("111022", "DCM", "Detection Performed")
ANALYSIS_PERFORMED = _C("111004", "DCM", "Analysis Performed")
IMAGE_LATERALITY = _C("111027", "DCM", "Image Laterality")
IMAGE_VIEW = _C("111031", "DCM", "Image View")
IMAGE_VIEW_MODIFIER = _C("111032", "DCM", "Image View Modifier")
ORIENTATION_ROW = _C("111044", "DCM", "Patient Orientation Row")
ORIENTATION_COLUMN = _C("111043", "DCM", "Patient Orientation Column")
STUDY_DATE = _C("111060", "DCM", "Study Date")
HORIZONTAL_SPACING = _C("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_SPACING = _C("111066", "DCM", "Vertical Pixel Spacing")
PERCENT = _C("%", "UCUM", "Percent")
MICROMETER = _C("um", "UCUM", "micrometer")
LATERALITY_VALUES = {"L": _C("80248007", "SCT", "Left breast"),
                     "R": _C("73056007", "SCT", "Right breast")}


# --------------------------------------------------------------------------- tree builder


@dataclass(eq=False)
class _Node:
    """One content item of the tree under construction.

    ``item`` holds the item's own attributes (value type, concept name, value) without
    RelationshipType and ContentSequence; a by-reference item has ``item=None`` and names its
    ``target`` instead. :func:`_encode` turns the tree into pydicom datasets.
    """

    item: Dataset | None
    relationship: str | None = None
    target: _Node | None = None
    children: list[_Node] = field(default_factory=list)

    def add(self, relationship: str, item: Dataset) -> _Node:
        node = _Node(_plain(item), relationship)
        self.children.append(node)
        return node

    def add_reference(self, relationship: str, target: _Node) -> _Node:
        node = _Node(None, relationship, target)
        self.children.append(node)
        return node


def _plain(item: Dataset) -> Dataset:
    """A plain pydicom copy of a highdicom content item, minus what :func:`_encode` sets."""
    out = Dataset()
    for elem in item:
        if elem.keyword not in ("RelationshipType", "ContentSequence"):
            out.add(elem)
    return out


def _encode(root: _Node) -> Dataset:
    """The root dataset with nested ContentSequences.

    By-reference items get the position of their target: the 1-based index of each item on the
    path from the root, the root being 1 (PS3.3 C.17.3.2.5)."""
    positions: dict[int, list[int]] = {}

    def number(node: _Node, path: list[int]) -> None:
        positions[id(node)] = path
        for i, child in enumerate(node.children, start=1):
            number(child, [*path, i])

    number(root, [1])

    def build(node: _Node) -> Dataset:
        ds = Dataset()
        if node.relationship is not None:
            ds.RelationshipType = node.relationship
        if node.target is not None:
            ds.ReferencedContentItemIdentifier = positions[id(node.target)]
            return ds
        assert node.item is not None
        for elem in node.item:
            ds.add(elem)
        if node.children:
            ds.ContentSequence = DicomSequence([build(child) for child in node.children])
        return ds

    return build(root)


def _code(name: hd.sr.CodedConcept, value: hd.sr.CodedConcept) -> Dataset:
    return hd.sr.CodeContentItem(name=name, value=value)


def _text(name: hd.sr.CodedConcept, value: str) -> Dataset:
    return hd.sr.TextContentItem(name=name, value=value)


def _num(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> Dataset:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit)


def _container(name: hd.sr.CodedConcept) -> Dataset:
    return hd.sr.ContainerContentItem(name=name)


def _image(reference: Dataset) -> Dataset:
    """A TID 4020 IMAGE item: no concept name (highdicom's ImageContentItem requires one)."""
    item = Dataset()
    item.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID = reference.SOPClassUID
    ref.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    item.ReferencedSOPSequence = [ref]
    return item


def _percent(probability: float) -> float:
    return round(float(probability) * 100.0, 2)


# --------------------------------------------------------------------------- content


def _library_entry(library: _Node, ref: Dataset, image: ImageAnalysis) -> _Node:
    """TID 4020 CAD Image Library Entry with the descriptors a workstation hangs images by."""
    entry = library.add("CONTAINS", _image(ref))
    lat = laterality_of(ref) or (image.laterality if image.laterality in ("L", "R") else "")
    if lat:
        entry.add("HAS ACQ CONTEXT", _code(IMAGE_LATERALITY, LATERALITY_VALUES[lat]))
    view, modifiers = _view_codes(ref, image)
    if view is not None:
        view_item = entry.add("HAS ACQ CONTEXT", _code(IMAGE_VIEW, view))
        for modifier in modifiers:  # CID 4015: spot compression, magnification, ...
            view_item.add("HAS CONCEPT MOD", _code(IMAGE_VIEW_MODIFIER, modifier))
    orientation = orientation_of(ref)
    if orientation is not None:  # as the source has it, combined values (A\FR) included
        entry.add("HAS ACQ CONTEXT", _text(ORIENTATION_ROW, orientation[0]))
        entry.add("HAS ACQ CONTEXT", _text(ORIENTATION_COLUMN, orientation[1]))
    study_date = str(ref.get("StudyDate", "") or "")
    if len(study_date) == 8 and study_date.isdigit():
        entry.add("HAS ACQ CONTEXT", hd.sr.DateContentItem(name=STUDY_DATE, value=study_date))
    spacing = ref.get("ImagerPixelSpacing") or ref.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        row_mm, col_mm = float(spacing[0]), float(spacing[1])
    else:  # the spacing the analysis worked with (possibly the configured fallback)
        row_mm = col_mm = float(image.pixel_spacing_mm)
    entry.add("HAS ACQ CONTEXT", _num(HORIZONTAL_SPACING, round(col_mm * 1000.0, 3), MICROMETER))
    entry.add("HAS ACQ CONTEXT", _num(VERTICAL_SPACING, round(row_mm * 1000.0, 3), MICROMETER))
    return entry


def _concept(code: Code) -> hd.sr.CodedConcept:
    return _C(code.value, code.scheme or "SCT", code.meaning or code.value)


def _view_codes(ref: Dataset, image: ImageAnalysis
                ) -> tuple[hd.sr.CodedConcept | None, list[hd.sr.CodedConcept]]:
    """Image View and its modifiers (CID 4014 / 4015): the current SCT code of the view the
    source names (ViewCodeSequence with any designator, SRT and SNM3 included, or View
    Position), else of the view the analysis determined; a code outside the context groups is
    copied as the source has it."""
    mv = mammo_view(ref)
    term = view_term(mv.view) or view_term(image.view)
    if term is not None:
        view = _concept(term_code(term))
    else:
        view = _concept(mv.view_code) if mv.view_code is not None else None
    mods = []
    for code in mv.modifiers:
        mterm = modifier_term_for_code(code.value)
        mods.append(_concept(term_code(mterm) if mterm is not None else code))
    return view, mods


def _algorithm(node: _Node, algo: hd.sr.AlgorithmIdentification,
               parameters: str | None = None) -> None:
    """TID 4019 Algorithm Identification under ``node`` (HAS PROPERTIES)."""
    node.add("HAS PROPERTIES", _text(ALGORITHM_NAME, algo[0].TextValue))
    node.add("HAS PROPERTIES", _text(ALGORITHM_VERSION, algo[1].TextValue))
    if parameters:
        node.add("HAS PROPERTIES", _text(ALGORITHM_PARAMETERS, parameters))


def _finding(summary: _Node, finding: Finding, entry: _Node, *,
             algo: hd.sr.AlgorithmIdentification, operating_point: float, validated: bool,
             tracking_uid: str) -> None:
    """TID 4003 Individual Impression/Recommendation holding one TID 4006 Single Image Finding.

    Certainty of Finding is the detector's cluster score; Probability of cancer is written only
    for a model validated for classification (then the operating point applies to it, else to
    the cluster score). The finding carries the same number (Tracking Identifier) and tracking
    UID as in the TID 1500 SR, the SC and the GSPS."""
    value = float(finding.probability) if validated else cluster_score(finding)
    intent = PRESENTATION_REQUIRED if value >= operating_point else PRESENTATION_OPTIONAL
    impression = summary.add("INFERRED FROM", _container(INDIVIDUAL_IMPRESSION))
    impression.add("HAS CONCEPT MOD", _code(RENDERING_INTENT, intent))
    sif = impression.add("CONTAINS", _code(SINGLE_IMAGE_FINDING, CALCIFICATION_CLUSTER))
    sif.add("HAS CONCEPT MOD", _code(RENDERING_INTENT, intent))
    if validated:
        params = f"operating point {operating_point * 100:.1f} % P(malignant)"
    else:
        params = f"operating point {operating_point * 100:.1f} % cluster score; {NOT_VALIDATED}"
    _algorithm(sif, algo, params)
    sif.add("HAS PROPERTIES", _text(TRACKING_IDENTIFIER, f"Calcification cluster {finding.index}"))
    sif.add("HAS PROPERTIES", hd.sr.UIDRefContentItem(name=TRACKING_UID, value=tracking_uid))
    sif.add("HAS PROPERTIES", _num(CERTAINTY_OF_FINDING, _percent(cluster_score(finding)),
                                   PERCENT))
    if validated:
        sif.add("HAS PROPERTIES", _num(PROBABILITY_OF_CANCER, _percent(finding.probability),
                                       PERCENT))
    centre = sif.add("HAS PROPERTIES", hd.sr.ScoordContentItem(
        name=CENTER, graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([finding.centre_xy], dtype=np.float64)))
    centre.add_reference("SELECTED FROM", entry)
    outline = sif.add("HAS PROPERTIES", hd.sr.ScoordContentItem(
        name=OUTLINE, graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(finding.outline_xy, dtype=np.float64)))
    outline.add_reference("SELECTED FROM", entry)


def _summary(root: _Node, name: hd.sr.CodedConcept, container: hd.sr.CodedConcept,
             performed: tuple[hd.sr.CodedConcept, hd.sr.CodedConcept],
             entries: Sequence[_Node], algo: hd.sr.AlgorithmIdentification) -> None:
    """Summary of Detections / Analyses = Succeeded (TID 4015/4017, 4016/4018)."""
    code = root.add("CONTAINS", _code(name, SUCCEEDED))
    done = code.add("INFERRED FROM", _container(container))
    item = done.add("CONTAINS", _code(*performed))
    _algorithm(item, algo)
    for entry in entries:
        item.add_reference("INFERRED FROM", entry)


# --------------------------------------------------------------------------- SOP class


def _references(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference Macro items (study > series > instance)."""
    grouped: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        grouped[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(item)
    studies: dict[str, Dataset] = {}
    for (study_uid, series_uid), items in grouped.items():
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = []
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = items
        study.ReferencedSeriesSequence.append(series)
    return list(studies.values())


class MammographyCADSR(hd.SOPClass):
    """Mammography CAD SR document (PS3.3 A.35.5) around a TID 4000 content tree.

    ``evidence`` are the headers of the images the tree references (the first one gives the
    patient and study identity); ``content`` is the root item as :func:`_encode` returns it.
    """

    def __init__(
        self,
        *,
        evidence: Sequence[Dataset],
        content: Dataset,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        previous_versions: Sequence[Dataset] = (),
        **kwargs: object,
    ) -> None:
        if not evidence:
            raise ValueError("a Mammography CAD SR needs at least one evidence image")
        identity = evidence[0]
        super().__init__(
            study_instance_uid=identity.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=MAMMOGRAPHY_CAD_SR,
            instance_number=instance_number,
            modality="SR",
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            patient_id=identity.PatientID,
            patient_name=identity.PatientName,
            patient_birth_date=identity.PatientBirthDate,
            patient_sex=identity.PatientSex,
            accession_number=identity.AccessionNumber,
            study_id=identity.StudyID,
            study_date=identity.StudyDate,
            study_time=identity.StudyTime,
            referring_physician_name=identity.get("ReferringPhysicianName"),
            specific_character_set=identity.get("SpecificCharacterSet"),
            **kwargs,  # type: ignore[arg-type]
        )
        self.CompletionFlag = "COMPLETE"
        self.VerificationFlag = "UNVERIFIED"
        for elem in content:
            self.add(elem)
        same_study = [ds for ds in evidence
                      if ds.StudyInstanceUID == identity.StudyInstanceUID]
        self.CurrentRequestedProcedureEvidenceSequence = _references(same_study)
        if previous_versions:
            self.PredecessorDocumentsSequence = _references(previous_versions)
        self.PerformedProcedureCodeSequence = []
        self.ReferencedPerformedProcedureStepSequence = []
        self.copy_patient_and_study_information(identity)
        self._add_contributing_equipment(None, identity)


# --------------------------------------------------------------------------- builder


def check_operating_point(operating_point: float) -> None:
    if isinstance(operating_point, bool) or not isinstance(operating_point, int | float):
        raise TypeError(f"operating_point must be a number, got {type(operating_point).__name__}")
    if not 0.0 <= float(operating_point) <= 1.0:
        raise ValueError(f"operating_point must be in [0, 1], got {operating_point}")


def build_mammo_cad_sr(
    analysis: StudyAnalysis,
    sources: Mapping[str, Dataset],
    *,
    analysis_key: str,
    created: dt.datetime,
    manufacturer: str,
    series_number: int,
    operating_point: float,
    software_version: str,
    previous_versions: Sequence[Dataset] = (),
) -> MammographyCADSR:
    """The Mammography CAD SR of one study analysis (see the module docstring for the tree).

    ``operating_point`` is the value in [0, 1] at or above which a cluster is marked
    "Presentation Required": P(malignant) for a model validated for classification, the
    cluster score otherwise. Findings on a For Processing image reference the matching For
    Presentation image when the study has one (as in the TID 1500 SR). ``previous_versions`` are
    the CAD SRs of the study's earlier result, listed as predecessors.
    """
    check_common_args(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                      threshold=operating_point, software_version=software_version)
    check_operating_point(operating_point)
    check_series_number("series_number", series_number)
    analysed = check_analysis(analysis, sources)
    uids = ResultUIDs(analysis_key)
    algo = algorithm_identification(analysis)
    op = float(operating_point)

    root = _Node(_plain(hd.sr.ContainerContentItem(name=MAMMOGRAPHY_CAD_REPORT,
                                                   template_id="4000")))
    root.add("HAS CONCEPT MOD", hd.sr.LanguageOfContentItemAndDescendants(
        hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)"))[0])
    library = root.add("CONTAINS", _container(IMAGE_LIBRARY))
    entries: dict[str, _Node] = {}
    evidence: dict[str, Dataset] = {}
    placed: list[tuple[ImageAnalysis, Dataset]] = []
    for image in analysed:
        ref = presentation_image_for(image, sources)
        uid = str(ref.SOPInstanceUID)
        if uid not in entries:
            entries[uid] = _library_entry(library, ref, image)
            evidence[uid] = _header(ref)
        placed.append((image, ref))

    findings = [(f, entries[str(ref.SOPInstanceUID)]) for image, ref in placed
                for f in sorted(image.findings, key=lambda f: f.index)]
    summary = root.add("CONTAINS", _code(CAD_SUMMARY,
                                         WITH_FINDINGS if findings else WITHOUT_FINDINGS))
    for finding, entry in findings:
        _finding(summary, finding, entry, algo=algo, operating_point=op,
                 validated=analysis.model.classification_validated,
                 tracking_uid=uids.tracking(finding.index))
    _summary(root, SUMMARY_OF_DETECTIONS, SUCCESSFUL_DETECTIONS,
             (DETECTION_PERFORMED, CALCIFICATION_CLUSTER), list(entries.values()), algo)
    _summary(root, SUMMARY_OF_ANALYSES, SUCCESSFUL_ANALYSES,
             (ANALYSIS_PERFORMED, IMPRESSION_ANALYSIS), list(entries.values()), algo)

    sr = MammographyCADSR(
        evidence=list(evidence.values()),
        content=_encode(root),
        series_instance_uid=uids.cad_sr_series,
        series_number=series_number,
        sop_instance_uid=uids.cad_sr_instance,
        instance_number=1,
        manufacturer=manufacturer,
        previous_versions=previous_versions,
        series_description=CAD_SR_SERIES_DESCRIPTION,
        software_versions=software_version,
        manufacturer_model_name=analysis.model.name[:64],
    )
    _set_dates(sr, created)
    validated = analysis.model.classification_validated
    required = sum(1 for f, _ in findings
                   if (float(f.probability) if validated else cluster_score(f)) >= op)
    log.info("built Mammography CAD SR: %d finding(s) (%d presentation required), "
             "%d library image(s)", len(findings), required, len(entries))
    return sr


def read_cad_findings(ds: Dataset) -> list[dict[str, object]]:
    """The Single Image Findings of a Mammography CAD SR as plain values (for checks and tools).

    Each entry: ``probability`` (%, only for a model validated for classification),
    ``certainty`` (%), ``tracking_identifier``, ``tracking_uid``, ``rendering_intent`` (code value),
    ``centre`` (x, y), ``outline`` (list of (x, y)) and ``sop_instance_uid`` of the image the
    coordinates are selected from (resolved through the by-reference identifiers).
    """
    def at(path: Sequence[int]) -> Dataset:
        node: Dataset = ds
        for index in path[1:]:
            node = node.ContentSequence[index - 1]
        return node

    out: list[dict[str, object]] = []
    for item in ds.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != CAD_SUMMARY.value:
            continue
        for impression in item.get("ContentSequence", []):
            for sif in impression.get("ContentSequence", []):
                if sif.get("ValueType") != "CODE" or \
                        sif.ConceptNameCodeSequence[0].CodeValue != SINGLE_IMAGE_FINDING.value:
                    continue
                entry: dict[str, object] = {}
                for prop in sif.ContentSequence:
                    code = prop.ConceptNameCodeSequence[0].CodeValue
                    if prop.ValueType == "NUM":
                        value = float(prop.MeasuredValueSequence[0].NumericValue)
                        if code == PROBABILITY_OF_CANCER.value:
                            entry["probability"] = value
                        elif code == CERTAINTY_OF_FINDING.value:
                            entry["certainty"] = value
                    elif prop.ValueType == "TEXT" and code == TRACKING_IDENTIFIER.value:
                        entry["tracking_identifier"] = str(prop.TextValue)
                    elif prop.ValueType == "UIDREF" and code == TRACKING_UID.value:
                        entry["tracking_uid"] = str(prop.UID)
                    elif prop.ValueType == "CODE" and code == RENDERING_INTENT.value:
                        entry["rendering_intent"] = prop.ConceptCodeSequence[0].CodeValue
                    elif prop.ValueType == "SCOORD":
                        pts = [tuple(float(v) for v in prop.GraphicData[i:i + 2])
                               for i in range(0, len(prop.GraphicData), 2)]
                        target = at(prop.ContentSequence[0].ReferencedContentItemIdentifier)
                        entry["sop_instance_uid"] = \
                            target.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                        if code == CENTER.value:
                            entry["centre"] = pts[0]
                        elif code == OUTLINE.value:
                            entry["outline"] = pts
                out.append(entry)
    return out
