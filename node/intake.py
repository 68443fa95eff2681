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

from pydicom import uid as uids
from pydicom.dataset import Dataset

from node.dicom_header import (
    is_quality_control,
    is_synthesized_2d,
    mammo_view,
)

MG_FOR_PRESENTATION = uids.DigitalMammographyXRayImageStorageForPresentation
MG_FOR_PROCESSING = uids.DigitalMammographyXRayImageStorageForProcessing
BPX_FOR_PRESENTATION = uids.BreastProjectionXRayImageStorageForPresentation
BPX_FOR_PROCESSING = uids.BreastProjectionXRayImageStorageForProcessing
SECONDARY_CAPTURE = uids.SecondaryCaptureImageStorage
DX_FOR_PRESENTATION = uids.DigitalXRayImageStorageForPresentation
DX_FOR_PROCESSING = uids.DigitalXRayImageStorageForProcessing
_DOSE_REPORTS = (uids.XRayRadiationDoseSRStorage, uids.EnhancedXRayRadiationDoseSRStorage)

#: SOP classes whose images are analysed (SC and DX only when they hold a mammogram).
ANALYSED_SOP_CLASSES: dict[str, str] = {uid: uid.name for uid in (
    MG_FOR_PRESENTATION, MG_FOR_PROCESSING, BPX_FOR_PRESENTATION, BPX_FOR_PROCESSING,
    SECONDARY_CAPTURE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)}

#: The default of ``[study] other_sop_classes``: what a PACS sends with a mammography study that
#: the node accepts but never analyses (the conformance statement lists the same).
DEFAULT_OTHER_SOP_CLASSES: dict[str, str] = {uid: uid.name for uid in (
    uids.BreastTomosynthesisImageStorage,
    *_DOSE_REPORTS,
    uids.MammographyCADSRStorage,
    uids.BasicTextSRStorage,
    uids.EnhancedSRStorage,
    uids.ComprehensiveSRStorage,
    uids.Comprehensive3DSRStorage,
    uids.KeyObjectSelectionDocumentStorage,
    uids.GrayscaleSoftcopyPresentationStateStorage,
    uids.ColorSoftcopyPresentationStateStorage,
    uids.PseudoColorSoftcopyPresentationStateStorage,
    uids.BlendingSoftcopyPresentationStateStorage,
    uids.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uids.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uids.SegmentationStorage,
    uids.EncapsulatedPDFStorage,
    uids.RawDataStorage,
)}

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
    if sop_class == uids.BreastTomosynthesisImageStorage:
        return "tomosynthesis"
    if sop_class in _DOSE_REPORTS:
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
