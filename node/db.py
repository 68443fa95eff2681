"""Database: the tables and the queue transitions (claim, finish, fail, retry).

Everything the node knows about studies, instances, analysis jobs, results and deliveries lives
here, in SQLite (WAL mode, synchronous=FULL) by default or PostgreSQL when several machines share
one queue. Claims are conditional UPDATEs, so two workers never take the same job.

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
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)


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
    result: Mapped[Result] = relationship()


class Database:
    """Engine + session factory with the pragmas the node's durability promise depends on."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, future=True)

    def create_schema(self) -> None:
        """Create what is missing: tables, then columns and indexes added since a database
        was created (an older node's database is upgraded in place, nothing is dropped)."""
        Base.metadata.create_all(self.engine)
        upgrade_schema(self.engine)

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


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss before we ack
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def upgrade_schema(engine: Engine) -> None:
    """Add columns and indexes the models have and an older database lacks.

    Only additive changes: nullable columns or columns with a scalar default. Before the unique
    "one live job per study" index is created, duplicate live jobs (an older node queued one per
    re-opening instance) are merged: the newest stays, the others become ``superseded``.
    """
    insp = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in insp.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} " \
                      f"{column.type.compile(engine.dialect)}"
                default = getattr(column.default, "arg", None)
                if isinstance(default, bool | int | float | str):
                    ddl += f" DEFAULT {_sql_literal(default)}"
                conn.exec_driver_sql(ddl)
        indexes = {ix["name"] for ix in insp.get_indexes(Job.__tablename__)}
        if "ix_jobs_one_live_per_study" not in indexes:
            _merge_duplicate_live_jobs(conn)
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            index.create(engine, checkfirst=True)


def _sql_literal(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _merge_duplicate_live_jobs(conn) -> None:  # type: ignore[no-untyped-def]
    live = conn.execute(select(Job.id, Job.study_id).where(Job.state.in_(LIVE_JOB_STATES))
                        .order_by(Job.study_id, Job.id.desc())).all()
    keep: set[int] = set()
    drop: list[int] = []
    for job_id, study_id in live:
        if study_id in keep:
            drop.append(job_id)
        else:
            keep.add(study_id)
    if drop:
        conn.execute(update(Job).where(Job.id.in_(drop)).values(
            state="superseded", error="merged into the study's newest job (schema upgrade)"))


def claim(session: Session, model: type[Job] | type[Delivery], row_id: int, from_state: str,
          to_state: str, **values: object) -> bool:
    """Move one row from ``from_state`` to ``to_state`` if nobody else did; True when we won."""
    res = session.execute(
        update(model)
        .where(model.id == row_id, model.state == from_state)
        .values(state=to_state, **values)
    )
    return res.rowcount == 1
