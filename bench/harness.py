"""The node as a real process between dcmtk storescu (the "modality") and storescp (the "PACS").

Used by the turnaround and sustained benchmarks. Timestamps come from the node's own database
(read-only): when each instance was stored, when the analysis job started and finished, the
per-stage timings the worker recorded, and when the destination acknowledged the delivery.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.studies import storescu_args
from tests.netutil import NodeProcess, StoreSCP, wait_until

STAGES = ("wait", "decode", "rois", "classify", "gradcam", "build", "send")
STAGE_NAMES = {
    "wait": "completion + queue",
    "decode": "decode",
    "rois": "ROI finding",
    "classify": "classifier",
    "gradcam": "Grad-CAM",
    "build": "SR/SC build + write",
    "send": "send (C-STORE to PACS)",
}


@dataclass
class StudyTiming:
    study_uid: str
    turnaround_s: float  # last instance stored -> delivery acknowledged by the destination
    stages_s: dict[str, float]
    rois: int


def _ts(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


class Harness:
    """storescp destination + node process; send studies, read back timings."""

    def __init__(self, work: Path, *, sc_max_side: int | None = None, precision: str = "auto",
                 shadow_card: Path | None = None, repo: Path | None = None,
                 analysis_extra: dict[str, object] | None = None) -> None:
        self.work = work
        self.dest = StoreSCP(work / "dest", ae_title="PACS")
        self.dest.start()
        analysis: dict[str, object] = {}
        if sc_max_side:
            analysis["sc_max_side"] = sc_max_side
        analysis.update(analysis_extra or {})
        # A long quiet timer: only the four-view rule completes a study (the quiet timer is
        # excluded from the turnaround by construction).
        self.node = NodeProcess(
            work / "node", [self.dest.destination("pacs")],
            study={"stable_seconds": 3600, "complete_on_four_views": True,
                   "check_interval_seconds": 2},
            analysis=analysis, model={"precision": precision},
            log={"level": "INFO"},
        )
        if repo is not None:  # another source tree (a baseline commit's worktree)
            self.node.repo = repo
        try:
            if shadow_card is not None:  # installed and run in shadow mode (bench/shadow.py)
                self._shadow(shadow_card)
            self.node.start()
        except Exception:
            self.dest.stop()
            raise
        self.db_path = self.node.data_dir / "node.sqlite3"

    def _shadow(self, card: Path) -> None:
        name = json.loads(Path(card).read_text())["name"]
        for args in (("model", "install", str(card)), ("model", "shadow", name)):
            out = self.node.cli(*args)
            if out.returncode != 0:
                raise RuntimeError(f"mammo-node {' '.join(args)}: {out.stderr[-500:]}")

    @property
    def pid(self) -> int:
        assert self.node.proc is not None
        return self.node.proc.pid

    def close(self) -> None:
        try:
            self.node.stop()
        finally:
            self.dest.stop()

    def send(self, files: list[Path]) -> None:
        """One dcmtk storescu association with every file (TCP_NODELAY, 128 KiB PDUs)."""
        res = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "MAMMO_AI", "-pdu", "131072",
             *storescu_args(files), "127.0.0.1",
             str(self.node.port), *map(str, files)],
            capture_output=True, text=True, timeout=600, env=dict(os.environ, TCP_NODELAY="1"),
        )
        if res.returncode != 0:
            raise RuntimeError(f"storescu failed ({res.returncode}): {res.stderr[-500:]}")

    def clear_destination(self) -> None:
        """Drop what storescp received so far (the bench checks the node's records, not files)."""
        for f in self.dest.files():
            f.unlink(missing_ok=True)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def delivered_count(self) -> int:
        return int(self._query("SELECT count(*) FROM deliveries WHERE state = 'done'")[0][0])

    def failed(self) -> list[tuple]:
        return self._query("SELECT 'job', error FROM jobs WHERE state = 'failed' UNION ALL "
                           "SELECT 'delivery', last_error FROM deliveries WHERE state = 'failed'")

    def wait_delivered(self, study_uid: str, timeout: float = 600) -> None:
        def done() -> bool:
            if self.failed():
                raise RuntimeError(f"the node failed: {self.failed()[:2]}")
            return bool(self._query(
                "SELECT 1 FROM deliveries d JOIN results r ON r.id = d.result_id "
                "JOIN studies s ON s.id = r.study_id WHERE s.study_uid = ? AND d.state = 'done'",
                (study_uid,)))

        wait_until(done, timeout, 0.05, f"delivery of {study_uid}")

    def timing(self, study_uid: str) -> StudyTiming:
        """Turnaround and its stages for a delivered study, from the node's database."""
        (sid,) = self._query("SELECT id FROM studies WHERE study_uid = ?", (study_uid,))[0]
        (last_rx,) = self._query("SELECT max(received_at) FROM instances WHERE study_id = ?",
                                 (sid,))[0]
        started, finished, summary, rois, sent = self._query(
            "SELECT j.started_at, j.finished_at, r.summary, r.roi_count, "
            "d.sent_at FROM results r JOIN jobs j ON j.id = r.job_id "
            "JOIN deliveries d ON d.result_id = r.id WHERE r.study_id = ? AND r.current = 1 "
            "AND d.state = 'done'", (sid,))[0]
        t_rx, t_start, t_end, t_sent = map(_ts, (last_rx, started, finished, sent))
        assert t_rx and t_start and t_end and t_sent
        tm = json.loads(summary)["timings_ms"]
        stages = {k: tm.get(k, 0.0) / 1000 for k in ("decode", "rois", "classify", "gradcam")}
        stages["wait"] = (t_start - t_rx).total_seconds()
        # The job's time beyond the analysis: report build, durable writes, the record commit.
        stages["build"] = (t_end - t_start).total_seconds() - tm.get("total", 0.0) / 1000
        stages["send"] = (t_sent - t_end).total_seconds()
        return StudyTiming(study_uid, (t_sent - t_rx).total_seconds(), stages, int(rois))
