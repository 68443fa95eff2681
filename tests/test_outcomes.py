"""Outcomes back in: import (idempotent, every bad row reported, accession numbers never
printed), live sensitivity/specificity/AUC per model version (against scikit-learn) on the
status page and /metrics, and the export that helper E's dicom-csv importer turns into a
training set from the node's own data directory."""

from __future__ import annotations

import csv
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from node import metrics, model_status, status_page
from node.db import Database, Outcome, ScoredBreast, ScoredFinding, Study
from node.evaluation import live_performance, performance
from node.modelstore import ModelRef
from node.outcomes import OutcomesError, export_training_csv, import_outcomes
from tests.lifecycle import make_env, store_files


def _write(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _seed(db: Database) -> None:
    """Four analysed studies (S1..S3, S4 shares an accession number with S3)."""
    with db.session() as s:
        for uid, acc in (("1.2.3.1", "ACC1"), ("1.2.3.2", "ACC2"), ("1.2.3.3", "DUP"),
                         ("1.2.3.4", "DUP")):
            s.add(Study(study_uid=uid, state="done", accession_number=acc))
            for side in ("L", "R"):
                s.add(ScoredBreast(study_uid=uid, accession_number=acc, laterality=side,
                                   model_name="m", model_version="1", role="active", job_id=1,
                                   score=0.3, findings=1, threshold=0.5))
        for idx in (1, 2):
            s.add(ScoredFinding(study_uid="1.2.3.3", job_id=1, model_name="m", model_version="1",
                                role="active", finding_index=idx, sop_uid=f"9.{idx}",
                                laterality="L", view="CC", centre_x=10, centre_y=10,
                                radius_mm=2, pixel_spacing_mm=0.1, probability=0.3))


HEADER = ["study_instance_uid", "accession_number", "laterality", "outcome", "kind", "date",
          "finding"]


def test_import_links_reports_and_is_idempotent(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    _seed(env.db)
    f = _write(tmp_path / "outcomes.csv", HEADER, [
        ["1.2.3.1", "", "R", "malignant", "biopsy", "2026-02-01", ""],
        ["", "ACC2", "B", "negative", "", "2027-01-15", ""],  # both breasts, follow-up
        ["1.2.3.3", "", "L", "benign", "biopsy", "20260301", "2"],  # finding 2
        ["1.2.3.3", "", "L", "benign", "biopsy", "2026-03-01", "9"],  # no such finding
        ["", "ACCSECRET9", "R", "malignant", "", "", ""],  # unknown accession
        ["1.2.3.1", "", "R", "pending", "", "", ""],
        ["1.2.9.9", "", "R", "malignant", "", "", ""],  # unknown study
        ["1.2.3.1", "ACC2", "R", "malignant", "", "", ""],  # study and accession disagree
        ["", "DUP", "R", "benign", "", "", ""],  # ambiguous accession
        ["1.2.3.1", "", "X", "malignant", "", "", ""],
        ["1.2.3.1", "", "R", "malignant", "biopsy", "2026-13-01", ""],
        ["1.2.3.1", "", "B", "malignant", "", "", "1"],  # a finding needs a side
    ])
    r = import_outcomes(env.db, f, data_dir=env.data_dir, rejects=tmp_path / "rejects.csv")
    assert (r.rows, r.added, r.updated, r.unchanged) == (12, 4, 0, 0)
    assert [line for line, _ in r.errors] == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    why = dict(r.errors)
    assert "no finding 9 on the L side" in why[5]
    assert why[6] == "accession number not found among the node's studies"
    assert "'pending' is not malignant, benign or negative" in why[7]
    assert "not among the node's studies" in why[8]
    assert "does not match" in why[9] and "matches 2 studies" in why[10]
    assert "laterality 'X'" in why[11] and "YYYY-MM-DD" in why[12] and "needs laterality" in why[13]
    text = r.text("outcomes.csv")
    assert "ACCSECRET9" not in text and "ACC2" not in text and "line 6:" in text
    with env.db.session() as s:
        rows = sorted((o.study_uid, o.laterality, o.finding_index, o.truth, o.kind,
                       o.outcome_date) for o in s.execute(select(Outcome)).scalars())
    assert rows == [("1.2.3.1", "R", 0, "malignant", "biopsy", "2026-02-01"),
                    ("1.2.3.2", "L", 0, "negative", "follow-up", "2027-01-15"),
                    ("1.2.3.2", "R", 0, "negative", "follow-up", "2027-01-15"),
                    ("1.2.3.3", "L", 2, "benign", "biopsy", "2026-03-01")]
    rejects = _rows(tmp_path / "rejects.csv")
    assert len(rejects) == 9 and rejects[1]["error"] == why[6]
    assert stat.S_IMODE(os.stat(tmp_path / "rejects.csv").st_mode) == 0o600
    # again: nothing changes
    again = import_outcomes(env.db, f, data_dir=env.data_dir)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 4)
    # a corrected outcome replaces the earlier one; a dry run writes nothing; ; and aliases
    fixed = _write(tmp_path / "fixed.csv", ["Study Instance UID", "Side", "Result", "Date"],
                   [["1.2.3.1", "right", "benign", "2026-02-01"],
                    ["1.2.3.4", "L", "M", ""]], delimiter=";")
    dry = import_outcomes(env.db, fixed, data_dir=env.data_dir, dry_run=True)
    assert (dry.added, dry.updated) == (1, 1)
    with env.db.session() as s:
        assert s.execute(select(Outcome.truth).where(Outcome.study_uid == "1.2.3.1")
                         ).scalar() == "malignant"
    done = import_outcomes(env.db, fixed, data_dir=env.data_dir)
    assert (done.added, done.updated) == (1, 1)
    with env.db.session() as s:
        assert s.execute(select(Outcome.truth).where(Outcome.study_uid == "1.2.3.1")
                         ).scalar() == "benign"
    with pytest.raises(OutcomesError, match="no outcome column"):
        import_outcomes(env.db, _write(tmp_path / "x.csv", ["study", "side"], []),
                        data_dir=env.data_dir)


def test_live_performance_per_model_version(tmp_path: Path) -> None:
    """sensitivity / specificity at each model's threshold and AUC, per version, equal to
    scikit-learn on the same breasts; the status page and /metrics show them."""
    env = make_env(tmp_path)
    rng = np.random.default_rng(7)
    n = 60
    truth = rng.integers(0, 2, n)
    models = {ModelRef("calc", "1"): (0.45, 0.35), ModelRef("calc", "2"): (0.5, 0.2)}
    scores = {ref: np.clip(truth * sep + rng.normal(0.3, 0.2, n), 0, 1)
              for ref, (_, sep) in models.items()}
    with env.db.session() as s:
        for i in range(n):
            uid = f"1.2.840.99.{i}"
            s.add(Study(study_uid=uid, state="done"))
            for ref, (thr, _) in models.items():
                s.add(ScoredBreast(study_uid=uid, laterality="L", model_name=ref.name,
                                   model_version=ref.version, role="active", job_id=i,
                                   score=float(scores[ref][i]), threshold=thr))
            # a malignant finding makes the breast positive; benign ones alone do not
            if truth[i]:
                s.add(Outcome(study_uid=uid, laterality="L", finding_index=1, truth="malignant",
                              kind="biopsy"))
            s.add(Outcome(study_uid=uid, laterality="L", finding_index=2, truth="benign",
                          kind="biopsy"))
            s.add(Outcome(study_uid=uid, laterality="R", truth="negative", kind="follow-up"))
        s.add(ScoredBreast(study_uid="1.2.840.99.x", laterality="L", model_name="calc",
                           model_version="1", role="active", job_id=99, score=0.9,
                           threshold=0.45))  # no outcome: does not count
    with env.db.session() as s:
        perf = live_performance(s)
    for ref, (thr, _) in models.items():
        p = perf[ref]
        called = scores[ref] >= thr
        assert (p.n_pos, p.n_neg) == (int(truth.sum()), int(n - truth.sum()))
        assert p.sensitivity == pytest.approx(called[truth == 1].mean())
        assert p.specificity == pytest.approx((~called[truth == 0]).mean())
        assert p.auc == pytest.approx(roc_auc_score(truth, scores[ref]))
        assert p.auc_ci95[0] < p.auc < p.auc_ci95[1]
        assert p.sensitivity_ci95[0] <= p.sensitivity <= p.sensitivity_ci95[1]
    assert performance([1, 0], [0.5, 0.5], [0.5, 0.5]).auc == pytest.approx(0.5)

    class Live:
        def describe(self) -> dict:
            import datetime as dt

            one = {"name": "calc", "version": "2", "source": "installed",
                   "architecture": "tf_efficientnet_lite0", "threshold": 0.5,
                   "loaded_at": dt.datetime(2026, 12, 1), "metrics": {"pooled_auc": 0.81},
                   "intended_use": "Research <only>"}
            return {"active": one, "active_error": None,
                    "shadow": {**one, "version": "1", "threshold": 0.45},
                    "shadow_error": "calc:3 not loaded: gone"}

    model_status.bind_metrics(env.db, Live())
    text = metrics.render().decode()

    def sample(name: str, version: str) -> float:
        m = re.search(rf'^{name}{{model="calc",role="(\w+)",version="{version}"}} (\S+)$', text,
                      re.M)
        assert m, (name, version, text)
        return float(m.group(2))

    assert sample("mammo_model_auc", "2") == pytest.approx(perf[ModelRef("calc", "2")].auc)
    assert sample("mammo_model_sensitivity", "1") == pytest.approx(
        perf[ModelRef("calc", "1")].sensitivity)
    assert sample("mammo_model_breasts_scored", "1") == n + 1
    assert re.search(r'mammo_model_info{model="calc",role="active",source="installed",'
                     r'version="2"} 1.0', text)
    assert re.search(r'mammo_model_load_failed{role="shadow"} 1.0', text)
    assert re.search(r'mammo_model_outcome_breasts{model="calc",role="shadow",truth="malignant",'
                     rf'version="1"}} {float(truth.sum())}', text)
    page = status_page.render(env.db, ae_title="MAMMO_AI", version="t", models=Live().describe)
    assert 'id="model-performance"' in page and "Research &lt;only&gt;" in page
    p2 = perf[ModelRef("calc", "2")]
    assert f"{100 * p2.sensitivity:.1f} % ({p2.tp}/{p2.n_pos})" in page
    assert "calc:3 not loaded: gone" in page and "CV AUC 0.810" in page
    assert 'id="models-summary">Model: <b>calc 2</b>; shadow: <b>calc 1</b>.' in page
    assert page.index("models-summary") < page.index("Recent studies")


def test_old_database_gets_the_accession_column_and_a_backfill(tmp_path: Path,
                                                               ) -> None:
    from tests.smallstudies import small_study

    env = make_env(tmp_path)
    uid = store_files(env, small_study(tmp_path / "s", 5, views=2, tag="old"))
    with env.db.engine.begin() as conn:  # the schema before this column existed
        conn.exec_driver_sql("DROP INDEX ix_studies_accession_number")
        conn.exec_driver_sql("ALTER TABLE studies DROP COLUMN accession_number")
    env.db.create_schema()
    with env.db.session() as s:
        assert s.execute(select(Study.accession_number)).scalar() is None
    f = _write(tmp_path / "o.csv", ["accession_number", "laterality", "outcome"],
               [["ACCOLD0005", "R", "malignant"]])
    r = import_outcomes(env.db, f, data_dir=env.data_dir)
    assert r.added == 1 and r.studies == {uid} and r.not_analysed == {uid}
    with env.db.session() as s:
        assert s.execute(select(Study.accession_number)).scalar() == "ACCOLD0005"


@pytest.mark.dcmtk
def test_export_feeds_the_dicom_csv_importer(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """Received over DICOM (accession numbers recorded then, never logged), analysed by the
    shipped model, outcomes imported by accession number, exported, imported by
    ``python -m models import dicom-csv`` from the node's data directory."""
    from models.__main__ import main as models_main
    from node.analysis.pipeline import AnalysisPipeline
    from node.completion import complete_ready_studies
    from node.config import ModelSettings
    from tests.lifecycle import manager, worker
    from tests.modelfixtures import SHIPPED_CARD
    from tests.netutil import storescu
    from tests.receivers import local_receiver
    from tests.smallstudies import small_study

    env = make_env(tmp_path)
    files = {i: small_study(tmp_path / f"s{i}", i, tag="exp") for i in (1, 3)}
    r = local_receiver(env.spool, env.db, max_pdu_size=131072,
                       max_associations=4)
    r.start()
    caplog.set_level(logging.INFO)
    try:
        for i in (1, 3):
            assert storescu(r.port, files[i]).returncode == 0
    finally:
        r.stop()
    with env.db.session() as s:
        acc = dict(s.execute(select(Study.study_uid, Study.accession_number)).all())
    assert sorted(acc.values()) == ["ACCEXP0001", "ACCEXP0003"]
    assert "instance.stored" in caplog.text and "ACCEXP" not in caplog.text
    complete_ready_studies(env.db, 0, True)
    models = manager(env, default=AnalysisPipeline(ModelSettings(card=SHIPPED_CARD, device="cpu")))
    w, _ = worker(env, models)
    assert w.run_once() and w.run_once()
    uid1 = next(u for u, a in acc.items() if a == "ACCEXP0001")
    with env.db.session() as s:
        found = s.execute(select(ScoredFinding).order_by(ScoredFinding.id)).scalars().all()
    f1 = {(f.laterality, f.finding_index): f for f in found if f.study_uid == uid1}
    assert f1, "the shipped model finds something on study 1"
    # The side with the most findings had a biopsy of one of them; the other side is negative.
    pos_side = max("RL", key=lambda side: sum(1 for s, _ in f1 if s == side))
    neg_side = "L" if pos_side == "R" else "R"
    pos = sorted(i for side, i in f1 if side == pos_side)
    named = pos[0]
    outcomes = _write(tmp_path / "biopsy.csv",
                      ["accession_number", "laterality", "outcome", "date", "finding"],
                      [["ACCEXP0001", pos_side, "malignant", "2026-02-03", named],
                       ["ACCEXP0001", neg_side, "negative", "2027-01-10", ""],
                       ["ACCEXP0003", "B", "negative", "2027-01-11", ""]])
    assert import_outcomes(env.db, outcomes, data_dir=env.data_dir).added == 4
    labels = tmp_path / "labels.csv"
    rep = export_training_csv(env.db, labels)
    rows = _rows(labels)
    n3 = sum(1 for f in found if f.study_uid != uid1)
    n_neg = sum(1 for side, _ in f1 if side == neg_side)
    expected = {"malignant": 1, "normal": n_neg + n3}
    assert {k: v for k, v in rep.labels.items() if v} == {k: v for k, v in expected.items() if v}
    assert sum(rep.skipped.values()) == len(pos) - 1  # unnamed findings of a malignant side
    assert stat.S_IMODE(os.stat(labels).st_mode) == 0o600
    malignant = next(r for r in rows if r["label"] == "malignant")
    f = f1[(pos_side, named)]
    assert (malignant["sop_instance_uid"], float(malignant["x"]), float(malignant["y"])) == (
        f.sop_uid, pytest.approx(f.centre_x - 0.5, abs=0.01),
        pytest.approx(f.centre_y - 0.5, abs=0.01))
    # helper E's importer reads the node's data directory with these labels
    out = tmp_path / "rois"
    models_main(["import", "dicom-csv", str(env.data_dir), "--csv", str(labels), "--out",
                 str(out), "--patch-mm", "8"])
    rois = _rows(out / "rois.csv")
    assert len(rois) == len(rows)
    assert sorted(r["label"] for r in rois) == sorted(r["label"] for r in rows)
    assert {r["roi_kind"] for r in rois} == {"cluster"}
    prov = _rows(out / "provenance.csv")
    assert sorted(p["sop_instance_uid"] for p in prov) == sorted(r["sop_instance_uid"]
                                                                 for r in rows)
    text = (out / "rois.csv").read_text()
    assert uid1 not in text and "EXP0001" not in text  # no UID, accession or patient ID
    assert len({r["patient_id"] for r in rois}) == 2
    # --breast-level adds one unlocated row per breast with an outcome (whole-breast ROIs)
    export_training_csv(env.db, labels, breast_level=True)
    out2 = tmp_path / "rois2"
    models_main(["import", "dicom-csv", str(env.data_dir), "--csv", str(labels), "--out",
                 str(out2), "--patch-mm", "8", "--breast-px", "64"])
    kinds = [r["roi_kind"] for r in _rows(out2 / "rois.csv")]
    assert kinds.count("breast") == 4 * 2 and kinds.count("cluster") == len(rows)
