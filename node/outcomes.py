"""Outcomes back in: biopsy and follow-up results linked to the studies the node analysed, and
the training set they make with the stored images.

``mammo-node outcomes import FILE.csv`` (header names case-insensitive; UTF-8, ``,`` or ``;``):

=====================  ================================================================
``study_instance_uid``  the study; or ``accession_number`` (matched with the accession
                        number the node recorded when it received the study)
``laterality``          L or R; B, both or empty: both breasts (e.g. a negative follow-up)
``outcome``             malignant (cancer, positive, M, 1) | benign (B, 0) | negative
                        (normal, N, no cancer): biopsy result or follow-up outcome
``kind``                optional: biopsy | follow-up (default: biopsy for malignant and
                        benign, follow-up for negative)
``date``                optional: YYYY-MM-DD or YYYYMMDD
``finding``             optional: the number of a finding in the node's report of the study
                        (the biopsied cluster); needs L or R
=====================  ================================================================

Rows are keyed by (study, side, finding, kind, date): importing the same file again changes
nothing, a corrected outcome replaces the earlier one. A row that names no study the node has
seen, is ambiguous or malformed is reported with its line number and the reason, and not
imported; the others are. Accession numbers are never printed or logged (only line numbers and
Study Instance UIDs).

``mammo-node outcomes export --out labels.csv`` writes the CSV that ``python -m models import
dicom-csv DATA_DIR --csv labels.csv --out DIR`` reads together with the node's data directory
(see models/README.md): one located ROI per finding of the node's report whose label is known —
a finding named by a biopsy row, or any finding of a breast whose outcome is benign or negative
(none of its clusters is cancer; labelled ``normal`` by default, ``--negatives benign`` to count
them as benign). Findings of a malignant breast whose biopsied finding is not named are left out
(which cluster is the cancer is unknown); ``--breast-level`` adds one unlocated row per breast
with an outcome (whole-breast ROIs: research only, not servable by the node).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from sqlalchemy import select

from node.db import Database, Instance, Outcome, ScoredBreast, ScoredFinding, Study, utcnow
from node.evaluation import SIDES
from node.modelstore import ModelRef

TRUTH = {
    "malignant": "malignant", "cancer": "malignant", "positive": "malignant", "m": "malignant",
    "1": "malignant", "benign": "benign", "b": "benign", "0": "benign",
    "negative": "negative", "normal": "negative", "n": "negative", "no cancer": "negative",
}
KINDS = {"biopsy": "biopsy", "pathology": "biopsy", "histology": "biopsy",
         "follow-up": "follow-up", "follow_up": "follow-up", "followup": "follow-up",
         "follow up": "follow-up"}
SIDE = {"l": "L", "left": "L", "r": "R", "right": "R", "b": "B", "both": "B",
        "bilateral": "B", "": "B"}
ALIASES = {
    "study_instance_uid": ("study_instance_uid", "studyinstanceuid", "study_uid",
                           "study instance uid", "study"),
    "accession_number": ("accession_number", "accessionnumber", "accession", "accession number"),
    "laterality": ("laterality", "side", "breast"),
    "outcome": ("outcome", "result", "biopsy_result", "pathology", "truth", "label"),
    "kind": ("kind", "outcome_kind", "source", "type"),
    "date": ("date", "outcome_date", "biopsy_date"),
    "finding": ("finding", "finding_number", "finding_index"),
}


class OutcomesError(Exception):
    """The file as a whole cannot be read (missing, no header, no key or outcome column)."""


@dataclass
class ImportReport:
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    not_analysed: set[str] = field(default_factory=set)

    @property
    def linked(self) -> int:
        return self.added + self.updated + self.unchanged

    def text(self, name: str) -> str:
        lines = [f"{name}: {self.rows} rows; {self.linked} linked to {len(self.studies)} "
                 f"studies ({self.added} added, {self.updated} updated, {self.unchanged} "
                 f"unchanged), {len(self.errors)} not imported"
                 + (":" if self.errors else "")]
        lines += [f"  line {line}: {msg}" for line, msg in self.errors]
        if self.not_analysed:
            lines.append(f"  {len(self.not_analysed)} linked studies have no analysis yet; "
                         "they count once the node has analysed them")
        return "\n".join(lines)


def _date(text: str) -> str:
    if not text:
        return ""
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date().isoformat()
        except ValueError:
            continue
    raise ValueError(f"date {text!r} is not YYYY-MM-DD or YYYYMMDD")


def _read(path: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise OutcomesError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise OutcomesError(f"{path} is not UTF-8 text: {exc}") from None
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    cols: dict[str, str] = {}
    low = {f.strip().lower(): f for f in reader.fieldnames or [] if f}
    for key, names in ALIASES.items():
        for n in names:
            if n in low:
                cols[key] = low[n]
                break
    if "outcome" not in cols:
        raise OutcomesError(f"{path} has no outcome column (outcome, result, pathology, "
                            f"label); columns: {', '.join(reader.fieldnames or []) or 'none'}")
    if not {"study_instance_uid", "accession_number"} & set(cols):
        raise OutcomesError(f"{path} names no study: give study_instance_uid or "
                            "accession_number")
    return list(reader), cols


def backfill_accessions(db: Database, data_dir: Path) -> int:
    """Studies received before the node recorded accession numbers: read one stored header of
    each (``""`` when it has none, so it is read once)."""
    with db.session() as s:
        todo = s.execute(select(Study.id).where(Study.accession_number.is_(None))).scalars().all()
    n = 0
    for study_id in todo:
        with db.session() as s:
            relpath = s.execute(select(Instance.relpath).where(Instance.study_id == study_id)
                                .order_by(Instance.id).limit(1)).scalar()
            value = ""
            if relpath is not None:
                try:
                    ds = pydicom.dcmread(Path(data_dir) / relpath, stop_before_pixels=True,
                                         specific_tags=["AccessionNumber"])
                    value = str(ds.get("AccessionNumber", "") or "")[:64]
                except Exception:  # noqa: BLE001 - unreadable: no accession number
                    value = ""
            s.get_one(Study, study_id).accession_number = value
            n += 1
    return n


def import_outcomes(db: Database, path: Path, *, data_dir: Path, dry_run: bool = False,
                    rejects: Path | None = None) -> ImportReport:
    rows, cols = _read(Path(path))
    report = ImportReport(rows=len(rows))
    name = Path(path).name
    if "accession_number" in cols:
        backfill_accessions(db, data_dir)
    with db.session() as s:
        known = set(s.execute(select(Study.study_uid)).scalars())
        known |= set(s.execute(select(ScoredBreast.study_uid).distinct()).scalars())
        by_accession: dict[str, set[str]] = defaultdict(set)
        for uid, acc in s.execute(select(Study.study_uid, Study.accession_number)
                                  .where(Study.accession_number.is_not(None),
                                         Study.accession_number != "")).all():
            if acc is not None:  # always (the query's condition): narrows its type
                by_accession[acc].add(uid)
        for uid, acc in s.execute(select(ScoredBreast.study_uid, ScoredBreast.accession_number)
                                  .where(ScoredBreast.accession_number.is_not(None)).distinct()
                                  ).all():
            if acc is not None:  # always (the query's condition)
                by_accession[acc].add(uid)
        accession_of = {u: a for a, us in by_accession.items() for u in us}
        analysed = set(s.execute(select(ScoredBreast.study_uid).distinct()).scalars())
        findings = defaultdict(set)
        for uid, side, idx in s.execute(select(ScoredFinding.study_uid, ScoredFinding.laterality,
                                               ScoredFinding.finding_index).distinct()).all():
            findings[uid].add((side, idx))
    parsed: list[tuple[int, str, str, int, str, str, str]] = []
    rejected: list[tuple[dict[str, str], str]] = []
    for line, raw in enumerate(rows, start=2):
        row = {k: (raw.get(v) or "").strip() for k, v in cols.items()}
        try:
            parsed.extend(_parse_row(row, line, name, known, by_accession, accession_of,
                                     findings))
        except ValueError as exc:
            report.errors.append((line, str(exc)))
            rejected.append((raw, str(exc)))
    with db.session() as s:
        seen: dict[tuple[str, str, int, str, str], str] = {}  # this file's rows (dry run)
        for line, uid, side, idx, truth, kind, date in parsed:
            report.studies.add(uid)
            if uid not in analysed:
                report.not_analysed.add(uid)
            key = (uid, side, idx, kind, date)
            existing = s.execute(select(Outcome).where(
                Outcome.study_uid == uid, Outcome.laterality == side,
                Outcome.finding_index == idx, Outcome.kind == kind,
                Outcome.outcome_date == date)).scalar()
            before = seen.get(key, existing.truth if existing is not None else None)
            seen[key] = truth
            if before is None:
                report.added += 1
            elif before != truth:
                report.updated += 1
            else:
                report.unchanged += 1
            if dry_run or before == truth:
                continue
            if existing is None:
                s.add(Outcome(study_uid=uid, laterality=side, finding_index=idx, truth=truth,
                              kind=kind, outcome_date=date, source=f"{name}:{line}"[:255]))
                s.flush()
            else:
                existing.truth, existing.updated_at = truth, utcnow()
                existing.source = f"{name}:{line}"[:255]
    if rejects is not None:
        _write_private_csv(rejects, [*(list(rows[0].keys()) if rows else []), "error"],
                           [[*r.values(), why] for r, why in rejected])
    return report


def _parse_row(row: dict[str, str], line: int, name: str, known: set[str],
               by_accession: dict[str, set[str]], accession_of: dict[str, str],
               findings: dict[str, set[tuple[str, int]]]
               ) -> list[tuple[int, str, str, int, str, str, str]]:
    truth = TRUTH.get(row.get("outcome", "").lower())
    if truth is None:
        raise ValueError(f"outcome {row.get('outcome', '')!r} is not malignant, benign or "
                         "negative")
    kind_text = row.get("kind", "").lower()
    kind = KINDS.get(kind_text) if kind_text else ("follow-up" if truth == "negative"
                                                   else "biopsy")
    if kind is None:
        raise ValueError(f"kind {row.get('kind')!r} is not biopsy or follow-up")
    side = SIDE.get(row.get("laterality", "").lower())
    if side is None:
        raise ValueError(f"laterality {row.get('laterality')!r} is not L, R or B")
    date = _date(row.get("date", ""))
    idx = 0
    if row.get("finding"):
        try:
            idx = int(row["finding"])
        except ValueError:
            raise ValueError(f"finding {row['finding']!r} is not a finding number") from None
        if idx < 1:
            raise ValueError(f"finding {idx} is not a finding number (1, 2, ...)")
        if side == "B":
            raise ValueError("a finding row needs laterality L or R")
    uid, accession = row.get("study_instance_uid", ""), row.get("accession_number", "")
    if uid:
        if uid not in known:
            raise ValueError(f"study {uid} is not among the node's studies")
        if accession and accession_of.get(uid, accession) != accession:
            raise ValueError(f"the accession number does not match study {uid}'s")
    elif accession:
        uids = by_accession.get(accession, set())
        if not uids:
            raise ValueError("accession number not found among the node's studies")
        if len(uids) > 1:
            raise ValueError(f"accession number matches {len(uids)} studies: give "
                             "study_instance_uid")
        uid = next(iter(uids))
    else:
        raise ValueError("no study_instance_uid or accession_number in this row")
    if idx and uid in findings and (side, idx) not in findings[uid]:
        raise ValueError(f"study {uid} has no finding {idx} on the {side} side in the node's "
                         "report")
    sides = SIDES if side == "B" else (side,)
    return [(line, uid, s, idx, truth, kind, date) for s in sides]


# -- export for the dicom-csv importer ------------------------------------------------------------
EXPORT_COLUMNS = ["sop_instance_uid", "study_instance_uid", "laterality", "view", "x", "y",
                  "radius_mm", "label", "finding", "outcome", "outcome_kind", "model"]


@dataclass
class ExportReport:
    labels: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    breasts: int = 0

    def text(self, out: Path) -> str:
        lines = [f"{out}: {sum(self.labels.values())} rows from {self.breasts} breasts with an "
                 "outcome (" + (", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))
                                or "none") + ")"]
        lines += [f"  left out {n}: {why}" for why, n in sorted(self.skipped.items())]
        return "\n".join(lines)


def export_training_csv(db: Database, out: Path, *, model: ModelRef | None = None,
                        negatives: str = "normal", breast_level: bool = False) -> ExportReport:
    if negatives not in ("normal", "benign"):
        raise ValueError("negatives must be normal or benign")
    report = ExportReport()
    with db.session() as s:
        outcomes = s.execute(select(Outcome)).scalars().all()
        by_breast: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            by_breast[(outcome.study_uid, outcome.laterality)].append(outcome)
        uids = sorted({u for u, _ in by_breast})
        found: dict[str, list[ScoredFinding]] = defaultdict(list)
        stored: set[str] = set()
        for i in range(0, len(uids), 500):
            q = select(ScoredFinding).where(ScoredFinding.study_uid.in_(uids[i:i + 500]))
            q = (q.where(ScoredFinding.model_name == model.name,
                         ScoredFinding.model_version == model.version) if model is not None
                 else q.where(ScoredFinding.role == "active"))
            for f in s.execute(q).scalars():
                found[f.study_uid].append(f)
        sops = sorted({f.sop_uid for fs in found.values() for f in fs})
        for i in range(0, len(sops), 500):
            stored |= set(s.execute(select(Instance.sop_uid).where(
                Instance.sop_uid.in_(sops[i:i + 500]))).scalars())
    rows: list[list[object]] = []
    for (uid, side), outs in sorted(by_breast.items()):
        report.breasts += 1
        positive = any(o.truth == "malignant" for o in outs)
        named = {o.finding_index: o for o in outs if o.finding_index}
        breast_outcome = next((o for o in outs if o.truth == "malignant"), outs[0])
        study_findings = found.get(uid, [])
        if study_findings:  # the latest analysis (highest job) of the chosen model(s)
            job = max(f.job_id for f in study_findings)
            study_findings = [f for f in study_findings if f.job_id == job]
        for f in sorted((f for f in study_findings if f.laterality == side),
                        key=lambda f: f.finding_index):
            o = named.get(f.finding_index)
            if o is not None:
                label = "malignant" if o.truth == "malignant" else "benign"
            elif positive:
                report.skipped["finding of a malignant breast whose biopsied finding is not "
                               "named (which cluster is the cancer is unknown)"] += 1
                continue
            else:
                o, label = breast_outcome, negatives
            if f.sop_uid not in stored:
                report.skipped["image no longer stored (purged after retention.days)"] += 1
                continue
            rows.append([f.sop_uid, uid, side, f.view, f"{f.centre_x - 0.5:.2f}",
                         f"{f.centre_y - 0.5:.2f}", f"{f.radius_mm:.2f}", label,
                         f.finding_index, o.truth, o.kind, f"{f.model_name}:{f.model_version}"])
            report.labels[label] += 1
        if breast_level:
            label = "malignant" if positive else negatives
            rows.append(["", uid, side, "", "", "", "", label, "", breast_outcome.truth,
                         breast_outcome.kind, ""])
            report.labels[f"{label} (breast-level)"] += 1
    _write_private_csv(out, EXPORT_COLUMNS, rows)
    return report


def _write_private_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    """UIDs and the site's own keys: mode 0600, written whole then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
