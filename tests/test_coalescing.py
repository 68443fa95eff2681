"""Coalescing in-process: one live job per study, absorbed instances, the claim rule, the
analysis-image bound, and the schema upgrade of a database an older node wrote."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.completion import complete_ready_studies
from node.db import Database, Instance, Job, Series, Study, utcnow
from node.worker import select_for_analysis
from tests.netutil import REPO, write_config


def _add(db: Database, study_uid: str, n: int, views=(("L", "CC"), ("R", "CC"), ("L", "MLO"),
                                                      ("R", "MLO"))) -> None:
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar()
        if study is None:
            study = Study(study_uid=study_uid, state="receiving", generation=1)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_uid=study_uid + ".1", modality="MG"))
            s.flush()
        elif study.state != "receiving":
            study.state, study.generation = "receiving", study.generation + 1
        series = s.execute(select(Series).where(Series.study_id == study.id)).scalar()
        start = s.execute(select(Instance).where(Instance.study_id == study.id)).all()
        for i in range(len(start), len(start) + n):
            lat, view = views[i % len(views)]
            s.add(Instance(study_id=study.id, series_id=series.id, sop_uid=f"{study_uid}.{i}",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", transfer_syntax="x",
                           relpath=f"instances/{study_uid}-{i}.dcm", size=1, sha256=f"{i:064x}",
                           laterality=lat, view=view))
        study.last_received_at = utcnow()


def _jobs(db: Database, study_uid: str) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(j.state, j.input_key) for j in s.execute(
            select(Job).join(Study, Study.id == Job.study_id)
            .where(Study.study_uid == study_uid).order_by(Job.id)).scalars()]


def test_later_instances_are_absorbed_into_the_live_job(db: Database) -> None:
    _add(db, "1.2.3", 4)
    assert complete_ready_studies(db, 30, True) == ["1.2.3"]  # four views: at once
    first = _jobs(db, "1.2.3")
    assert [s for s, _ in first] == ["queued"]
    for _ in range(50):  # every later instance re-opens the study...
        _add(db, "1.2.3", 1)
        assert complete_ready_studies(db, 30, True) == []  # ...four views no longer complete it
    later = utcnow() + dt.timedelta(seconds=31)
    assert complete_ready_studies(db, 30, True, now=later) == ["1.2.3"]  # stable: completes
    jobs = _jobs(db, "1.2.3")
    assert len(jobs) == 1 and jobs[0][0] == "queued" and jobs[0][1] != first[0][1]  # absorbed


def test_the_database_refuses_a_second_live_job(db: Database) -> None:
    _add(db, "1.2.4", 4)
    complete_ready_studies(db, 30, True)
    with pytest.raises(IntegrityError), db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == "1.2.4")).scalar_one()
        s.add(Job(study_id=study.id, generation=1, input_key="x", state="queued"))


def test_a_job_is_not_claimed_while_its_study_receives(db: Database, tmp_path: Path) -> None:
    from node.store import Spool
    from node.worker import AnalysisWorker, ReportOptions

    class NoAnalyser:
        model = None

        def analyse(self, *a, **k):  # type: ignore[no-untyped-def]
            raise AssertionError("must not be claimed")

    _add(db, "1.2.5", 4)
    complete_ready_studies(db, 30, True)
    _add(db, "1.2.5", 1)  # re-opened: the queued job waits
    worker = AnalysisWorker(db, Spool(tmp_path / "spool"), NoAnalyser(), lambda *a, **k: [],
                            ReportOptions("m", 1, 2, 0.5, "v"), [])
    assert worker.run_once() is False
    assert _jobs(db, "1.2.5")[0][0] == "queued"


def test_select_for_analysis_keeps_each_view_then_the_newest(db: Database) -> None:
    _add(db, "1.2.6", 40)
    with db.session() as s:
        instances = list(s.execute(select(Instance).order_by(Instance.id)).scalars())
    chosen, over = select_for_analysis(instances, 6)
    assert len(chosen) == 6 and len(over) == 34
    assert {(i.laterality, i.view) for i in chosen} == {("L", "CC"), ("R", "CC"), ("L", "MLO"),
                                                        ("R", "MLO")}
    assert max(i.id for i in over) < max(i.id for i in chosen)  # the newest were kept
    assert [i.id for i in chosen] == sorted(i.id for i in chosen)  # in received order
    assert select_for_analysis(instances[:5], 6) == (instances[:5], [])


def test_an_older_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE studies (id INTEGER PRIMARY KEY, study_uid VARCHAR(64) UNIQUE,
            state VARCHAR(16), generation INTEGER, created_at DATETIME,
            last_received_at DATETIME, completed_at DATETIME);
        CREATE TABLE series (id INTEGER PRIMARY KEY, study_id INTEGER, series_uid VARCHAR(64),
            modality VARCHAR(16));
        CREATE TABLE instances (id INTEGER PRIMARY KEY, study_id INTEGER, series_id INTEGER,
            sop_uid VARCHAR(64) UNIQUE, sop_class_uid VARCHAR(64), transfer_syntax VARCHAR(64),
            relpath VARCHAR(255), size INTEGER, sha256 VARCHAR(64), laterality VARCHAR(2),
            view VARCHAR(16), for_processing BOOLEAN, calling_aet VARCHAR(16),
            received_at DATETIME);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, study_id INTEGER, generation INTEGER,
            input_key VARCHAR(64), state VARCHAR(16), attempts INTEGER, created_at DATETIME,
            started_at DATETIME, finished_at DATETIME, error TEXT);
        INSERT INTO studies VALUES (1, '1.2.7', 'complete', 3, NULL, '2026-01-01', NULL);
        INSERT INTO jobs (id, study_id, generation, input_key, state, attempts)
            VALUES (1, 1, 1, 'a', 'queued', 0), (2, 1, 2, 'b', 'queued', 0),
                   (3, 1, 3, 'c', 'queued', 0), (4, 1, 1, 'd', 'done', 1);
    """)
    con.commit()
    con.close()
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    db.create_schema()  # idempotent
    with db.session() as s:
        states = dict(s.execute(select(Job.id, Job.state)).all())
        assert s.execute(select(Instance.outcome)).all() == []  # the column exists
    assert states == {1: "superseded", 2: "superseded", 3: "queued", 4: "done"}


def test_retry_requeues_one_failed_job_per_study(tmp_path: Path, db: Database) -> None:
    _add(db, "1.2.8", 4)
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == "1.2.8")).scalar_one()
        s.add_all([Job(study_id=study.id, generation=1, input_key="a", state="failed"),
                   Job(study_id=study.id, generation=1, input_key="b", state="failed")])
    config = write_config(tmp_path / "c.toml", {"node": {"data_dir": str(tmp_path)}})
    out = subprocess.run([sys.executable, "-m", "node", "retry", "--config", str(config)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 failed analyses" in out.stdout
    assert sorted(s for s, _ in _jobs(db, "1.2.8")) == ["failed", "queued"]


def test_per_image_work_is_reused_when_a_superseded_analysis_runs_again() -> None:
    import numpy as np

    from node.analysis.pipeline import AnalysisPipeline
    from node.analysis.result import ImageAnalysis, ImageInput

    calls: list[str] = []
    pipeline = object.__new__(AnalysisPipeline)

    def prepare_image(item):  # type: ignore[no-untyped-def]
        calls.append(item.sop_instance_uid)
        ia = ImageAnalysis(item.sop_instance_uid, item.sop_class_uid, "L", "CC", 8, 8, 0.1,
                           "x", True, display=np.zeros((8, 8), np.uint8),
                           cam=np.zeros((8, 8), np.float32))
        breast = np.ones((8, 8), bool)  # display-size breast mask (confines the heat map)
        return ia, [np.ones((4, 4), np.float32)], [], 0.5, 0.5, breast

    pipeline._prepare_image = prepare_image  # type: ignore[method-assign]
    cache: dict = {}
    item = ImageInput(Path("/x/a.dcm"), "1.2.9.1", "1.2.840.10008.5.1.4.1.1.1.2")
    first = pipeline._prepare_cached(item, cache)
    first[0].findings.append("painted")  # the classifier mutates the per-study copy...
    first[0].cam[0, 0] = 1.0
    again = pipeline._prepare_cached(item, cache)
    assert calls == ["1.2.9.1"]  # ...decoded once
    assert again[0].findings == [] and again[0].cam[0, 0] == 0.0  # a fresh copy each time
