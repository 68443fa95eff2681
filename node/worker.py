"""Analyse: the worker that takes queued studies, runs the analysis stage and records results.

It runs in its own thread, apart from the association threads, so a slow model never stalls a
C-STORE. A job is claimed with a conditional UPDATE; the result objects are written durably first
and recorded in the same transaction that finishes the job and queues its deliveries, so a crash
at any point leaves either no result (the job is re-queued at start-up) or a complete one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node import faults, metrics
from node.analysis.result import ImageInput, ModelInfo, StudyAnalyser, StudyAnalysis
from node.db import (
    Database,
    Delivery,
    Instance,
    Job,
    Result,
    ResultKind,
    ResultObject,
    Study,
    claim,
    utcnow,
)
from node.log import event
from node.memory import release_free_memory
from node.reports.kinds import kind_of
from node.store import Spool

log = logging.getLogger("node.worker")

MAX_JOB_ATTEMPTS = 3
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"

ReportBuilder = Callable[..., list[Dataset]]


@dataclass(frozen=True)
class ReportOptions:
    manufacturer: str
    sr_series_number: int
    sc_series_number: int
    threshold: float
    software_version: str
    # Output kinds to build (node.reports.kinds): the union over the destinations.
    kinds: tuple[str, ...] = ("tid1500", "sc")
    cad_operating_point: float | None = None  # None: threshold
    cad_sr_series_number: int = 9903
    gsps_series_number: int = 9904


class AnalysisWorker:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        analyser: StudyAnalyser,
        build_reports: ReportBuilder,
        options: ReportOptions,
        destinations: Sequence[str],
    ) -> None:
        self.db = db
        self.spool = spool
        self.analyser = analyser
        self.build_reports = build_reports
        self.options = options
        self.destinations = list(destinations)
        self.wake = threading.Event()
        # Called (in the worker thread) after a result with objects to deliver was recorded, so
        # that delivery starts at once instead of at the deliverer's next tick.
        self.on_result: Callable[[], None] | None = None
        # Called (in the worker thread) after a result was recorded, with (job id, study UID,
        # the inputs, the analysis): the model lifecycle's scores and shadow run (node.shadow).
        self.on_analysed: Callable[[int, str, list[ImageInput], StudyAnalysis], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def recover(self) -> int:
        """Re-queue jobs that were running when the node stopped."""
        with self.db.session() as s:
            n = s.execute(
                update(Job).where(Job.state == "running").values(state="queued")
            ).rowcount
        if n:
            event(log, "worker.recovered", jobs=n, reason="interrupted by a restart")
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="analysis-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # never let the worker thread die
                log.exception("worker.error")
                worked = False
            if not worked:
                self.wake.wait(1.0)
                self.wake.clear()

    # -- one job ---------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and process the oldest queued job; False when there was none."""
        with self.db.session() as s:
            job_ids = s.execute(
                select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(5)
            ).scalars().all()
            job_id = None
            for candidate in job_ids:
                if claim(s, Job, candidate, "queued", "running", started_at=utcnow(),
                         attempts=Job.attempts + 1):
                    job_id = candidate
                    break
        if job_id is None:
            return False
        try:
            self._process(job_id)
        finally:
            release_free_memory()  # keeps the RSS flat study after study (node/memory.py)
        return True

    def _process(self, job_id: int) -> None:
        t0 = time.perf_counter()
        with self.db.session() as s:
            job = s.get(Job, job_id)
            study = s.get(Study, job.study_id)
            study_uid, attempts = study.study_uid, job.attempts
            if study.state == "complete":
                study.state = "analysing"
            instances = list(s.execute(
                select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
            ).scalars())
        event(log, "analysis.started", study=study_uid, job=job_id, images=len(instances),
              attempt=attempts)
        try:
            inputs = [ImageInput(self.spool.path(i.relpath), i.sop_uid, i.sop_class_uid)
                      for i in instances]
            faults.hit("analysis.running")
            analysis = self.analyser.analyse(study_uid, inputs)
            # Keyed and reported on the model that ran (a switch may happen at any time).
            key = self._analysis_key(job_id, analysis.model)
            sources = {i.sop_uid: pydicom.dcmread(self.spool.path(i.relpath),
                                                  stop_before_pixels=True) for i in instances}
            if not any(image.analysed for image in analysis.images):
                # Nothing analysable (e.g. For Processing only, with for_processing = "skip"):
                # a finished job without result objects, said so in the log.
                event(log, "analysis.nothing_to_report", logging.WARNING, study=study_uid,
                      reasons=";".join(sorted({i.skipped_reason or "" for i in
                                               analysis.images})))
                self._record(job_id, key, analysis, [], (time.perf_counter() - t0) * 1000)
                return
            previous = self._current_srs(study_uid, key)
            kinds = self._kinds_to_build(key)
            written, failed = self._build_each_kind(kinds, analysis, sources, key, previous)
        except Exception as exc:
            self._fail(job_id, study_uid, attempts, exc)
            return
        ms = (time.perf_counter() - t0) * 1000
        faults.hit("analysis.before_record")
        self._record(job_id, key, analysis, written, ms, failed)
        if written and self.destinations and self.on_result is not None:
            self.on_result()
        if self.on_analysed is not None:  # model lifecycle (issue 17); never raises
            self.on_analysed(job_id, study_uid, inputs, analysis)

    def _kinds_to_build(self, key: str) -> tuple[str, ...]:
        """The configured kinds, less those the result with this analysis key already has
        (``mammo-node retry`` re-queues a study whose result lacks a kind that failed)."""
        with self.db.session() as s:
            result = s.execute(select(Result).where(Result.analysis_key == key)).scalar()
            if result is None:
                return self.options.kinds
            built = set(s.execute(select(ResultKind.kind).where(
                ResultKind.result_id == result.id, ResultKind.state == "built")).scalars())
            if not built and s.execute(select(ResultObject.id).where(
                    ResultObject.result_id == result.id)).first():
                return ()  # a result recorded before per-kind bookkeeping: complete
        return tuple(k for k in self.options.kinds if k not in built)

    def _build_each_kind(self, kinds: Sequence[str], analysis: StudyAnalysis,
                         sources: dict[str, Dataset], key: str, previous: list[Dataset]
                         ) -> tuple[list[tuple[Dataset, str]], dict[str, str]]:
        """Build and write each output kind on its own: one that fails (a builder bug, a legal
        value a library refuses) is logged and recorded with its reason, and the others still
        go out. Returns (objects written with their spool paths, error per failed kind)."""
        o = self.options
        written: list[tuple[Dataset, str]] = []
        failed: dict[str, str] = {}
        for kind in kinds:
            try:
                faults.fail(f"build.{kind}")
                datasets = self.build_reports(
                    analysis, sources, analysis_key=key, created=dt.datetime.now(dt.UTC),
                    manufacturer=o.manufacturer, sr_series_number=o.sr_series_number,
                    sc_series_number=o.sc_series_number,
                    threshold=analysis.model.threshold,  # the model that ran
                    software_version=o.software_version, previous_srs=previous,
                    kinds=(kind,), cad_operating_point=o.cad_operating_point,
                    cad_sr_series_number=o.cad_sr_series_number,
                    gsps_series_number=o.gsps_series_number,
                )
                paths = [self.spool.write_dataset(ds) for ds in datasets]
            except Exception as exc:
                failed[kind] = f"{type(exc).__name__}: {exc}"[:2000]
                log.exception("output.build_failed study=%s kind=%s", analysis.study_instance_uid,
                              kind)
                metrics.output_build_failed(kind)
                event(log, "output.failed", logging.ERROR, study=analysis.study_instance_uid,
                      kind=kind, error=failed[kind][:300],
                      effect="the other output kinds are delivered; `mammo-node retry` "
                             "rebuilds this one")
                continue
            written += list(zip(datasets, paths, strict=True))
        return written, failed

    def _current_srs(self, study_uid: str, key: str = "") -> list[Dataset]:
        """Headers of the SRs of the study's current result: the new SR supersedes them (not
        when the current result is this very analysis, rebuilding a kind that failed)."""
        with self.db.session() as s:
            relpaths = s.execute(
                select(ResultObject.relpath)
                .join(Result, Result.id == ResultObject.result_id)
                .join(Study, Study.id == Result.study_id)
                .where(Study.study_uid == study_uid, Result.current.is_(True),
                       Result.analysis_key != key,
                       ResultObject.sop_class_uid.in_((COMPREHENSIVE_SR, MAMMOGRAPHY_CAD_SR)))
            ).scalars().all()
        return [pydicom.dcmread(self.spool.path(r), stop_before_pixels=True) for r in relpaths
                if self.spool.path(r).exists()]

    def _analysis_key(self, job_id: int, model: ModelInfo | None = None) -> str:
        """Digest of the inputs, the model that ran (name, version, architecture, threshold)
        and the output options: the same inputs and model give the same result UIDs."""
        model = model or self.analyser.model
        with self.db.session() as s:
            job = s.get(Job, job_id)
            text = "|".join([job.input_key, model.name, model.version, model.architecture,
                             f"{model.threshold:.6f}", *self._outputs_key()])
        return hashlib.sha256(text.encode()).hexdigest()

    def _outputs_key(self) -> list[str]:
        """What, besides the analysis, changes the result objects: other kinds or operating
        point give another key (new UIDs, a new result). Empty for the default outputs, so
        keys of existing results stay valid."""
        o = self.options
        if o.kinds == ("tid1500", "sc") and o.cad_operating_point is None:
            return []
        op = "card" if o.cad_operating_point is None else f"{o.cad_operating_point:.6f}"
        return [",".join(o.kinds), op]

    def _record(self, job_id: int, key: str, analysis: StudyAnalysis,
                written: list[tuple[Dataset, str]], ms: float,
                failed: dict[str, str] | None = None) -> None:
        findings = analysis.findings
        max_p = max((f.probability for f in findings), default=None)
        summary = {
            "timings_ms": {k: round(v, 1) for k, v in analysis.timings_ms.items()},
            "max_probability_per_breast": analysis.max_probability_per_breast(),
            "images": [{"sop": i.sop_instance_uid, "laterality": i.laterality, "view": i.view,
                        "rois": len(i.findings), "skipped": i.skipped_reason}
                       for i in analysis.images],
            "model": {"name": analysis.model.name, "version": analysis.model.version},
        }
        with self.db.session() as s:
            job = s.get(Job, job_id)
            study = s.get(Study, job.study_id)
            existing = s.execute(select(Result).where(Result.analysis_key == key)).scalar()
            if existing is None:
                old_ids = s.execute(select(Result.id).where(
                    Result.study_id == study.id, Result.current.is_(True))).scalars().all()
                if old_ids:
                    s.execute(update(Result).where(Result.id.in_(old_ids)).values(current=False))
                    s.execute(update(Delivery).where(
                        Delivery.result_id.in_(old_ids),
                        Delivery.state == "pending").values(state="superseded"))
                result = Result(study_id=study.id, job_id=job.id, analysis_key=key,
                                current=True, roi_count=len(findings), max_probability=max_p,
                                analysis_ms=ms, summary=json.dumps(summary))
                s.add(result)
                s.flush()
                added = written
            else:  # same analysis again (a retry rebuilding a failed kind): add what is new
                result = existing
                have = set(s.execute(select(ResultObject.sop_uid).where(
                    ResultObject.result_id == result.id)).scalars())
                added = [(ds, p) for ds, p in written if str(ds.SOPInstanceUID) not in have]
                for ds, relpath in written:
                    if str(ds.SOPInstanceUID) in have:
                        self.spool.remove(relpath)
            for ds, relpath in added:
                s.add(ResultObject(result_id=result.id, sop_class_uid=str(ds.SOPClassUID),
                                   sop_uid=str(ds.SOPInstanceUID), relpath=relpath))
            _record_kinds(s, result.id, {kind_of(str(ds.SOPClassUID)) for ds, _ in added},
                          failed or {})
            if added:
                _queue_deliveries(s, result.id, self.destinations)
            job.state = "done"
            job.finished_at = utcnow()
            job.error = None
            if study.generation == job.generation and study.state in ("complete", "analysing"):
                study.state = "done"
        metrics.analysis_done(ms / 1000, len(findings), analysis.timings_ms,
                              [f.probability for f in findings])
        event(log, "analysis.done", study=study.study_uid, job=job_id, rois=len(findings),
              max_probability=None if max_p is None else round(max_p, 3),
              images=sum(1 for i in analysis.images if i.analysed),
              skipped=sum(1 for i in analysis.images if not i.analysed),
              objects=len(written), failed_kinds=",".join(sorted(failed or {})) or None,
              ms=round(ms, 1),
              stages=",".join(f"{k}:{v:.0f}" for k, v in analysis.timings_ms.items()))

    def _fail(self, job_id: int, study_uid: str, attempts: int, exc: Exception) -> None:
        final = attempts >= MAX_JOB_ATTEMPTS
        message = f"{type(exc).__name__}: {exc}"[:2000]
        log.exception("analysis.error study=%s job=%s", study_uid, job_id)
        metrics.analysis_failed()
        with self.db.session() as s:
            job = s.get(Job, job_id)
            job.state = "failed" if final else "queued"
            job.error = message
            job.finished_at = utcnow()
            if final:
                study = s.get(Study, job.study_id)
                if study.generation == job.generation:
                    study.state = "failed"
        event(log, "analysis.failed", logging.ERROR, study=study_uid, job=job_id,
              attempt=attempts, final=final, error=message[:300])


def _record_kinds(s: Session, result_id: int, built: set[str | None],
                  failed: dict[str, str]) -> None:
    """Per-kind bookkeeping of a result: kinds just built, kinds that failed (with why)."""
    rows = {r.kind: r for r in s.execute(select(ResultKind).where(
        ResultKind.result_id == result_id)).scalars()}
    now = utcnow()
    for kind in sorted(k for k in built if k):
        row = rows.get(kind)
        if row is None:
            s.add(ResultKind(result_id=result_id, kind=kind, state="built", updated_at=now))
        else:
            row.state, row.error, row.updated_at = "built", None, now
    for kind, error in sorted(failed.items()):
        row = rows.get(kind)
        if row is None:
            s.add(ResultKind(result_id=result_id, kind=kind, state="failed", error=error,
                             attempts=1, updated_at=now))
        else:
            row.state, row.error, row.updated_at = "failed", error, now
            row.attempts += 1


def _queue_deliveries(s: Session, result_id: int, destinations: Sequence[str]) -> None:
    """A delivery per destination; an existing one (a kind was added to a delivered result)
    goes back to pending: only the kinds it has not delivered yet are sent."""
    existing = {d.destination: d for d in s.execute(select(Delivery).where(
        Delivery.result_id == result_id)).scalars()}
    for name in destinations:
        d = existing.get(name)
        if d is None:
            s.add(Delivery(result_id=result_id, destination=name, state="pending",
                           next_attempt_at=utcnow()))
        elif d.state != "superseded":
            d.state, d.attempts, d.next_attempt_at = "pending", 0, utcnow()
