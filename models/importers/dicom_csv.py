"""A site's own DICOM images + a CSV of outcomes -> ROI dataset (``dicom-csv``).

Images: SRC is either a folder of DICOM files (any tree, any names) or the node's own data
directory (``node.sqlite3`` inside it, or ``--node-db URL`` for PostgreSQL): then the node's
``instances`` and ``studies`` tables give each stored image's SOP Instance UID, study,
laterality, view and file (``instances.relpath`` under the data directory), read with
SQLAlchemy Core in a read-only connection; ``models`` never imports ``node``.

Labels CSV (``--csv``; header names case-insensitive), one row per ROI or per breast:

``sop_instance_uid``  the image; or ``study_instance_uid`` (or ``accession_number``) +
                      ``laterality`` (L/R) [+ ``view``: CC, MLO, ...]
``x``, ``y``          ROI centre in image pixels (column, row), with ``radius`` (pixels) or
                      ``radius_mm``; or ``mask``: a mask image (path relative to the CSV) of the
                      image's size. Without any location the row labels the breast: every
                      matching image gives one whole-breast ROI (``roi_kind=breast``).
``label``             benign / malignant / normal (or 0 / 1, B / M): biopsy or follow-up outcome
``patient``           optional grouping key; else the image's PatientID

Patient keys are identifying here, so ``patient_id`` is an HMAC-SHA256 pseudonym under a key
file (``--id-key``, default ``<out>/.pseudonym-key``, mode 0600; keep it off shared copies and
reuse it for later imports of the same site). ``rois.csv`` holds no UID or name; the mapping
back to the images is written separately to ``provenance.csv`` (mode 0600, site-internal).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.importers.common import (
    DatasetWriter,
    Pseudonymiser,
    Region,
    region_from_mask,
    spacing_or_default,
)
from models.importers.dicom_io import (
    is_dicom_file,
    laterality_and_view,
    read_header,
    read_mammogram,
)

LABELS = {"malignant": "malignant", "m": "malignant", "1": "malignant", "benign": "benign",
          "b": "benign", "0": "benign", "normal": "normal", "n": "normal"}
ALIASES = {
    "sop_instance_uid": ("sop_instance_uid", "sopinstanceuid", "sop_uid", "sop instance uid"),
    "study_instance_uid": ("study_instance_uid", "studyinstanceuid", "study_uid", "study"),
    "accession_number": ("accession_number", "accessionnumber", "accession"),
    "laterality": ("laterality", "side", "imagelaterality"),
    "view": ("view", "viewposition", "view_position"),
    "x": ("x", "col", "column"), "y": ("y", "row"),
    "radius": ("radius", "radius_px"), "radius_mm": ("radius_mm",),
    "mask": ("mask", "mask_file"), "label": ("label", "outcome", "pathology", "result"),
    "patient": ("patient", "patient_id", "patientid"),
}


@dataclass
class StoredImage:
    path: Path
    sop_uid: str
    study_uid: str
    laterality: str
    view: str
    accession: str = ""
    patient_id: str = ""  # filled from the header when needed


def _columns(fieldnames: Sequence[str]) -> dict[str, str]:
    low = {f.strip().lower(): f for f in fieldnames if f}
    out = {}
    for key, names in ALIASES.items():
        for n in names:
            if n in low:
                out[key] = low[n]
                break
    return out


def scan_folder(src: Path, writer: DatasetWriter) -> list[StoredImage]:
    images = []
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        if not is_dicom_file(path):
            continue
        try:
            ds = read_header(path)
        except Exception:  # noqa: BLE001
            writer.skip(path.relative_to(src).as_posix(), "not readable as DICOM")
            continue
        if "SOPInstanceUID" not in ds:
            continue
        lat, view = laterality_and_view(ds)
        images.append(StoredImage(path, str(ds.get("SOPInstanceUID", "")),
                                  str(ds.get("StudyInstanceUID", "")), lat, view,
                                  str(ds.get("AccessionNumber", "") or ""),
                                  str(ds.get("PatientID", "") or "")))
    return images


def node_db_url(data_dir: Path) -> str:
    """Read-only SQLAlchemy URL of the node's default SQLite database in ``data_dir``."""
    db = (Path(data_dir) / "node.sqlite3").resolve()
    return f"sqlite:///file:{db}?mode=ro&uri=true"


def scan_node(data_dir: Path, url: str | None) -> list[StoredImage]:
    """Every stored instance of the node (tables ``instances`` + ``studies``, node/db.py)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url or node_db_url(data_dir))
    root = Path(data_dir).resolve()
    out = []
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT i.sop_uid, i.relpath, i.laterality, i.view, s.study_uid "
                "FROM instances i JOIN studies s ON s.id = i.study_id ORDER BY i.id")).all()
    finally:
        engine.dispose()
    for sop, relpath, lat, view, study in rows:
        path = (root / str(relpath)).resolve()
        if root not in path.parents:  # a relpath must stay inside the data directory
            continue
        out.append(StoredImage(path, str(sop), str(study), str(lat or "").upper(),
                               str(view or "").upper()))
    return out


def _fill_header(img: StoredImage) -> None:
    if img.patient_id or img.accession:
        return
    try:
        ds = read_header(img.path)
    except Exception:  # noqa: BLE001
        return
    img.patient_id = str(ds.get("PatientID", "") or "")
    img.accession = str(ds.get("AccessionNumber", "") or "")


def import_dicom_csv(src: Path, out: Path, *, labels_csv: Path, node_db: str | None = None,
                     id_key: Path | None = None, patch_mm: float = 48.0,
                     store_spacing_mm: float | None = None, pixel_spacing_mm: float | None = None,
                     breast_px: int = 512):
    src, out, labels_csv = Path(src), Path(out), Path(labels_csv)
    is_node = node_db is not None or (src / "node.sqlite3").is_file()
    writer = DatasetWriter(out, "dicom-csv", patch_mm=patch_mm,
                           store_spacing_mm=store_spacing_mm, breast_px=breast_px,
                           options={"labels_csv": labels_csv.name,
                                    "source": "node data directory" if is_node else "folder"})
    pseudo = Pseudonymiser(id_key or out / ".pseudonym-key")
    if pseudo.created:
        writer.note(f"new pseudonym key {pseudo.key_file}: reuse it (--id-key) for later "
                    "imports of this site, never share it")
    images = scan_node(src, node_db) if is_node else scan_folder(src, writer)
    by_sop = {i.sop_uid: i for i in images if i.sop_uid}
    by_study: dict[tuple[str, str], list[StoredImage]] = {}
    for i in images:
        by_study.setdefault((i.study_uid, i.laterality), []).append(i)
    by_accession: dict[tuple[str, str], list[StoredImage]] | None = None
    provenance: list[tuple[str, str, str]] = []

    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = _columns(reader.fieldnames or [])
        if "label" not in cols:
            raise ValueError(f"{labels_csv} has no label column")
        if not ({"sop_instance_uid", "study_instance_uid", "accession_number"} & set(cols)):
            raise ValueError(f"{labels_csv} names no image: give sop_instance_uid, or "
                             "study_instance_uid / accession_number with laterality")
        rows = list(reader)
    for line, raw in enumerate(rows, start=2):
        row = {k: (raw.get(v) or "").strip() for k, v in cols.items()}
        ref = f"{labels_csv.name} line {line}"
        label = LABELS.get(row.get("label", "").lower())
        if label is None:
            writer.skip(ref, f"unknown label: {row.get('label')!r}")
            continue
        lat = row.get("laterality", "").upper()[:1]
        view = row.get("view", "").upper()
        if row.get("sop_instance_uid"):
            matches = [by_sop[row["sop_instance_uid"]]] if row["sop_instance_uid"] in by_sop \
                else []
        elif row.get("study_instance_uid"):
            matches = by_study.get((row["study_instance_uid"], lat), [])
        elif row.get("accession_number"):
            if by_accession is None:
                by_accession = {}
                for i in images:
                    _fill_header(i)
                    by_accession.setdefault((i.accession, i.laterality), []).append(i)
            matches = by_accession.get((row["accession_number"], lat), [])
        else:
            writer.skip(ref, "no image key in this row")
            continue
        if view:
            matches = [m for m in matches if m.view == view]
        if not matches:
            writer.skip(ref, "no stored image matches")
            continue
        located = bool(row.get("x") and row.get("y")) or bool(row.get("mask"))
        if located and len(matches) > 1:
            writer.skip(ref, f"ambiguous: {len(matches)} images match a located ROI "
                             "(give sop_instance_uid or view)")
            continue
        for img in matches:
            _fill_header(img)
            key = row.get("patient") or img.patient_id
            if not key:
                writer.skip(ref, "no patient key (patient column or PatientID)")
                continue
            try:
                mg = read_mammogram(img.path)
            except ValueError as exc:
                writer.skip(ref, f"image unreadable: {exc}")
                continue
            name = f"dcsv_{len(writer.rows) + 1:06d}"
            common = dict(label=label, patient_id=pseudo(key), laterality=img.laterality,
                          view=img.view, source=ref)
            if not located:
                writer.add_breast(mg.image01, name=name, abnormality="breast", **common)
            else:
                try:
                    spacing, source = spacing_or_default(mg.spacing_mm, mg.spacing_source,
                                                         pixel_spacing_mm, ref)
                    region = _region(row, labels_csv.parent, mg.image01.shape, spacing)
                except ValueError as exc:
                    writer.skip(ref, str(exc))
                    continue
                writer.add_patch(mg.image01, spacing, source, region, name=name,
                                 roi_kind="cluster", abnormality="calcification", **common)
            provenance.append((str(writer.rows[-1]["path"]), ref, img.sop_uid))
    summary = writer.finish()
    prov = out / "provenance.csv"
    fd = os.open(prov, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels_row", "sop_instance_uid"])
        w.writerows(provenance)
    return summary


def _region(row: dict[str, str], base: Path, shape: tuple[int, int], spacing: float) -> Region:
    rows_, cols_ = shape
    if row.get("mask"):
        mask = read_mammogram(base / row["mask"]).image01
        if mask.shape != shape:
            raise ValueError(f"mask size {mask.shape} is not the image's {shape}")
        region = region_from_mask(mask)
        if region is None:
            raise ValueError("mask is empty")
        return region
    try:
        x, y = float(row["x"]), float(row["y"])
    except ValueError:
        raise ValueError(f"x/y not numbers: {row.get('x')!r}, {row.get('y')!r}") from None
    if not (0 <= x < cols_ and 0 <= y < rows_):
        raise ValueError(f"ROI centre ({x:g}, {y:g}) outside the {cols_}x{rows_} image")
    if row.get("radius_mm"):
        r_px = float(row["radius_mm"]) / spacing
    elif row.get("radius"):
        r_px = float(row["radius"])
    else:
        r_px = 0.5
    return Region(y, x, 2 * r_px, 2 * r_px)
