"""Health checks for ``/health``: is the node able to take and process studies right now?

The overall ``ok`` flag covers what the node itself needs: the DICOM listener accepts TCP
connections, the database answers, and data_dir has more than ``node.min_free_mb`` free (below
that every C-STORE is refused with 0xA700). Destinations are reported (last success, last error)
but do not make the node unhealthy: a PACS that is down is the PACS's problem, results wait in
the queue, and a monitoring system restarting the node because of it would only make it worse.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from node.db import Database, Delivery, utcnow
from node.metrics import last_success
from node.store import Spool


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"


def check_listener(listening: bool, host: str, port: int) -> dict[str, Any]:
    """The DICOM listener's socket is open and its accept thread alive.

    Checked in-process rather than by connecting: a bare TCP connect every few seconds from the
    monitoring system would show up in the association log as aborted associations.
    """
    if not listening:
        return {"ok": False, "address": f"{host}:{port}", "error": "DICOM listener not running"}
    return {"ok": True, "address": f"{host}:{port}"}


def check_database(db: Database) -> dict[str, Any]:
    try:
        db.ping()
    except Exception as exc:  # noqa: BLE001 - a check reports, never raises
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ok": True}


def check_disk(spool: Spool, min_free_mb: float) -> dict[str, Any]:
    free = spool.free_mb()
    return {"ok": free >= min_free_mb, "free_mb": round(free, 1), "min_free_mb": min_free_mb}


def check_destinations(db: Database, names: Sequence[str]) -> dict[str, Any]:
    """Per destination: last successful delivery, and the latest attempt's error if it failed."""
    out: dict[str, Any] = {n: {"last_success": None, "last_error": None, "pending": 0,
                               "failed": 0} for n in names}
    try:
        with db.session() as s:
            for name in out:
                out[name]["last_success"] = _iso(last_success(s, name))
            for name, state, n in s.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .where(Delivery.state.in_(("pending", "failed")))
                .group_by(Delivery.destination, Delivery.state)
            ).all():
                if name in out:
                    out[name][state] = n
            for name in out:
                last = s.execute(
                    select(Delivery.last_error, Delivery.state)
                    .where(Delivery.destination == name, Delivery.attempts > 0)
                    .order_by(Delivery.id.desc()).limit(1)).first()
                if last is not None and last[1] != "done":
                    out[name]["last_error"] = last[0]
    except Exception as exc:  # noqa: BLE001 - a check reports, never raises
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def health(*, host: str, port: int, listening: bool, db: Database, spool: Spool,
           min_free_mb: float, destinations: Sequence[str]) -> tuple[bool, dict[str, Any]]:
    """(ok, report) for ``/health``."""
    checks = {
        "listener": check_listener(listening, host, port),
        "database": check_database(db),
        "disk": check_disk(spool, min_free_mb),
    }
    ok = all(c["ok"] for c in checks.values())
    report = {"ok": ok, "time": _iso(utcnow()), "checks": checks,
              "destinations": check_destinations(db, destinations)}
    return ok, report
