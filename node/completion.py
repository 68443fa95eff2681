"""Study completion: decide when a study has stopped arriving and queue its analysis.

A study in state ``receiving`` is complete when no instance arrived for ``stable_seconds``, or
earlier when the four screening views (L/R x CC/MLO) are present and that rule is on. Completing
queues one analysis job whose ``input_key`` digests the study's instances; when a job with the
same key already finished (e.g. a re-sent, identical instance re-opened the study), nothing new is
queued, so the same content is never analysed or sent twice.

Coalescing, so that a study is analysed once per change and not once per instance:

* A study has at most one live (queued or running) job (a partial unique index enforces it).
  Completing a study that has one updates that job's ``input_key`` to the new content: the job
  absorbs the later instances. A queued job is not claimed while its study is receiving; a
  running one stops at its next safe point (node.worker) and runs again with the latest content.
* The four-view rule completes a study early only the first time (no job yet). A study that was
  analysed, or is being analysed, and receives more instances (a re-send, extra views,
  tomosynthesis behind the 2D views, a study of hundreds of instances) completes when it has been
  stable for ``stable_seconds``: one analysis of everything instead of one per arriving instance.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import queue
from node.db import Database, Instance, Job, Study, utcnow
from node.log import event

log = logging.getLogger("node.completion")

SCREENING_VIEWS = {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}


def input_key(instances: list[Instance]) -> str:
    """Digest of (SOP Instance UID, content hash) of every instance, order-independent."""
    h = hashlib.sha256()
    for uid, sha in sorted((i.sop_uid, i.sha256) for i in instances):
        h.update(f"{uid}:{sha};".encode())
    return h.hexdigest()


def has_four_views(instances: list[Instance]) -> bool:
    return {(i.laterality, i.view) for i in instances} >= SCREENING_VIEWS


def complete_ready_studies(
    db: Database, stable_seconds: float, complete_on_four_views: bool,
    now: dt.datetime | None = None,
) -> list[str]:
    """Complete every study that is ready; returns their Study Instance UIDs."""
    now = now or utcnow()
    if db.is_sqlite and not _any_ready(db, stable_seconds, complete_on_four_views, now):
        return []  # the usual check: nothing ready, and the write lock was never taken
    done: list[str] = []
    with db.session() as s:
        # Locked (queue.receiving_studies): an instance being recorded into one of these
        # studies is either read below or waits for this transaction's commit.
        for study in queue.receiving_studies(s):
            ready = _ready(s, study, stable_seconds, complete_on_four_views, now)
            if ready is None:
                continue
            reason, instances = ready
            _complete(s, study, instances, reason=reason)
            done.append(study.study_uid)
    return done


def _any_ready(db: Database, stable_seconds: float, complete_on_four_views: bool,
               now: dt.datetime) -> bool:
    """Whether some receiving study looks ready, read without a lock: on SQLite the locked pass
    holds every receiver's commit back while it reads, so it runs only when it has work."""
    with db.session() as s:
        return any(_ready(s, st, stable_seconds, complete_on_four_views, now) is not None
                   for st in queue.receiving_studies(s, lock=False))


def _ready(s: Session, study: Study, stable_seconds: float, complete_on_four_views: bool,
           now: dt.datetime) -> tuple[str, list[Instance]] | None:
    """(why the study is complete, its instances), or None while it is still arriving."""
    instances = list(s.execute(select(Instance).where(Instance.study_id == study.id)).scalars())
    quiet = (now - study.last_received_at).total_seconds() >= stable_seconds
    first = s.execute(select(Job.id).where(Job.study_id == study.id).limit(1)
                      ).first() is None
    four = complete_on_four_views and first and has_four_views(instances)
    if not (quiet or four):
        return None
    return ("four views" if four and not quiet else "stable"), instances


def _complete(s: Session, study: Study, instances: list[Instance], reason: str) -> None:
    done = queue.complete_study(s, study, input_key(instances))
    if done.absorbed is not None:  # the study's one live job analyses the latest content
        event(log, "study.complete", study=study.study_uid, instances=len(instances),
              reason=reason, job=done.job, absorbed=done.absorbed)
    elif done.job is None:
        event(log, "study.complete", study=study.study_uid, instances=len(instances),
              reason=reason, job="unchanged content, no new analysis")
    else:
        event(log, "study.complete", study=study.study_uid, instances=len(instances),
              reason=reason, job=done.job)
