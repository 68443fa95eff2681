"""Database: the tables (their state changes are node.queue's, and only node.queue's).

Everything the node knows about studies, instances, analysis jobs, results and deliveries lives
here, in SQLite (WAL mode, synchronous=FULL) by default or PostgreSQL when several machines share
one queue. The schema is versioned by Alembic migrations (node/migrations, ``mammo-node db
upgrade``).

Times are naive UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import ConnectionPoolEntry


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # receiving -> complete -> analysing -> done | failed; a new instance re-opens (receiving)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # AccessionNumber of the study's first instance that had one (issue 17: outcomes are
    # matched by it). Database only: never logged. NULL in rows from before the column existed.
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(255))  # relative to data_dir
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    laterality: Mapped[str] = mapped_column(String(2), default="")
    view: Mapped[str] = mapped_column(String(16), default="")
    for_processing: Mapped[bool] = mapped_column(Boolean, default=False)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # What the latest analysis of its study made of it: NULL (pending), "analysed", "skipped"
    # (outcome_reason says why) or "failed" (a counted failure). Accepted means accounted for.
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    outcome_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    study: Mapped[Study] = relationship(back_populates="instances")


class OtherObject(Base):
    """An object accepted with a study but not analysed, kept (``[study] other_objects =
    "keep"``): tomosynthesis, dose reports, presentation states, other systems' SRs, ...

    Its own table, apart from :class:`Instance`, so that it never re-opens a study, never delays
    its completion and never enters an analysis (node.intake)."""

    __tablename__ = "other_objects"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    relpath: Mapped[str] = mapped_column(String(255))  # relative to data_dir
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


LIVE_JOB_STATES = ("queued", "running")


class Job(Base):
    """One analysis of a study. At most one is live (queued or running) per study: later
    instances are absorbed into it (node.completion); ``superseded`` marks duplicates merged
    when upgrading from a version that queued one job per instance."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_one_live_per_study", "study_id", unique=True,
              sqlite_where=text("state IN ('queued', 'running')"),
              postgresql_where=text("state IN ('queued', 'running')")),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    input_key: Mapped[str] = mapped_column(String(64), index=True)  # digest of the inputs
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Who holds the claim (a node's name, node.cluster) and until when: the holder renews the
    # lease while it works; an expired lease goes back to the queue (node.queue.reap_expired).
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    analysis_key: Mapped[str] = mapped_column(String(64), unique=True)
    current: Mapped[bool] = mapped_column(Boolean, default=True)  # False once superseded
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    roi_count: Mapped[int] = mapped_column(Integer, default=0)
    max_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    analysis_ms: Mapped[float] = mapped_column(Float, default=0.0)
    summary: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    objects: Mapped[list[ResultObject]] = relationship(back_populates="result")


class ResultObject(Base):
    __tablename__ = "result_objects"
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(255))
    result: Mapped[Result] = relationship(back_populates="objects")


class ResultKind(Base):
    """One output kind (tid1500, mammo_cad, sc, gsps) of a result: built, or failed with why.

    Each kind is built on its own; a kind that fails does not withhold the others.
    ``mammo-node retry`` marks failed kinds "rebuild" and queues the analysis again; the same
    analysis key gives the same UIDs, so only the missing kind is added and delivered."""

    __tablename__ = "result_kinds"
    __table_args__ = (UniqueConstraint("result_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # built | failed | rebuild
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # pending -> sending -> done | pending (retry) | failed; superseded when a newer result exists
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Who holds the claim (a node's name, node.cluster) and until when: the holder renews the
    # lease while it works; an expired lease goes back to the queue (node.queue.reap_expired).
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    result: Mapped[Result] = relationship()


class DeliveryKind(Base):
    """The delivery of one output kind to one destination: each kind is sent on its own
    association, so a kind the destination refuses does not withhold the others, and a kind
    already sent is not sent again when the delivery is retried."""

    __tablename__ = "delivery_kinds"
    __table_args__ = (UniqueConstraint("delivery_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed
    last_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


# -- model lifecycle and evaluation (issue 17: node/modelstore.py, node/shadow.py,
# node/evaluation.py, node/outcomes.py) -------------------------------------------------------
# These tables reference studies by UID, not by foreign key: the evaluation record (scores,
# outcomes) outlives retention's purge of the images, because biopsy and follow-up outcomes
# arrive weeks to years after the analysis.


class InstalledModel(Base):
    """One installed model version: an immutable copy under ``data_dir/models/<name>/<version>/``
    (``relpath``), verified at install (models.verify) and re-hashed before it is served."""

    __tablename__ = "installed_models"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    input_size: Mapped[int] = mapped_column(Integer)
    roi_size_mm: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    card_sha256: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(255))  # folder, relative to data_dir
    card_file: Mapped[str] = mapped_column(String(255), default="card.json")
    weights_file: Mapped[str] = mapped_column(String(255))
    # the card's cluster detector (models.detector), kept beside it; "" when the card names none
    detector_file: Mapped[str] = mapped_column(String(255), default="")
    detector_sha256: Mapped[str] = mapped_column(String(64), default="")
    intended_use: Mapped[str] = mapped_column(Text, default="")
    data_licence: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the card's headline metrics
    installed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ModelRole(Base):
    """Which installed model is ``active`` (serves results) and which is the ``shadow`` (runs
    beside it, never delivered). No ``active`` row: ``[model] card`` of config.toml serves."""

    __tablename__ = "model_roles"
    role: Mapped[str] = mapped_column(String(16), primary_key=True)  # active | shadow
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ModelEvent(Base):
    """Audit trail of the lifecycle: install, activate, default, shadow, shadow_off, loaded,
    load_failed (the last two written by a running node)."""

    __tablename__ = "model_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class ShadowRun(Base):
    """The shadow model's analysis of one active job's inputs: queued by the worker's hook,
    run by node.shadow when nothing is received or analysed; findings in ``relpath`` (JSON under
    ``data_dir/shadow/``) and in scored_breasts/scored_findings. Never delivered."""

    __tablename__ = "shadow_runs"
    __table_args__ = (UniqueConstraint("job_id", "input_key", "model_name", "model_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    input_key: Mapped[str] = mapped_column(String(64))
    inputs: Mapped[str] = mapped_column(Text, default="[]")  # JSON: SOP Instance UIDs analysed
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    active_name: Mapped[str] = mapped_column(String(64))
    active_version: Mapped[str] = mapped_column(String(64))
    # queued -> running -> done | failed | dropped (study changed, images gone, model changed)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    roi_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    analysis_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    relpath: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Who holds the claim (a node's name, node.cluster) and until when: the holder renews the
    # lease while it works; an expired lease goes back to the queue (node.queue.reap_expired).
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ScoredBreast(Base):
    """A model's score for one breast of one study: the highest P(malignant) of its findings
    (0 when the analysed images of that side had none), with the threshold it was called at.
    The latest analysis of the study by that model version wins."""

    __tablename__ = "scored_breasts"
    __table_args__ = (UniqueConstraint("study_uid", "laterality", "model_name", "model_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    laterality: Mapped[str] = mapped_column(String(2))
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # how it ran: active | shadow
    job_id: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    findings: Mapped[int] = mapped_column(Integer, default=0)
    threshold: Mapped[float] = mapped_column(Float)
    analysed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class ScoredFinding(Base):
    """One ROI of a model's analysis (geometry in source-image pixels, as in the SR)."""

    __tablename__ = "scored_findings"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    finding_index: Mapped[int] = mapped_column(Integer)  # the number in the node's report
    sop_uid: Mapped[str] = mapped_column(String(64))
    laterality: Mapped[str] = mapped_column(String(2))
    view: Mapped[str] = mapped_column(String(16), default="")
    centre_x: Mapped[float] = mapped_column(Float)  # column, DICOM SCOORD (pixel corner = 0)
    centre_y: Mapped[float] = mapped_column(Float)
    radius_mm: Mapped[float] = mapped_column(Float)
    pixel_spacing_mm: Mapped[float] = mapped_column(Float)
    probability: Mapped[float] = mapped_column(Float)


class Outcome(Base):
    """Ground truth for a breast (``finding_index`` 0) or one numbered finding of a study:
    ``truth`` malignant | benign | negative, from a biopsy or a follow-up (``mammo-node outcomes
    import``). Re-importing the same row updates it instead of adding one."""

    __tablename__ = "outcomes"
    __table_args__ = (UniqueConstraint("study_uid", "laterality", "finding_index", "kind",
                                       "outcome_date"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    laterality: Mapped[str] = mapped_column(String(2))
    finding_index: Mapped[int] = mapped_column(Integer, default=0)
    truth: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))  # biopsy | follow-up
    outcome_date: Mapped[str] = mapped_column(String(10), default="")  # YYYY-MM-DD or ""
    source: Mapped[str] = mapped_column(String(255), default="")  # file name and line
    imported_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


# -- several nodes, one queue (issue 19: node/queue.py, node/cluster.py) ------------------------


class NodeRecord(Base):
    """One node sharing this queue: its roles, where it runs, its last heartbeat. Written by
    the node itself (node.cluster); ``mammo-node status`` and the status page list them."""

    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    roles: Mapped[str] = mapped_column(String(64), default="receive,analyse,deliver")
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # running | draining (takes no new work) | stopped (left cleanly)
    state: Mapped[str] = mapped_column(String(16), default="running")


class ClaimRecord(Base):
    """History of every claim (a job, a delivery or a shadow run held by a node, from claimed
    to released): the audit trail that shows no row was ever processed by two nodes at once."""

    __tablename__ = "claims"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # job | delivery | shadow
    row_id: Mapped[int] = mapped_column(Integer, index=True)
    holder: Mapped[str] = mapped_column(String(64), index=True)
    claimed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # done | failed | requeued | superseded | expired (the holder stopped renewing) | ...
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)


class ClusterSetting(Base):
    """Facts every node sharing the queue must agree on, e.g. ``storage_id``: the identity of
    the shared data folder (node.cluster.check_shared_storage)."""

    __tablename__ = "cluster_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")


class Database:
    """Engine + session factory with the pragmas the node's durability promise depends on."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        # pre-ping (a SELECT 1 per checkout) finds a PostgreSQL connection the server dropped;
        # a SQLite connection is a local file and cannot be dropped
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=not self.is_sqlite,
                                            **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, future=True)

    def create_schema(self) -> None:
        """Bring the schema to this release's: the Alembic migrations (node.migrate). An
        older node's database is upgraded in place, nothing is dropped."""
        from node.migrate import upgrade

        upgrade(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on error."""
        with self._sessions() as s, s.begin():
            yield s

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


def rows_matched(result: object) -> int:
    """Rows an UPDATE or DELETE (without RETURNING) matched. ``Session.execute()`` is typed to
    return a ``Result``; for such statements it is a ``CursorResult``, which has the count
    (SQLAlchemy's typing does not say so: sqlalchemy/sqlalchemy#9185)."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"not the result of an UPDATE or DELETE: {type(result).__name__}")
    return result.rowcount


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss before we ack
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
