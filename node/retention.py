"""Retention: purge studies, their instances and their results after ``retention.days``.

Only studies that are finished (done or failed) and have no delivery still pending are purged,
so nothing that is still owed to a destination disappears.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select

from node.db import (
    Database,
    Delivery,
    DeliveryKind,
    Instance,
    Job,
    OtherObject,
    Result,
    ResultKind,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from node.log import event
from node.store import Spool

log = logging.getLogger("node.retention")


def purge_expired(db: Database, spool: Spool, days: float, now: dt.datetime | None = None) -> int:
    """Delete expired studies; returns how many were purged."""
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    purged = 0
    with db.session() as s:
        study_ids = s.execute(select(Study.id).where(
            Study.state.in_(("done", "failed")), Study.last_received_at < cutoff)).scalars().all()
    for study_id in study_ids:
        with db.session() as s:
            result_ids = s.execute(select(Result.id).where(Result.study_id == study_id)
                                   ).scalars().all()
            busy = s.execute(select(Delivery.id).where(
                Delivery.result_id.in_(result_ids),
                Delivery.state.in_(("pending", "sending")))).first()
            if busy:
                continue
            files = list(s.execute(select(Instance.relpath).where(
                Instance.study_id == study_id)).scalars())
            files += list(s.execute(select(ResultObject.relpath).where(
                ResultObject.result_id.in_(result_ids))).scalars())
            delivery_ids = select(Delivery.id).where(Delivery.result_id.in_(result_ids))
            s.execute(delete(DeliveryKind).where(DeliveryKind.delivery_id.in_(delivery_ids)))
            s.execute(delete(ResultKind).where(ResultKind.result_id.in_(result_ids)))
            s.execute(delete(Delivery).where(Delivery.result_id.in_(result_ids)))
            s.execute(delete(ResultObject).where(ResultObject.result_id.in_(result_ids)))
            s.execute(delete(Result).where(Result.study_id == study_id))
            s.execute(delete(Job).where(Job.study_id == study_id))
            s.execute(delete(Instance).where(Instance.study_id == study_id))
            s.execute(delete(Series).where(Series.study_id == study_id))
            study_uid = s.get_one(Study, study_id).study_uid
            s.execute(delete(Study).where(Study.id == study_id))
        for relpath in files:  # rows are gone (committed): the files follow
            spool.remove(relpath)
        purged += 1
        event(log, "retention.purged", study=study_uid, files=len(files))
    purged_other = _purge_other_objects(db, spool, cutoff)
    if purged_other:
        event(log, "retention.purged_other_objects", objects=purged_other)
    return purged


def _purge_other_objects(db: Database, spool: Spool, cutoff: dt.datetime) -> int:
    """Kept objects that were never analysed (``[study] other_objects = "keep"``) go after the
    same time, counted from their arrival."""
    with db.session() as s:
        rows = s.execute(select(OtherObject.id, OtherObject.relpath)
                         .where(OtherObject.received_at < cutoff)).all()
        if rows:
            s.execute(delete(OtherObject).where(OtherObject.id.in_([r[0] for r in rows])))
    for _, relpath in rows:
        spool.remove(relpath)
    return len(rows)
