"""Start-up sweep: files in the spool that no database row references.

A crash between making a file durable and committing its row (an instance adopted but not
recorded, result objects written but not recorded, a retention purge between its commit and its
unlinks) leaves a file nobody owns. Nothing was acknowledged or delivered for it, so it is deleted
when the node starts. With SQLite the node is the only writer, so every orphan goes; with a
shared database (PostgreSQL, several nodes) only files older than ``min_age_seconds`` go, so
another node's file between rename and commit is never touched.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from node.db import Database, Instance, OtherObject, ResultObject
from node.log import event
from node.store import Spool

log = logging.getLogger("node.orphans")


def sweep_orphans(db: Database, spool: Spool, min_age_seconds: float = 0.0) -> int:
    """Delete unreferenced files under instances/ and results/; returns how many."""
    with db.session() as s:
        referenced = set(s.execute(select(Instance.relpath)).scalars())
        referenced.update(s.execute(select(ResultObject.relpath)).scalars())
        referenced.update(s.execute(select(OtherObject.relpath)).scalars())
    now = time.time()
    removed = 0
    for area in (spool.instances, spool.results):
        for path in area.rglob("*"):
            if not path.is_file():
                continue
            if path.relative_to(spool.root).as_posix() in referenced:
                continue
            if now - path.stat().st_mtime < min_age_seconds:
                continue
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        event(log, "spool.orphans_removed", files=removed,
              reason="written before a crash, never recorded")
    return removed
