"""The queue: every state change of studies, jobs, deliveries, output kinds and shadow runs.

No other module writes a ``state`` column; they call the transitions below (and read states
through the enums). The flow, top-down:

* **receive** — :func:`receive_instance`: a study is created ``receiving``; a new instance
  re-opens a study in any other state (generation + 1).
* **completion** — :func:`complete_study`: ``receiving`` → ``complete`` with one queued job, or
  the study's live job absorbs the new content, or (same content already analysed) → ``done``.
* **analyse** — :func:`claim_job` (``queued`` → ``running``, held by one node under a lease),
  :func:`begin_analysis` (study → ``analysing``), then one of :func:`finish_job` (job ``done``,
  study ``done``, older results' pending deliveries ``superseded``, new deliveries ``pending``),
  :func:`requeue_job` (superseded or interrupted: back to ``queued``, attempt not counted) or
  :func:`fail_job` (``queued`` again, or ``failed`` for good). Each output kind is delivered
  as soon as it is durable: :func:`open_result` (the result, current, before its kinds are
  built), :func:`add_result_objects` (one kind's objects recorded, its deliveries ``pending``
  at once); :func:`finish_job` closes it. While its job runs a result is *open*: a delivery
  that sent everything recorded so far waits (``pending``) for the next kind instead of
  becoming ``done`` (:func:`finish_delivery`).
* **deliver** — :func:`claim_delivery` (``pending`` → ``sending``), :func:`finish_delivery`
  (``done``, ``pending`` with backoff, or ``failed``).
* **retry** (the CLI) — :func:`retry_failed`.
* **leases** — a claim records its holder (a node's name) and ``lease_until``; the holder
  renews it while it works (:func:`renew_leases`, node.cluster's heartbeat). Only an expired
  lease goes back to the queue (:func:`reap_expired`, run by every node); a node that restarts
  releases what its previous run held (:func:`release_holder`). A finish is conditional on the
  holder still holding the row, so a node whose lease was taken over records nothing.

Claims: on PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED`` picks the row (nodes never queue up
behind each other's locks); on SQLite a conditional UPDATE (``… WHERE state = 'queued'``) on
the candidates, first winner takes it. Every claim is written to the ``claims`` history with
when it was released and how, the audit trail that shows nothing ran twice at the same time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from node.db import (
    ClaimRecord,
    Database,
    Delivery,
    DeliveryKind,
    Job,
    Result,
    ResultKind,
    ResultObject,
    ShadowRun,
    Study,
    rows_matched,
    utcnow,
)


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a duplicate merged by a schema upgrade


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer result of the study replaced it before it was sent


class DeliveryKindState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class ResultKindState(StrEnum):
    BUILT = "built"
    FAILED = "failed"
    REBUILD = "rebuild"  # `mammo-node retry` asked for it again


class ShadowState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DROPPED = "dropped"


LIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
WAITING_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED)


@dataclass(frozen=True)
class Holder:
    """Who claims: a node's name and how long its leases last without renewal."""

    name: str
    lease_seconds: float = 60.0

    def lease_until(self, now: dt.datetime | None = None) -> dt.datetime:
        return (now or utcnow()) + dt.timedelta(seconds=self.lease_seconds)


# -- studies ---------------------------------------------------------------------------------
def lock_for_writing(s: Session) -> None:
    """SQLite: take the database's write lock now, before reading what this transaction will
    change. pysqlite begins a transaction at the first INSERT/UPDATE/DELETE, so the SELECTs
    before it read outside any transaction, and another connection could commit between a read
    and the write based on it: a completion keyed without the instance being recorded (the
    study then ``complete`` with an instance no analysis saw), or an instance recorded into a
    study completed under it. An UPDATE that matches no row still takes the lock (waiting up
    to the busy timeout for the writer that holds it); a transaction that changes nothing
    commits without writing. PostgreSQL locks the rows instead (``FOR UPDATE``)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(Study).where(Study.id.is_(None)).values(generation=Study.generation))


def receive_instance(s: Session, study_uid: str, now: dt.datetime) -> tuple[Study, str | None]:
    """The study an arriving instance belongs to, created or re-opened (``receiving``).
    Returns (study, the state it was re-opened from, or None)."""
    if s.get_bind().dialect.name == "postgresql":
        # Several receivers: the first instance of a new study may arrive at two at once (one
        # row wins, both use it), and the row is locked so that a completion running on another
        # node cannot complete the study under this instance (it skips locked studies).
        from sqlalchemy.dialects.postgresql import insert

        study: Study | None
        s.execute(insert(Study).values(
            study_uid=study_uid, state=StudyState.RECEIVING, generation=1, created_at=now,
            last_received_at=now).on_conflict_do_nothing(index_elements=["study_uid"]))
        study = s.execute(select(Study).where(Study.study_uid == study_uid).with_for_update()
                          .execution_options(populate_existing=True)).scalar_one()
        if study.created_at == now and study.generation == 1 and \
                study.state == StudyState.RECEIVING:
            return study, None
    else:
        lock_for_writing(s)
        study = s.execute(select(Study).where(Study.study_uid == study_uid)
                          .execution_options(populate_existing=True)).scalar()
    if study is None:
        study = Study(study_uid=study_uid, state=StudyState.RECEIVING, generation=1,
                      created_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        return study, None
    previous = None
    if study.state != StudyState.RECEIVING:
        previous = study.state
        study.state = StudyState.RECEIVING
        study.generation += 1
        study.completed_at = None
    study.last_received_at = now
    return study, previous


def receiving_studies(s: Session, lock: bool = True) -> list[Study]:
    """Studies still receiving. ``lock``: on PostgreSQL locked for this transaction, skipping
    those another node is completing or storing an instance into right now (they are looked at
    next time); on SQLite with the database's write lock held (:func:`lock_for_writing`), so
    that an instance being recorded is either in what the caller reads next or waits for its
    commit. Without ``lock``, a look that decides nothing."""
    q = select(Study).where(Study.state == StudyState.RECEIVING).order_by(Study.id)
    if lock and s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    elif lock:
        lock_for_writing(s)
    return list(s.execute(q.execution_options(populate_existing=True)).scalars())


@dataclass(frozen=True)
class Completion:
    """What completing a study did: ``job`` queued or absorbing, or None (nothing new)."""

    job: int | None
    absorbed: str | None = None  # "new content into queued job", ...


def complete_study(s: Session, study: Study, key: str) -> Completion:
    """``receiving`` → ``complete`` (or ``analysing`` while its live job runs, or ``done`` when
    this content was analysed already): the study's one live job absorbs the content, or one
    is queued."""
    study.completed_at = utcnow()
    live = s.execute(select(Job).where(Job.study_id == study.id,
                                       Job.state.in_(LIVE_JOB_STATES))).scalar()
    if live is not None:
        changed = live.input_key != key
        live.input_key, live.generation = key, study.generation
        study.state = StudyState.ANALYSING if live.state == JobState.RUNNING \
            else StudyState.COMPLETE
        return Completion(live.id, ("new content" if changed else "same content")
                          + f" into {live.state} job")
    previous = s.execute(
        select(Job).where(Job.study_id == study.id, Job.input_key == key,
                          Job.state.in_((*LIVE_JOB_STATES, JobState.DONE)))).scalar()
    if previous is not None:
        study.state = StudyState.DONE if previous.state == JobState.DONE \
            else StudyState.COMPLETE
        return Completion(None)
    study.state = StudyState.COMPLETE
    job = Job(study_id=study.id, generation=study.generation, input_key=key,
              state=JobState.QUEUED)
    s.add(job)
    s.flush()
    return Completion(job.id)


# -- claims (shared by jobs, deliveries, shadow runs) ------------------------------------------
#: the tables whose rows are claimed under a lease (columns id, state, holder, lease_until)
_LeasedModel = type[Job] | type[Delivery] | type[ShadowRun]

_CLAIMABLE: dict[str, tuple[_LeasedModel, str, str]] = {
    "job": (Job, JobState.QUEUED, JobState.RUNNING),
    "delivery": (Delivery, DeliveryState.PENDING, DeliveryState.SENDING),
    "shadow": (ShadowRun, ShadowState.QUEUED, ShadowState.RUNNING),
}


def _claim_first(db: Database, kind: str, candidates: Select, holder: Holder,
                 **values: object) -> int | None:
    """Claim the first row of ``candidates`` (a select of ids, oldest first) nobody else
    took: SKIP LOCKED on PostgreSQL, conditional UPDATEs on SQLite. Records the claim."""
    model, free, held = _CLAIMABLE[kind]
    now = utcnow()
    with db.session() as s:
        if db.engine.dialect.name == "postgresql":
            ids = s.execute(candidates.limit(1).with_for_update(skip_locked=True,
                                                                of=model)).scalars().all()
        else:
            ids = s.execute(candidates.limit(5)).scalars().all()
        for row_id in ids:
            won = rows_matched(s.execute(
                update(model).where(model.id == row_id, model.state == free)
                .values(state=held, holder=holder.name, lease_until=holder.lease_until(now),
                        **values)))
            if won == 1:
                s.add(ClaimRecord(kind=kind, row_id=row_id, holder=holder.name, claimed_at=now))
                return row_id
    return None


def _release_claim(s: Session, kind: str, row_id: int, outcome: str,
                   holder: str | None = None) -> None:
    q = update(ClaimRecord).where(ClaimRecord.kind == kind, ClaimRecord.row_id == row_id,
                                  ClaimRecord.released_at.is_(None))
    if holder is not None:
        q = q.where(ClaimRecord.holder == holder)
    s.execute(q.values(released_at=utcnow(), outcome=outcome))


# -- jobs --------------------------------------------------------------------------------------
def claim_job(db: Database, holder: Holder) -> int | None:
    """The oldest queued job whose study is not receiving again (such a job waits: completion
    absorbs the new instances into it), now ``running`` and held by ``holder``."""
    candidates = (select(Job.id).join(Study, Study.id == Job.study_id)
                  .where(Job.state == JobState.QUEUED, Study.state != StudyState.RECEIVING)
                  .order_by(Job.id))
    return _claim_first(db, "job", candidates, holder, started_at=utcnow(),
                        attempts=Job.attempts + 1)


def begin_analysis(s: Session, study: Study) -> None:
    if study.state == StudyState.COMPLETE:
        study.state = StudyState.ANALYSING


def job_verdict(db: Database, job_id: int, input_key: str, holder: str | None) -> str | None:
    """Why a running job must stop now (None: carry on): its study re-opened or changed, or
    its claim is no longer this node's (the lease expired and another node took it)."""
    with db.session() as s:
        row = s.execute(select(Job.input_key, Job.state, Job.holder, Study.state)
                        .join(Study, Study.id == Job.study_id).where(Job.id == job_id)).first()
    if row is None:
        return "job gone"
    key, state, job_holder, study_state = row
    if holder is not None and (state != JobState.RUNNING or job_holder != holder):
        return "lease lost: another node holds the job"
    if study_state == StudyState.RECEIVING:
        return "study re-opened by a new instance"
    if key != input_key:
        return "study content changed"
    return None


def requeue_job(db: Database, job_id: int, reason: str = "requeued",
                holder: str | None = None) -> str | None:
    """Back to the queue without counting the attempt (superseded, or the node stopping);
    the study's UID, or None when the job was not running (under ``holder``)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or \
                (holder is not None and job.holder not in (holder, None)):
            return None
        job.state = JobState.QUEUED
        job.attempts = max(0, job.attempts - 1)
        job.started_at = None
        job.holder = job.lease_until = None
        study = s.get_one(Study, job.study_id)
        if study.state == StudyState.ANALYSING:
            study.state = StudyState.COMPLETE
        _release_claim(s, "job", job_id, "superseded" if "stopping" not in reason
                       else "requeued")
        return study.study_uid


def _ours(job_id: int, input_key: str | None, holder: str | None) -> list[Any]:
    """WHERE terms: the job runs under ``holder`` (None: any) with ``input_key`` (None: any),
    its study not receiving."""
    conds: list[Any] = [
        Job.id == job_id, Job.state == JobState.RUNNING,
        Job.study_id.in_(select(Study.id).where(Study.state != StudyState.RECEIVING))]
    if input_key:
        conds.append(Job.input_key == input_key)
    if holder is not None:
        conds.append(Job.holder == holder)
    return conds


def finish_job(s: Session, job_id: int, input_key: str | None, holder: str | None) -> bool:
    """The recording transaction's first write, conditional: the job is still running under
    ``holder``, its key unchanged and its study not receiving. False: record nothing."""
    done = rows_matched(s.execute(update(Job).where(*_ours(job_id, input_key, holder)).values(
        state=JobState.DONE, finished_at=utcnow(), error=None, holder=None,
        lease_until=None))) == 1
    if done:
        _release_claim(s, "job", job_id, "done")
    return done


def study_analysed(s: Session, study: Study) -> None:
    if study.state in (StudyState.COMPLETE, StudyState.ANALYSING):
        study.state = StudyState.DONE


def replace_current_results(s: Session, study_id: int) -> None:
    """A new result of the study: older ones stop being current and their deliveries that were
    not sent yet are superseded (the newer result goes instead)."""
    old_ids = s.execute(select(Result.id).where(
        Result.study_id == study_id, Result.current.is_(True))).scalars().all()
    if old_ids:
        s.execute(update(Result).where(Result.id.in_(old_ids)).values(current=False))
        s.execute(update(Delivery).where(
            Delivery.result_id.in_(old_ids), Delivery.state == DeliveryState.PENDING)
            .values(state=DeliveryState.SUPERSEDED))


def fail_job(s: Session, job_id: int, message: str, final: bool,
             holder: str | None = None) -> Job | None:
    """``queued`` again (an attempt counted), or ``failed`` for good with its study. None
    (nothing written) when the job is no longer running under ``holder``."""
    job = s.get(Job, job_id)
    if job is None or job.state != JobState.RUNNING or \
            (holder is not None and job.holder not in (holder, None)):
        return None
    job.state = JobState.FAILED if final else JobState.QUEUED
    job.error = message
    job.finished_at = utcnow()
    job.holder = job.lease_until = None
    if final:
        study = s.get_one(Study, job.study_id)
        if study.state != StudyState.RECEIVING:
            study.state = StudyState.FAILED
    _release_claim(s, "job", job_id, "failed")
    return job


def record_result_kinds(s: Session, result_id: int, built: Iterable[str | None],
                        failed: dict[str, str]) -> None:
    """Per-kind bookkeeping of a result: kinds just built, kinds that failed (with why)."""
    rows = {r.kind: r for r in s.execute(select(ResultKind).where(
        ResultKind.result_id == result_id)).scalars()}
    now = utcnow()
    for kind in sorted(k for k in built if k):
        row = rows.get(kind)
        if row is None:
            s.add(ResultKind(result_id=result_id, kind=kind, state=ResultKindState.BUILT,
                             updated_at=now))
        else:
            row.state, row.error, row.updated_at = ResultKindState.BUILT, None, now
    for kind, error in sorted(failed.items()):
        row = rows.get(kind)
        if row is None:
            s.add(ResultKind(result_id=result_id, kind=kind, state=ResultKindState.FAILED,
                             error=error, attempts=1, updated_at=now))
        else:
            row.state, row.error, row.updated_at = ResultKindState.FAILED, error, now
            row.attempts += 1


def queue_deliveries(s: Session, result_id: int, destinations: Sequence[str]) -> None:
    """A delivery per destination; an existing one (a kind was added to a delivered result)
    goes back to pending: only the kinds it has not delivered yet are sent. One already
    pending is due now, unless it waits out a backoff after a failed attempt (the
    destination is down: a new kind does not hurry the retries)."""
    existing = {d.destination: d for d in s.execute(select(Delivery).where(
        Delivery.result_id == result_id)).scalars()}
    for name in destinations:
        d = existing.get(name)
        if d is None:
            s.add(Delivery(result_id=result_id, destination=name, state=DeliveryState.PENDING,
                           next_attempt_at=utcnow()))
        elif d.state == DeliveryState.PENDING:
            if d.last_error is None:  # waiting for the next kind of an open result
                d.next_attempt_at = utcnow()
        elif d.state not in (DeliveryState.SUPERSEDED, DeliveryState.SENDING):
            d.state, d.attempts, d.next_attempt_at = DeliveryState.PENDING, 0, utcnow()


def _job_is_ours(s: Session, job_id: int, input_key: str | None, holder: str | None) -> bool:
    """The job still runs under ``holder`` on the content it started with, its study not
    receiving again (the conditions of :func:`finish_job`, read without writing)."""
    return s.execute(select(Job.id).where(*_ours(job_id, input_key, holder))).first() is not None


def open_result(s: Session, job_id: int, input_key: str | None, holder: str | None,
                analysis_key: str, **values: object) -> int | None:
    """The result of a running job's analysis, before its kinds are built: the existing one
    with this analysis key (a retry rebuilding a kind), else a new current one (older results
    stop being current, their unsent deliveries are superseded). ``values``: the Result's
    roi_count, max_probability, analysis_ms, summary. None (nothing written) when the job is
    no longer ours or its study changed."""
    if not _job_is_ours(s, job_id, input_key, holder):
        return None
    existing = s.execute(select(Result.id).where(Result.analysis_key == analysis_key)).scalar()
    if existing is not None:
        return int(existing)
    job = s.get(Job, job_id)
    assert job is not None  # _job_is_ours read it
    replace_current_results(s, job.study_id)
    result = Result(study_id=job.study_id, job_id=job_id, analysis_key=analysis_key,
                    current=True, **values)
    s.add(result)
    s.flush()
    return int(result.id)


def add_result_objects(s: Session, result_id: int, job_id: int, holder: str | None,
                       objects: Sequence[tuple[str, str, str]], kind: str,
                       destinations: Sequence[str]) -> list[str] | None:
    """One built output kind of an open result: its objects ((SOP class, SOP instance UID,
    spool relpath), durable on disk) recorded, the kind marked built and the result's
    deliveries ``pending`` now, so the kind goes out while the next one is built. Returns the
    relpaths not recorded (an object the result already has: the caller removes the file), or
    None (nothing written) when the job no longer runs under ``holder``."""
    if not _job_is_ours(s, job_id, None, holder):
        return None
    have = set(s.execute(select(ResultObject.sop_uid).where(
        ResultObject.result_id == result_id)).scalars())
    duplicates = []
    added = 0
    for sop_class, sop_uid, relpath in objects:
        if sop_uid in have:
            duplicates.append(relpath)
            continue
        s.add(ResultObject(result_id=result_id, sop_class_uid=sop_class, sop_uid=sop_uid,
                           relpath=relpath))
        added += 1
    record_result_kinds(s, result_id, [kind], {})
    if added:
        queue_deliveries(s, result_id, destinations)
    return duplicates


#: How long a delivery of an open result waits, when everything recorded so far was sent,
#: before it looks again (the next kind or the job's end wakes it sooner: queue_deliveries).
OPEN_RESULT_RECHECK = dt.timedelta(seconds=60)


# -- deliveries --------------------------------------------------------------------------------
def claim_delivery(db: Database, holder: Holder, now: dt.datetime | None = None,
                   after_id: int = 0) -> int | None:
    """The next due pending delivery (id above ``after_id``), now ``sending`` under
    ``holder``, its attempt counted."""
    candidates = (select(Delivery.id).where(Delivery.state == DeliveryState.PENDING,
                                            Delivery.next_attempt_at <= (now or utcnow()),
                                            Delivery.id > after_id)
                  .order_by(Delivery.id))
    return _claim_first(db, "delivery", candidates, holder, attempts=Delivery.attempts + 1)


def settled_kinds(s: Session, delivery_id: int) -> dict[str, str]:
    """Kinds of a delivery sent before or refused for good (not to be sent again)."""
    return {k.kind: k.state for k in s.execute(select(DeliveryKind).where(
        DeliveryKind.delivery_id == delivery_id)).scalars()
        if k.state != DeliveryKindState.PENDING}


@dataclass(frozen=True)
class KindOutcome:
    ok: bool
    permanent: bool
    status: str
    error: str


def finish_delivery(s: Session, delivery_id: int, holder: str | None,
                    kinds: dict[str, KindOutcome], ok: bool, retry_at: dt.datetime | None,
                    errors: str, seen: set[int] | None = None) -> str | None:
    """Record each kind's outcome and the delivery's new state: ``done``, ``pending`` again at
    ``retry_at``, or ``failed``. None (nothing recorded) when ``holder`` lost the claim.
    ``seen``: the result objects this attempt knew of; a kind added to the result while it was
    in flight (a rebuilt output, the next kind of an open result) sends the delivery round
    again at once. A delivery that sent everything of a result still open (its job running:
    more kinds to come) stays ``pending`` (see :data:`OPEN_RESULT_RECHECK`), never ``done``."""
    d = s.get(Delivery, delivery_id)
    if d is None or d.state != DeliveryState.SENDING or \
            (holder is not None and d.holder not in (holder, None)):
        return None
    rows = {k.kind: k for k in s.execute(select(DeliveryKind).where(
        DeliveryKind.delivery_id == delivery_id)).scalars()}
    now = utcnow()
    for kind, o in kinds.items():
        if kind == "*":
            continue
        row = rows.get(kind)
        if row is None:
            row = DeliveryKind(delivery_id=delivery_id, kind=kind)
            s.add(row)
        row.state = DeliveryKindState.DONE if o.ok else DeliveryKindState.FAILED \
            if o.permanent else DeliveryKindState.PENDING
        row.last_status = o.status or None
        row.last_error = None if o.ok else o.error
        if o.ok:
            row.sent_at = now
    statuses = [o.status for o in kinds.values() if o.status]
    if statuses:  # a closing pass that sent nothing keeps the last answer
        d.last_status = statuses[-1]
    # Only kinds refused for good (no transient failure, the destination still configured):
    # the other kinds still go. One recorded while this pass was in flight, or still to be
    # built, sends the delivery round again; the refused kinds stay failed (not re-sent) and
    # the delivery ends failed once the rest went (the branch on ``refused`` below).
    only_refused = not ok and retry_at is None and bool(kinds) and "*" not in kinds and all(
        o.ok or o.permanent for o in kinds.values())
    progressed = ok or only_refused
    grown = progressed and seen is not None and any(
        i not in seen for i in s.execute(select(ResultObject.id).where(
            ResultObject.result_id == d.result_id)).scalars())
    building = progressed and not grown and s.execute(
        select(Job.state).join(Result, Result.job_id == Job.id)
        .where(Result.id == d.result_id)).scalar() == JobState.RUNNING
    if grown:
        d.state, d.attempts, d.next_attempt_at = DeliveryState.PENDING, 0, now
        d.last_error = errors[:2000] if only_refused else d.last_error
    elif building:  # the result is open: its next kind (or its job's end) wakes it
        d.state, d.attempts = DeliveryState.PENDING, 0
        d.last_error = errors[:2000] if only_refused else None
        d.next_attempt_at = now + OPEN_RESULT_RECHECK
    elif ok and (refused := [f"{k}: {r.last_error}" for k, r in sorted(rows.items())
                             if r.state == DeliveryKindState.FAILED and k not in kinds]):
        # everything left went, but a kind was refused in an earlier attempt (each kind of a
        # result is sent as it is built): failed, as one attempt with the refusal would be
        d.state, d.last_error = DeliveryState.FAILED, "; ".join(refused)[:2000]
    elif ok:
        d.state, d.sent_at, d.last_error = DeliveryState.DONE, now, None
    elif retry_at is not None:
        d.state, d.last_error, d.next_attempt_at = DeliveryState.PENDING, errors, retry_at
    else:
        d.state, d.last_error = DeliveryState.FAILED, errors
    d.holder = d.lease_until = None
    _release_claim(s, "delivery", delivery_id, str(d.state))
    return str(d.state)


# -- shadow runs -------------------------------------------------------------------------------
def claim_shadow_run(db: Database, holder: Holder, model: tuple[str, str]) -> int | None:
    """The oldest queued shadow run of ``model`` (name, version); queued runs of another
    model are dropped on the way."""
    with db.session() as s:
        for run in s.execute(select(ShadowRun).where(
                ShadowRun.state == ShadowState.QUEUED,
                (ShadowRun.model_name != model[0]) | (ShadowRun.model_version != model[1]))
                .limit(50)).scalars():
            run.state, run.finished_at = ShadowState.DROPPED, utcnow()
            run.error = f"the shadow model is now {model[0]} {model[1]}"
    candidates = (select(ShadowRun.id).where(ShadowRun.state == ShadowState.QUEUED,
                                             ShadowRun.model_name == model[0],
                                             ShadowRun.model_version == model[1])
                  .order_by(ShadowRun.id))
    return _claim_first(db, "shadow", candidates, holder, started_at=utcnow(),
                        attempts=ShadowRun.attempts + 1)


def finish_shadow_run(db: Database, run_id: int, state: ShadowState, **values: object) -> None:
    with db.session() as s:
        s.execute(update(ShadowRun).where(ShadowRun.id == run_id).values(
            state=state, finished_at=utcnow() if state != ShadowState.QUEUED else None,
            holder=None, lease_until=None, **values))
        _release_claim(s, "shadow", run_id, str(state))


# -- leases ------------------------------------------------------------------------------------
_HELD: tuple[tuple[_LeasedModel, str, str, str], ...] = (
    (Job, JobState.RUNNING, JobState.QUEUED, "job"),
    (Delivery, DeliveryState.SENDING, DeliveryState.PENDING, "delivery"),
    (ShadowRun, ShadowState.RUNNING, ShadowState.QUEUED, "shadow"))


def renew_leases(db: Database, holder: Holder) -> int:
    """Extend every lease ``holder`` holds (its heartbeat); how many rows it holds."""
    until = holder.lease_until()
    n = 0
    with db.session() as s:
        for model, held, _free, _kind in _HELD:
            n += rows_matched(s.execute(update(model).where(model.holder == holder.name,
                                                            model.state == held)
                                        .values(lease_until=until)))
    return n


def _put_back(s: Session, model: _LeasedModel, held: str, free: str, kind: str, where: list,
              outcome: str) -> int:
    ids = s.execute(select(model.id).where(model.state == held, *where)).scalars().all()
    if not ids:
        return 0
    s.execute(update(model).where(model.id.in_(ids), model.state == held)
              .values(state=free, holder=None, lease_until=None))
    if model is Job:  # their studies wait for the next claim
        s.execute(update(Study).where(
            Study.id.in_(select(Job.study_id).where(Job.id.in_(ids))),
            Study.state == StudyState.ANALYSING).values(state=StudyState.COMPLETE))
    for row_id in ids:
        _release_claim(s, kind, row_id, outcome)
    return len(ids)


def reap_expired(db: Database, now: dt.datetime | None = None) -> dict[str, int]:
    """Put rows whose lease expired back in the queue (their holder stopped renewing: it died
    or lost the database), and rows held without a lease (an older node's). The attempt stays
    counted: a study that kills its node each time ends failed."""
    now = now or utcnow()
    out: dict[str, int] = {}
    with db.session() as s:
        for model, held, free, kind in _HELD:
            expired = (model.lease_until < now) | model.lease_until.is_(None)
            if n := _put_back(s, model, held, free, kind, [expired], "expired"):
                out[kind] = n
    return out


def release_holder(db: Database, holder: str) -> dict[str, int]:
    """At start-up: what this node's previous run held (it was killed) goes back to the
    queue. Node names are unique (node.cluster refuses a second live node of the same name)."""
    out: dict[str, int] = {}
    with db.session() as s:
        for model, held, free, kind in _HELD:
            if n := _put_back(s, model, held, free, kind, [model.holder == holder],
                              "restarted"):
                out[kind] = n
    return out


def holdings(s: Session) -> dict[str, dict[str, int]]:
    """Node name -> {"job": n, "delivery": n, "shadow": n} it holds now."""
    from sqlalchemy import func

    out: dict[str, dict[str, int]] = {}
    for model, held, _free, kind in _HELD:
        for name, n in s.execute(select(model.holder, func.count()).where(
                model.state == held, model.holder.is_not(None)).group_by(model.holder)):
            if name is not None:  # always (the query's condition): narrows the holder's type
                out.setdefault(name, {})[kind] = n
    return out


# -- retry (the CLI) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Retried:
    deliveries: int
    jobs: int
    kinds: int
    kind_studies: int


def retry_failed(s: Session, study_ids: list[int] | None = None) -> Retried:
    """Failed deliveries back to pending (their refused kinds are sent again, the sent ones
    are not), the newest failed job of each study without a live one back to queued (its
    study ``complete``), failed output kinds of current results to ``rebuild`` with a queued
    analysis (same input, same model: same analysis key and UIDs, only the missing kinds)."""
    from sqlalchemy import func

    dwhere = [Delivery.state == DeliveryState.FAILED]
    jq = update(Job).where(Job.state == JobState.FAILED)
    if study_ids is not None:
        dwhere.append(Delivery.result_id.in_(
            select(Result.id).where(Result.study_id.in_(study_ids))))
        jq = jq.where(Job.study_id.in_(study_ids))
    failed_deliveries = s.execute(select(Delivery.id).where(*dwhere)).scalars().all()
    n_d = rows_matched(s.execute(update(Delivery).where(*dwhere).values(
        state=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow())))
    if failed_deliveries:
        s.execute(update(DeliveryKind).where(
            DeliveryKind.delivery_id.in_(failed_deliveries),
            DeliveryKind.state == DeliveryKindState.FAILED)
            .values(state=DeliveryKindState.PENDING))
    live = select(Job.study_id).where(Job.state.in_(LIVE_JOB_STATES))
    newest = select(func.max(Job.id)).where(Job.state == JobState.FAILED,
                                            Job.study_id.not_in(live)).group_by(Job.study_id)
    n_j = rows_matched(s.execute(jq.where(Job.id.in_(newest))
                                 .values(state=JobState.QUEUED, attempts=0)))
    if n_j:
        s.execute(update(Study).where(
            Study.state == StudyState.FAILED,
            Study.id.in_(select(Job.study_id).where(Job.state == JobState.QUEUED)))
            .values(state=StudyState.COMPLETE))
    q = (select(ResultKind, Result).join(Result, Result.id == ResultKind.result_id)
         .where(ResultKind.state == ResultKindState.FAILED, Result.current.is_(True)))
    if study_ids is not None:
        q = q.where(Result.study_id.in_(study_ids))
    rows = s.execute(q).all()
    studies: set[int] = set()
    for kind, result in rows:
        kind.state = ResultKindState.REBUILD
        if result.study_id in studies:
            continue
        studies.add(result.study_id)
        pending = s.execute(select(Job.id).where(
            Job.study_id == result.study_id, Job.state.in_(LIVE_JOB_STATES))).first()
        if pending is None:  # a live job analyses the study's latest content anyway
            original = s.get_one(Job, result.job_id)
            study = s.get_one(Study, result.study_id)
            s.add(Job(study_id=result.study_id, generation=study.generation,
                      input_key=original.input_key, state=JobState.QUEUED,
                      created_at=utcnow()))
    return Retried(n_d, n_j, len(rows), len(studies))
