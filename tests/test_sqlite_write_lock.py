"""SQLite: a completion and an instance being recorded never interleave between read and write.

pysqlite begins a transaction at the first INSERT/UPDATE/DELETE, so the SELECTs before it read
outside any transaction and another connection can commit in between. A completion that read a
study's instances before an arriving instance was committed, and wrote after it, completed the
study with an input key that left that instance out: the study was ``complete`` (then ``done``)
with an instance no analysis had seen. PostgreSQL locks the study's row (tests/test_postgres.py);
SQLite takes the database's write lock before reading (node.queue.lock_for_writing).
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import queue
from node.completion import complete_ready_studies, input_key
from node.db import Database, Instance, Job, Series, Study, utcnow

UID = "1.2.826.0.1.3680043.10.9999.1"


def _add_instance(s: Session, study: Study, n: int) -> None:
    series = s.execute(select(Series).where(Series.series_uid == UID + ".1")).scalar()
    if series is None:
        series = Series(study_id=study.id, series_uid=UID + ".1", modality="MG")
        s.add(series)
        s.flush()
    s.add(Instance(study_id=study.id, series_id=series.id, sop_uid=f"{UID}.1.{n}",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                   transfer_syntax="1.2.840.10008.1.2.1", relpath=f"x/{n}.dcm", size=1,
                   sha256=f"{n:064d}", laterality="R", view="CC",
                   received_at=utcnow()))
    s.flush()


def test_a_completion_waits_for_the_instance_being_recorded(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    db.create_schema()
    long_ago = utcnow() - dt.timedelta(hours=1)
    with db.session() as s:
        study, _ = queue.receive_instance(s, UID, long_ago)
        _add_instance(s, study, 1)
    completer = Database(db.url)
    completed: list[str] = []
    errors: list[BaseException] = []

    def complete() -> None:
        try:
            completed.extend(complete_ready_studies(completer, stable_seconds=60,
                                                    complete_on_four_views=False,
                                                    now=utcnow() + dt.timedelta(hours=1)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=complete)
    with db.session() as writing:  # the second instance is being recorded
        study, _ = queue.receive_instance(writing, UID, utcnow())
        _add_instance(writing, study, 2)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the completion did not wait for the instance being recorded"
    thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert completed == [UID]
    with db.session() as s:
        instances = list(s.execute(select(Instance)).scalars())
        job = s.execute(select(Job)).scalar_one()
        state = s.execute(select(Study.state)).scalar_one()
    assert len(instances) == 2
    assert job.input_key == input_key(instances), "completed with a key that left out an instance"
    assert state == queue.StudyState.COMPLETE
    completer.dispose()
    db.dispose()
