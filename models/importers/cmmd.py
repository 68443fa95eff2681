"""CMMD (The Chinese Mammography Database, TCIA) -> ROI dataset with image-level labels.

Source layout (found under SRC): the clinical table ``CMMD_clinicaldata_revision.xlsx`` (or a
CSV export of it; columns ``ID1, LeftRight, Age, number, abnormality, classification,
subtype``: one row per breast, ``classification`` Benign / Malignant, ``abnormality``
calcification / mass / both) and the DICOM tree as the NBIA retriever writes it,
``CMMD/<ID1>/<study>/<series>/1-N.dcm``; each image's side comes from its header
(ImageLaterality, ViewCodeSequence), its woman from PatientID (or the ``D1-0001`` folder).

CMMD has no lesion location. ``--roi breast`` (default) stores the whole breast of every image
as one image-level ROI (``roi_kind=breast``); ``--candidates FILE.csv`` instead cuts a patch at
each listed candidate (columns ``file`` relative to SRC, or ``sop_instance_uid``, and ``row``,
``col`` in pixels), e.g. the node detector's candidates, each labelled with its breast's label
(``roi_kind=candidate``: weak labels; a malignant breast's candidates are not all malignant).
``patient_id`` = ``ID1`` (the dataset's pseudonym), prefixed ``CMMD-``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from models.importers.common import DatasetWriter, Region, spacing_or_default
from models.importers.dicom_io import (
    is_dicom_file,
    laterality_and_view,
    read_header,
    read_mammogram,
)
from models.importers.tables import read_spreadsheet

ID_RE = re.compile(r"^D\d-\d{4}$")


def _norm(row: dict[str, str]) -> dict[str, str]:
    return {re.sub(r"[^a-z0-9]", "", k.lower()): v for k, v in row.items()}


def import_cmmd(src: Path, out: Path, *, clinical: Path | None = None, abnormality: str = "calc",
                candidates: Path | None = None, patch_mm: float = 48.0,
                store_spacing_mm: float | None = None, pixel_spacing_mm: float | None = None,
                breast_px: int = 512, limit: int | None = None):
    src = Path(src)
    if abnormality not in ("calc", "mass", "all"):
        raise ValueError("abnormality must be calc, mass or all")
    if clinical is None:
        tables = sorted(p for p in src.rglob("CMMD_clinicaldata*")
                        if p.suffix.lower() in (".xlsx", ".xls", ".csv"))
        if not tables:
            raise ValueError(f"no CMMD_clinicaldata_revision.xlsx (or .csv) under {src}; "
                             "pass --clinical FILE")
        clinical = tables[0]
    labels: dict[tuple[str, str], dict[str, str]] = {}
    for row in read_spreadsheet(Path(clinical)):
        norm = _norm(row)
        pid, side = norm.get("id1", "").strip(), norm.get("leftright", "").strip().upper()[:1]
        if pid and side:
            labels[(pid, side)] = norm
    writer = DatasetWriter(out, "CMMD", patch_mm=patch_mm, store_spacing_mm=store_spacing_mm,
                           breast_px=breast_px,
                           options={"clinical": Path(clinical).name, "abnormality": abnormality,
                                    "candidates": str(candidates or "")})
    cands: dict[str, list[tuple[float, float]]] = {}
    if candidates is not None:
        with open(candidates, newline="", encoding="utf-8-sig") as fh:
            for c in csv.DictReader(fh):
                c = {k.strip().lower(): (v or "").strip() for k, v in c.items()}
                key = c.get("sop_instance_uid") or c.get("file", "")
                cands.setdefault(key, []).append((float(c["row"]), float(c["col"])))
    n_images = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".xlsx", ".xls", ".csv", ".txt", ".json") \
                or not is_dicom_file(path):
            continue
        rel = path.relative_to(src).as_posix()
        try:
            ds = read_header(path)
        except Exception as exc:  # noqa: BLE001
            writer.skip(rel, f"not readable as DICOM: {exc}")
            continue
        pid = str(ds.get("PatientID", "") or "").strip()
        if not ID_RE.match(pid):
            pid = next((p for p in path.relative_to(src).parts if ID_RE.match(p)), pid)
        side, view = laterality_and_view(ds)
        ref = f"{pid} {side or '?'} {view or '?'} ({rel})"
        r = labels.get((pid, side))
        if r is None:
            writer.skip(ref, "breast not in the clinical table")
            continue
        abn = r.get("abnormality", "").lower()
        wanted = {"calc": ("calcification", "both"), "mass": ("mass", "both"),
                  "all": ("calcification", "mass", "both")}[abnormality]
        if abn not in wanted:
            writer.skip(ref, f"abnormality {abn or '?'} not selected (--abnormality "
                             f"{abnormality})")
            continue
        label = {"benign": "benign", "malignant": "malignant"}.get(
            r.get("classification", "").lower())
        if label is None:
            writer.skip(ref, f"classification {r.get('classification')!r} is not "
                             "Benign/Malignant")
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        these = cands.get(sop, []) + cands.get(rel, [])
        if candidates is not None and not these:
            writer.skip(ref, "no candidate listed for this image")
            continue
        if limit is not None and n_images >= limit:
            writer.skip(ref, "beyond --limit")
            continue
        try:
            mg = read_mammogram(path)
        except ValueError as exc:
            writer.skip(ref, f"image unreadable: {exc}")
            continue
        n_images += 1
        common = dict(label=label, patient_id=f"CMMD-{pid}", laterality=side, view=view,
                      abnormality=abn, pathology=r.get("classification", ""),
                      source=f"CMMD {pid} {side} {view} ({path.name})")
        if candidates is None:
            writer.add_breast(mg.image01, name=f"CMMD_{pid}_{side}_{view}_{path.stem}",
                              **common)
            continue
        try:
            spacing, source = spacing_or_default(mg.spacing_mm, mg.spacing_source,
                                                 pixel_spacing_mm, path.name)
        except ValueError as exc:
            writer.skip(ref, str(exc))
            continue
        for k, (row_, col_) in enumerate(these, start=1):
            writer.add_patch(mg.image01, spacing, source, Region(row_, col_, 1.0, 1.0),
                             name=f"CMMD_{pid}_{side}_{view}_{path.stem}_c{k}",
                             roi_kind="candidate", **common)
    writer.note("CMMD labels are per breast (biopsy), with no location: "
                + ("whole-breast ROIs (roi_kind=breast): a model trained on them is an "
                   "image-level classifier, not the node's cluster classifier"
                   if candidates is None else
                   "candidate ROIs carry their breast's label (weak labels)"))
    return writer.finish()
