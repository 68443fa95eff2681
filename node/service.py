"""The node: wires the stages in the order data flows through them, and runs them.

receive -> store (spool + database) -> completion (scheduler) -> analyse (worker thread)
-> report -> deliver (scheduler) ; plus retention. ``serve`` builds exactly one :class:`Node`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import threading
import time

from node import __version__, metrics, model_status, queue
from node.activemodel import MODEL_POLL_SECONDS, ModelManager
from node.analysis.result import StudyAnalyser
from node.cluster import Membership, check_shared_storage, node_name
from node.completion import complete_ready_studies
from node.config import Settings
from node.db import Database
from node.deliver import Deliverer, DeliveryContext
from node.httpd import MonitoringServer
from node.log import event
from node.orphans import sweep_orphans
from node.preanalysis import PreAnalysis
from node.receive import ReceiveContext, Receiver, StoredInstance
from node.retention import purge_expired
from node.schedule import build_scheduler
from node.security import client_context, server_context
from node.shadow import ShadowRunner
from node.store import Spool
from node.worker import AnalysisWorker, ReportOptions, StudyBounds

log = logging.getLogger("node.service")


def load_analyser(settings: Settings) -> StudyAnalyser:
    """Load the classifier once; raises RuntimeError with a clear message when unusable."""
    from node.analysis.pipeline import AnalysisPipeline

    return AnalysisPipeline(settings.model, settings.analysis, settings.limits)


def build_monitoring(node: Node) -> MonitoringServer:
    """The [http] server over this node's listener, database and data_dir."""
    from node import health, status_page

    s = node.settings
    return MonitoringServer(
        s.http.host, s.http.port,
        health=lambda: health.health(
            host=s.node.host, port=s.node.port, db=node.db,
            # a node without the receive role has no listener to be healthy about
            listening=node.receiver.listening or "receive" not in node.roles,
            spool=node.spool, min_free_mb=s.node.min_free_mb,
            destinations=[d.name for d in s.destinations]),
        status_page=lambda: status_page.render(
            node.db, ae_title=s.node.ae_title, version=__version__,
            limit=s.http.recent_studies, refresh_seconds=s.http.refresh_seconds,
            models=node.models.describe),
        request_timeout=s.http.request_timeout, idle_timeout=s.http.idle_timeout,
        max_connections=s.http.max_connections,
    )


class Node:
    def __init__(self, settings: Settings, analyser: StudyAnalyser | None = None,
                 roles: list[str] | None = None) -> None:
        self.settings = settings
        c = settings.cluster
        # What this node does (receive, analyse, deliver); all three by default.
        self.roles = list(roles or c.roles)
        self.holder = queue.Holder(node_name(c.node_name, settings.node.port), c.lease_seconds)
        self.spool = Spool(settings.node.data_dir)
        self.db = Database(settings.database_url)
        if settings.database.migrate == "auto":
            self.db.create_schema()  # the Alembic migrations (node.migrate)
        else:
            from node.migrate import require_current

            require_current(self.db)
        # Every node of a queue sees the same data_dir (a shared mount): refuse otherwise.
        check_shared_storage(self.db, settings.node.data_dir)
        self.membership = Membership(self.db, self.holder, self.roles, c.heartbeat_seconds,
                                     __version__)
        # The active model ([model] card, or the one `mammo-node model activate` chose) behind
        # a switchable analyser, and the shadow model; followed live (node.activemodel).
        self.models = ModelManager(settings, self.db, load_analyser, default=analyser)
        self.analyser = self.models.analyser
        from node.reports import iter_reports  # each SC written while the next is rendered

        model = self.analyser.model
        self.worker = AnalysisWorker(
            self.db, self.spool, self.analyser, iter_reports,
            ReportOptions(
                manufacturer=settings.output.manufacturer,
                sr_series_number=settings.output.sr_series_number,
                sc_series_number=settings.output.sc_series_number,
                threshold=model.threshold,
                software_version=f"mammo-node {__version__}",
                kinds=tuple(settings.report_kinds),
                cad_operating_point=settings.cad_operating_point_override,
                cad_sr_series_number=settings.output.cad_sr_series_number,
                gsps_series_number=settings.output.gsps_series_number,
            ),
            destinations=[d.name for d in settings.destinations],
            bounds=StudyBounds(max_images=settings.analysis.max_images_per_study,
                               max_seconds=settings.analysis.max_study_seconds),
            holder=self.holder,
        )
        tls = settings.tls
        self.deliverer = Deliverer.from_settings(settings, DeliveryContext(
            self.db, self.spool, holder=self.holder,
            tls_context=client_context(tls) if any(d.tls for d in settings.destinations)
            else None))
        self.receiver = Receiver.from_settings(settings, ReceiveContext(
            self.spool, self.db, on_stored=self._on_stored,
            ssl_context=server_context(tls) if tls.enabled else None))
        st = settings.study
        self.scheduler = build_scheduler([
            *([("complete-studies", self._complete, st.check_interval_seconds)]
              if "receive" in self.roles else []),
            *([("deliver", self.deliverer.run_due, 1.0)] if "deliver" in self.roles else []),
            ("retention", lambda: purge_expired(self.db, self.spool, settings.retention.days),
             settings.retention.check_interval_hours * 3600),
            ("models", self.models.refresh, MODEL_POLL_SECONDS),
        ])
        self.worker.on_result = self._on_result
        self.preanalysis = None
        # Pre-analysis feeds this node's own worker: it runs where instances are received and
        # analysed (a receive-only node stays light; its studies are analysed at completion).
        if (settings.analysis.preanalysis_workers > 0 and {"receive", "analyse"} <= set(self.roles)
                and PreAnalysis.supported(self.analyser)):
            self.preanalysis = PreAnalysis(
                self.db, self.spool, self.analyser,
                workers=settings.analysis.preanalysis_workers,
                max_pending=settings.analysis.preanalysis_queue,
                max_images_per_study=settings.analysis.max_images_per_study)
            self.worker.preanalysis = self.preanalysis
        self.shadow = ShadowRunner(self.db, self.spool, self.models, holder=self.holder)
        self.worker.on_analysed = self.shadow.on_analysed
        self._stopped = threading.Event()
        metrics.bind(self.db, settings.node.data_dir, [d.name for d in settings.destinations])
        model_status.bind_metrics(self.db, self.models)
        metrics.bind_admission(self.receiver.admission.snapshot)
        self.http = build_monitoring(self) if settings.http.enabled else None
        self.stow = None
        if settings.dicomweb.enabled:  # STOW-RS in, through the receiver's checks and store
            from node.stow import StowServer, https_context

            w = settings.dicomweb
            self.stow = StowServer(w, self.receiver, https_context(
                tls.certificate, tls.private_key) if w.tls else None)

    def _on_stored(self, stored: StoredInstance) -> None:
        # Durable and committed: its per-image work may start (only queued here, never waited
        # for: the C-STORE answer goes out at once).
        if self.preanalysis is not None and stored.relpath:
            self.preanalysis.submit(stored.study_uid, stored.relpath, stored.sop_uid,
                                    stored.sop_class_uid)
        # Four views may be there now: run the completion check at once, in the scheduler's
        # thread (not in this association thread), rather than at the next tick.
        if self.settings.study.complete_on_four_views and stored.view in ("CC", "MLO"):
            job = self.scheduler.get_job("complete-studies")
            if job is not None:
                job.modify(next_run_time=dt.datetime.now(dt.UTC))

    def _on_result(self) -> None:
        # Results were just recorded: deliver now, in the scheduler's thread, not at the next tick.
        self.deliverer.wake()  # (a run under way makes another pass)
        job = self.scheduler.get_job("deliver")
        if job is not None:
            job.modify(next_run_time=dt.datetime.now(dt.UTC))

    def _complete(self) -> None:
        st = self.settings.study
        if complete_ready_studies(self.db, st.stable_seconds, st.complete_on_four_views):
            self.worker.wake.set()

    def start(self) -> None:
        # With a shared database (and so a shared data_dir) other nodes' transfers in flight
        # are in incoming/ too: only files older than an hour go.
        stale = self.spool.clear_incoming(0 if self.db.is_sqlite else 3600)
        if stale:
            event(log, "spool.cleared", files=stale, reason="unacknowledged transfers from "
                                                           "before the restart")
        sweep_orphans(self.db, self.spool, 0 if self.db.is_sqlite else 3600)
        # What this node's previous run held goes back to the queue, and what other nodes
        # held under leases that expired; live claims of other nodes stay theirs.
        self.membership.join()
        self.worker.recover()
        if self.preanalysis is not None:
            self.preanalysis.start()
        self.shadow.recover()
        self.deliverer.recover()
        self.membership.start()
        if "receive" in self.roles:
            self.receiver.start()
            if self.stow is not None:
                self.stow.start()
        if "analyse" in self.roles:
            self.worker.start()
            self.shadow.start()
        self.scheduler.start()
        self.worker.wake.set()
        if self.http is not None:
            self.http.start()
        event(log, "node.started", version=__version__, node=self.holder.name,
              roles=",".join(self.roles), model=self.analyser.model.name,
              model_version=self.analyser.model.version,
              shadow=str(self.models.shadow.ref) if self.models.shadow else "off",
              destinations=",".join(d.name for d in self.settings.destinations) or "none",
              data_dir=self.settings.node.data_dir)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop within ``timeout`` seconds (``node.shutdown_timeout``): the listener closes at
        once; C-STOREs in flight get half the time to finish, then their associations are cut
        off; the analysis stops at its next safe point and its job goes back to the queue
        (not counted as an attempt); deliveries in flight resume at the next start. True when
        everything ended in time, False when something was still running at the deadline (the
        caller then exits anyway: the running job was re-queued, nothing acknowledged is lost).
        """
        timeout = self.settings.node.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.receiver.stop(grace=timeout / 2)
        if self.http is not None:
            self.http.stop()
        if self.stow is not None:
            self.stow.stop()
        self.scheduler.shutdown(wait=False)
        self.shadow.stop(max(0.1, min(2.0, deadline - time.monotonic() - 1.0)))  # never sent
        if self.preanalysis is not None:
            self.preanalysis.stop()
        clean = self.worker.stop(max(0.1, deadline - time.monotonic() - 0.5))
        if not clean:
            job = self.worker.requeue_interrupted()
            event(log, "node.stop_timeout", logging.WARNING, job=job,
                  reason=f"analysis still running after node.shutdown_timeout = {timeout:g} s; "
                         "re-queued, it resumes after the restart")
        self.membership.leave()
        self.db.dispose()
        event(log, "node.stopped", seconds=round(timeout - (deadline - time.monotonic()), 1))
        self._stopped.set()
        return clean

    def serve_forever(self) -> None:
        self.start()
        stop = threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            if stop.is_set():  # a second signal: leave now
                os._exit(1)
            event(log, "node.stopping", signal=signal.Signals(signum).name,
                  within_seconds=self.settings.node.shutdown_timeout)
            stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        # Not a bare stop.wait(): a signal delivered to another thread only sets a flag, and a
        # main thread blocked in an untimed wait would never run the handler (how SIGTERM used
        # to go unanswered during an analysis). Waking every 0.2 s runs it within that time.
        while not stop.wait(0.2):
            pass
        self.stop()
        # Everything acknowledged is durable and interrupted work is re-queued (or, for a
        # delivery in flight, resumes at the next start). Threads still inside a decode, a report
        # build or a send, and the thread pools that interpreter exit would join, must not hold
        # the process past node.shutdown_timeout: flush the log and leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
