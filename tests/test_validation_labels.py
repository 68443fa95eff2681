"""The card decides whether the node may call benign/malignant, in all four output kinds.

* models.card.classification_validated: the documented rule, case by case;
* an unvalidated model: the TID 1500 SR, CAD SR, SC and GSPS carry the numbered cluster marks
  with the detector's cluster score, say "not validated for benign/malignant classification",
  hold no Pathology code, no Probability of cancer, no red/green call colours, and stay valid
  (dciodvfy, dsrdump);
* a validated one: the call and P(malignant) are there;
* the shipped card and the node's pipeline: a study outside the validated pixel-size range gets
  no call.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.card import ModelCard, calibrate, classification_validated
from node.analysis.result import StudyAnalysis
from node.reports import build_reports
from node.reports.labels import NOT_VALIDATED
from node.reports.sc import BENIGN_RGB, MALIGNANT_RGB, MARK_RGB
from node.reports.uids import ResultUIDs
from tests.srfindings import sr_findings
from tests.srread import read_cad_findings
from tests.test_reports import MODEL, context, mias_four_view_analysis, save_all
from tests.tools import dciodvfy_problems, dsrdump

KINDS = ("tid1500", "mammo_cad", "sc", "gsps")
MALIGNANT_CODE, BENIGN_CODE, PATHOLOGY_CODE = "21594007", "30807003", "111042"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights" / "calc-cluster-lite0.json"


# --------------------------------------------------------------------------- the rule


def _evidence(**over: object) -> dict:
    ev = {"validation": "patient-grouped cross-validation", "auc": 0.8, "auc_ci95": [0.62, 0.95],
          "n_clusters": 27, "threshold_source": "out-of-fold",
          "calibration": {"method": "platt", "fitted_on": "out-of-fold", "a": 2.0, "b": -0.5}}
    ev.update(over)
    return ev


def _card(**over: object) -> ModelCard:
    return ModelCard(name="m", version="1", architecture="tf_efficientnet_lite0",
                     input_size=128, roi_size_mm=32.0, classification=_evidence(**over))


@pytest.mark.parametrize("over, ok, why", [
    ({}, True, "AUC 0.80"),
    ({"auc_ci95": [0.49, 0.95]}, False, "lower bound is not above 0.5"),
    ({"auc_ci95": [0.5, 0.95]}, False, "lower bound"),
    ({"n_clusters": 12}, False, "12 clusters"),
    ({"threshold_source": "pooled"}, False, "threshold"),
    ({"calibration": {}}, False, "calibrated"),
    ({"calibration": {"method": "platt", "fitted_on": "training data"}}, False, "calibrated"),
    ({"validation": "hold-out split"}, False, "patient-grouped"),
    ({"auc": "n/a"}, False, "lacks"),
])
def test_rule(over: dict, ok: bool, why: str) -> None:
    got, reason = classification_validated(_card(**over))
    assert got is ok and why in reason
    empty = ModelCard(name="m", version="1", architecture="x", input_size=64, roi_size_mm=10.0)
    assert classification_validated(empty) == (
        False, "the model card holds no cross-validated classification evidence")


def test_calibration_is_the_cards_out_of_fold_platt() -> None:
    card = _card()
    p = np.array([0.1, 0.5, 0.9])
    q = calibrate(p, card)
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-(2.0 * np.log(p / (1 - p)) - 0.5))))
    assert np.all(np.diff(q) > 0)  # monotone: the ranking (AUC) is unchanged
    card.classification["calibration"]["method"] = "identity"
    np.testing.assert_array_equal(calibrate(p, card), p)


# --------------------------------------------------------------------------- four kinds


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    analysis, sources, paths = mias_four_view_analysis(tmp_path_factory.mktemp("src"))
    for image in analysis.images:  # the detector's cluster score of each mark
        image.findings = [replace(f, detection_score=round(0.3 + 0.1 * f.index, 2))
                          for f in image.findings]
    return analysis, sources, paths


def _build(study, validated: bool, out: Path):
    analysis, sources, _ = study
    a = StudyAnalysis(analysis.study_instance_uid,
                      replace(MODEL, classification_validated=validated),
                      copy.deepcopy(analysis.images))
    objs = build_reports(a, sources, context(f"validated-{validated}"), KINDS)
    return a, objs, save_all(objs, out)


def _texts(ds) -> list[str]:
    """Every TEXT value of an SR content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _by_class(objs, paths):
    out: dict[str, list] = {}
    for ds, p in zip(objs, paths, strict=True):
        out.setdefault(str(ds.SOPClassUID), []).append((ds, p))
    return out


TID1500, CAD, SC, GSPS = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.50",
                          "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.1")


def test_unvalidated_model_makes_no_call_in_any_kind(study, tmp_path: Path) -> None:
    analysis, objs, paths = _build(study, False, tmp_path)
    kinds = _by_class(objs, paths)
    assert set(kinds) == {TID1500, CAD, SC, GSPS}
    findings = {f.index: f for f in analysis.findings}
    for _, path in [x for v in kinds.values() for x in v]:
        errors, warnings = dciodvfy_problems(path)
        assert errors == [] and warnings == [], (path.name, errors, warnings)
    # TID 1500 and CAD SR: valid, no pathology code, no probability of cancer, the note
    for cls in (TID1500, CAD):
        (_, path), = kinds[cls]
        rc, dump = dsrdump(path)
        assert rc == 0 and not [ln for ln in dump.splitlines() if ln.startswith("E:")], dump
        for code in (MALIGNANT_CODE, BENIGN_CODE, PATHOLOGY_CODE, "111047"):
            assert code not in dump, (cls, code)
        assert "Probability of cancer" not in dump
        assert "Certainty of Finding" in dump
        assert any(NOT_VALIDATED in t for t in _texts(pydicom.dcmread(path)))
    (_, sr_path), = kinds[TID1500]
    rc, dump = dsrdump(sr_path)
    assert rc == 0
    marks = {int(g.tracking_identifier.rsplit(" ", 1)[1]): g for g in sr_findings(sr_path)}
    assert set(marks) == set(findings)
    for n, f in findings.items():  # the cluster score, in %, per numbered cluster
        assert marks[n].tracking_identifier.endswith(f"Calcification cluster {n}")
        assert marks[n].score_percent == pytest.approx(f.detection_score * 100, abs=0.01)
        assert marks[n].probability_percent is None and marks[n].pathology is None
        assert NOT_VALIDATED in marks[n].label
    (cad, _), = kinds[CAD]
    uids = ResultUIDs("validated-False")
    entries = read_cad_findings(cad)
    assert len(entries) == len(findings)
    for e in entries:
        n = int(str(e["tracking_identifier"]).rsplit(" ", 1)[1])
        assert "probability" not in e
        assert e["certainty"] == pytest.approx(findings[n].detection_score * 100)
        assert e["tracking_uid"] == uids.tracking(n)  # the same number and UID as the SR
        assert e["rendering_intent"] == "111150"  # every reported mark: presentation required
    # SC: marks in the neutral colour, no call colours; the derivation says so
    for ds, _ in kinds[SC]:
        assert "not validated for benign/malignant classification" in ds.DerivationDescription
        rgb = ds.pixel_array
        image = next(i for i in analysis.images if ds.SourceImageSequence[0]
                     .ReferencedSOPInstanceUID == i.sop_instance_uid)
        for f in image.findings:
            px, py = f.outline_xy[0]
            ring = rgb[int(py) - 2:int(py) + 3, int(px) - 2:int(px) + 3].reshape(-1, 3)
            assert (np.abs(ring.astype(int) - MARK_RGB).sum(axis=1) < 60).any()
            for call in (MALIGNANT_RGB, BENIGN_RGB):
                assert not (np.abs(ring.astype(int) - call).sum(axis=1) < 40).any()
    # GSPS: numbered labels with the cluster score; the note on every image
    for ds, _ in kinds[GSPS]:
        texts = [t.UnformattedTextValue for t in ds.GraphicAnnotationSequence[0]
                 .TextObjectSequence]
        assert not any("P(malignant)" in t for t in texts)
        marks = [t for t in texts if t.startswith("#")]
        assert not any("malignant" in t or "benign" in t for t in marks)
        for t in marks:
            n = int(t[1:].split()[0])
            assert t == f"#{n} cluster score {findings[n].detection_score * 100:.0f}%"
        if marks:
            assert NOT_VALIDATED in texts[-1]


def test_validated_model_calls_benign_or_malignant(study, tmp_path: Path) -> None:
    analysis, objs, paths = _build(study, True, tmp_path)
    kinds = _by_class(objs, paths)
    (_, sr_path), = kinds[TID1500]
    rc, dump = dsrdump(sr_path)
    assert rc == 0 and not any(NOT_VALIDATED in t for t in _texts(pydicom.dcmread(sr_path)))
    calls = {f.index: f.probability >= MODEL.threshold for f in analysis.findings}
    assert dump.count(MALIGNANT_CODE) == sum(calls.values())
    assert dump.count(BENIGN_CODE) == sum(not v for v in calls.values())
    assert "Probability of cancer" in dump and "Certainty of Finding" in dump
    (cad, _), = kinds[CAD]
    entries = read_cad_findings(cad)
    by_n = {int(str(e["tracking_identifier"]).rsplit(" ", 1)[1]): e for e in entries}
    for f in analysis.findings:
        assert by_n[f.index]["probability"] == pytest.approx(f.probability * 100)
        assert by_n[f.index]["certainty"] == pytest.approx(f.detection_score * 100)
    for ds, _ in kinds[GSPS]:
        texts = [t.UnformattedTextValue for t in ds.GraphicAnnotationSequence[0]
                 .TextObjectSequence]
        for t in texts:
            if t.startswith("#"):
                assert (" malignant P(malignant) " in t) or (" benign P(malignant) " in t)


# --------------------------------------------------------------------------- the shipped card


def test_shipped_card_states_its_evidence_and_domain() -> None:
    card = ModelCard.load(SHIPPED)
    ok, why = classification_validated(card)
    c = card.classification
    assert c["rule_outcome"] == why  # what the card says is what the rule finds
    assert c["threshold_source"] == "out-of-fold" and c["n_clusters"] >= 20
    assert c["validated_for"]["pixel_spacing_mm"] == [0.15, 0.25]
    assert ok == (c["auc_ci95"][0] > 0.5)
    assert card.detector_path(SHIPPED).is_file()


def test_pipeline_withholds_the_call_outside_the_validated_pixel_size(tmp_path: Path) -> None:
    from node.analysis.pipeline import AnalysisPipeline
    from node.analysis.result import ImageInput
    from node.config import AnalysisSettings, ModelSettings
    from tests.testdata import mias_to_mg

    pipe = AnalysisPipeline(ModelSettings(card=SHIPPED, device="cpu"),
                            AnalysisSettings(sc_max_side=512, max_rois_per_image=2))
    film, digital = tmp_path / "film.dcm", tmp_path / "digital.dcm"
    mias_to_mg("mdb241", film)
    mias_to_mg("mdb241", digital, upsample=2)  # 0.1 mm: outside the film-only validation
    results = {}
    for name, path in (("film", film), ("digital", digital)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        results[name] = pipe.analyse("1.2.3", [ImageInput(path, ds.SOPInstanceUID,
                                                          ds.SOPClassUID)])
    assert results["film"].model.classification_validated is \
        pipe.model.classification_validated
    assert results["digital"].model.classification_validated is False
    for res in results.values():
        (image,) = res.images
        f = image.findings
        assert 1 <= len(f) <= 2 and [x.index for x in f] == list(range(1, len(f) + 1))
        scores = [x.detection_score for x in f]
        assert scores == sorted(scores, reverse=True)  # numbered by descending score
        # the heat map: smooth, only on the breast, strongest at the marks
        cam = image.cam
        assert cam.max() > 0.2 and cam[:, :40].max() == 0.0  # film background: nothing
        r, c = int(f[0].centre_xy[1] * image.display_scale), int(f[0].centre_xy[0]
                                                                   * image.display_scale)
        assert cam[max(r - 25, 0):r + 25, max(c - 25, 0):c + 25].max() > 0.2
        assert np.abs(np.diff(cam, axis=0)).max() < 0.15  # no edges: no pasted squares
        assert np.abs(np.diff(cam, axis=1)).max() < 0.15
