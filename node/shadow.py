"""Shadow mode: a candidate model analyses live studies beside the active one, never delivered.

1. The worker records the active result, then calls :meth:`ShadowRunner.on_analysed` (its one
   hook, in the worker thread). That records the active model's scores for the live metrics
   (node.evaluation) and, when a shadow model is loaded, queues a ``shadow_runs`` row naming
   the job, its input key and the SOP Instance UIDs the active model analysed. Both are short
   database writes after the result is committed; any error in them is logged and swallowed,
   so the active result is recorded and delivered whatever happens here.
2. The shadow thread starts a queued run only when nothing is being analysed or received (no
   job queued or running, no instance received in the last :data:`QUIET_SECONDS`), at a lower
   CPU priority (nice +10 for the thread), so the active model's analyses do not wait for it;
   a study that arrives while a shadow analysis runs shares the CPU with that one analysis.
   It analyses the same stored images with the shadow model, writes the findings to
   ``data_dir/shadow/YYYY/MM/DD/<random>.json`` (fsynced, marked ``"shadow": true``), records
   the scores (role ``shadow``) and finishes the run. It builds no DICOM object and creates no
   delivery: nothing of it is ever sent.
3. A shadow model that raises fails only its run (retried once, then ``failed`` with the
   error); a run whose study changed since (another analysis queues its own run), whose images
   are gone, or whose model is no longer the shadow is ``dropped`` with the reason. Runs that
   were running at a restart are queued again. Runs of studies purged by retention go with
   their JSON (their scores stay in the evaluation record).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import delete, func, select

from node import queue
from node.activemodel import LoadedModel, ModelManager
from node.analysis.result import ImageInput, StudyAnalysis
from node.db import Database, Instance, Job, ShadowRun, Study, utcnow
from node.evaluation import record_analysis
from node.log import event
from node.queue import ShadowState, StudyState
from node.store import Spool

log = logging.getLogger("node.shadow")

SHADOW_AREA = "shadow"
MAX_SHADOW_ATTEMPTS = 2
POLL_SECONDS = 1.0
QUIET_SECONDS = 5.0  # no instance received for this long before a shadow run starts
PURGE_EVERY_SECONDS = 3600.0


class ShadowRunner:
    def __init__(self, db: Database, spool: Spool, models: ModelManager,
                 holder: queue.Holder | None = None) -> None:
        self.db = db
        self.holder = holder or queue.Holder("local")  # this node's name on its claims
        self.spool = spool
        self.models = models
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0

    # -- the worker's hook -------------------------------------------------------------------
    def on_analysed(self, job_id: int, study_uid: str, inputs: Sequence[ImageInput],
                    analysis: StudyAnalysis) -> None:
        """After the active result was recorded (worker thread). Never raises."""
        try:
            record_analysis(self.db, study_uid=study_uid, job_id=job_id, analysis=analysis,
                            role="active")
        except Exception as exc:  # noqa: BLE001 - the active result is recorded already
            event(log, "scores.not_recorded", logging.WARNING, study=study_uid, job=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])
        shadow = self.models.shadow
        if shadow is None or (shadow.ref.name, shadow.ref.version) == (analysis.model.name,
                                                                       analysis.model.version):
            return  # off, or the shadow model was just activated and ran this analysis itself
        try:
            with self.db.session() as s:
                input_key = s.execute(select(Job.input_key).where(Job.id == job_id)).scalar()
                exists = s.execute(select(ShadowRun.id).where(
                    ShadowRun.job_id == job_id, ShadowRun.input_key == input_key,
                    ShadowRun.model_name == shadow.ref.name,
                    ShadowRun.model_version == shadow.ref.version)).first()
                if input_key is None or exists:
                    return
                s.add(ShadowRun(study_uid=study_uid, job_id=job_id, input_key=input_key,
                                inputs=json.dumps([i.sop_instance_uid for i in inputs]),
                                model_name=shadow.ref.name, model_version=shadow.ref.version,
                                active_name=analysis.model.name,
                                active_version=analysis.model.version))
        except Exception as exc:  # noqa: BLE001
            event(log, "shadow.not_queued", logging.WARNING, study=study_uid, job=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self.wake.set()

    # -- lifecycle -----------------------------------------------------------------------------
    def recover(self) -> int:
        n = queue.release_holder(self.db, self.holder.name).get("shadow", 0) \
            + queue.reap_expired(self.db).get("shadow", 0)
        if n:
            event(log, "shadow.recovered", runs=n, reason="interrupted by a restart")
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shadow-analysis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            try:
                worked = self.run_once()
                if time.monotonic() >= self._next_purge:
                    self._next_purge = time.monotonic() + PURGE_EVERY_SECONDS
                    self.purge_orphans()
            except Exception:  # never let the thread die
                log.exception("shadow.error")
                worked = False
            if not worked:
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()

    # -- one run -------------------------------------------------------------------------------
    def active_busy(self) -> bool:
        """An analysis is queued or running, or a study received an instance in the last
        :data:`QUIET_SECONDS` (its analysis is about to start): the shadow model waits."""
        with self.db.session() as s:
            if s.execute(select(Job.id).where(Job.state.in_(queue.LIVE_JOB_STATES))
                         .limit(1)).first() is not None:
                return True
            last = s.execute(select(func.max(Study.last_received_at))
                             .where(Study.state == StudyState.RECEIVING)).scalar()
        return last is not None and (utcnow() - last).total_seconds() < QUIET_SECONDS

    def run_once(self) -> bool:
        """Run the oldest queued run of the loaded shadow model; False when none ran."""
        loaded = self.models.shadow
        if loaded is None or self.active_busy():
            return False
        ref = loaded.ref
        run_id = queue.claim_shadow_run(self.db, self.holder, (ref.name, ref.version))
        if run_id is None:
            return False
        self._run(run_id, loaded)
        return True

    def _run(self, run_id: int, loaded: LoadedModel) -> None:
        with self.db.session() as s:
            run = s.get_one(ShadowRun, run_id)
            study_uid, job_id, attempts = run.study_uid, run.job_id, run.attempts
            job_key = s.execute(select(Job.input_key).where(Job.id == job_id)).scalar()
            uids = json.loads(run.inputs)
            found = {i.sop_uid: i for i in s.execute(
                select(Instance).where(Instance.sop_uid.in_(uids))).scalars()}
        if job_key != run.input_key:
            return self._finish(run_id, ShadowState.DROPPED,
                                error="the study changed after the active analysis; the "
                                      "newer analysis queues its own shadow run")
        missing = [u for u in uids if u not in found]
        if missing:
            return self._finish(run_id, ShadowState.DROPPED,
                                error=f"{len(missing)} image(s) no longer stored")
        inputs = [ImageInput(self.spool.path(found[u].relpath), u, found[u].sop_class_uid)
                  for u in uids]
        t0 = time.perf_counter()
        try:
            analysis = loaded.analyser.analyse(study_uid, inputs)
            ms = (time.perf_counter() - t0) * 1000
            relpath = self._write(run_id, job_id, analysis, ms)
            record_analysis(self.db, study_uid=study_uid, job_id=job_id, analysis=analysis,
                            role="shadow")
        except Exception as exc:
            final = attempts >= MAX_SHADOW_ATTEMPTS
            message = f"{type(exc).__name__}: {exc}"[:2000]
            log.debug("shadow run %s failed", run_id, exc_info=True)
            event(log, "shadow.failed", logging.ERROR, study=study_uid, job=job_id,
                  model=loaded.ref.name, model_version=loaded.ref.version, attempt=attempts,
                  final=final, error=message[:300])
            return self._finish(run_id, ShadowState.FAILED if final else ShadowState.QUEUED,
                                error=message)
        findings = analysis.findings
        max_p = max((f.probability for f in findings), default=None)
        self._finish(run_id, ShadowState.DONE, relpath=relpath, roi_count=len(findings),
                     max_probability=max_p, analysis_ms=ms)
        event(log, "shadow.done", study=study_uid, job=job_id, model=loaded.ref.name,
              model_version=loaded.ref.version, rois=len(findings),
              max_probability=None if max_p is None else round(max_p, 3), ms=round(ms, 1))

    def _finish(self, run_id: int, state: ShadowState, **values: object) -> None:
        queue.finish_shadow_run(self.db, run_id, state, **values)

    def _write(self, run_id: int, job_id: int, analysis: StudyAnalysis, ms: float) -> str:
        """The shadow result as JSON under data_dir/shadow/, written durably."""
        m = analysis.model
        doc = {
            "shadow": True, "delivered": False,
            "note": "shadow-mode result: stored for comparison, never sent to a destination",
            "study_instance_uid": analysis.study_instance_uid, "job": job_id, "run": run_id,
            "created": utcnow().isoformat() + "Z", "analysis_ms": round(ms, 1),
            "model": {"name": m.name, "version": m.version, "architecture": m.architecture,
                      "threshold": m.threshold},
            "max_probability_per_breast": analysis.max_probability_per_breast(),
            "images": [{"sop_instance_uid": i.sop_instance_uid, "laterality": i.laterality,
                        "view": i.view, "pixel_spacing_mm": i.pixel_spacing_mm,
                        "skipped": i.skipped_reason} for i in analysis.images],
            "findings": [{"index": f.index, "sop_instance_uid": f.sop_instance_uid,
                          "laterality": f.laterality, "view": f.view,
                          "centre_xy": list(f.centre_xy), "radius_mm": f.radius_mm,
                          "n_calcifications": f.n_calcifications,
                          "probability": f.probability,
                          "called_malignant": f.probability >= m.threshold}
                         for f in analysis.findings],
        }
        day = utcnow().strftime("%Y/%m/%d")
        relpath = f"{SHADOW_AREA}/{day}/{uuid.uuid4().hex}.json"
        dest = self.spool.path(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dest.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        return relpath

    def purge_orphans(self) -> int:
        """Shadow runs (and their JSON) of studies that retention purged."""
        with self.db.session() as s:
            rows = s.execute(select(ShadowRun.id, ShadowRun.relpath).where(
                ShadowRun.study_uid.not_in(select(Study.study_uid))).limit(1000)).all()
            if rows:
                s.execute(delete(ShadowRun).where(ShadowRun.id.in_([r[0] for r in rows])))
        for _, relpath in rows:
            if relpath:
                Path(self.spool.path(relpath)).unlink(missing_ok=True)
        if rows:
            event(log, "shadow.purged", runs=len(rows), reason="their studies were purged")
        # A crash between writing a JSON and recording its run leaves a file nobody owns.
        area = self.spool.path(SHADOW_AREA)
        if area.is_dir():
            with self.db.session() as s:
                known = set(s.execute(select(ShadowRun.relpath)
                                      .where(ShadowRun.relpath.is_not(None))).scalars())
            cutoff = time.time() - 3600
            for path in area.rglob("*"):
                rel = path.relative_to(self.spool.root).as_posix()
                if path.is_file() and rel not in known and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
        return len(rows)


def _lower_priority(increment: int = 10) -> None:
    """nice +``increment`` for the calling thread only (Linux: priorities are per thread;
    threads it starts inherit it). Elsewhere a no-op."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                 + increment))
    except (AttributeError, OSError):
        pass
