"""node.reports.sr_document builds the dataset highdicom's ComprehensiveSR constructor builds.

Each build below hands the *same* content tree, evidence and UIDs to highdicom's constructor
and to :func:`node.reports.sr_document.comprehensive_sr` (``build_sr``'s constructor call is
intercepted), then compares the two datasets element by element (and their encoded bytes), and
runs dciodvfy and dsrdump on the node's one.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import node.reports.sr as sr_module
from node.analysis.result import Finding, StudyAnalysis
from node.reports import build_reports
from node.reports.common import set_document_dates
from node.reports.sr_document import ComprehensiveSRDocument, comprehensive_sr
from tests.test_reports import (
    CREATED,
    MODEL,
    circle,
    context,
    image_analysis,
    mias_four_view_analysis,
)
from tests.testdata import mg_dataset, mias_pixels
from tests.tools import dciodvfy_problems, dsrdump


def differences(a: Dataset, b: Dataset, path: str = "") -> Iterator[str]:
    """Every element that differs between ``a`` and ``b`` (tag, VR or value), recursively."""
    tags = sorted(set(a.keys()) | set(b.keys()))
    for tag in tags:
        where = f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}"
        if tag not in a or tag not in b:
            yield f"{where}: only in {'highdicom' if tag in a else 'sr_document'}"
            continue
        ea, eb = a[tag], b[tag]
        if ea.VR != eb.VR:
            yield f"{where}: VR {ea.VR} != {eb.VR}"
        elif isinstance(ea.value, DicomSequence):
            if len(ea.value) != len(eb.value):
                yield f"{where}: {len(ea.value)} != {len(eb.value)} items"
                continue
            for n, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=True)):
                yield from differences(ia, ib, f"{where}[{n}].")
        elif ea.value != eb.value:
            yield f"{where}: {ea.value!r} != {eb.value!r}"


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class BothConstructors:
    """Stands in for ``comprehensive_sr`` in node.reports.sr: builds with both, keeps both."""

    def __init__(self) -> None:
        self.pairs: list[tuple[hd.sr.ComprehensiveSR, ComprehensiveSRDocument]] = []

    def __call__(self, **kwargs: Any) -> ComprehensiveSRDocument:
        ours = comprehensive_sr(**kwargs)
        # highdicom's constructor has no ``references`` (it walks the tree) and parses the raw
        # (encoded) content in place: it gets a copy
        theirs = {k: v for k, v in kwargs.items() if k != "references"}
        theirs["content"] = deepcopy(kwargs["content"])
        reference = hd.sr.ComprehensiveSR(**theirs)
        self.pairs.append((reference, ours))
        return ours


@pytest.fixture()
def both(monkeypatch: pytest.MonkeyPatch) -> BothConstructors:
    recorder = BothConstructors()
    monkeypatch.setattr(sr_module, "comprehensive_sr", recorder)
    return recorder


def assert_same_and_valid(both: BothConstructors, built: Dataset, tmp_path: Path) -> None:
    ((reference, ours),) = both.pairs
    assert built is ours
    assert isinstance(ours, hd.sr.ComprehensiveSR)
    # build_sr sets the dates after the constructor: on the returned (our) object only
    set_document_dates(reference, CREATED)
    assert list(differences(reference, ours)) == []
    assert reference.file_meta == ours.file_meta
    assert encoded(reference) == encoded(ours)
    # the parsed content tree (read lazily) is highdicom's too
    assert list(differences(reference.content[0], ours.content[0])) == []
    path = tmp_path / "sr.dcm"
    ours.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_problems(path)
    assert errors == [] and warnings == [], (errors, warnings)
    rc, out = dsrdump(path)
    assert rc == 0 and not [ln for ln in out.splitlines() if ln.startswith("E:")], out[-2000:]
    assert hd.sr.srread(path).content.get_planar_roi_measurement_groups() is not None


def build_sr(analysis: StudyAnalysis, sources: dict[str, Dataset], key: str,
             previous: list[Dataset] | None = None) -> Dataset:
    (sr,) = build_reports(analysis, sources, context(key, previous_srs=previous or []),
                          ["tid1500"])
    return sr


def test_findings_and_predecessors_same_as_highdicom(both: BothConstructors,
                                                     tmp_path: Path) -> None:
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    previous = Dataset()
    previous.SOPClassUID = pydicom.uid.ComprehensiveSRStorage
    previous.SOPInstanceUID = "2.25.99"
    previous.StudyInstanceUID = analysis.study_instance_uid
    previous.SeriesInstanceUID = "2.25.98"
    sr = build_sr(analysis, sources, "a", [previous])
    assert sr.PredecessorDocumentsSequence[0].StudyInstanceUID == analysis.study_instance_uid
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) >= 1
    assert_same_and_valid(both, sr, tmp_path)


def test_no_roi_not_validated_same_as_highdicom(both: BothConstructors, tmp_path: Path) -> None:
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    images = [image_analysis(sources[i.sop_instance_uid], [], i.display) for i in analysis.images]
    unvalidated = StudyAnalysis(analysis.study_instance_uid,
                                MODEL.__class__(MODEL.name, MODEL.version, MODEL.architecture,
                                                MODEL.threshold), images)
    assert not unvalidated.model.classification_validated
    sr = build_sr(unvalidated, sources, "b")
    assert_same_and_valid(both, sr, tmp_path)


def test_for_processing_reference_same_as_highdicom(both: BothConstructors,
                                                    tmp_path: Path) -> None:
    pixels = mias_pixels("mdb209").astype(np.uint16) << 4
    study = "2.25.1234567890123"
    proc = mg_dataset(pixels, patient_id="FP1", study_uid=study, sop_uid="2.25.11",
                      laterality="R", view="CC", spacing_mm=0.2, for_processing=True,
                      bits_stored=12, series_uid="2.25.21")
    pres = mg_dataset(pixels, patient_id="FP1", study_uid=study, sop_uid="2.25.12",
                      laterality="R", view="CC", spacing_mm=0.2, bits_stored=12,
                      series_uid="2.25.22")
    sources = {d.SOPInstanceUID: d for d in (proc, pres)}
    f = Finding(1, "2.25.11", "R", "CC", (300.0, 300.0), circle(300.0, 300.0, 20.0), 4.0, 5, 0.9)
    image = image_analysis(proc, [f], (pixels >> 4).astype(np.uint8))
    image.for_presentation = False
    sr = build_sr(StudyAnalysis(study, MODEL, [image]), sources, "c")
    assert_same_and_valid(both, sr, tmp_path)


def _content_referencing(*uids: str) -> Dataset:
    root = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("126000", "DCM", "Imaging "
                                                               "Measurement Report"),
                                      template_id="1500")
    root.ContentSequence = [hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("121233", "DCM", "Source of Measurement"),
        referenced_sop_class_uid=pydicom.uid.DigitalMammographyXRayImageStorageForPresentation,
        referenced_sop_instance_uid=uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for uid in uids]
    return root


def _evidence(study: str, sop: str, series: str) -> Dataset:
    ds = mg_dataset(np.zeros((8, 8), np.uint16), patient_id="E1", study_uid=study, sop_uid=sop,
                    laterality="L", view="CC", spacing_mm=0.1, series_uid=series)
    del ds.PixelData
    return ds


def test_other_study_evidence_and_errors_as_highdicom() -> None:
    here, there = _evidence("2.25.1", "2.25.11", "2.25.111"), _evidence("2.25.2", "2.25.21",
                                                                         "2.25.211")
    args: dict[str, Any] = dict(series_instance_uid="2.25.5", series_number=7,
                                sop_instance_uid="2.25.6", instance_number=1,
                                manufacturer="mammo-node", is_complete=True)
    content = _content_referencing("2.25.11", "2.25.21")
    reference = hd.sr.ComprehensiveSR(evidence=[here, there, here], content=content, **args)
    ours = comprehensive_sr(evidence=[here, there, here], content=content, **args)
    assert "PertinentOtherEvidenceSequence" in ours
    for ds in (reference, ours):  # the creation times are "now" in both
        set_document_dates(ds, CREATED)
    assert list(differences(reference, ours)) == []
    without = comprehensive_sr(evidence=[here, there], content=content, record_evidence=False,
                               **args)
    assert "PertinentOtherEvidenceSequence" not in without
    # a referenced instance missing from the evidence, no evidence, a 3D coordinate: refused
    with pytest.raises(ValueError, match="2.25.21"):
        comprehensive_sr(evidence=[here], content=content, **args)
    with pytest.raises(ValueError, match="No evidence"):
        comprehensive_sr(evidence=[], content=content, **args)
    scoord3d = _content_referencing("2.25.11")
    scoord3d.ContentSequence[0].ContentSequence = [hd.sr.Scoord3DContentItem(
        name=hd.sr.CodedConcept("111030", "DCM", "Image Region"),
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([[1.0, 2.0, 3.0]]), frame_of_reference_uid="2.25.7",
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)]
    with pytest.raises(ValueError, match="SCOORD3D"):
        hd.sr.ComprehensiveSR(evidence=[here], content=scoord3d, **args)
    with pytest.raises(ValueError, match="SCOORD3D"):
        comprehensive_sr(evidence=[here], content=scoord3d, **args)
