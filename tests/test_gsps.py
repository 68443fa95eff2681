"""GSPS with the ROI marks: dciodvfy-clean, VOI carried from the image, one outline per ROI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from node.analysis.result import Finding, StudyAnalysis
from node.reports import build_gsps, build_reports, describe_study
from node.reports.gsps import LAYER_NAME
from node.reports.labels import mark_label
from tests.test_cad_sr import four_view_case
from tests.test_reports import MODEL, circle, context, image_analysis
from tests.testdata import mg_dataset, mias_pixels
from tests.tools import dciodvfy_problems

GSPS_CLASS = GrayscaleSoftcopyPresentationStateStorage


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return four_view_case(tmp_path_factory.mktemp("gsps"), key="gsps-key")


def test_one_valid_gsps_per_image(case) -> None:  # type: ignore[no-untyped-def]
    analysis, sources, _, objs, out = case
    files = [p for o, p in zip(objs, out, strict=True) if o.SOPClassUID == GSPS_CLASS]
    assert len(files) == len(analysis.images) == 4
    series_by_lat: dict[str, set[str]] = {}
    for path, image in zip(files, analysis.images, strict=True):
        assert dciodvfy_problems(path) == ([], []), path.name
        gsps = pydicom.dcmread(path)
        src = sources[image.sop_instance_uid]
        ref = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert gsps.SeriesNumber == 9904 and gsps.Modality == "PR"
        assert gsps.Laterality == src.ImageLaterality
        series_by_lat.setdefault(gsps.Laterality, set()).add(gsps.SeriesInstanceUID)
        assert gsps.PatientID == src.PatientID and gsps.StudyInstanceUID == src.StudyInstanceUID
        # The image's window is carried over.
        (voi,) = gsps.SoftcopyVOILUTSequence
        assert float(voi.WindowCenter) == pytest.approx(float(src.WindowCenter))
        assert float(voi.WindowWidth) == pytest.approx(float(src.WindowWidth))
        assert gsps.PresentationLUTShape == "IDENTITY"
        assert [layer.GraphicLayer for layer in gsps.GraphicLayerSequence] == [LAYER_NAME]
        (annotation,) = gsps.GraphicAnnotationSequence
        assert annotation.GraphicLayer == LAYER_NAME
        graphics = annotation.get("GraphicObjectSequence", [])
        texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
        assert len(graphics) == len(image.findings)
        # one label per mark, then the line with the finding site and what the marks mean
        if image.findings:
            assert texts[:-1] == [mark_label(f, MODEL, MODEL.threshold) for f in image.findings]
            assert "benign/malignant at P(malignant) >= 50%" in texts[-1]
        else:
            assert texts[-1].endswith("AI found no calcification cluster")
        assert texts[-1].startswith(("left breast", "right breast"))
        for g, f in zip(graphics, image.findings, strict=True):
            assert g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL"
            pts = np.asarray(g.GraphicData, dtype=np.float64).reshape(-1, 2)
            np.testing.assert_allclose(pts, np.asarray(f.outline_xy), atol=1e-3)
    # One series per breast.
    assert {k: len(v) for k, v in series_by_lat.items()} == {"L": 1, "R": 1}
    assert series_by_lat["L"] != series_by_lat["R"]


def test_monochrome1_gets_inverse(tmp_path: Path) -> None:
    pixels = mias_pixels("mdb209")
    ds = mg_dataset(255 - pixels, patient_id="M1", study_uid="2.25.555", sop_uid="2.25.556",
                    laterality="R", view="MLO", spacing_mm=0.2, monochrome1=True)
    f = Finding(1, ds.SOPInstanceUID, "R", "MLO", (300.0, 300.0), circle(300.0, 300.0, 20.0),
                4.0, 5, 0.7)
    image = image_analysis(ds, [f], pixels)
    study = describe_study(StudyAnalysis("2.25.555", MODEL, [image]), {ds.SOPInstanceUID: ds})
    gsps = build_gsps(study.images[0], study, context("m1"))
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path) == ([], [])
    back = pydicom.dcmread(path)
    assert back.PresentationLUTShape == "INVERSE"
    assert float(back.SoftcopyVOILUTSequence[0].WindowWidth) == pytest.approx(
        float(ds.WindowWidth))


def test_skipped_image_gets_no_gsps(case) -> None:  # type: ignore[no-untyped-def]
    analysis, sources, _, _, _ = case
    skipped = replace(analysis.images[0], skipped_reason="test")
    rest = analysis.images[1:]
    objs = build_reports(replace(analysis, images=[skipped, *rest]), sources, context("k"),
                         ["gsps"])
    presented = [o.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
                 .ReferencedSOPInstanceUID for o in objs]
    assert presented == [im.sop_instance_uid for im in rest]
    assert [o.InstanceNumber for o in objs] == [1, 2, 3]
    with pytest.raises(ValueError, match="no analysed image"):
        build_reports(replace(analysis, images=[skipped]), sources, context("k"), ["gsps"])
