"""Monitoring endpoints under a large history: latency of /, /health and /metrics.

    .venv/bin/python -m bench.http_endpoints [--studies 20000] [--requests 50]

Fills a fresh SQLite database (WAL, as the node runs it) with ``--studies`` finished studies,
each with 4 instances, a job, a current result and deliveries to two destinations (5 % of them
failed with an error), starts the node's monitoring server in-process on loopback and requests
each endpoint ``--requests`` times one after the other. Prints the median and 95th percentile
latency (ms) and the response size of each endpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from sqlalchemy import insert

from node import health, metrics, status_page
from node.db import Database, Delivery, Instance, Job, Result, Series, Study
from node.httpd import MonitoringServer
from node.store import Spool


def fill(db: Database, n: int) -> None:
    t0 = dt.datetime(2026, 1, 1)
    studies, series, instances, jobs, results, deliveries = [], [], [], [], [], []
    for i in range(1, n + 1):
        when = t0 + dt.timedelta(minutes=i)
        studies.append(dict(id=i, study_uid=f"1.2.826.0.1.3680043.10.1.{i}", state="done",
                            generation=1, created_at=when, last_received_at=when,
                            completed_at=when + dt.timedelta(seconds=30)))
        series.append(dict(id=i, study_id=i, series_uid=f"1.2.826.0.1.3680043.10.2.{i}",
                           modality="MG"))
        for k in range(4):
            instances.append(dict(study_id=i, series_id=i,
                                  sop_uid=f"1.2.826.0.1.3680043.10.3.{i}.{k}",
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                                  transfer_syntax="1.2.840.10008.1.2.1", relpath="x", size=1,
                                  sha256="0" * 64, received_at=when))
        jobs.append(dict(id=i, study_id=i, generation=1, input_key=str(i), state="done",
                         attempts=1, created_at=when))
        results.append(dict(id=i, study_id=i, job_id=i, analysis_key=str(i), current=True,
                            created_at=when + dt.timedelta(seconds=40), roi_count=i % 7,
                            max_probability=(i % 100) / 100, analysis_ms=5000.0, summary="{}"))
        failed = i % 20 == 0
        deliveries.append(dict(result_id=i, destination="pacs", state="done", attempts=1,
                               next_attempt_at=when, sent_at=when + dt.timedelta(seconds=41)))
        deliveries.append(dict(result_id=i, destination="archive",
                               state="failed" if failed else "done", attempts=6 if failed else 1,
                               next_attempt_at=when,
                               last_error="cannot connect to archive:104 (ARCHIVE)"
                               if failed else None,
                               sent_at=None if failed else when + dt.timedelta(seconds=42)))
    with db.session() as s:
        for model, rows in ((Study, studies), (Series, series), (Instance, instances),
                            (Job, jobs), (Result, results), (Delivery, deliveries)):
            s.execute(insert(model), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = Path(tmp)
        spool = Spool(root)
        db = Database(f"sqlite:///{root / 'node.sqlite3'}")
        db.create_schema()
        t = time.perf_counter()
        fill(db, args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - t:.1f} s")
        metrics.bind(db, root, ["pacs", "archive"])
        server = MonitoringServer(
            "127.0.0.1", 0,
            health=lambda: health.health(host="127.0.0.1", port=11112, listening=True, db=db,
                                         spool=spool, min_free_mb=16,
                                         destinations=["pacs", "archive"]),
            status_page=lambda: status_page.render(db, ae_title="MAMMO_AI", version="bench",
                                                   limit=50))
        server.start()
        try:
            print(f"{'endpoint':<10} {'median ms':>10} {'p95 ms':>8} {'bytes':>8}")
            for path in ("/", "/health", "/metrics"):
                times, size = [], 0
                for _ in range(args.requests):
                    t = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                                timeout=60) as rsp:
                        size = len(rsp.read())
                    times.append((time.perf_counter() - t) * 1000)
                times.sort()
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                print(f"{path:<10} {statistics.median(times):>10.1f} {p95:>8.1f} {size:>8}")
        finally:
            server.stop()
            db.dispose()


if __name__ == "__main__":
    main()
