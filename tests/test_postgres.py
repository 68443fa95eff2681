"""The queue on a real PostgreSQL server (tests/pgserver.py): migrations, SKIP LOCKED claims by
several nodes at once, leases taken over, each row held by one node at a time."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, func, select

from node import migrate, queue
from node.db import Base, ClaimRecord, Database, Delivery, Job, Result, utcnow
from node.queue import Holder, JobState
from tests.pgserver import PostgresServer
from tests.test_migrations import _schema


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


_names = iter(range(10_000))


@pytest.fixture
def db(pg: PostgresServer) -> Iterator[Database]:
    d = Database(pg.create_database(f"q{next(_names)}"))
    d.create_schema()
    yield d
    d.dispose()


def test_migrations_build_the_models_schema_on_postgresql(pg: PostgresServer) -> None:
    replayed = Database(pg.create_database("replayed"))
    assert migrate.upgrade(replayed, replay=True) == (None, migrate.head_revision())
    models = create_engine(pg.create_database("models"))
    Base.metadata.create_all(models)
    assert _schema(replayed.engine) == _schema(models)
    replayed.dispose()
    models.dispose()


def _queue_jobs(db: Database, n: int) -> None:
    for i in range(n):
        with db.session() as s:
            study, _ = queue.receive_instance(s, f"1.2.{i}", utcnow())
            queue.complete_study(s, study, f"key-{i}")


def test_nodes_claiming_at_once_never_take_the_same_job(db: Database) -> None:
    """Four "nodes" (each its own engine: its own connections) claim 120 jobs as fast as they
    can; SKIP LOCKED hands each job to exactly one of them."""
    assert db.engine.dialect.name == "postgresql"
    _queue_jobs(db, 120)
    won: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def node(name: str) -> None:
        own = Database(db.url)
        try:
            holder, mine = Holder(name, 30), won.setdefault(name, [])
            while (job_id := queue.claim_job(own, holder)) is not None:
                mine.append(job_id)
                with own.session() as s:
                    assert queue.finish_job(s, job_id, None, name)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=node, args=(f"node-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    claimed = [j for jobs in won.values() for j in jobs]
    assert len(claimed) == 120 and len(set(claimed)) == 120
    assert sum(1 for jobs in won.values() if jobs) >= 2  # they really ran side by side
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(Job)
                         .where(Job.state == JobState.DONE)).scalar() == 120
        per_job = Counter(s.execute(select(ClaimRecord.row_id)
                                    .where(ClaimRecord.kind == "job")).scalars())
    assert set(per_job.values()) == {1}


def test_an_expired_lease_is_taken_over_and_the_old_holder_records_nothing(
        db: Database) -> None:
    _queue_jobs(db, 1)
    short = Holder("gpu-1", 0.2)
    job_id = queue.claim_job(db, short)
    assert job_id is not None and queue.claim_job(db, Holder("gpu-2", 30)) is None
    import time

    time.sleep(0.3)
    assert queue.reap_expired(db) == {"job": 1}
    assert queue.claim_job(db, Holder("gpu-2", 30)) == job_id
    with db.session() as s:
        assert not queue.finish_job(s, job_id, None, "gpu-1")
    with db.session() as s:
        assert queue.finish_job(s, job_id, None, "gpu-2")
    with db.session() as s:
        history = s.execute(select(ClaimRecord.holder, ClaimRecord.outcome)
                            .order_by(ClaimRecord.id)).all()
    assert history == [("gpu-1", "expired"), ("gpu-2", "done")]


def test_deliveries_are_claimed_once_across_nodes(db: Database) -> None:
    _queue_jobs(db, 30)
    with db.session() as s:
        for job in s.execute(select(Job)).scalars():
            r = Result(study_id=job.study_id, job_id=job.id, analysis_key=f"a{job.id}")
            s.add(r)
            s.flush()
            queue.queue_deliveries(s, r.id, ["pacs", "archive"])
    got: list[int] = []
    lock = threading.Lock()

    def node(name: str) -> None:
        own = Database(db.url)
        holder, last = Holder(name, 30), 0
        while (d := queue.claim_delivery(own, holder, after_id=last)) is not None:
            last = d
            with lock:
                got.append(d)
            with own.session() as s:
                queue.finish_delivery(s, d, name, {}, True, None, "")
        own.dispose()

    threads = [threading.Thread(target=node, args=(f"n{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 60 and len(set(got)) == 60
    with db.session() as s:
        assert set(s.execute(select(Delivery.state)).scalars()) == {"done"}


def test_receivers_share_a_new_study_and_completion_skips_a_study_being_written(
        db: Database) -> None:
    """Two receivers get the first instances of one new study at once: one row, both use it.
    A completion on another node skips the study while an instance is being recorded."""
    barrier = threading.Barrier(4)
    ids: list[int] = []

    def receiver() -> None:
        own = Database(db.url)
        barrier.wait()
        with own.session() as s:
            study, _ = queue.receive_instance(s, "1.2.99", utcnow())
            ids.append(study.id)
        own.dispose()

    threads = [threading.Thread(target=receiver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 4 and len(set(ids)) == 1
    other = Database(db.url)
    with db.session() as writing:  # an instance being recorded holds the study's row
        queue.receive_instance(writing, "1.2.99", utcnow())
        with other.session() as s:
            assert queue.receiving_studies(s) == []
    with other.session() as s:
        assert [st.study_uid for st in queue.receiving_studies(s)] == ["1.2.99"]
    other.dispose()
