"""Analyse: the worker that takes queued studies, runs the analysis stage and records results.

It runs in its own thread, apart from the association threads, so a slow model never stalls a
C-STORE. A job is claimed with a conditional UPDATE; the result objects are written durably first
and recorded in the same transaction that finishes the job and queues its deliveries, so a crash
at any point leaves either no result (the job is re-queued at start-up) or a complete one.

Coalescing (with node.completion): a study has at most one live job. A job is not claimed while
its study is receiving again, and a running job checks at safe points (before each image, before
classifying, before building and before recording the reports: :class:`Checkpoint`) whether its
study was re-opened or its content changed; if so it stops there, goes back to the queue without
counting an attempt, and keeps the per-image work it had done (decode, ROI finding, crops) for the
next run of the same study. Only the latest content is recorded and sent. The same safe points
stop an analysis that runs past ``analysis.max_study_seconds`` (a failure) or when the node
stops (re-queued, not a failed attempt).

Every instance of the study gets an outcome (``Instance.outcome``): analysed, skipped (with the
reason: a policy, ``analysis.max_images_per_study``) or failed (undecodable, over the decode
limits). A study where nothing could be decoded is a failed analysis, never "done" with nothing.

Each output kind is built on its own (:meth:`AnalysisWorker._build_each_kind`): a kind that
fails is recorded with its reason (``result_kinds``) and the others are still delivered;
``mammo-node retry`` re-queues the study and the same analysis key rebuilds only what is missing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node import faults, metrics, queue
from node.analysis.result import ImageInput, ModelInfo, StudyAnalyser, StudyAnalysis
from node.charset import normalise_for_copy
from node.db import (
    Database,
    Instance,
    Job,
    Result,
    ResultKind,
    ResultObject,
    Study,
)
from node.intake import ANALYSED_SOP_CLASSES
from node.kinds import SR_SOP_CLASSES, kind_of
from node.log import event
from node.memory import release_free_memory
from node.reports.common import warm_up as warm_up_reports
from node.reports.context import ReportContext, SeriesNumbers
from node.store import Spool

if TYPE_CHECKING:
    from node.preanalysis import PreAnalysis

log = logging.getLogger("node.worker")

MAX_JOB_ATTEMPTS = 3

ReportBuilder = Callable[..., Iterable[Dataset]]  # a list, or one at a time
CHECK_EVERY_SECONDS = 0.25  # a safe point asks the database at most this often


class Superseded(Exception):
    """The analysis stopped at a safe point; the job goes back to the queue, no attempt lost."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLong(Exception):
    """The analysis ran past ``analysis.max_study_seconds``: a failure, not retried."""


class NothingDecodable(Exception):
    """No image of the study could be decoded: a failure, not retried (the bytes won't change).
    ``outcomes`` says why for each instance."""

    def __init__(self, message: str, outcomes: dict[str, tuple[str, str | None]]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


@dataclass
class StudyBounds:
    """Per-study bounds (``[analysis]``): how many images are analysed, for how long."""

    max_images: int = 16
    max_seconds: float = 600.0


class Checkpoint:
    """Callable at safe points (any thread): raises :class:`Superseded` when the job's study
    was re-opened or got new content, or the node is stopping; :class:`TooLong` past the
    deadline. The database is asked at most every :data:`CHECK_EVERY_SECONDS`."""

    def __init__(self, db: Database, job_id: int, input_key: str, deadline: float,
                 stopping: threading.Event, holder: str | None = None) -> None:
        self.db, self.job_id, self.input_key, self.holder = db, job_id, input_key, holder
        self.deadline, self.stopping = deadline, stopping
        self._lock = threading.Lock()
        self._next = 0.0
        self._verdict: Exception | None = None

    def __call__(self) -> None:
        if self.stopping.is_set():
            raise Superseded("node stopping")
        if time.monotonic() > self.deadline:
            raise TooLong("analysis took longer than analysis.max_study_seconds")
        with self._lock:
            if self._verdict is None and time.monotonic() >= self._next:
                self._next = time.monotonic() + CHECK_EVERY_SECONDS
                self._verdict = self._ask()
            verdict = self._verdict
        if verdict is not None:
            raise verdict

    def _ask(self) -> Exception | None:
        why = queue.job_verdict(self.db, self.job_id, self.input_key, self.holder)
        return None if why is None else Superseded(why)


@dataclass(frozen=True)
class ReportOptions:
    manufacturer: str
    sr_series_number: int
    sc_series_number: int
    threshold: float
    software_version: str
    # Output kinds to build (node.kinds): the union over the destinations.
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
        bounds: StudyBounds | None = None,
        holder: queue.Holder | None = None,
    ) -> None:
        self.db = db
        # This node's name on its claims and how long a lease lasts unrenewed (node.cluster
        # renews it while the analysis runs).
        self.holder = holder or queue.Holder("local")
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
        self.bounds = bounds or StudyBounds()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: int | None = None  # the job being processed (for a forced stop)
        # Per-image work of the last studies analysed, reused when a superseded job runs again:
        # {study_uid|model: {file path: prepared image}}, at most two studies.
        self._image_cache: dict[str, dict[str, object]] = {}
        # Per-instance pre-analysis (node.preanalysis): when set, the per-image work comes from
        # it (done while the study was arriving) instead of the in-memory cache above.
        self.preanalysis: PreAnalysis | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def recover(self) -> int:
        """Re-queue the jobs this node's previous run held (it was killed) and any job whose
        lease expired; another node's live claims stay its own."""
        mine = queue.release_holder(self.db, self.holder.name).get("job", 0)
        expired = queue.reap_expired(self.db).get("job", 0)
        if mine or expired:
            event(log, "worker.recovered", jobs=mine + expired, own=mine, expired=expired,
                  reason="interrupted by a restart or a lost node")
        return mine + expired

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="analysis-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop at the next safe point (the running job is re-queued); True when the thread
        ended within ``timeout``."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def requeue_interrupted(self) -> int | None:
        """After a stop that did not reach a safe point in time: put the running job back in
        the queue without counting the attempt (the process is about to exit)."""
        job_id = self.current_job
        if job_id is None:
            return None
        self._requeue(job_id, "node stopping")
        return job_id

    def _loop(self) -> None:
        try:
            warm_up_reports(ANALYSED_SOP_CLASSES)
        except Exception:  # a cold cache only costs time
            log.exception("worker.warm_up_failed")
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
        """Claim and process the oldest queued job whose study is not receiving again (such a
        job waits: completion absorbs the new instances into it); False when there was none."""
        if self._stop.is_set():
            return False
        job_id = queue.claim_job(self.db, self.holder)
        if job_id is None:
            return False
        self.current_job = job_id
        try:
            self._process(job_id)
        finally:
            self.current_job = None
            release_free_memory()  # keeps the RSS flat study after study (node/memory.py)
        return True

    def _process(self, job_id: int) -> None:
        t0 = time.perf_counter()
        with self.db.session() as s:
            job = s.get(Job, job_id)
            study = s.get(Study, job.study_id) if job is not None else None
            if job is None or study is None:  # pragma: no cover - claimed just now
                return
            study_uid, attempts, input_key = study.study_uid, job.attempts, job.input_key
            queue.begin_analysis(s, study)
            instances = list(s.execute(
                select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
            ).scalars())
        chosen, over = select_for_analysis(instances, self.bounds.max_images)
        event(log, "analysis.started", study=study_uid, job=job_id, images=len(chosen),
              not_analysed=len(over) or None, attempt=attempts)
        check = Checkpoint(self.db, job_id, input_key, time.monotonic() + self.bounds.max_seconds,
                           self._stop, self.holder.name)
        try:
            inputs = [ImageInput(self.spool.path(i.relpath), i.sop_uid, i.sop_class_uid)
                      for i in chosen]
            faults.hit("analysis.running")
            cache_key = self._cache_key(study_uid)
            cache = (self.preanalysis.images_of(study_uid) if self.preanalysis is not None
                     else self._cache_for(cache_key))
            analysis = self.analyser.analyse(study_uid, inputs, checkpoint=check,
                                             cache=cache)  # type: ignore[arg-type]
            if self.preanalysis is not None:
                event(log, "analysis.prepared_ahead", study=study_uid, job=job_id,
                      images=getattr(cache, "hits", 0), of=len(inputs))
            check()
            # Keyed and reported on the model that ran (a switch may happen at any time).
            key = self._analysis_key(job_id, input_key, analysis.model)
            sources = {i.sop_uid: normalise_for_copy(pydicom.dcmread(
                self.spool.path(i.relpath), stop_before_pixels=True)) for i in chosen}
            outcomes = self._outcomes(analysis, over)
            if not any(image.analysed for image in analysis.images):
                undecodable = [i for i in analysis.images if i.failed]
                if undecodable:  # nothing could be decoded: a counted failure, not "done"
                    raise NothingDecodable(
                        f"no image could be decoded ({len(undecodable)} of "
                        f"{len(analysis.images)}): "
                        + "; ".join(sorted({i.skipped_reason or "" for i in undecodable}))[:1500],
                        outcomes)
                # Nothing analysable by policy (e.g. For Processing only, with for_processing =
                # "skip"): a finished job without result objects, each skip recorded.
                event(log, "analysis.nothing_to_report", logging.WARNING, study=study_uid,
                      reasons=";".join(sorted({i.skipped_reason or "" for i in
                                               analysis.images})))
                if self._record(job_id, key, analysis, [], (time.perf_counter() - t0) * 1000,
                                outcomes, input_key) and self.preanalysis is not None:
                    self.preanalysis.drop_study(study_uid)
                return
            check()
            previous = self._current_srs(study_uid, key)
            kinds = self._kinds_to_build(key)
            # The result is recorded (current) before its kinds are built, and each kind is
            # recorded and queued for delivery as soon as it is durable: the first kind is on
            # its way while the next one is built. A kind built before the study changed stays
            # with this (then superseded) result; the job's end closes it (_finish).
            result_id = self._open_result(job_id, key, analysis, input_key,
                                          (time.perf_counter() - t0) * 1000)
            if result_id is None:
                raise Superseded(self._why_stale(job_id))
            recorded, failed = self._build_each_kind(kinds, analysis, sources, key, previous,
                                                     check, job_id=job_id, result_id=result_id)
            check()
        except Superseded as sup:  # what was built is recorded; nothing else is on disk
            self._requeue(job_id, sup.reason)
            return
        except (TooLong, NothingDecodable) as exc:
            self._fail(job_id, study_uid, attempts, exc, final=True,
                       outcomes=getattr(exc, "outcomes", None))
            return
        except Exception as exc:  # noqa: BLE001 - the job fails (retried)
            self._fail(job_id, study_uid, attempts, exc)
            return
        ms = (time.perf_counter() - t0) * 1000
        if not self._finish(job_id, result_id, analysis, recorded, ms, outcomes, input_key,
                            failed):
            return
        self._image_cache.pop(cache_key, None)  # recorded: the per-image work is not needed
        if self.preanalysis is not None:
            self.preanalysis.drop_study(study_uid)
        if recorded and self.destinations and self.on_result is not None:
            self.on_result()  # the result is complete: its delivery can be done
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
                         sources: dict[str, Dataset], key: str, previous: list[Dataset],
                         check: Callable[[], None] | None = None, *, job_id: int,
                         result_id: int) -> tuple[list[tuple[Dataset, str]], dict[str, str]]:
        """Build, write and record each output kind on its own: one that fails (a builder bug,
        a legal value a library refuses) is logged with its reason, and the others still go
        out. Each kind is recorded in result ``result_id`` and queued for delivery as soon as
        its files are durable (:meth:`_record_kind`). Returns (objects recorded with their
        spool paths, error per failed kind). ``check`` (a :class:`Checkpoint`) runs before each
        kind: a study that changed stops the building (the kinds recorded so far stay)."""
        o = self.options
        recorded: list[tuple[Dataset, str]] = []
        failed: dict[str, str] = {}
        for kind in kinds:
            if check is not None:
                check()
            try:
                faults.fail(f"build.{kind}")
                context = ReportContext(
                    analysis_key=key, created=dt.datetime.now(dt.UTC),
                    manufacturer=o.manufacturer, software_version=o.software_version,
                    threshold=analysis.model.threshold,  # the model that ran
                    series=SeriesNumbers(tid1500=o.sr_series_number, sc=o.sc_series_number,
                                         mammo_cad=o.cad_sr_series_number,
                                         gsps=o.gsps_series_number),
                    cad_operating_point=o.cad_operating_point, previous_srs=previous)
                datasets: list[Dataset] = []
                # each object is written (and fsynced) while the next one is built, when the
                # builder hands them over one at a time (node.reports.iter_reports)
                paths = self.spool.write_datasets(_kept(
                    self.build_reports(analysis, sources, context, (kind,)), datasets))
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
            recorded += self._record_kind(job_id, result_id, kind, datasets, paths)
        return recorded, failed

    def _record_kind(self, job_id: int, result_id: int, kind: str, datasets: list[Dataset],
                     paths: list[str]) -> list[tuple[Dataset, str]]:
        """Record one kind's durable files in the open result and wake the deliverer; the
        objects recorded. A job no longer this node's (lease lost) records nothing: its files
        go and :class:`Superseded` ends the analysis."""
        if not datasets:
            return []
        faults.hit("analysis.before_record")
        try:
            with self.db.session() as s:
                duplicates = queue.add_result_objects(
                    s, result_id, job_id, self.holder.name,
                    [(str(ds.SOPClassUID), str(ds.SOPInstanceUID), p)
                     for ds, p in zip(datasets, paths, strict=True)],
                    kind, self.destinations)
        except Exception:
            for relpath in paths:
                self.spool.remove(relpath)
            raise
        if duplicates is None:
            for relpath in paths:
                self.spool.remove(relpath)
            raise Superseded("the job is no longer held by this node")
        for relpath in duplicates:  # the result has them (a retry): the new copy goes
            self.spool.remove(relpath)
        if self.destinations and self.on_result is not None:
            self.on_result()
        return [(ds, p) for ds, p in zip(datasets, paths, strict=True) if p not in duplicates]

    # -- coalescing, bounds, outcomes ----------------------------------------------------------
    def _cache_key(self, study_uid: str) -> str:
        """The per-image work (crops cut at the card's ROI size) belongs to one model: a model
        switched in between (node.activemodel) starts afresh."""
        model = self.analyser.model
        return f"{study_uid}|{model.name}|{model.version}"

    def _cache_for(self, cache_key: str) -> dict[str, object]:
        cache = self._image_cache.pop(cache_key, None) or {}
        self._image_cache[cache_key] = cache  # most recent last
        while len(self._image_cache) > 2:
            self._image_cache.pop(next(iter(self._image_cache)))
        return cache

    def _requeue(self, job_id: int, reason: str) -> None:
        """Back to the queue without counting the attempt (superseded or interrupted)."""
        study_uid = queue.requeue_job(self.db, job_id, reason, self.holder.name)
        if study_uid is None:  # not ours any more (lease lost) or not running
            return
        metrics.analysis_superseded("stopping" if reason == "node stopping" else "changed")
        event(log, "analysis.superseded", study=study_uid, job=job_id, reason=reason,
              next="waits for the study to be complete" if "re-opened" in reason else
              "runs again with the latest content" if "changed" in reason else
              "resumes after the restart")

    @staticmethod
    def _outcomes(analysis: StudyAnalysis, over: list[Instance]
                  ) -> dict[str, tuple[str, str | None]]:
        """SOP Instance UID -> (outcome, reason) for every instance of the study."""
        out: dict[str, tuple[str, str | None]] = {}
        for image in analysis.images:
            if image.analysed:
                out[image.sop_instance_uid] = ("analysed", None)
            else:
                out[image.sop_instance_uid] = ("failed" if image.failed else "skipped",
                                               image.skipped_reason)
        n = len(over) + len(analysis.images)
        for inst in over:
            out[inst.sop_uid] = ("skipped", f"not analysed: the study has {n} images, "
                                            "analysis.max_images_per_study = "
                                            f"{len(analysis.images)}")
        return out

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
                       ResultObject.sop_class_uid.in_(SR_SOP_CLASSES))
            ).scalars().all()
        return [pydicom.dcmread(self.spool.path(r), stop_before_pixels=True) for r in relpaths
                if self.spool.path(r).exists()]

    def _analysis_key(self, job_id: int, input_key: str | None = None,
                      model: ModelInfo | None = None) -> str:
        """Digest of what the result objects depend on: the content analysed (the job's input
        key when the analysis started), the model that ran (name, version, architecture,
        threshold), the output options: the same inputs and model give the same result UIDs."""
        model = model or self.analyser.model
        with self.db.session() as s:
            job = s.get(Job, job_id)
            started = input_key or (job.input_key if job is not None else "")
            text = "|".join([started, model.name, model.version, model.architecture,
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

    @staticmethod
    def _summary(analysis: StudyAnalysis) -> dict[str, object]:
        return {
            "timings_ms": {k: round(v, 1) for k, v in analysis.timings_ms.items()},
            "max_probability_per_breast": analysis.max_probability_per_breast(),
            "images": [{"sop": i.sop_instance_uid, "laterality": i.laterality, "view": i.view,
                        "rois": len(i.findings), "skipped": i.skipped_reason}
                       for i in analysis.images],
            "model": {"name": analysis.model.name, "version": analysis.model.version},
        }

    def _open_result(self, job_id: int, key: str, analysis: StudyAnalysis,
                     input_key: str | None, ms: float) -> int | None:
        """The result the kinds are recorded in (queue.open_result); None: the study changed
        or the job is not this node's any more."""
        findings = analysis.findings
        with self.db.session() as s:
            return queue.open_result(
                s, job_id, input_key, self.holder.name, key, roi_count=len(findings),
                max_probability=max((f.probability for f in findings), default=None),
                analysis_ms=ms, summary=json.dumps(self._summary(analysis)))

    def _finish(self, job_id: int, result_id: int, analysis: StudyAnalysis,
                recorded: list[tuple[Dataset, str]], ms: float,
                outcomes: dict[str, tuple[str, str | None]], input_key: str | None,
                failed: dict[str, str]) -> bool:
        """Close the result (its kinds are recorded): the job done, each instance's outcome,
        the failed kinds, the deliveries due now, in one transaction, unless the study changed
        since (then the job is re-queued; the kinds recorded stay with this result, which the
        next analysis supersedes): False."""
        findings = analysis.findings
        try:
            with self.db.session() as s:
                if not queue.finish_job(s, job_id, input_key, self.holder.name):
                    raise _Stale()
                job = s.get(Job, job_id)
                study = s.get(Study, job.study_id) if job is not None else None
                if study is None:  # pragma: no cover - finish_job just read both
                    raise _Stale()
                _record_outcomes(s, study.id, outcomes)
                result = s.get(Result, result_id)
                if result is not None and result.job_id == job_id:
                    result.analysis_ms = ms
                queue.record_result_kinds(s, result_id, (), failed)
                if recorded:  # a delivery waiting for the result's end is due now
                    queue.queue_deliveries(s, result_id, self.destinations)
                queue.study_analysed(s, study)
                study_uid = study.study_uid
        except _Stale:
            self._requeue(job_id, self._why_stale(job_id))
            return False
        max_p = max((f.probability for f in findings), default=None)
        metrics.analysis_done(ms / 1000, len(findings), analysis.timings_ms,
                              [f.probability for f in findings])
        event(log, "analysis.done", study=study_uid, job=job_id, rois=len(findings),
              max_probability=None if max_p is None else round(max_p, 3),
              images=sum(1 for i in analysis.images if i.analysed),
              skipped=sum(1 for i in analysis.images if not i.analysed),
              objects=len(recorded), failed_kinds=",".join(sorted(failed)) or None,
              ms=round(ms, 1),
              stages=",".join(f"{k}:{v:.0f}" for k, v in analysis.timings_ms.items()))
        bad = [(uid, why) for uid, (o, why) in outcomes.items() if o == "failed"]
        if bad:
            event(log, "analysis.images_failed", logging.WARNING, study=study_uid,
                  job=job_id, images=len(bad), reason=bad[0][1])
        return True

    def _record(self, job_id: int, key: str, analysis: StudyAnalysis,
                written: list[tuple[Dataset, str]], ms: float,
                outcomes: dict[str, tuple[str, str | None]] | None = None,
                input_key: str | None = None, failed: dict[str, str] | None = None) -> bool:
        """Record the result and finish the job, in one transaction, unless the study changed
        meanwhile (then nothing is recorded, the files go and the job is re-queued): False."""
        findings = analysis.findings
        max_p = max((f.probability for f in findings), default=None)
        summary = self._summary(analysis)
        try:
            with self.db.session() as s:
                # The first write, and conditional: a study re-opened or changed since the
                # analysis started is not recorded (nothing of this transaction is kept).
                if not queue.finish_job(s, job_id, input_key, self.holder.name):
                    raise _Stale()
                job = s.get(Job, job_id)
                study = s.get(Study, job.study_id) if job is not None else None
                if job is None or study is None:  # pragma: no cover - finish_job read both
                    raise _Stale()
                _record_outcomes(s, study.id, outcomes or {})
                existing = s.execute(select(Result).where(Result.analysis_key == key)).scalar()
                if existing is None:
                    queue.replace_current_results(s, study.id)
                    result = Result(study_id=study.id, job_id=job.id, analysis_key=key,
                                    current=True, roi_count=len(findings),
                                    max_probability=max_p, analysis_ms=ms,
                                    summary=json.dumps(summary))
                    s.add(result)
                    s.flush()
                    added = written
                else:  # same analysis again (a retry rebuilding a failed kind): what is new
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
                queue.record_result_kinds(s, result.id,
                                          {kind_of(str(ds.SOPClassUID)) for ds, _ in added},
                                          failed or {})
                if added:
                    queue.queue_deliveries(s, result.id, self.destinations)
                queue.study_analysed(s, study)
        except _Stale:
            for _, relpath in written:
                self.spool.remove(relpath)
            self._requeue(job_id, self._why_stale(job_id))
            return False
        metrics.analysis_done(ms / 1000, len(findings), analysis.timings_ms,
                              [f.probability for f in findings])
        event(log, "analysis.done", study=study.study_uid, job=job_id, rois=len(findings),
              max_probability=None if max_p is None else round(max_p, 3),
              images=sum(1 for i in analysis.images if i.analysed),
              skipped=sum(1 for i in analysis.images if not i.analysed),
              objects=len(written), failed_kinds=",".join(sorted(failed or {})) or None,
              ms=round(ms, 1),
              stages=",".join(f"{k}:{v:.0f}" for k, v in analysis.timings_ms.items()))
        bad = [(uid, why) for uid, (o, why) in (outcomes or {}).items() if o == "failed"]
        if bad:
            event(log, "analysis.images_failed", logging.WARNING, study=study.study_uid,
                  job=job_id, images=len(bad), reason=bad[0][1])
        return True

    def _why_stale(self, job_id: int) -> str:
        with self.db.session() as s:
            row = s.execute(select(Study.state).join(Job, Job.study_id == Study.id)
                            .where(Job.id == job_id)).first()
        return "study re-opened by a new instance" if row and \
            row[0] == queue.StudyState.RECEIVING else \
            "study content changed"

    def _fail(self, job_id: int, study_uid: str, attempts: int, exc: Exception,
              final: bool = False,
              outcomes: dict[str, tuple[str, str | None]] | None = None) -> None:
        final = final or attempts >= MAX_JOB_ATTEMPTS
        message = f"{type(exc).__name__}: {exc}"[:2000]
        if not isinstance(exc, NothingDecodable | TooLong):  # those say all in their message
            log.exception("analysis.error study=%s job=%s", study_uid, job_id)
        metrics.analysis_failed()
        with self.db.session() as s:
            job = queue.fail_job(s, job_id, message, final, self.holder.name)
            if job is None:  # another node holds it now (this node's lease expired)
                return
            if final:
                if outcomes:  # each image's own reason
                    _record_outcomes(s, job.study_id, outcomes)
                else:  # the study's analysis failed as a whole: its images with it
                    s.execute(update(Instance).where(
                        Instance.study_id == job.study_id,
                        Instance.outcome.is_(None) | (Instance.outcome != "skipped"))
                        .values(outcome="failed", outcome_reason=message[:1000]))
        event(log, "analysis.failed", logging.ERROR, study=study_uid, job=job_id,
              attempt=attempts, final=final, error=message[:300])
        if final and self.preanalysis is not None:
            self.preanalysis.drop_study(study_uid)


def _kept(datasets: Iterable[Dataset], into: list[Dataset]) -> Iterator[Dataset]:
    """``datasets`` as they come, each also appended to ``into``."""
    for ds in datasets:
        into.append(ds)
        yield ds


class _Stale(Exception):
    """Raised inside the recording transaction to roll it back (the study changed)."""


def _record_outcomes(s: Session, study_id: int, outcomes: dict[str, tuple[str, str | None]]
                     ) -> None:
    """Write each instance's outcome; the study's other instances (none, normally) stay."""
    by_outcome: dict[tuple[str, str | None], list[str]] = {}
    for uid, value in outcomes.items():
        by_outcome.setdefault(value, []).append(uid)
    for (outcome, reason), uids in by_outcome.items():
        for i in range(0, len(uids), 500):
            s.execute(update(Instance).where(Instance.study_id == study_id,
                                             Instance.sop_uid.in_(uids[i:i + 500]))
                      .values(outcome=outcome, outcome_reason=(reason or None) and reason[:1000]))


def select_for_analysis(instances: list[Instance], limit: int
                        ) -> tuple[list[Instance], list[Instance]]:
    """(to analyse, not analysed) under ``analysis.max_images_per_study``.

    First the newest instance of each (laterality, view, For Processing) group, so that a study
    with many images still has each screening view analysed, then the rest, newest first; the
    chosen ones keep their received order.
    """
    if len(instances) <= limit:
        return list(instances), []
    newest_first = sorted(instances, key=lambda i: i.id, reverse=True)
    chosen: list[Instance] = []
    seen: set[tuple[str, str, bool]] = set()
    for inst in newest_first:
        group = (inst.laterality or "", inst.view or "", bool(inst.for_processing))
        if group not in seen and len(chosen) < limit:
            seen.add(group)
            chosen.append(inst)
    keep = {i.id for i in chosen}
    for inst in newest_first:
        if len(keep) >= limit:
            break
        keep.add(inst.id)
    return ([i for i in instances if i.id in keep], [i for i in instances if i.id not in keep])
