"""The read-only status page: recent studies, failed deliveries and failed output kinds, as one
HTML document.

Every value that came from a peer or the database is HTML-escaped. The database holds no patient
names or IDs (only UIDs), so the page shows none. A fixed number of queries whatever the number
of studies: the recent studies, their current results, those results' deliveries, and the
failed output kinds (node.output_failures).
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from node.db import Database, Delivery, Job, Result, Study


@dataclass
class StudyRow:
    study_uid: str
    state: str
    instances: int
    first_received: dt.datetime
    last_received: dt.datetime
    completed: dt.datetime | None
    analysis_ms: float | None = None
    result_at: dt.datetime | None = None
    rois: int | None = None
    max_probability: float | None = None
    deliveries: list[tuple[str, str, dt.datetime | None]] = field(default_factory=list)


@dataclass
class FailedDelivery:
    study_uid: str
    destination: str
    attempts: int
    status: str | None
    error: str | None
    state: str


def collect(db: Database, limit: int) -> tuple[list[StudyRow], list[FailedDelivery],
                                                dict[str, int]]:
    """(recent studies, failed or retrying deliveries, job counts) from the database."""
    from node.db import Instance

    with db.session() as s:
        studies = s.execute(select(Study).order_by(Study.last_received_at.desc(), Study.id.desc())
                            .limit(limit)).scalars().all()
        ids = [st.id for st in studies]
        counts = dict(s.execute(select(Instance.study_id, func.count())
                                .where(Instance.study_id.in_(ids))
                                .group_by(Instance.study_id)).all())
        results = {r.study_id: r for r in s.execute(
            select(Result).where(Result.study_id.in_(ids), Result.current.is_(True))).scalars()}
        deliveries: dict[int, list[tuple[str, str, dt.datetime | None]]] = {}
        for d in s.execute(select(Delivery).where(
                Delivery.result_id.in_([r.id for r in results.values()]))
                .order_by(Delivery.destination)).scalars():
            deliveries.setdefault(d.result_id, []).append((d.destination, d.state, d.sent_at))
        failed = [
            FailedDelivery(uid, d.destination, d.attempts, d.last_status, d.last_error, d.state)
            for d, uid in s.execute(
                select(Delivery, Study.study_uid).join(Result, Result.id == Delivery.result_id)
                .join(Study, Study.id == Result.study_id)
                .where(Delivery.state.in_(("failed", "pending")), Delivery.last_error.is_not(None))
                .order_by(Delivery.id.desc()).limit(limit)).all()
        ]
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    rows = []
    for st in studies:
        row = StudyRow(st.study_uid, st.state, counts.get(st.id, 0), st.created_at,
                       st.last_received_at, st.completed_at)
        r = results.get(st.id)
        if r is not None:
            row.analysis_ms, row.result_at = r.analysis_ms, r.created_at
            row.rois, row.max_probability = r.roi_count, r.max_probability
            row.deliveries = deliveries.get(r.id, [])
        rows.append(row)
    return rows, failed, jobs


def _t(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> str:
    if a is None or b is None:
        return ""
    return f"{(b - a).total_seconds():.1f}"


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right}
.state-done,.d-done{color:#176117}.state-failed,.d-failed{color:#b00020;font-weight:bold}
.state-receiving,.state-complete,.state-analysing,.d-pending,.d-sending{color:#8a5a00}
.uid{font-family:monospace}
"""


def _nodes_section(db: Database, now: dt.datetime) -> list[str]:
    """Every node sharing this queue: roles, last heartbeat, what it holds now."""
    from node.cluster import describe_nodes

    with db.session() as s:
        nodes = describe_nodes(s, now)
    out = [f"<h2>Nodes ({len(nodes)})</h2>",
           '<table id="nodes"><thead><tr><th>Node</th><th>Roles</th><th>Host</th>'
           "<th>State</th><th>Last heartbeat (s ago)</th><th>Holds</th><th>Version</th>"
           "</tr></thead><tbody>"]
    for n in nodes:
        holds = ", ".join(f"{v} {k}" + ("s" if v != 1 else "")
                          for k, v in sorted(n["holds"].items())) or "nothing"
        out.append(f'<tr class="node"><td class=uid>{_e(n["name"])}</td>'
                   f'<td>{_e(",".join(n["roles"]))}</td><td>{_e(n["host"])} (pid '
                   f'{n["pid"]})</td><td>{_e(n["state"])}</td>'
                   f'<td class=n>{n["heartbeat_age_s"]:.1f}</td><td>{_e(holds)}</td>'
                   f'<td>{_e(n["version"])}</td></tr>')
    if not nodes:
        out.append('<tr><td colspan="7">No node has registered.</td></tr>')
    out.append("</tbody></table>")
    return out


def render(db: Database, *, ae_title: str, version: str, limit: int = 50,
           refresh_seconds: int = 10, now: dt.datetime | None = None,
           models: Callable[[], dict[str, Any]] | None = None) -> str:
    """The page; ``models`` (the node's ModelManager.describe) adds the Models section."""
    rows, failed, jobs = collect(db, limit)
    live = models() if models is not None else None
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    queue = jobs.get("queued", 0) + jobs.get("running", 0)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">'
        if refresh_seconds > 0 else "",
        f"<title>mammo-node {_e(ae_title)}: status</title><style>{CSS}</style></head><body>",
        f"<h1>mammo-node <span class=uid>{_e(ae_title)}</span> &mdash; status</h1>",
        f"<p>Version {_e(version)}. Page generated {_t(now)} UTC. Analysis queue: "
        f'<b id="queue-depth">{queue}</b> (queued {jobs.get("queued", 0)}, running '
        f'{jobs.get("running", 0)}). Research software: not for diagnosis. '
        '<a href="health">health</a> &middot; <a href="metrics">metrics</a></p>',
        _model_summary(live),
        f"<h2>Recent studies ({len(rows)})</h2>",
        '<table id="studies"><thead><tr><th>Study Instance UID</th><th>State</th>'
        "<th>Instances</th><th>First received (UTC)</th><th>Last received</th>"
        "<th>Complete</th><th>Result</th><th>Receive&rarr;result (s)</th>"
        "<th>Analysis (s)</th><th>ROIs</th><th>Highest probability</th>"
        "<th>Delivery</th></tr></thead><tbody>",
    ]
    for r in rows:
        delivery = "<br>".join(
            f'<span class="d-{_e(state)}">{_e(dest)}: {_e(state)}'
            f'{" " + _t(sent) if sent else ""}</span>' for dest, state, sent in r.deliveries
        ) or ("none" if r.result_at is not None else "")
        out.append(
            f'<tr class="study"><td class=uid>{_e(r.study_uid)}</td>'
            f'<td class="state-{_e(r.state)}">{_e(r.state)}</td>'
            f"<td class=n>{r.instances}</td><td>{_t(r.first_received)}</td>"
            f"<td>{_t(r.last_received)}</td><td>{_t(r.completed)}</td>"
            f"<td>{_t(r.result_at)}</td>"
            f"<td class=n>{_seconds(r.first_received, r.result_at)}</td>"
            f"<td class=n>{'' if r.analysis_ms is None else f'{r.analysis_ms / 1000:.1f}'}</td>"
            f"<td class=n>{'' if r.rois is None else r.rois}</td>"
            f"<td class=n>"
            f"{'' if r.max_probability is None else f'{100 * r.max_probability:.1f} %'}</td>"
            f"<td>{delivery}</td></tr>")
    if not rows:
        out.append('<tr><td colspan="12">No studies received yet.</td></tr>')
    out.append("</tbody></table>")
    out += _nodes_section(db, now)
    out.append(f"<h2>Failed and retrying deliveries ({len(failed)})</h2>")
    if failed:
        out.append('<table id="failed"><thead><tr><th>Study Instance UID</th>'
                   "<th>Destination</th><th>State</th><th>Attempts</th><th>Last status</th>"
                   "<th>Error</th></tr></thead><tbody>")
        for f in failed:
            out.append(
                f'<tr class="failed"><td class=uid>{_e(f.study_uid)}</td>'
                f"<td>{_e(f.destination)}</td><td class=\"d-{_e(f.state)}\">{_e(f.state)}</td>"
                f"<td class=n>{f.attempts}</td><td>{_e(f.status)}</td><td>{_e(f.error)}</td>"
                "</tr>")
        out.append("</tbody></table>")
    else:
        out.append('<p id="failed">None.</p>')
    outputs = _failed_outputs(db, limit)
    out.append(f"<h2>Failed output kinds ({len(outputs)})</h2>")
    if outputs:
        out.append('<table id="failed-outputs"><thead><tr><th>Study Instance UID</th>'
                   "<th>Kind</th><th>Stage</th><th>Destination</th><th>State</th>"
                   "<th>Error</th></tr></thead><tbody>")
        for kind in outputs:
            out.append(
                f'<tr class="failed-output"><td class=uid>{_e(kind["study"])}</td>'
                f'<td>{_e(kind["kind"])}</td><td>{_e(kind["stage"])}</td>'
                f'<td>{_e(kind.get("destination", ""))}</td>'
                f'<td class="d-failed">{_e(kind["state"])}</td><td>{_e(kind["error"])}</td></tr>')
        out.append("</tbody></table><p>The other kinds of these results were delivered; "
                   "<code>mammo-node retry</code> rebuilds or re-sends these.</p>")
    else:
        out.append('<p id="failed-outputs">None.</p>')
    out.extend(_not_analysed_section(db))
    if live is not None:  # active and shadow models, live performance (issue 17)
        from node.model_status import section

        out.extend(section(db, live))
    out.append("</body></html>")
    return "\n".join(x for x in out if x)


def _failed_outputs(db: Database, limit: int) -> list[dict[str, Any]]:
    from node.output_failures import failed_output_kinds

    with db.session() as s:
        return failed_output_kinds(s, limit)


def _model_summary(live: dict[str, Any] | None) -> str:
    if live is None:
        return ""
    from node.model_status import summary

    return summary(live)


def outcome_counts(db: Database) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
    """(instances per outcome, [(outcome, reason, count)] of skipped and failed instances,
    most frequent first). Shared with ``mammo-node status``."""
    from node.db import Instance

    with db.session() as s:
        counts: dict[str, int] = {}
        pending = 0  # outcome None: not analysed yet
        for outcome, n in s.execute(select(Instance.outcome, func.count())
                                    .group_by(Instance.outcome)).all():
            if outcome is None:
                pending = n
            else:
                counts[outcome] = n
        reasons = s.execute(
            select(Instance.outcome, Instance.outcome_reason, func.count())
            .where(Instance.outcome.in_(("skipped", "failed")))
            .group_by(Instance.outcome, Instance.outcome_reason)
            .order_by(func.count().desc()).limit(20)).all()
    counts["pending"] = pending
    # (the query keeps skipped and failed instances only: the outcome is never None)
    return counts, [(o, r or "", n) for o, r, n in reasons if o is not None]


def _not_analysed_section(db: Database) -> list[str]:
    """Every accepted instance is accounted for: analysed, skipped (why) or failed (why)."""
    counts, reasons = outcome_counts(db)
    out = ["<h2>Instances by outcome</h2>",
           '<p id="outcomes">' + ", ".join(
               f'{_e(k)} <b class="outcome-{_e(k)}">{counts.get(k, 0)}</b>'
               for k in ("analysed", "skipped", "failed", "pending")) + "</p>"]
    if reasons:
        out.append('<table id="not-analysed"><thead><tr><th>Outcome</th><th>Instances</th>'
                   "<th>Reason</th></tr></thead><tbody>")
        for outcome, reason, n in reasons:
            cls = "state-failed" if outcome == "failed" else ""
            out.append(f'<tr class="not-analysed"><td class="{cls}">{_e(outcome)}</td>'
                       f"<td class=n>{n}</td><td>{_e(reason)}</td></tr>")
        out.append("</tbody></table>")
    return out
