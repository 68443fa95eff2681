"""Output kinds that did not reach their destination: not built, or refused by a destination.

One query for ``mammo-node status``, the status page and ``/metrics``, so that the three say the
same. Only current results count (a superseded result's failures no longer matter).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db import Delivery, DeliveryKind, Result, ResultKind, Study


def failed_output_kinds(s: Session, limit: int = 50) -> list[dict[str, object]]:
    """Newest first: ``stage`` "build" (the builder failed; ``state`` failed, or rebuild once
    ``mammo-node retry`` queued it) or "delivery" (``destination`` refused it), with the
    study, the kind and the error."""
    out: list[dict[str, object]] = []
    for rk, uid in s.execute(
        select(ResultKind, Study.study_uid).join(Result, Result.id == ResultKind.result_id)
        .join(Study, Study.id == Result.study_id)
        .where(Result.current.is_(True), ResultKind.state.in_(("failed", "rebuild")))
        .order_by(ResultKind.id.desc()).limit(limit)
    ).all():
        out.append({"stage": "build", "study": uid, "kind": rk.kind, "state": rk.state,
                    "attempts": rk.attempts, "error": rk.error})
    for dk, d, uid in s.execute(
        select(DeliveryKind, Delivery, Study.study_uid)
        .join(Delivery, Delivery.id == DeliveryKind.delivery_id)
        .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
        .where(Result.current.is_(True), DeliveryKind.state == "failed")
        .order_by(DeliveryKind.id.desc()).limit(limit)
    ).all():
        out.append({"stage": "delivery", "study": uid, "kind": dk.kind, "state": dk.state,
                    "destination": d.destination, "status": dk.last_status,
                    "error": dk.last_error})
    return out


def failed_kind_counts(s: Session) -> dict[tuple[str, str], int]:
    """(stage, kind) -> how many current results have that kind failed (for /metrics)."""
    counts: dict[tuple[str, str], int] = {}
    for kind, n in s.execute(
        select(ResultKind.kind, func.count()).join(Result, Result.id == ResultKind.result_id)
        .where(Result.current.is_(True), ResultKind.state.in_(("failed", "rebuild")))
        .group_by(ResultKind.kind)
    ).all():
        counts[("build", kind)] = n
    for kind, n in s.execute(
        select(DeliveryKind.kind, func.count())
        .join(Delivery, Delivery.id == DeliveryKind.delivery_id)
        .join(Result, Result.id == Delivery.result_id)
        .where(Result.current.is_(True), DeliveryKind.state == "failed")
        .group_by(DeliveryKind.kind)
    ).all():
        counts[("delivery", kind)] = n
    return counts
