"""Read the findings of the node's TID 1500 SR back with highdicom (an independent reader)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes


@dataclass
class SRFinding:
    tracking_identifier: str
    tracking_uid: str
    score_percent: float  # Probability of cancer (validated model), else Certainty of Finding
    probability_percent: float | None  # None when the model is not validated for a call
    outline: np.ndarray  # (n, 2) column, row
    referenced_sop_instance_uid: str
    group: hd.sr.MeasurementsAndQualitativeEvaluations
    label: str  # Comment (121106, DCM): the label OHIF shows
    pathology: hd.sr.CodedConcept | None


CERTAINTY_OF_FINDING = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")


def sr_findings(path: Path | str) -> list[SRFinding]:
    """One entry per measurement group with a score (Probability of cancer, or Certainty of
    Finding for a model not validated for a benign/malignant call) inferred from an outline."""
    report = hd.sr.srread(path)
    out = []
    for g in report.content.get_image_measurement_groups():
        probs = g.get_measurements(name=codes.DCM.ProbabilityOfCancer)
        scores = probs or g.get_measurements(name=CERTAINTY_OF_FINDING)
        if not scores:
            continue
        (score,) = scores
        (scoord,) = score.referenced_coordinates
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        comments = [i.TextValue for i in g[0].ContentSequence
                    if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Comment.value]
        quals = g.get_qualitative_evaluations(name=codes.DCM.Pathology)
        out.append(SRFinding(
            tracking_identifier=g.tracking_identifier,
            tracking_uid=str(g.tracking_uid),
            score_percent=float(score.value),
            probability_percent=float(probs[0].value) if probs else None,
            outline=np.asarray(scoord.value, dtype=float).reshape(-1, 2),
            referenced_sop_instance_uid=str(ref),
            group=g,
            label=comments[0] if comments else "",
            pathology=quals[0].value if quals else None,
        ))
    return out


def absent_images(path: Path | str) -> list[str]:
    """SOP Instance UIDs the report says have no calcification cluster."""
    report = hd.sr.srread(path)
    out = []
    for item in report.content[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "C0034375":  # Qualitative Evaluations
            continue
        for ev in item.ContentSequence:
            if (ev.ValueType == "CODE"
                    and ev.ConceptNameCodeSequence[0].CodeValue == "129769006"
                    and ev.ConceptCodeSequence[0].CodeValue == "272519000"):
                out.append(ev.ContentSequence[0].ReferencedSOPSequence[0]
                           .ReferencedSOPInstanceUID)
    return out
