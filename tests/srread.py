"""Read the node's Mammography CAD SR back as plain values (tests, ``bench.evaluate_mias``)."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from node.reports import codes as C


def read_cad_findings(ds: Dataset) -> list[dict[str, object]]:
    """The Single Image Findings of a Mammography CAD SR as plain values (read through
    the by-reference identifiers independently of the builder).

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
        if item.ConceptNameCodeSequence[0].CodeValue != C.CAD_SUMMARY.value:
            continue
        for impression in item.get("ContentSequence", []):
            for sif in impression.get("ContentSequence", []):
                if sif.get("ValueType") != "CODE" or \
                        sif.ConceptNameCodeSequence[0].CodeValue != C.SINGLE_IMAGE_FINDING.value:
                    continue
                entry: dict[str, object] = {}
                for prop in sif.ContentSequence:
                    code = prop.ConceptNameCodeSequence[0].CodeValue
                    if prop.ValueType == "NUM":
                        value = float(prop.MeasuredValueSequence[0].NumericValue)
                        if code == C.PROBABILITY_OF_CANCER.value:
                            entry["probability"] = value
                        elif code == C.CERTAINTY_OF_FINDING.value:
                            entry["certainty"] = value
                    elif prop.ValueType == "TEXT" and code == C.TRACKING_IDENTIFIER.value:
                        entry["tracking_identifier"] = str(prop.TextValue)
                    elif prop.ValueType == "UIDREF" and code == C.TRACKING_UID.value:
                        entry["tracking_uid"] = str(prop.UID)
                    elif prop.ValueType == "CODE" and code == C.RENDERING_INTENT.value:
                        entry["rendering_intent"] = prop.ConceptCodeSequence[0].CodeValue
                    elif prop.ValueType == "SCOORD":
                        pts = [tuple(float(v) for v in prop.GraphicData[i:i + 2])
                               for i in range(0, len(prop.GraphicData), 2)]
                        target = at(prop.ContentSequence[0].ReferencedContentItemIdentifier)
                        entry["sop_instance_uid"] = \
                            target.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                        if code == C.CENTER.value:
                            entry["centre"] = pts[0]
                        elif code == C.OUTLINE.value:
                            entry["outline"] = pts
                out.append(entry)
    return out
