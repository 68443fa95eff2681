"""What a reader sees next to each mark: one wording for the SR, CAD SR, SC and GSPS.

A model whose card does not support a benign/malignant call (``ModelInfo.classification_validated``
False, see ``models.card.classification_validated``) never shows a pathology call or a
probability of cancer: its marks carry the detector's cluster score and the reports say
:data:`NOT_VALIDATED`. Marks are numbered by ``Finding.index`` in every kind.
"""

from __future__ import annotations

from node.analysis.result import Finding, ModelInfo

NOT_VALIDATED = "not validated for benign/malignant classification"
DETECTION_ONLY = f"AI calcification-cluster marks: detection only, {NOT_VALIDATED}"

_SIDES = {"L": "left breast", "R": "right breast"}


def site_name(laterality: str, view: str) -> str:
    """The finding site in words, e.g. "left breast MLO" ("breast" when unknown)."""
    side = _SIDES.get(laterality, "breast")
    return f"{side} {view}".strip() if view else side


def cluster_score(finding: Finding) -> float:
    """The detection score in [0, 1] (``probability`` for analyses without one)."""
    return float(finding.detection_score if finding.detection_score is not None
                 else finding.probability)


def is_malignant(finding: Finding, threshold: float) -> bool:
    return float(finding.probability) >= float(threshold)


def mark_label(finding: Finding, model: ModelInfo, threshold: float) -> str:
    """The short label drawn next to a mark (SC and GSPS)."""
    if model.classification_validated:
        call = "malignant" if is_malignant(finding, threshold) else "benign"
        return f"#{finding.index} {call} P(malignant) {finding.probability * 100:.0f}%"
    return f"#{finding.index} cluster score {cluster_score(finding) * 100:.0f}%"


def tracking_label(finding: Finding, laterality: str, view: str) -> str:
    """The SR tracking identifier: number and site, e.g. "Calcification cluster 2, left breast
    MLO"."""
    return f"Calcification cluster {finding.index}, {site_name(laterality, view)}"


def legend(model: ModelInfo, threshold: float) -> str:
    """One line saying what the marks mean (SC footer, GSPS, CAD SR algorithm parameters)."""
    if model.classification_validated:
        return (f"AI {model.name} {model.version}: calcification clusters, benign/malignant at "
                f"P(malignant) >= {threshold * 100:.0f}%")
    return f"AI {model.name} {model.version}: calcification clusters, {NOT_VALIDATED}"
