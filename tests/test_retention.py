"""Retention: expired, finished studies are purged with their files; owed deliveries are kept."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import func, select

from node.db import Database, Delivery, Instance, Job, Result, ResultObject, Series, Study, utcnow
from node.retention import purge_expired
from node.store import Spool
from tests.testdata import mias_to_mg


def _study(db: Database, spool: Spool, tmp: Path, uid: str, state: str, age_days: float,
           delivery_state: str) -> list[Path]:
    src = tmp / f"{uid}.dcm"
    ds = mias_to_mg("mdb209", src)
    relpath, size, sha = spool.adopt(src)
    result_rel = spool.write_dataset(ds)
    when = utcnow() - dt.timedelta(days=age_days)
    with db.session() as s:
        study = Study(study_uid=uid, state=state, last_received_at=when)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=uid + ".1")
        s.add(series)
        s.flush()
        s.add(Instance(study_id=study.id, series_id=series.id, sop_uid=uid + ".1.1",
                       sop_class_uid=str(ds.SOPClassUID), transfer_syntax="1.2.840.10008.1.2.1",
                       relpath=relpath, size=size, sha256=sha))
        job = Job(study_id=study.id, generation=1, input_key=uid, state="done")
        s.add(job)
        s.flush()
        result = Result(study_id=study.id, job_id=job.id, analysis_key=uid)
        s.add(result)
        s.flush()
        s.add(ResultObject(result_id=result.id, sop_class_uid="1.2", sop_uid=uid + ".9",
                           relpath=result_rel))
        s.add(Delivery(result_id=result.id, destination="pacs", state=delivery_state))
    return [spool.path(relpath), spool.path(result_rel)]


def test_purge_removes_only_expired_finished_studies(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'db.sqlite3'}")
    db.create_schema()
    old = _study(db, spool, tmp_path, "1.2.826.0.1.1", "done", 40, "done")
    owed = _study(db, spool, tmp_path, "1.2.826.0.1.2", "done", 40, "pending")
    recent = _study(db, spool, tmp_path, "1.2.826.0.1.3", "done", 1, "done")
    receiving = _study(db, spool, tmp_path, "1.2.826.0.1.4", "receiving", 40, "done")
    assert purge_expired(db, spool, days=30) == 1
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in owed + recent + receiving)
    with db.session() as s:
        uids = set(s.execute(select(Study.study_uid)).scalars())
        n_inst = s.execute(select(func.count()).select_from(Instance)).scalar_one()
    assert uids == {"1.2.826.0.1.2", "1.2.826.0.1.3", "1.2.826.0.1.4"}
    assert n_inst == 3
    assert purge_expired(db, spool, days=0) == 0  # 0 = keep forever
    db.dispose()


def test_kept_objects_that_are_not_analysed_survive_the_orphan_sweep_and_expire(
        tmp_path: Path) -> None:
    """``[study] other_objects = "keep"``: their files are owned (the start-up sweep keeps
    them) and purged after retention.days like everything else."""
    from node.db import OtherObject
    from node.orphans import sweep_orphans

    spool = Spool(tmp_path / "data")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.sqlite3'}")
    db.create_schema()
    paths = {}
    for name, age in (("old", 40.0), ("new", 1.0)):
        src = tmp_path / f"{name}.dcm"
        mias_to_mg("mdb210", src)
        relpath, size, sha = spool.adopt(src)
        paths[name] = spool.path(relpath)
        with db.session() as s:
            s.add(OtherObject(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=f"1.2.3.4.{age}",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67", kind="dose_report",
                              relpath=relpath, size=size, sha256=sha,
                              received_at=utcnow() - dt.timedelta(days=age)))
    assert sweep_orphans(db, spool) == 0
    assert all(p.exists() for p in paths.values())
    purge_expired(db, spool, days=30)
    with db.session() as s:
        left = s.execute(select(OtherObject.sop_uid)).scalars().all()
    assert left == ["1.2.3.4.1.0"]
    assert not paths["old"].exists() and paths["new"].exists()
    db.dispose()
