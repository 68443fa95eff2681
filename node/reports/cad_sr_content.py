"""The content tree of the Mammography CAD SR (PS3.16 TID 4000) of one study.

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

:func:`cad_report` returns the root item and the evidence headers; :mod:`node.reports.cad_sr`
wraps them in the SOP instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.analysis.result import Finding
from node.reports import codes as C
from node.reports.common import algorithm_identification, evidence_header, percent
from node.reports.context import ReportContext
from node.reports.images import AnalysedImage, ReportedStudy
from node.reports.labels import NOT_VALIDATED, cluster_score

RT = hd.sr.RelationshipTypeValues


# --------------------------------------------------------------------------- tree builder


@dataclass(eq=False)
class _Node:
    """One content item of the tree under construction.

    ``item`` holds the item's own attributes (value type, concept name, value) without
    RelationshipType and ContentSequence; a by-reference item has ``item=None`` and names its
    ``target`` instead. :func:`_encode` turns the tree into pydicom datasets.
    """

    item: Dataset | None
    relationship: hd.sr.RelationshipTypeValues | None = None
    target: _Node | None = None
    children: list[_Node] = field(default_factory=list)

    def add(self, relationship: hd.sr.RelationshipTypeValues, item: Dataset) -> _Node:
        node = _Node(_plain(item), relationship)
        self.children.append(node)
        return node

    def add_reference(self, relationship: hd.sr.RelationshipTypeValues, target: _Node) -> _Node:
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
            ds.RelationshipType = node.relationship.value
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


def _code(name: C.Concept, value: C.Concept) -> Dataset:
    return hd.sr.CodeContentItem(name=name, value=value)


def _text(name: C.Concept, value: str) -> Dataset:
    return hd.sr.TextContentItem(name=name, value=value)


def _num(name: C.Concept, value: float, unit: C.Concept) -> Dataset:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit)


def _container(name: C.Concept) -> Dataset:
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


# --------------------------------------------------------------------------- content


def _library_entry(library: _Node, image: AnalysedImage) -> _Node:
    """TID 4020 CAD Image Library Entry with the descriptors a workstation hangs images by."""
    ref = image.reference
    entry = library.add(RT.CONTAINS, _image(ref))
    if image.laterality:
        entry.add(RT.HAS_ACQ_CONTEXT,
                  _code(C.IMAGE_LATERALITY, C.BREAST_OF_SIDE[image.laterality]))
    if image.view is not None:
        view_item = entry.add(RT.HAS_ACQ_CONTEXT, _code(C.IMAGE_VIEW, image.view))
        for modifier in image.view_modifiers:  # CID 4015: spot compression, magnification, ...
            view_item.add(RT.HAS_CONCEPT_MOD, _code(C.IMAGE_VIEW_MODIFIER, modifier))
    if image.orientation is not None:  # as the source has it, combined values (A\FR) included
        entry.add(RT.HAS_ACQ_CONTEXT, _text(C.ORIENTATION_ROW, image.orientation[0]))
        entry.add(RT.HAS_ACQ_CONTEXT, _text(C.ORIENTATION_COLUMN, image.orientation[1]))
    study_date = str(ref.get("StudyDate", "") or "")
    if len(study_date) == 8 and study_date.isdigit():
        entry.add(RT.HAS_ACQ_CONTEXT,
                  hd.sr.DateContentItem(name=C.STUDY_DATE, value=study_date))
    row_mm, col_mm = image.spacing_mm
    entry.add(RT.HAS_ACQ_CONTEXT,
              _num(C.HORIZONTAL_SPACING, round(col_mm * 1000.0, 3), C.MICROMETER))
    entry.add(RT.HAS_ACQ_CONTEXT,
              _num(C.VERTICAL_SPACING, round(row_mm * 1000.0, 3), C.MICROMETER))
    return entry


def _algorithm(node: _Node, algo: hd.sr.AlgorithmIdentification,
               parameters: str | None = None) -> None:
    """TID 4019 Algorithm Identification under ``node`` (HAS PROPERTIES)."""
    node.add(RT.HAS_PROPERTIES, _text(C.ALGORITHM_NAME, algo[0].TextValue))
    node.add(RT.HAS_PROPERTIES, _text(C.ALGORITHM_VERSION, algo[1].TextValue))
    if parameters:
        node.add(RT.HAS_PROPERTIES, _text(C.ALGORITHM_PARAMETERS, parameters))


def _finding(summary: _Node, finding: Finding, entry: _Node, *,
             algo: hd.sr.AlgorithmIdentification, operating_point: float, validated: bool,
             tracking_uid: str) -> None:
    """TID 4003 Individual Impression/Recommendation holding one TID 4006 Single Image Finding.

    Certainty of Finding is the detector's cluster score; Probability of cancer is written only
    for a model validated for classification (then the operating point applies to it, else to
    the cluster score). The finding carries the same number (Tracking Identifier) and tracking
    UID as in the TID 1500 SR, the SC and the GSPS."""
    intent = (C.PRESENTATION_REQUIRED if _is_required(finding, operating_point, validated)
              else C.PRESENTATION_OPTIONAL)
    impression = summary.add(RT.INFERRED_FROM, _container(C.INDIVIDUAL_IMPRESSION))
    impression.add(RT.HAS_CONCEPT_MOD, _code(C.RENDERING_INTENT, intent))
    sif = impression.add(RT.CONTAINS, _code(C.SINGLE_IMAGE_FINDING, C.CALCIFICATION_CLUSTER))
    sif.add(RT.HAS_CONCEPT_MOD, _code(C.RENDERING_INTENT, intent))
    if validated:
        params = f"operating point {operating_point * 100:.1f} % P(malignant)"
    else:
        params = f"operating point {operating_point * 100:.1f} % cluster score; {NOT_VALIDATED}"
    _algorithm(sif, algo, params)
    sif.add(RT.HAS_PROPERTIES,
            _text(C.TRACKING_IDENTIFIER, f"Calcification cluster {finding.index}"))
    sif.add(RT.HAS_PROPERTIES, hd.sr.UIDRefContentItem(name=C.TRACKING_UID, value=tracking_uid))
    sif.add(RT.HAS_PROPERTIES, _num(C.CERTAINTY_OF_FINDING, percent(cluster_score(finding)),
                                   C.PERCENT))
    if validated:
        sif.add(RT.HAS_PROPERTIES, _num(C.PROBABILITY_OF_CANCER, percent(finding.probability),
                                       C.PERCENT))
    centre = sif.add(RT.HAS_PROPERTIES, hd.sr.ScoordContentItem(
        name=C.CENTER, graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([finding.centre_xy], dtype=np.float64)))
    centre.add_reference(RT.SELECTED_FROM, entry)
    outline = sif.add(RT.HAS_PROPERTIES, hd.sr.ScoordContentItem(
        name=C.OUTLINE, graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(finding.outline_xy, dtype=np.float64)))
    outline.add_reference(RT.SELECTED_FROM, entry)


def _summary(root: _Node, name: C.Concept, container: C.Concept,
             performed: tuple[C.Concept, C.Concept],
             entries: Sequence[_Node], algo: hd.sr.AlgorithmIdentification) -> None:
    """Summary of Detections / Analyses = Succeeded (TID 4015/4017, 4016/4018)."""
    code = root.add(RT.CONTAINS, _code(name, C.SUCCEEDED))
    done = code.add(RT.INFERRED_FROM, _container(container))
    item = done.add(RT.CONTAINS, _code(*performed))
    _algorithm(item, algo)
    for entry in entries:
        item.add_reference(RT.INFERRED_FROM, entry)




@dataclass(frozen=True)
class CadReportContent:
    """The root content item, the evidence headers (Image Library order) and counts."""

    root: Dataset
    evidence: list[Dataset]
    findings: int
    required: int


def _is_required(finding: Finding, operating_point: float, validated: bool) -> bool:
    value = float(finding.probability) if validated else cluster_score(finding)
    return value >= operating_point


def cad_report(study: ReportedStudy, context: ReportContext) -> CadReportContent:
    """The TID 4000 root item of ``study`` (see the module docstring) and its evidence."""
    uids = context.uids
    algo = algorithm_identification(study.model)
    op = context.operating_point(study.model)
    validated = study.model.classification_validated

    root = _Node(_plain(hd.sr.ContainerContentItem(name=C.MAMMOGRAPHY_CAD_REPORT,
                                                   template_id="4000")))
    root.add(RT.HAS_CONCEPT_MOD, hd.sr.LanguageOfContentItemAndDescendants(C.ENGLISH_US)[0])
    library = root.add(RT.CONTAINS, _container(C.IMAGE_LIBRARY))
    entries: dict[str, _Node] = {}
    evidence: list[Dataset] = []
    for image in study.library():
        entries[image.reference_uid] = _library_entry(library, image)
        evidence.append(evidence_header(image.reference))

    findings = [(f, entries[image.reference_uid]) for image in study.images
                for f in sorted(image.analysis.findings, key=lambda f: f.index)]
    summary = root.add(RT.CONTAINS, _code(C.CAD_SUMMARY,
                                          C.WITH_FINDINGS if findings else C.WITHOUT_FINDINGS))
    for finding, entry in findings:
        _finding(summary, finding, entry, algo=algo, operating_point=op, validated=validated,
                 tracking_uid=uids.tracking(finding.index))
    _summary(root, C.SUMMARY_OF_DETECTIONS, C.SUCCESSFUL_DETECTIONS,
             (C.DETECTION_PERFORMED, C.CALCIFICATION_CLUSTER), list(entries.values()), algo)
    _summary(root, C.SUMMARY_OF_ANALYSES, C.SUCCESSFUL_ANALYSES,
             (C.ANALYSIS_PERFORMED, C.IMPRESSION_ANALYSIS), list(entries.values()), algo)
    required = sum(1 for f, _ in findings if _is_required(f, op, validated))
    return CadReportContent(_encode(root), evidence, len(findings), required)
