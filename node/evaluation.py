"""The evaluation record: what each model said about each breast, against what the outcome was.

Every analysis (the active model's, from the worker's hook; the shadow model's, from
node.shadow) is recorded per breast in ``scored_breasts`` (the highest P(malignant) of the
breast's findings, 0 when it had none, and the threshold the model calls at) and per finding in
``scored_findings``. Outcomes (node.outcomes) are per breast or per numbered finding.

Definitions used everywhere (status page, /metrics, ``mammo-node model compare``):

* a breast is **positive** when any outcome of it is malignant (biopsy), **negative** when it
  has outcomes and none is malignant (benign biopsy, negative follow-up); breasts without an
  outcome do not count;
* a model **calls** a breast (or a finding) malignant when its score is at or above that
  model's own threshold (its card's, as in its reports);
* sensitivity = called positives / positives, specificity = uncalled negatives / negatives
  (95 % Wilson intervals), AUC = Mann-Whitney over the breast scores (95 % interval by Hanley
  & McNeil 1982), each with its counts.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Subquery

from node.analysis.result import StudyAnalysis
from node.db import Database, Outcome, ScoredBreast, ScoredFinding, Study, utcnow
from node.modelstore import ModelRef

SIDES = ("L", "R")


# -- recording -----------------------------------------------------------------------------------
def record_analysis(db: Database, *, study_uid: str, job_id: int, analysis: StudyAnalysis,
                    role: str, at: dt.datetime | None = None) -> int:
    """Record one model's analysis of a study (replacing that model's earlier one); returns
    the number of breasts scored. Breasts of unknown laterality are not scored (an outcome
    names a side)."""
    model = analysis.model
    at = at or utcnow()
    scores: dict[str, float] = {}
    counts: dict[str, int] = defaultdict(int)
    for image in analysis.images:
        if not image.analysed or image.laterality not in SIDES:
            continue
        scores.setdefault(image.laterality, 0.0)
        for f in image.findings:
            scores[image.laterality] = max(scores[image.laterality], f.probability)
            counts[image.laterality] += 1
    spacing = {i.sop_instance_uid: i.pixel_spacing_mm for i in analysis.images}
    with db.session() as s:
        accession = s.execute(select(Study.accession_number)
                              .where(Study.study_uid == study_uid)).scalar()
        existing = {b.laterality: b for b in s.execute(select(ScoredBreast).where(
            ScoredBreast.study_uid == study_uid, ScoredBreast.model_name == model.name,
            ScoredBreast.model_version == model.version)).scalars()}
        for side, score in scores.items():
            row = existing.get(side)
            if row is None:
                row = ScoredBreast(study_uid=study_uid, laterality=side, model_name=model.name,
                                   model_version=model.version)
                s.add(row)
            row.accession_number = accession or row.accession_number
            row.role, row.job_id, row.score = role, job_id, float(score)
            row.findings, row.threshold, row.analysed_at = counts[side], model.threshold, at
        s.execute(delete(ScoredFinding).where(
            ScoredFinding.study_uid == study_uid, ScoredFinding.model_name == model.name,
            ScoredFinding.model_version == model.version))
        for f in analysis.findings:
            s.add(ScoredFinding(
                study_uid=study_uid, job_id=job_id, model_name=model.name,
                model_version=model.version, role=role, finding_index=f.index,
                sop_uid=f.sop_instance_uid, laterality=f.laterality, view=f.view,
                centre_x=float(f.centre_xy[0]), centre_y=float(f.centre_xy[1]),
                radius_mm=float(f.radius_mm), pixel_spacing_mm=float(spacing.get(
                    f.sop_instance_uid, 0.0)), probability=float(f.probability)))
    return len(scores)


# -- statistics ----------------------------------------------------------------------------------
def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def auc_hanley_mcneil(auc: float, n_pos: int, n_neg: int, z: float = 1.959964
                      ) -> tuple[float, float] | None:
    if n_pos == 0 or n_neg == 0 or math.isnan(auc):
        return None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc)
           + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return (max(0.0, auc - z * se), min(1.0, auc + z * se))


@dataclass
class Performance:
    """A model's breast-level performance against the known outcomes."""

    n_pos: int = 0
    n_neg: int = 0
    tp: int = 0
    tn: int = 0
    sensitivity: float | None = None
    sensitivity_ci95: tuple[float, float] | None = None
    specificity: float | None = None
    specificity_ci95: tuple[float, float] | None = None
    auc: float | None = None
    auc_ci95: tuple[float, float] | None = None
    thresholds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def performance(truth: Iterable[int], scores: Iterable[float], thresholds: Iterable[float]
                ) -> Performance:
    from models.metrics import roc_auc

    y = np.asarray(list(truth), dtype=int)
    p = np.asarray(list(scores), dtype=float)
    t = np.asarray(list(thresholds), dtype=float)
    called = p >= t
    out = Performance(n_pos=int(y.sum()), n_neg=int((1 - y).sum()),
                      tp=int((called & (y == 1)).sum()), tn=int((~called & (y == 0)).sum()),
                      thresholds=sorted({round(float(x), 6) for x in t}))
    if out.n_pos:
        out.sensitivity = out.tp / out.n_pos
        out.sensitivity_ci95 = wilson(out.tp, out.n_pos)
    if out.n_neg:
        out.specificity = out.tn / out.n_neg
        out.specificity_ci95 = wilson(out.tn, out.n_neg)
    if out.n_pos and out.n_neg:
        out.auc = _nan_none(roc_auc(y, p))
        out.auc_ci95 = auc_hanley_mcneil(out.auc, out.n_pos, out.n_neg) if out.auc is not None \
            else None
    return out


def kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two binary call vectors (None when undefined)."""
    n = len(a)
    if n == 0:
        return None
    po = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1.0 else (po - pe) / (1 - pe)


def distribution(values: list[float], threshold: float | None = None) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    hist, _ = np.histogram(v, bins=10, range=(0.0, 1.0))
    out: dict[str, Any] = {"n": len(v), "mean": float(v.mean()), "p10": float(q[0]),
                           "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                           "p90": float(q[4]), "histogram_0.1": [int(x) for x in hist]}
    if threshold is not None:
        out["called_malignant"] = int((v >= threshold).sum())
    return out


# -- outcomes against scores -----------------------------------------------------------------------
def _truth_subquery() -> Subquery:
    return (select(Outcome.study_uid, Outcome.laterality,
                   func.max(case((Outcome.truth == "malignant", 1), else_=0)).label("positive"))
            .group_by(Outcome.study_uid, Outcome.laterality).subquery())


def live_performance(session: Session) -> dict[ModelRef, Performance]:
    """Per model version: breast-level performance over every breast it scored that has an
    outcome (one query; the rows returned are only the breasts with outcomes)."""
    t = _truth_subquery()
    rows = session.execute(
        select(ScoredBreast.model_name, ScoredBreast.model_version, ScoredBreast.score,
               ScoredBreast.threshold, t.c.positive)
        .join(t, and_(t.c.study_uid == ScoredBreast.study_uid,
                      t.c.laterality == ScoredBreast.laterality))).all()
    by: dict[ModelRef, list[tuple[float, float, int]]] = defaultdict(list)
    for name, version, score, thr, positive in rows:
        by[ModelRef(name, version)].append((score, thr, int(positive)))
    return {ref: performance([r[2] for r in v], [r[0] for r in v], [r[1] for r in v])
            for ref, v in sorted(by.items(), key=lambda kv: (kv[0].name, kv[0].version))}


def scored_counts(session: Session) -> dict[ModelRef, int]:
    """Breasts scored per model version (with or without an outcome)."""
    return {ModelRef(n, v): int(c) for n, v, c in session.execute(
        select(ScoredBreast.model_name, ScoredBreast.model_version, func.count())
        .group_by(ScoredBreast.model_name, ScoredBreast.model_version)).all()}


# -- active vs shadow ------------------------------------------------------------------------------
def _match_findings(a: list[ScoredFinding], b: list[ScoredFinding]
                    ) -> tuple[list[tuple[ScoredFinding, ScoredFinding]], list[ScoredFinding],
                               list[ScoredFinding]]:
    """Pair the two models' findings of one analysis: same image, centres within the larger
    radius (at least 1 mm); nearest first. Returns (pairs, only in a, only in b)."""
    candidates = []
    for i, fa in enumerate(a):
        for j, fb in enumerate(b):
            if fa.sop_uid != fb.sop_uid:
                continue
            spacing = fa.pixel_spacing_mm or fb.pixel_spacing_mm or 0.1
            d = math.hypot(fa.centre_x - fb.centre_x, fa.centre_y - fb.centre_y) * spacing
            if d <= max(fa.radius_mm, fb.radius_mm, 1.0):
                candidates.append((d, i, j))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((a[i], b[j]))
    return (pairs, [f for i, f in enumerate(a) if i not in used_a],
            [f for j, f in enumerate(b) if j not in used_b])


def _agreement(calls_a: np.ndarray, calls_b: np.ndarray) -> dict[str, Any]:
    n = len(calls_a)
    return {"pairs": n,
            "both_malignant": int((calls_a & calls_b).sum()),
            "both_benign": int((~calls_a & ~calls_b).sum()),
            "active_only_malignant": int((calls_a & ~calls_b).sum()),
            "shadow_only_malignant": int((~calls_a & calls_b).sum()),
            "agreement": float((calls_a == calls_b).mean()) if n else None,
            "kappa": kappa(calls_a.astype(int), calls_b.astype(int))}


def compare(db: Database, active: ModelRef, shadow: ModelRef,
            since: dt.datetime | None = None) -> dict[str, Any]:
    """Agreement of ``shadow`` with ``active`` on the analyses both made of the same inputs
    (same study and job), score distributions, and both models' performance on the paired
    breasts that have outcomes."""
    with db.session() as s:
        def breasts(ref: ModelRef) -> dict[tuple[str, str], ScoredBreast]:
            q = select(ScoredBreast).where(ScoredBreast.model_name == ref.name,
                                           ScoredBreast.model_version == ref.version)
            return {(b.study_uid, b.laterality): b for b in s.execute(q).scalars()}

        a_b, s_b = breasts(active), breasts(shadow)
        keys = sorted(k for k in a_b.keys() & s_b.keys()
                      if a_b[k].job_id == s_b[k].job_id
                      and (since is None or s_b[k].analysed_at >= since))
        studies = {(k[0], a_b[k].job_id) for k in keys}

        def findings(ref: ModelRef) -> dict[tuple[str, int], list[ScoredFinding]]:
            out: dict[tuple[str, int], list[ScoredFinding]] = defaultdict(list)
            uids = sorted({u for u, _ in studies})
            for i in range(0, len(uids), 500):
                for f in s.execute(select(ScoredFinding).where(
                        ScoredFinding.model_name == ref.name,
                        ScoredFinding.model_version == ref.version,
                        ScoredFinding.study_uid.in_(uids[i:i + 500]))).scalars():
                    out[(f.study_uid, f.job_id)].append(f)
            return out

        a_f, s_f = findings(active), findings(shadow)
        t = _truth_subquery()
        truth = {(u, lat): int(p) for u, lat, p in s.execute(select(t)).all()}
    thr_a = sorted({round(a_b[k].threshold, 6) for k in keys})
    thr_s = sorted({round(s_b[k].threshold, 6) for k in keys})
    pairs, only_a, only_s = [], 0, 0
    for key in studies:
        p, oa, os_ = _match_findings(a_f.get(key, []), s_f.get(key, []))
        pairs += p
        only_a += len(oa)
        only_s += len(os_)
    fa = np.array([x.probability for x, _ in pairs], dtype=float)
    fs = np.array([y.probability for _, y in pairs], dtype=float)
    # each finding is called at its model's threshold (that of its breast's score; a finding
    # of unknown side has no breast score: the model's threshold of the other breasts)
    ta = np.array([a_b[k].threshold if (k := (x.study_uid, x.laterality)) in a_b
                   else (thr_a or [0.5])[0] for x, _ in pairs], dtype=float)
    ts = np.array([s_b[k].threshold if (k := (y.study_uid, y.laterality)) in s_b
                   else (thr_s or [0.5])[0] for _, y in pairs], dtype=float)
    per_finding = _agreement(fa >= ta, fs >= ts)
    per_finding.update({"found_by_active_only": only_a, "found_by_shadow_only": only_s,
                        "mean_abs_difference": float(np.abs(fa - fs).mean()) if len(fa)
                        else None})
    ba = np.array([a_b[k].score for k in keys], dtype=float)
    bs = np.array([s_b[k].score for k in keys], dtype=float)
    per_breast = _agreement(ba >= np.array([a_b[k].threshold for k in keys]),
                            bs >= np.array([s_b[k].threshold for k in keys]))
    per_breast["mean_abs_difference"] = float(np.abs(ba - bs).mean()) if len(keys) else None
    per_breast["pearson_r"] = (float(np.corrcoef(ba, bs)[0, 1])
                               if len(keys) >= 3 and ba.std() > 0 and bs.std() > 0 else None)
    known = [k for k in keys if k in truth]
    y = [truth[k] for k in known]
    return {
        "active": str(active), "shadow": str(shadow),
        "since": since.isoformat() if since else None,
        "studies": len(studies), "breasts": len(keys),
        "thresholds": {"active": thr_a, "shadow": thr_s},
        "per_finding": per_finding, "per_breast": per_breast,
        "distribution": {
            "finding_probability": {
                "active": distribution([f.probability for key in studies
                                        for f in a_f.get(key, [])], thr_a[0] if thr_a else None),
                "shadow": distribution([f.probability for key in studies
                                        for f in s_f.get(key, [])], thr_s[0] if thr_s else None)},
            "breast_score": {"active": distribution(list(ba), thr_a[0] if thr_a else None),
                             "shadow": distribution(list(bs), thr_s[0] if thr_s else None)}},
        "outcomes": {
            "breasts_with_outcome": len(known), "positive": int(sum(y)),
            "negative": len(y) - int(sum(y)),
            "active": performance(y, [a_b[k].score for k in known],
                                  [a_b[k].threshold for k in known]).as_dict(),
            "shadow": performance(y, [s_b[k].score for k in known],
                                  [s_b[k].threshold for k in known]).as_dict()},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _ci(ci: tuple[float, float] | list[float] | None, pct: bool = True) -> str:
    if not ci:
        return ""
    return (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if pct
            else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def render_compare(r: dict[str, Any]) -> str:
    """The text report of :func:`compare`."""
    lines = [f"active {r['active']} vs shadow {r['shadow']}"
             + (f" since {r['since']}" if r["since"] else ""),
             f"paired analyses: {r['studies']} studies, {r['breasts']} breasts "
             f"(thresholds: active {r['thresholds']['active'] or '-'}, shadow "
             f"{r['thresholds']['shadow'] or '-'})"]
    if not r["breasts"]:
        lines.append("nothing to compare yet: the shadow model has not analysed a study that "
                     "the active model analysed with the same inputs")
        return "\n".join(lines)
    for title, key in (("per finding (matched ROIs)", "per_finding"),
                       ("per breast (highest P of the breast)", "per_breast")):
        a = r[key]
        kap = "-" if a["kappa"] is None else f"{a['kappa']:.3f}"
        diff = "-" if a["mean_abs_difference"] is None else f"{a['mean_abs_difference']:.3f}"
        lines.append(f"\nagreement {title}: {a['pairs']} pairs, agreement "
                     f"{_pct(a['agreement'])}, kappa {kap}")
        lines.append(f"  both malignant {a['both_malignant']}, both benign {a['both_benign']}, "
                     f"active only {a['active_only_malignant']}, shadow only "
                     f"{a['shadow_only_malignant']}; mean |difference| {diff}")
        if key == "per_finding":
            lines.append(f"  found by the active model only {a['found_by_active_only']}, by the "
                         f"shadow model only {a['found_by_shadow_only']}")
        elif a.get("pearson_r") is not None:
            lines.append(f"  Pearson r of the breast scores {a['pearson_r']:.3f}")
    lines.append("\nscore distributions (n, mean, p10 / p25 / median / p75 / p90, called "
                 "malignant; histogram in tenths)")
    for what, d in r["distribution"].items():
        for role in ("active", "shadow"):
            x = d[role]
            if not x.get("n"):
                lines.append(f"  {what:19s} {role:6s} n 0")
                continue
            lines.append(
                f"  {what:19s} {role:6s} n {x['n']}, mean {x['mean']:.3f}, {x['p10']:.3f} / "
                f"{x['p25']:.3f} / {x['median']:.3f} / {x['p75']:.3f} / {x['p90']:.3f}, "
                f"called {x.get('called_malignant', '-')}; "
                f"{' '.join(str(h) for h in x['histogram_0.1'])}")
    o = r["outcomes"]
    lines.append(f"\noutcomes: {o['breasts_with_outcome']} paired breasts with an outcome "
                 f"({o['positive']} malignant, {o['negative']} benign or negative)")
    if o["breasts_with_outcome"]:
        for role in ("active", "shadow"):
            p = o[role]
            auc = "-" if p["auc"] is None else f"{p['auc']:.3f}{_ci(p['auc_ci95'], False)}"
            lines.append(f"  {role:6s} sensitivity {_pct(p['sensitivity'])}"
                         f"{_ci(p['sensitivity_ci95'])} ({p['tp']}/{p['n_pos']}), specificity "
                         f"{_pct(p['specificity'])}{_ci(p['specificity_ci95'])} "
                         f"({p['tn']}/{p['n_neg']}), AUC {auc}")
    return "\n".join(lines)
