"""Prometheus metrics: event counters fed by the stages, and gauges read from the database.

The stages call one-line hooks (:func:`instance_received`, :func:`instance_rejected`,
:func:`analysis_done`, :func:`analysis_failed`, :func:`delivery_attempt`); they only increment
in-memory counters and never fail. Gauges that describe state (studies per state, queue depth,
deliveries, last successful delivery, free disk) are computed from the database when ``/metrics``
is scraped, so they are right even after a restart and with several processes sharing one queue.

The node has its own :class:`CollectorRegistry` (not prometheus-client's global one), so
importing this module twice or running several nodes in one test process does not collide.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node import queue
from node.db import Database, Delivery, Instance, Job, Study
from node.output_failures import failed_kind_counts
from node.queue import DeliveryState, StudyState

if TYPE_CHECKING:
    from node.admission import Ticket  # node.admission imports this module

log = logging.getLogger("node.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: DIMSE status -> the ``reason`` label of ``mammo_instances_rejected_total``.
REJECT_REASONS: dict[int, str] = {
    0xA700: "out_of_resources",
    0xC001: "not_mammogram",
    0xC002: "bad_uids",
    0xC003: "unreadable",
    0xC004: "no_pixel_data",
    0xC005: "conflict",
    0xC000: "not_dicom",  # STOW-RS part that is not application/dicom
    0xC122: "transfer_syntax",  # STOW-RS: a transfer syntax the node does not decode
    0xA900: "wrong_study",  # STOW-RS: instance of another study than the URL names
}

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter(
    "mammo_instances_received", "Instances acknowledged with 0x0000 (duplicates included)",
    registry=REGISTRY)
INSTANCES_REJECTED = Counter(
    "mammo_instances_rejected", "Instances refused, by reason", ["reason"], registry=REGISTRY)
ANALYSIS_SECONDS = Histogram(
    "mammo_analysis_duration_seconds", "Wall time of one study analysis (load to reports)",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)
ANALYSIS_FAILURES = Counter(
    "mammo_analysis_failures", "Failed analysis attempts (retried up to 3 times)",
    registry=REGISTRY)
ROIS_PER_STUDY = Histogram(
    "mammo_rois_per_study", "Regions of interest reported per analysed study",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100), registry=REGISTRY)
DELIVERY_ATTEMPTS = Counter(
    "mammo_delivery_attempts", "Delivery attempts (one association each), by destination",
    ["destination"], registry=REGISTRY)
DELIVERY_FAILURES = Counter(
    "mammo_delivery_failures", "Failed delivery attempts, by destination", ["destination"],
    registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "mammo_stage_duration_seconds", "Wall time of each analysis stage of one study (decode, rois, "
    "classify, gradcam, report)", ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=REGISTRY)
DELIVERY_SECONDS = Histogram(
    "mammo_delivery_duration_seconds", "Wall time of one delivery attempt, by destination",
    ["destination"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=REGISTRY)
FINDING_PROBABILITY = Histogram(
    "mammo_finding_probability", "P(malignant) of each reported finding (model scores over "
    "time: a drift shows as a moving distribution)",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "mammo_connections_refused", "Connections or associations refused before any C-STORE, by "
    "reason (peer_ip, tls_handshake, association, pool_full, per_ip, per_ae)", ["reason"],
    registry=REGISTRY)
ASSOCIATIONS_ABORTED = Counter(
    "mammo_associations_aborted", "Associations the node cut off, by reason (stalled: silent "
    "inside a PDU; too_slow: below node.min_receive_rate_kib; shutdown)", ["reason"],
    registry=REGISTRY)
HTTP_CONNECTIONS_CUT = Counter(
    "mammo_http_connections_cut", "Monitoring-server connections closed by the node, by reason "
    "(over_limit: http.max_connections; request_timeout; idle_timeout)", ["reason"],
    registry=REGISTRY)
PARTIAL_TRANSFERS_REMOVED = Counter(
    "mammo_partial_transfers_removed", "Unfinished C-STORE temp files removed when their "
    "association ended", registry=REGISTRY)
ANALYSIS_SUPERSEDED = Counter(
    "mammo_analysis_superseded", "Analyses stopped at a safe point because their study changed "
    "(re-queued with the new content) or the node was stopping", ["reason"], registry=REGISTRY)

INSTANCES_NOT_ANALYSED = Counter(
    "mammo_instances_not_analysed", "Instances acknowledged but not analysed (node.intake), by "
    "kind (tomosynthesis, synthesized_2d, dose_report, ...) and action (kept, discarded, "
    "duplicate)", ["kind", "action"], registry=REGISTRY)
OUTPUT_BUILD_FAILURES = Counter(
    "mammo_output_build_failures", "Output kinds that could not be built for a result (the "
    "other kinds are still delivered), by kind", ["kind"], registry=REGISTRY)
DELIVERY_KIND_FAILURES = Counter(
    "mammo_delivery_kind_failures", "Output kinds a destination refused (the other kinds are "
    "still delivered), by destination and kind", ["destination", "kind"], registry=REGISTRY)

STUDY_STATES = tuple(str(s) for s in StudyState)
#: What became of each stored instance (node.db.Instance.outcome; NULL = still pending).
INSTANCE_OUTCOMES = ("pending", "analysed", "skipped", "failed")
WAITING_DELIVERY_STATES = tuple(str(s) for s in queue.WAITING_DELIVERY_STATES)


# -- hooks called by the stages ----------------------------------------------------------------
def instance_received() -> None:
    INSTANCES_RECEIVED.inc()


def instance_rejected(status_or_reason: int | str) -> None:
    reason = (REJECT_REASONS.get(status_or_reason, f"0x{status_or_reason:04X}")
              if isinstance(status_or_reason, int) else status_or_reason)
    INSTANCES_REJECTED.labels(reason=reason).inc()


def instance_not_analysed(kind: str, action: str) -> None:
    INSTANCES_NOT_ANALYSED.labels(kind=kind, action=action).inc()


def output_build_failed(kind: str) -> None:
    OUTPUT_BUILD_FAILURES.labels(kind=kind).inc()


def delivery_kind_failed(destination: str, kind: str) -> None:
    DELIVERY_KIND_FAILURES.labels(destination=destination, kind=kind).inc()


def connection_refused(reason: str) -> None:
    CONNECTIONS_REFUSED.labels(reason=reason).inc()


def association_aborted(reason: str) -> None:
    ASSOCIATIONS_ABORTED.labels(reason=reason).inc()


def http_connection_cut(reason: str) -> None:
    HTTP_CONNECTIONS_CUT.labels(reason=reason).inc()


def partial_transfer_removed() -> None:
    PARTIAL_TRANSFERS_REMOVED.inc()


def analysis_superseded(reason: str) -> None:
    ANALYSIS_SUPERSEDED.labels(reason=reason).inc()


def analysis_done(seconds: float, rois: int, stages_ms: dict[str, float] | None = None,
                  probabilities: list[float] | None = None) -> None:
    ANALYSIS_SECONDS.observe(seconds)
    ROIS_PER_STUDY.observe(rois)
    stages = dict(stages_ms or {})
    total_ms = stages.pop("total", None)
    for stage, ms in stages.items():
        STAGE_SECONDS.labels(stage=stage).observe(max(ms, 0.0) / 1000)
    if total_ms is not None:  # building the result objects: what the analysis did not take
        STAGE_SECONDS.labels(stage="report").observe(max(seconds - total_ms / 1000, 0.0))
    for p in probabilities or ():
        FINDING_PROBABILITY.observe(p)


def analysis_failed() -> None:
    ANALYSIS_FAILURES.inc()


def delivery_attempt(destination: str, ok: bool, seconds: float | None = None) -> None:
    DELIVERY_ATTEMPTS.labels(destination=destination).inc()
    if seconds is not None:
        DELIVERY_SECONDS.labels(destination=destination).observe(seconds)
    if not ok:
        DELIVERY_FAILURES.labels(destination=destination).inc()


# -- state read at scrape time ---------------------------------------------------------------
class StateCollector(Collector):
    """Gauges computed from the database and the data directory at each scrape."""

    def __init__(self, db: Database, data_dir: Path, destinations: list[str]) -> None:
        self.db = db
        self.data_dir = data_dir
        self.destinations = destinations

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        disk = GaugeMetricFamily("mammo_disk_free_bytes", "Free bytes on data_dir's filesystem")
        disk.add_metric([], float(shutil.disk_usage(self.data_dir).free))
        yield disk
        up = GaugeMetricFamily("mammo_database_up", "1 when the database answered this scrape")
        try:
            yield from self._from_db()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer when the database is down
            log.warning("metrics.database_unavailable error=%s", type(exc).__name__)
            up.add_metric([], 0.0)
        else:
            up.add_metric([], 1.0)
        yield up

    def _from_db(self) -> Iterator[Metric]:
        with self.db.session() as s:
            studies = dict(s.execute(select(Study.state, func.count())
                                     .group_by(Study.state)).all())
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            # Only the states a delivery waits in: "done" and "superseded" are history and
            # would need a scan of every delivery ever made (see the delivery counters).
            deliveries = s.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .where(Delivery.state.in_(WAITING_DELIVERY_STATES))
                .group_by(Delivery.destination, Delivery.state)).all()
            last_ok = {name: last_success(s, name) for name in self.destinations}
            failed_kinds = failed_kind_counts(s)
            # outcome -> instances; None: not analysed yet (reported as "pending")
            outcomes: dict[str, int] = {}
            for outcome, count in s.execute(select(Instance.outcome, func.count())
                                            .group_by(Instance.outcome)).all():
                key = "pending" if outcome is None else outcome
                outcomes[key] = outcomes.get(key, 0) + count
            from node.cluster import describe_nodes

            nodes = describe_nodes(s)
        g = GaugeMetricFamily("mammo_studies", "Studies by state", labels=["state"])
        for state in sorted(set(STUDY_STATES) | set(studies)):
            g.add_metric([state], float(studies.get(state, 0)))
        yield g
        g = GaugeMetricFamily("mammo_instances", "Stored instances by outcome: pending (not "
                              "analysed yet), analysed, skipped (a recorded reason), failed "
                              "(could not be analysed: a counted failure)", labels=["outcome"])
        for outcome in sorted(set(INSTANCE_OUTCOMES) | set(outcomes)):
            g.add_metric([outcome], float(outcomes.get(outcome, 0)))
        yield g
        g = GaugeMetricFamily("mammo_node_heartbeat_age_seconds", "Seconds since each node "
                              "sharing the queue last beat (node.cluster), by node and state",
                              labels=["node", "state"])
        for n in nodes:
            g.add_metric([n["name"], n["state"]], float(n["heartbeat_age_s"]))
        yield g
        g = GaugeMetricFamily("mammo_claims_held", "Jobs, deliveries and shadow runs each node "
                              "holds under a lease now", labels=["node", "kind"])
        for n in nodes:
            for kind in ("job", "delivery", "shadow"):
                g.add_metric([n["name"], kind], float(n["holds"].get(kind, 0)))
        yield g
        g = GaugeMetricFamily("mammo_queue_depth", "Analysis jobs queued or running")
        g.add_metric([], float(sum(jobs.get(str(s), 0) for s in queue.LIVE_JOB_STATES)))
        yield g
        g = GaugeMetricFamily("mammo_deliveries",
                              "Deliveries waiting (pending, sending) or failed, by destination",
                              labels=["destination", "state"])
        counts = {(d, st): n for d, st, n in deliveries}
        for dest in sorted(set(self.destinations) | {d for d, _ in counts}):
            for state in WAITING_DELIVERY_STATES:
                g.add_metric([dest, state], float(counts.get((dest, state), 0)))
        yield g
        g = GaugeMetricFamily("mammo_output_kinds_failed",
                              "Current results with an output kind not built (stage build) or "
                              "refused by a destination (stage delivery), by kind",
                              labels=["stage", "kind"])
        for stage in ("build", "delivery"):
            for kind in ("tid1500", "mammo_cad", "sc", "gsps"):
                g.add_metric([stage, kind], float(failed_kinds.get((stage, kind), 0)))
        yield g
        g = GaugeMetricFamily("mammo_destination_last_success_timestamp_seconds",
                              "Unix time of the last successful delivery to each destination",
                              labels=["destination"])
        for dest, when in sorted(last_ok.items()):
            if when is not None:
                g.add_metric([dest], when.replace(tzinfo=dt.UTC).timestamp())
        yield g


def last_success(session: Session, destination: str) -> dt.datetime | None:
    """When the newest successful delivery to ``destination`` was sent.

    Walks the state index backwards from the newest delivery instead of aggregating the whole
    table, so it stays fast with years of history.
    """
    return session.execute(
        select(Delivery.sent_at).where(Delivery.state == DeliveryState.DONE,
                                       Delivery.destination == destination)
        .order_by(Delivery.id.desc()).limit(1)).scalar()


class AdmissionCollector(Collector):
    """Connections holding a slot now, from node.admission (trusted: in the reserve)."""

    def __init__(self, open_tickets: Callable[[], Sequence[Ticket]]) -> None:
        self.open_tickets = open_tickets

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        tickets = self.open_tickets()
        g = GaugeMetricFamily("mammo_associations_open", "Connections holding an association "
                              "slot, by kind (trusted: node.trusted_peers)", labels=["kind"])
        trusted = sum(1 for t in tickets if t.trusted)
        g.add_metric(["trusted"], float(trusted))
        g.add_metric(["other"], float(len(tickets) - trusted))
        yield g


_state: StateCollector | None = None
_admission: AdmissionCollector | None = None


def bind_admission(open_tickets: Callable[[], Sequence[Ticket]]) -> None:
    """Report ``open_tickets()`` (node.admission.Admission.snapshot) at each scrape."""
    global _admission
    if _admission is not None:
        REGISTRY.unregister(_admission)
    _admission = AdmissionCollector(open_tickets)
    REGISTRY.register(_admission)


def bind(db: Database, data_dir: Path, destinations: list[str]) -> None:
    """Point the scrape-time gauges at this node's database (replaces an earlier binding).

    Every known label value starts at 0, so that a dashboard's ``increase()`` shows 0 rather
    than "no data" before the first refusal or failure."""
    global _state
    for reason in REJECT_REASONS.values():
        INSTANCES_REJECTED.labels(reason=reason)
    for reason in ("peer_ip", "tls_handshake", "association"):
        CONNECTIONS_REFUSED.labels(reason=reason)
    for name in destinations:
        DELIVERY_ATTEMPTS.labels(destination=name)
        DELIVERY_FAILURES.labels(destination=name)
    if _state is not None:
        REGISTRY.unregister(_state)
    _state = StateCollector(db, data_dir, destinations)
    REGISTRY.register(_state)


def render() -> bytes:
    """The exposition text for ``/metrics``."""
    return generate_latest(REGISTRY)

