"""Schedule: the APScheduler jobs that move work along (completion, delivery, retention)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger("node.schedule")


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:  # a failing tick must not kill the scheduler
            log.exception("schedule.error job=%s", name)

    return run


def build_scheduler(jobs: list[tuple[str, Callable[[], object], float]]) -> BackgroundScheduler:
    """One interval job per (name, callable, seconds); never two runs of a job at once."""
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, fn, seconds in jobs:
        scheduler.add_job(_guarded(name, fn), "interval", seconds=seconds, id=name, name=name,
                          max_instances=1, coalesce=True, misfire_grace_time=None)
    return scheduler
