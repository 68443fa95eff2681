"""Intake: what the node does with each object a PACS sends with a mammography study.

A PACS forwards the whole study: besides the 2D mammograms there are tomosynthesis volumes,
synthesized 2D views, vendor Secondary Captures, dose reports, presentation states and other
systems' CAD results. Refusing any of them at negotiation fails the PACS's forward job, so the
node accepts them all (answer 0x0000) and decides here, from the header alone, what each one is:

* ``analyse``: a 2D mammogram (Digital Mammography X-Ray, Breast Projection X-Ray, Digital X-Ray
  or Secondary Capture holding a mammogram); it joins the study's analysis.
* ``other``: accepted, never analysed; ``[study] other_objects`` keeps it (stored, recorded in
  its own table, purged with the retention) or discards it. It never re-opens a study, never
  delays its completion and never enters the analysis input key.
* ``refuse``: not a mammogram at all (0xC001): a Digital X-Ray whose Modality is not MG.

The decision and its reason go into one log line per object (``instance.not_analysed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.dicom_header import (
    is_quality_control,
    is_synthesized_2d,
    mammo_view,
)

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
BPX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
BPX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.13.1.5"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

#: SOP classes whose images are analysed (SC and DX only when they hold a mammogram).
ANALYSED_SOP_CLASSES: dict[str, str] = {
    MG_FOR_PRESENTATION: "Digital Mammography X-Ray Image Storage - For Presentation",
    MG_FOR_PROCESSING: "Digital Mammography X-Ray Image Storage - For Processing",
    BPX_FOR_PRESENTATION: "Breast Projection X-Ray Image Storage - For Presentation",
    BPX_FOR_PROCESSING: "Breast Projection X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
    DX_FOR_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    DX_FOR_PROCESSING: "Digital X-Ray Image Storage - For Processing",
}

#: The default of ``[study] other_sop_classes``: what a PACS sends with a mammography study that
#: the node accepts but never analyses (the conformance statement lists the same).
DEFAULT_OTHER_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.76": "Enhanced X-Ray Radiation Dose SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.11.2": "Color Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.11.3": "Pseudo-Color Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.11.4": "Blending Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data Storage",
}

ANALYSE, OTHER, REFUSE = "analyse", "other", "refuse"


@dataclass(frozen=True)
class IntakePolicy:
    """The configuration the decision depends on (``[study]``, ``[analysis]``)."""

    other_sop_classes: frozenset[str] = frozenset(DEFAULT_OTHER_SOP_CLASSES)
    synthesized_2d: str = "skip"  # "skip" | "analyse"

    @classmethod
    def of(cls, other_sop_classes: Iterable[str], synthesized_2d: str) -> IntakePolicy:
        return cls(frozenset(other_sop_classes), synthesized_2d)


@dataclass(frozen=True)
class Intake:
    """The decision for one object: ``action`` (analyse / other / refuse), a short ``kind``
    (metric label: image, tomosynthesis, synthesized_2d, quality_control, ...) and ``reason``
    (for the log line and, when refused, the Error Comment)."""

    action: str
    kind: str
    reason: str


def sop_class_name(uid: str) -> str:
    return ANALYSED_SOP_CLASSES.get(uid) or DEFAULT_OTHER_SOP_CLASSES.get(uid) or uid


def _kind_of_other(sop_class: str) -> str:
    if sop_class == "1.2.840.10008.5.1.4.1.1.13.1.3":
        return "tomosynthesis"
    if sop_class in ("1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.76"):
        return "dose_report"
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "structured_report"
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.11."):
        return "presentation_state"
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "secondary_capture"
    return "other"


def _holds_mammogram(ds: Dataset) -> bool:
    """A Secondary Capture or other non-MG object that is a digitised mammogram: Modality MG,
    or (e.g. WG-04's MG1, Modality RG) a mammography view and a laterality in its header."""
    if str(ds.get("Modality", "") or "") == "MG":
        return True
    view = mammo_view(ds)
    return bool(view.view and view.laterality in ("L", "R"))


def decide(ds: Dataset, policy: IntakePolicy) -> Intake:
    """What to do with ``ds`` (a parsed header; pixels are not read)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "")
    if sop_class in ANALYSED_SOP_CLASSES:
        name = ANALYSED_SOP_CLASSES[sop_class]
        if sop_class in (DX_FOR_PRESENTATION, DX_FOR_PROCESSING) and modality != "MG":
            return Intake(REFUSE, "not_mammogram",
                          f"{name} with Modality {modality or '(empty)'} is not a mammogram")
        if sop_class == SECONDARY_CAPTURE and not _holds_mammogram(ds):
            return Intake(OTHER, "secondary_capture",
                          f"Secondary Capture with Modality {modality or '(empty)'} and no "
                          "mammography view: not a mammogram (e.g. a viewer or AI overlay)")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return Intake(OTHER, "colour_image", f"{name}: colour image, not a mammogram")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return Intake(OTHER, "multi_frame", f"{name}: multi-frame object (not a 2D view)")
        if is_quality_control(ds):
            return Intake(OTHER, "quality_control",
                          f"{name}: quality-control or flat-field image "
                          f"(QualityControlImage/ViewPosition {ds.get('ViewPosition', '')})")
        if is_synthesized_2d(ds) and policy.synthesized_2d != "analyse":
            return Intake(OTHER, "synthesized_2d",
                          f"{name}: synthesized 2D view from tomosynthesis "
                          "(analysis.synthesized_2d = \"skip\")")
        return Intake(ANALYSE, "image", name)
    if sop_class in policy.other_sop_classes:
        return Intake(OTHER, _kind_of_other(sop_class),
                      f"{sop_class_name(sop_class)}: not analysed by this node "
                      "([study] other_sop_classes)")
    return Intake(REFUSE, "not_accepted", f"SOP class {sop_class} is not accepted")
