"""The seam between the node and the analysis stage.

The node hands the analysis stage a list of :class:`ImageInput` (files already durable in the
spool, one study) and gets back one :class:`StudyAnalysis`. Everything the report stage needs
(ROI geometry in image pixel coordinates, probabilities, a display image and a Grad-CAM map for the
Secondary Capture, model identity for the SR) is in these plain dataclasses; the report stage never
decodes pixels and never touches the model.

Coordinates follow DICOM SCOORD conventions: ``(x, y) = (column, row)`` in pixels of the *source
image*, with (0.0, 0.0) the top-left corner of the top-left pixel, so the centre of numpy pixel
``[r, c]`` is ``(c + 0.5, r + 0.5)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ImageInput:
    """One stored instance of the study, as the node hands it to the analysis stage."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the classifier, copied from its model card into every report."""

    name: str
    version: str
    architecture: str
    threshold: float  # P(malignant) at or above which a finding is called malignant
    # True only when the model card's cross-validated evidence supports a Benign/Malignant call
    # (models.card.classification_validated); otherwise the reports carry the cluster mark and
    # its detection score and say "not validated for benign/malignant classification".
    classification_validated: bool = False


@dataclass(frozen=True)
class Finding:
    """One calcification-cluster ROI on one image."""

    index: int  # 1-based, unique within the study, stable for the same input
    sop_instance_uid: str  # the image the coordinates refer to
    laterality: str  # "L", "R" or "" when unknown
    view: str  # "CC", "MLO", ... or "" when unknown
    centre_xy: tuple[float, float]  # (column, row), source-image pixels
    outline_xy: tuple[tuple[float, float], ...]  # closed polygon (first == last), pixels
    radius_mm: float  # cluster radius in millimetres
    n_calcifications: int  # candidate specks grouped into this cluster
    probability: float  # P(malignant) in [0, 1] (calibrated when the card has a calibration)
    # The detector's cluster score in [0, 1] (likelihood that the mark is a calcification
    # cluster); None when the analysis has no detector score (then reports use ``probability``).
    detection_score: float | None = None


@dataclass
class ImageAnalysis:
    """What the stage found on one image (or why it skipped it)."""

    sop_instance_uid: str
    sop_class_uid: str
    laterality: str
    view: str
    rows: int
    columns: int
    pixel_spacing_mm: float  # the spacing the stage worked with
    spacing_source: str  # e.g. "ImagerPixelSpacing", "PixelSpacing", "fallback"
    for_presentation: bool
    findings: list[Finding] = field(default_factory=list)
    # For the Secondary Capture: a display rendering of the image (uint8, VOI and polarity
    # applied) at ``display_scale`` display pixels per source pixel, and the Grad-CAM map of all
    # findings in [0, 1] with the same shape (zeros where there is no finding).
    display: np.ndarray | None = None
    cam: np.ndarray | None = None
    display_scale: float = 1.0
    # what ``cam`` shows: the CNN's Grad-CAM, or the detector's calcification evidence when the
    # call comes from a morphology head (the SC says which)
    cam_source: str = "Grad-CAM"
    skipped_reason: str | None = None  # set when the image was not analysed
    # True when it could not be analysed (undecodable, over the decode limits): a counted
    # failure; False for a deliberate skip (policy, tomosynthesis, ...). Only with a reason.
    failed: bool = False

    @property
    def analysed(self) -> bool:
        return self.skipped_reason is None


@dataclass
class StudyAnalysis:
    """The result of analysing one study: the only thing the report stage reads."""

    study_instance_uid: str
    model: ModelInfo
    images: list[ImageAnalysis]
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage name -> milliseconds

    @property
    def findings(self) -> list[Finding]:
        return [f for image in self.images for f in image.findings]

    def max_probability_per_breast(self) -> dict[str, float]:
        """Highest P(malignant) per laterality ("L"/"R"/""), over the analysed images."""
        out: dict[str, float] = {}
        for image in self.images:
            if not image.analysed:
                continue
            out.setdefault(image.laterality, 0.0)
            for f in image.findings:
                out[image.laterality] = max(out[image.laterality], f.probability)
        return out


class StudyAnalyser(Protocol):
    """What the node's worker calls. Implementations load their model once, at construction,
    and raise ``RuntimeError`` with a clear message when the weights or card are unusable."""

    @property
    def model(self) -> ModelInfo:
        """The model in use (an attribute or a read-only property: node.activemodel switches
        it behind a property)."""
        ...

    def analyse(self, study_instance_uid: str, images: list[ImageInput], *,
                checkpoint: Callable[[], None] | None = None,
                cache: dict[str, Any] | None = None) -> StudyAnalysis:
        """``checkpoint`` is called at safe points (between images, before classifying) and
        raises to stop the analysis cheaply (its study changed, the node is stopping);
        ``cache`` keeps per-image work of this study between calls (keyed by file path)."""
        ...
