"""The TID 1500 tree written as bytes (node.reports.sr_content + sr_encode) is highdicom's.

Each case builds the same study twice through ``build_reports(kinds=["tid1500"])``: with the
node's byte-emitting content builder, and with the highdicom-template builder it replaced
(tests/tid1500_reference.py, the code of 667f167). The two SR datasets must agree element by
element (the raw Content Sequence parsed back), and the two encoded files byte for byte; the
node's file must pass dciodvfy and dsrdump and read back with highdicom.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)

import node.reports.sr as sr_module
import tests.tid1500_reference as reference
from bench.outputs import study as bench_study
from node.analysis.result import Finding, ModelInfo, StudyAnalysis
from node.reports import build_reports
from node.reports.context import ReportContext
from tests.test_reports import (
    MODEL,
    circle,
    context,
    image_analysis,
    mias_four_view_analysis,
)
from tests.test_sr_document import differences
from tests.testdata import mg_dataset, mias_pixels
from tests.tools import dciodvfy_problems, dsrdump

UNVALIDATED = ModelInfo(MODEL.name, MODEL.version, MODEL.architecture, MODEL.threshold)


def same_as_written(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """:func:`differences`, with FL values compared as the float32 they are written as (the
    reference holds highdicom's float64 list until it is encoded)."""
    out = []
    for line in differences(a, b, path):
        if "GraphicData" not in line.split(":")[0]:
            out.append(line)
    fl_a = [np.float32(v) for v in _values_of(a, 0x00700022)]
    fl_b = [np.float32(v) for v in _values_of(b, 0x00700022)]
    if fl_a != fl_b:
        out.append("GraphicData differs as float32")
    return out


def _values_of(ds: Dataset, tag: int) -> list[float]:
    values: list[float] = []
    for elem in ds:
        if elem.tag == tag:
            values.extend(elem.value)
        elif elem.VR == "SQ":
            for child in elem.value:
                values.extend(_values_of(child, tag))
    return values


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def both(monkeypatch: pytest.MonkeyPatch, analysis: StudyAnalysis,
         sources: dict[str, Dataset], ctx: ReportContext) -> tuple[Dataset, Dataset]:
    """(reference SR, node SR) of the same study and context."""
    (ours,) = build_reports(analysis, sources, ctx, ["tid1500"])
    with monkeypatch.context() as m:
        m.setattr(sr_module, "measurement_report", reference.measurement_report)
        (ref,) = build_reports(analysis, sources, ctx, ["tid1500"])
    return ref, ours


def assert_same(ref: Dataset, ours: Dataset, tmp_path: Path, validate: bool = True) -> None:
    assert ours.get_item(0x0040A730).is_raw  # the node's content is the encoded bytes
    ours_bytes = encoded(ours)  # before anything parses the raw content
    assert ours.get_item(0x0040A730).is_raw  # writing did not decode it
    ref_bytes = encoded(ref)
    assert ours_bytes == ref_bytes
    # element by element: in memory (FL as written), and as any reader of the files sees them
    assert same_as_written(ref, ours) == []
    assert list(differences(pydicom.dcmread(io.BytesIO(ref_bytes)), ours)) == []
    assert same_as_written(ref.content[0], ours.content[0]) == []
    if validate:
        path = tmp_path / "sr.dcm"
        path.write_bytes(ours_bytes)
        errors, warnings = dciodvfy_problems(path)
        assert errors == [] and warnings == [], (errors, warnings)
        rc, out = dsrdump(path)
        assert rc == 0 and not [ln for ln in out.splitlines() if ln.startswith("E:")], out[-2000:]
        read = hd.sr.srread(path)
        assert read.content.get_planar_roi_measurement_groups() is not None


def test_four_views_validated_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    previous = Dataset()
    previous.SOPClassUID = ComprehensiveSRStorage
    previous.SOPInstanceUID = "2.25.99"
    previous.StudyInstanceUID = analysis.study_instance_uid
    previous.SeriesInstanceUID = "2.25.98"
    ref, ours = both(monkeypatch, analysis, sources, context("a", previous_srs=[previous]))
    assert_same(ref, ours, tmp_path)
    assert len(ours.ContentSequence[-2].ContentSequence) == 3  # 3 ROI groups


def test_no_roi_unvalidated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    images = [image_analysis(sources[i.sop_instance_uid], [], i.display) for i in analysis.images]
    ref, ours = both(monkeypatch, StudyAnalysis(analysis.study_instance_uid, UNVALIDATED, images),
                     sources, context("b"))
    assert_same(ref, ours, tmp_path)


def test_bench_study_twelve_rois(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    analysis, sources = bench_study(4096, 3328, 3)
    ref, ours = both(monkeypatch, analysis, sources, context("bench"))
    assert_same(ref, ours, tmp_path, validate=False)  # synthetic headers (no pixels)


def _source(study: str, sop: str, lat: str, view: str, **over: object) -> Dataset:
    pixels = mias_pixels("mdb209").astype(np.uint16) << 4
    ds = mg_dataset(pixels, patient_id="V1", study_uid=study, sop_uid=sop, laterality=lat,
                    view=view, spacing_mm=0.2, bits_stored=12, series_uid=sop + ".1")
    for keyword, value in over.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def test_header_variants(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Breast Projection class (a library stand-in), no pixel spacing, no orientation, frames
    of reference (two library groups), no laterality, UTF-8 text, a for-processing view, a
    detection score, and findings without an area (fallback spacing)."""
    study = "2.25.7000"
    sources = [
        _source(study, "2.25.7001", "R", "CC",
                SOPClassUID=BreastProjectionXRayImageStorageForPresentation,
                FrameOfReferenceUID="2.25.7100"),
        _source(study, "2.25.7002", "L", "CC", ImagerPixelSpacing=None,
                FrameOfReferenceUID="2.25.7100"),
        _source(study, "2.25.7003", "R", "MLO", PatientOrientation=None,
                FrameOfReferenceUID="2.25.7200"),
        _source(study, "2.25.7004", "L", "MLO", ImageLaterality="", SpecificCharacterSet=None),
    ]
    sources[0].SpecificCharacterSet = "ISO_IR 192"
    sources[0].Manufacturer = "Médecine Élan"
    sources[0].PatientName = "Ærø^Zoë"
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    images, index = [], 1
    for n, ds in enumerate(sources):
        findings = []
        for k in range(n % 3):
            cx, cy = 200.0 + 150 * k, 250.0 + 40 * n
            findings.append(Finding(index, ds.SOPInstanceUID, str(ds.get("ImageLaterality", "")),
                                    str(ds.ViewPosition), (cx, cy), circle(cx, cy, 18.5), 3.7,
                                    4 + k, 0.2 + 0.3 * k,
                                    detection_score=0.61 if k else None))
            index += 1
        image = image_analysis(ds, findings, (mias_pixels("mdb209") >> 0).astype(np.uint8))
        if n == 2:
            image.spacing_source = "fallback"
        images.append(image)
    for model in (MODEL, UNVALIDATED):
        ctx = context(f"v-{model.classification_validated}",
                      manufacturer="Hôpital mammo-node", software_version="0.1.0 β")
        ref, ours = both(monkeypatch, StudyAnalysis(study, model, images), by_uid, ctx)
        assert ours.SpecificCharacterSet == "ISO_IR 192"
        assert_same(ref, ours, tmp_path)
        library = ours.ContentSequence[7]
        assert len(library.ContentSequence) == 3  # frames of reference 7100, 7200, none


def test_secondary_capture_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Digitised film stored as Secondary Capture: the library entry without descriptors."""
    study = "2.25.8000"
    sources = {}
    images = []
    for n, (lat, view) in enumerate((("R", "CC"), ("L", "MLO"))):
        ds = _source(study, f"2.25.800{n}", lat, view, SOPClassUID=SecondaryCaptureImageStorage,
                     Modality="OT", PatientOrientation="CC", ImagerPixelSpacing=None)
        sources[ds.SOPInstanceUID] = ds
        cx, cy = 300.0, 310.0 + 10 * n
        f = Finding(n + 1, ds.SOPInstanceUID, lat, view, (cx, cy), circle(cx, cy, 20.0), 4.0, 5,
                    0.7)
        images.append(image_analysis(ds, [f], mias_pixels("mdb209").astype(np.uint8)))
    ref, ours = both(monkeypatch, StudyAnalysis(study, MODEL, images), sources, context("sc"))
    assert_same(ref, ours, tmp_path, validate=False)  # the sources are not valid SC images


def test_written_as_built_and_parsed_only_when_read(tmp_path: Path) -> None:
    """The spool writes the raw content as it is; reading the dataset's content parses it."""
    from node.store import Spool

    analysis, sources = bench_study(4096, 3328, 1)
    (sr,) = build_reports(analysis, sources, context("w"), ["tid1500"])
    spool = Spool(tmp_path / "spool")
    rel = spool.write_dataset(sr)
    assert sr.get_item(0x0040A730).is_raw
    back = pydicom.dcmread(spool.path(rel))
    assert len(back.ContentSequence) == len(sr.ContentSequence) == 10
    assert math.isclose(float(back.ContentSequence[8].ContentSequence[0].ContentSequence[6]
                              .MeasuredValueSequence[0].NumericValue),
                        float(sr.ContentSequence[8].ContentSequence[0].ContentSequence[6]
                              .MeasuredValueSequence[0].NumericValue))
