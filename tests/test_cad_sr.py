"""Mammography CAD SR (TID 4000): validated with dciodvfy and dsrdump, read back against the
TID 1500 SR of the same analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MammographyCADSRStorage

from node.analysis.result import Finding, StudyAnalysis
from node.reports import SeriesNumbers, build_mammo_cad_sr, build_reports, describe_study
from node.reports.codes import PRESENTATION_OPTIONAL, PRESENTATION_REQUIRED
from node.reports.uids import ResultUIDs
from tests.srfindings import sr_findings
from tests.srread import read_cad_findings
from tests.test_reports import (
    MODEL,
    THRESHOLD,
    assert_valid,
    circle,
    context,
    image_analysis,
    mias_four_view_analysis,
    save_all,
)
from tests.testdata import mg_dataset, mias_four_view, mias_pixels
from tests.tools import dciodvfy_problems, dsrdump

CAD_CLASS = MammographyCADSRStorage
ALL_KINDS = ["tid1500", "mammo_cad", "gsps", "sc"]


def four_view_case(tmp: Path, key: str = "cad-key"):  # type: ignore[no-untyped-def]
    """Four mini-MIAS views, three findings on two images; every output kind built."""
    analysis, sources, paths = mias_four_view_analysis(tmp / "src")
    objs = build_reports(analysis, sources, context(key, cad_operating_point=0.45), ALL_KINDS)
    out = save_all(objs, tmp / "out")
    return analysis, sources, paths, objs, out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return four_view_case(tmp_path_factory.mktemp("cad"))


def cad_file(objs: list[Dataset], out: list[Path]) -> Path:
    return next(p for o, p in zip(objs, out, strict=True) if o.SOPClassUID == CAD_CLASS)


def test_all_kinds_in_order_and_valid(case) -> None:  # type: ignore[no-untyped-def]
    _, _, src_paths, objs, out = case
    assert [str(o.SOPClassUID) for o in objs] == (
        ["1.2.840.10008.5.1.4.1.1.88.33", CAD_CLASS] + ["1.2.840.10008.5.1.4.1.1.7"] * 4
        + ["1.2.840.10008.5.1.4.1.1.11.1"] * 4)
    # dciodvfy: no error and no warning on every object; dsrdump: no error on both SRs;
    # dcentvfy: no conflict across the sources and all outputs.
    assert_valid(out[0], out[1:], src_paths)
    rc, dump = dsrdump(out[1])
    assert rc == 0 and not [ln for ln in dump.splitlines() if ln.startswith("E:")], dump
    assert "TID 4000" in dump or "Mammography CAD Report" in dump


def test_cad_sr_tree(case) -> None:  # type: ignore[no-untyped-def]
    _, _, _, objs, out = case
    path = cad_file(objs, out)
    errors, warnings = dciodvfy_problems(path)
    assert errors == [] and warnings == []
    first = pydicom.dcmread(path)
    assert first.SeriesNumber == 9903 and first.Modality == "SR"
    assert first.CompletionFlag == "COMPLETE"
    assert first.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert first.ContentTemplateSequence[0].MappingResource == "DCMR"
    top = [(i.RelationshipType, i.ValueType, i.ConceptNameCodeSequence[0].CodeValue)
           for i in first.ContentSequence]
    assert top == [("HAS CONCEPT MOD", "CODE", "121049"), ("CONTAINS", "CONTAINER", "111028"),
                   ("CONTAINS", "CODE", "111017"), ("CONTAINS", "CODE", "111064"),
                   ("CONTAINS", "CODE", "111065")]
    library = first.ContentSequence[1].ContentSequence
    assert len(library) == 4
    for entry in library:
        assert entry.ValueType == "IMAGE" and "ConceptNameCodeSequence" not in entry
        names = {c.ConceptNameCodeSequence[0].CodeValue for c in entry.ContentSequence}
        assert {"111027", "111031", "111026", "111066"} <= names
        spacing = [c for c in entry.ContentSequence
                   if c.ConceptNameCodeSequence[0].CodeValue == "111026"][0]
        assert float(spacing.MeasuredValueSequence[0].NumericValue) == pytest.approx(200.0)
    summary = first.ContentSequence[2]
    assert summary.ConceptCodeSequence[0].CodeValue == "111242"  # with findings
    assert len(summary.ContentSequence) == 3  # one Individual Impression per cluster
    detections = first.ContentSequence[3]
    assert detections.ConceptCodeSequence[0].CodeValue == "111222"  # Succeeded
    performed = detections.ContentSequence[0].ContentSequence[0]
    assert performed.ConceptCodeSequence[0].CodeValue == "129769006"
    refs = [c.ReferencedContentItemIdentifier for c in performed.ContentSequence
            if "ReferencedContentItemIdentifier" in c]
    assert [list(r) for r in refs] == [[1, 2, n] for n in range(1, 5)]


def test_cad_sr_reads_back_like_tid1500(case) -> None:  # type: ignore[no-untyped-def]
    analysis, _, _, objs, out = case
    cad = read_cad_findings(pydicom.dcmread(cad_file(objs, out)))
    found = sr_findings(out[0])
    assert len(cad) == len(found) == len(analysis.findings) == 3
    tid1500 = [(f.probability_percent, f.referenced_sop_instance_uid, f.outline)
               for f in found]
    tid1500.sort(key=lambda t: (t[1], t[0]))
    cad.sort(key=lambda e: (e["sop_instance_uid"], e["probability"]))
    for entry, (p, ref, outline) in zip(cad, tid1500, strict=True):
        assert entry["probability"] == pytest.approx(p, abs=0.01)
        assert entry["certainty"] == pytest.approx(p, abs=0.01)
        assert entry["sop_instance_uid"] == ref
        np.testing.assert_allclose(np.asarray(entry["outline"]), outline, atol=1e-3)
    for f in analysis.findings:
        (entry,) = [e for e in cad if e["probability"] == pytest.approx(f.probability * 100)]
        assert entry["centre"] == pytest.approx(f.centre_xy, abs=1e-3)
        # Operating point 0.45: 82 % and 50 % must be presented, 31 % is optional.
        expected = PRESENTATION_REQUIRED if f.probability >= 0.45 else PRESENTATION_OPTIONAL
        assert entry["rendering_intent"] == expected.value


def test_no_findings_and_default_operating_point(tmp_path: Path) -> None:
    paths = mias_four_view(tmp_path / "src")
    sources, images = {}, []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
        images.append(image_analysis(ds, [], np.full((ds.Rows, ds.Columns), 80, np.uint8)))
    analysis = StudyAnalysis(ds.StudyInstanceUID, MODEL, images)
    ctx = context("none")
    assert ctx.operating_point(MODEL) == THRESHOLD  # default: the threshold (validated model)
    sr = build_mammo_cad_sr(describe_study(analysis, sources), ctx)
    path = tmp_path / "cad.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path) == ([], [])
    rc, dump = dsrdump(path)
    assert rc == 0 and not [ln for ln in dump.splitlines() if ln.startswith("E:")]
    assert "111241" in dump or "without findings" in dump
    assert read_cad_findings(pydicom.dcmread(path)) == []
    assert "Single Image Finding" not in dump


def test_for_processing_finding_references_for_presentation(tmp_path: Path) -> None:
    pixels = (mias_pixels("mdb209").astype(np.uint16) << 4)
    study = "2.25.98765432101"
    proc = mg_dataset(pixels, patient_id="FP2", study_uid=study, sop_uid="2.25.31",
                      laterality="R", view="CC", spacing_mm=0.2, for_processing=True,
                      bits_stored=12, series_uid="2.25.41")
    pres = mg_dataset(pixels, patient_id="FP2", study_uid=study, sop_uid="2.25.32",
                      laterality="R", view="CC", spacing_mm=0.2, bits_stored=12,
                      series_uid="2.25.42")
    src_paths = []
    for name, ds in (("proc", proc), ("pres", pres)):
        p = tmp_path / f"{name}.dcm"
        ds.save_as(p, enforce_file_format=True)
        src_paths.append(p)
    sources = {d.SOPInstanceUID: d for d in (proc, pres)}
    f = Finding(1, "2.25.31", "R", "CC", (300.0, 300.0), circle(300.0, 300.0, 20.0), 4.0, 5, 0.9)
    image = image_analysis(proc, [f], (pixels >> 4).astype(np.uint8))
    image.for_presentation = False
    analysis = StudyAnalysis(study, MODEL, [image])
    objs = build_reports(analysis, sources, context("fp-cad"), ["mammo_cad", "gsps"])
    out = save_all(objs, tmp_path / "out")
    for path in out:
        assert dciodvfy_problems(path) == ([], []), path.name
    (entry,) = read_cad_findings(pydicom.dcmread(out[0]))
    assert entry["sop_instance_uid"] == "2.25.32"
    gsps = pydicom.dcmread(out[1])
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
        .ReferencedSOPInstanceUID == "2.25.32"


def test_reopened_study_lists_the_previous_cad_sr(case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    analysis, sources, _, objs, _ = case
    previous = [objs[0], objs[1]]  # the TID 1500 SR and the CAD SR of the first result
    again = build_reports(analysis, sources, context("cad-key-2", previous_srs=previous),
                          ["tid1500", "mammo_cad"])
    tid1500, cad = again
    def predecessors(ds: Dataset) -> set[str]:
        return {i.ReferencedSOPInstanceUID for s in ds.PredecessorDocumentsSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
    assert predecessors(cad) == {objs[1].SOPInstanceUID}
    assert predecessors(tid1500) == {objs[0].SOPInstanceUID}
    path = tmp_path / "cad2.dcm"
    cad.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path) == ([], [])
    assert dsrdump(path)[0] == 0


def test_uids_deterministic(case) -> None:  # type: ignore[no-untyped-def]
    analysis, sources, _, objs, _ = case
    again = build_reports(analysis, sources, context("cad-key", cad_operating_point=0.45),
                          ["mammo_cad"])
    uids = ResultUIDs("cad-key")
    assert again[0].SOPInstanceUID == objs[1].SOPInstanceUID == uids.cad_sr_instance
    assert again[0].SeriesInstanceUID == uids.cad_sr_series


def test_operating_point_validation(case) -> None:  # type: ignore[no-untyped-def]
    analysis, sources, _, _, _ = case
    with pytest.raises(ValueError, match="operating_point"):
        context(cad_operating_point=2.0)
    with pytest.raises(ValueError, match="operating_point"):
        context(cad_operating_point=float("nan"))
    with pytest.raises(ValueError, match="unknown output kind"):
        build_reports(analysis, sources, context(), ["seg"])
    with pytest.raises(ValueError, match="must all differ"):
        SeriesNumbers(tid1500=901, sc=902, gsps=901)
