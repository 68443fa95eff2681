"""Models on the status page and in /metrics: active and shadow, shadow runs, live performance.

Everything is read from the database at render/scrape time (a handful of aggregate queries;
the only rows fetched are the breasts that have an outcome), plus what the running node has
loaded (:meth:`node.activemodel.ModelManager.describe`).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from node import metrics
from node.activemodel import ModelManager
from node.db import Database, ScoredBreast, ShadowRun
from node.evaluation import Performance, live_performance, scored_counts
from node.modelstore import ModelRef

log = logging.getLogger("node.model_status")

SHADOW_STATES = ("queued", "running", "done", "failed", "dropped")


def shadow_counts(s: Session) -> dict[str, int]:
    return dict(s.execute(select(ShadowRun.state, func.count()).group_by(ShadowRun.state)).all())


def pair_agreement(s: Session, active: ModelRef, shadow: ModelRef) -> tuple[int, int]:
    """(breasts both models scored from the same inputs, of which both made the same call)."""
    a, b = aliased(ScoredBreast), aliased(ScoredBreast)
    same = case(((a.score >= a.threshold) == (b.score >= b.threshold), 1), else_=0)
    n, agree = s.execute(
        select(func.count(), func.coalesce(func.sum(same), 0))
        .select_from(a).join(b, and_(a.study_uid == b.study_uid, a.laterality == b.laterality,
                                     a.job_id == b.job_id))
        .where(a.model_name == active.name, a.model_version == active.version,
               b.model_name == shadow.name, b.model_version == shadow.version)).one()
    return int(n), int(agree)


def _ref(d: dict[str, Any] | None) -> ModelRef | None:
    return None if d is None else ModelRef(d["name"], d["version"])


def collect(db: Database, live: dict[str, Any]) -> dict[str, Any]:
    active, shadow = _ref(live.get("active")), _ref(live.get("shadow"))
    with db.session() as s:
        perf = live_performance(s)
        scored = scored_counts(s)
        runs = shadow_counts(s)
        last_failure = s.execute(select(ShadowRun.error).where(ShadowRun.state == "failed")
                                 .order_by(ShadowRun.id.desc()).limit(1)).scalar()
        agreement = (pair_agreement(s, active, shadow) if active and shadow else None)
    return {"perf": perf, "scored": scored, "runs": runs, "last_failure": last_failure,
            "agreement": agreement, "active": active, "shadow": shadow}


def role_of(ref: ModelRef, active: ModelRef | None, shadow: ModelRef | None) -> str:
    return "active" if ref == active else "shadow" if ref == shadow else "inactive"


# -- the status page section -------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f} %"


def _card_metrics(m: dict[str, Any]) -> str:
    parts = []
    if isinstance(m.get("pooled_auc"), int | float):
        parts.append(f"CV AUC {m['pooled_auc']:.3f}")
    if isinstance(m.get("n_rois"), int | float):
        parts.append(f"n = {m['n_rois']}")
    if m.get("data"):
        parts.append(str(m["data"])[:80])
    return "; ".join(parts)


def summary(live: dict[str, Any]) -> str:
    """One line at the top of the page: which model serves, which runs in shadow."""
    def name(m: dict[str, Any] | None) -> str:
        return "off" if m is None else f"<b>{_e(m['name'])} {_e(m['version'])}</b>"

    errors = [f"{role}: {_e(live[role + '_error'])}" for role in ("active", "shadow")
              if live.get(f"{role}_error")]
    return (f'<p id="models-summary">Model: {name(live.get("active"))}'
            f'{" ([model] card)" if (live.get("active") or {}).get("source") == "config" else ""}'
            f'; shadow: {name(live.get("shadow"))}.'
            + (f' <span class="state-failed">{"; ".join(errors)}</span>' if errors else "")
            + ' <a href="#models">Models</a></p>')


def section(db: Database, live: dict[str, Any]) -> list[str]:
    """HTML for the status page: the models this node serves and their live performance."""
    try:
        c = collect(db, live)
    except Exception as exc:  # noqa: BLE001 - the page still renders when these tables cannot be read
        log.warning("status_page.models_unavailable error=%s", type(exc).__name__)
        return ['<h2>Models</h2><p id="models">Model information unavailable.</p>']
    out = ["<h2>Models</h2>",
           '<table id="models"><thead><tr><th>Role</th><th>Model</th><th>Version</th>'
           "<th>From</th><th>Architecture</th><th>Threshold</th><th>Loaded (UTC)</th>"
           "<th>Card metrics</th><th>Intended use</th></tr></thead><tbody>"]
    for role in ("active", "shadow"):
        m = live.get(role)
        if m is None:
            out.append(f'<tr class="model-{role}"><td>{role}</td><td colspan="8">'
                       f'{"off" if role == "shadow" else "none"}</td></tr>')
            continue
        source = "[model] card" if m["source"] == "config" else "installed"
        out.append(
            f'<tr class="model-{role}"><td>{role}</td><td>{_e(m["name"])}</td>'
            f'<td>{_e(m["version"])}</td><td>{source}</td><td>{_e(m["architecture"])}</td>'
            f'<td class=n>{m["threshold"]:.4f}</td>'
            f'<td>{m["loaded_at"].strftime("%Y-%m-%d %H:%M:%S")}</td>'
            f'<td>{_e(_card_metrics(m.get("metrics") or {}))}</td>'
            f'<td>{_e(m.get("intended_use"))}</td></tr>')
    out.append("</tbody></table>")
    for role in ("active", "shadow"):
        if live.get(f"{role}_error"):
            out.append(f'<p class="state-failed" id="model-{role}-error">{role}: '
                       f'{_e(live[role + "_error"])}</p>')
    runs = c["runs"]
    out.append('<p id="shadow-runs">Shadow runs: '
               + ", ".join(f"{st} {runs.get(st, 0)}" for st in SHADOW_STATES)
               + " (they run when nothing is received or analysed; never delivered)."
               + (f" Last failure: {_e(c['last_failure'][:300])}" if c["last_failure"] else "")
               + "</p>")
    if c["agreement"] is not None:
        n, agree = c["agreement"]
        out.append(f'<p id="shadow-agreement">Shadow vs active, per breast: {agree} of {n} '
                   f"paired breasts called the same ({_pct(agree / n) if n else '-'}). "
                   "<code>mammo-node model compare</code> gives the full report.</p>")
    out.append('<h3>Live performance (breasts with a known outcome)</h3>'
               '<table id="model-performance"><thead><tr><th>Model</th><th>Version</th>'
               "<th>Role</th><th>Breasts scored</th><th>With outcome (malignant / "
               "negative)</th><th>Sensitivity</th><th>Specificity</th><th>AUC</th></tr>"
               "</thead><tbody>")
    refs = sorted(set(c["perf"]) | {r for r in (c["active"], c["shadow"]) if r},
                  key=lambda r: (r.name, r.version))
    for ref in refs:
        p: Performance = c["perf"].get(ref, Performance())
        auc = "" if p.auc is None else f"{p.auc:.3f}"
        out.append(
            f'<tr class="model-perf"><td>{_e(ref.name)}</td><td>{_e(ref.version)}</td>'
            f"<td>{role_of(ref, c['active'], c['shadow'])}</td>"
            f"<td class=n>{c['scored'].get(ref, 0)}</td>"
            f"<td class=n>{p.n_pos + p.n_neg} ({p.n_pos} / {p.n_neg})</td>"
            f"<td class=n>{_pct(p.sensitivity)}{f' ({p.tp}/{p.n_pos})' if p.n_pos else ''}"
            f"</td><td class=n>{_pct(p.specificity)}"
            f"{f' ({p.tn}/{p.n_neg})' if p.n_neg else ''}</td><td class=n>{auc}</td></tr>")
    out.append("</tbody></table>")
    return out


# -- /metrics --------------------------------------------------------------------------------------
class ModelCollector(Collector):
    """Gauges for the models, computed from the database at each scrape."""

    def __init__(self, db: Database, models: ModelManager) -> None:
        self.db = db
        self.models = models

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        live = self.models.describe()
        g = GaugeMetricFamily("mammo_model_info", "1 for each model the node serves, by role",
                              labels=["role", "model", "version", "source"])
        for role in ("active", "shadow"):
            m = live.get(role)
            if m is not None:
                g.add_metric([role, m["name"], m["version"], m["source"]], 1.0)
        yield g
        g = GaugeMetricFamily("mammo_model_load_failed",
                              "1 when the model wanted for the role could not be loaded",
                              labels=["role"])
        for role in ("active", "shadow"):
            g.add_metric([role], 1.0 if live.get(f"{role}_error") else 0.0)
        yield g
        try:
            c = collect(self.db, live)
        except Exception as exc:  # noqa: BLE001 - the scrape still answers
            log.warning("metrics.models_unavailable error=%s", type(exc).__name__)
            return
        g = GaugeMetricFamily("mammo_shadow_runs", "Shadow runs by state", labels=["state"])
        for st in SHADOW_STATES:
            g.add_metric([st], float(c["runs"].get(st, 0)))
        yield g
        if c["agreement"] is not None:
            n, agree = c["agreement"]
            g = GaugeMetricFamily("mammo_shadow_paired_breasts",
                                  "Breasts scored by both the active and the shadow model")
            g.add_metric([], float(n))
            yield g
            if n:
                g = GaugeMetricFamily("mammo_shadow_breast_agreement_ratio",
                                      "Share of paired breasts both models called the same")
                g.add_metric([], agree / n)
                yield g
        labels = ["model", "version", "role"]
        scored = GaugeMetricFamily("mammo_model_breasts_scored",
                                   "Breasts scored per model version", labels=labels)
        with_outcome = GaugeMetricFamily(
            "mammo_model_outcome_breasts", "Scored breasts with a known outcome, by truth "
            "(malignant, negative)", labels=[*labels, "truth"])
        sens = GaugeMetricFamily("mammo_model_sensitivity", "Breast-level sensitivity at the "
                                 "model's threshold, against the imported outcomes",
                                 labels=labels)
        spec = GaugeMetricFamily("mammo_model_specificity", "Breast-level specificity at the "
                                 "model's threshold, against the imported outcomes",
                                 labels=labels)
        auc = GaugeMetricFamily("mammo_model_auc", "Breast-level AUC against the imported "
                                "outcomes", labels=labels)
        for ref in sorted(set(c["perf"]) | set(c["scored"]), key=lambda r: (r.name, r.version)):
            lv = [ref.name, ref.version, role_of(ref, c["active"], c["shadow"])]
            scored.add_metric(lv, float(c["scored"].get(ref, 0)))
            p = c["perf"].get(ref)
            if p is None:
                continue
            with_outcome.add_metric([*lv, "malignant"], float(p.n_pos))
            with_outcome.add_metric([*lv, "negative"], float(p.n_neg))
            for family, value in ((sens, p.sensitivity), (spec, p.specificity), (auc, p.auc)):
                if value is not None:
                    family.add_metric(lv, float(value))
        yield from (scored, with_outcome, sens, spec, auc)


_collector: ModelCollector | None = None


def bind_metrics(db: Database, models: ModelManager) -> None:
    """Register the model gauges in the node's registry (replaces an earlier binding)."""
    global _collector
    if _collector is not None:
        metrics.REGISTRY.unregister(_collector)
    _collector = ModelCollector(db, models)
    metrics.REGISTRY.register(_collector)
