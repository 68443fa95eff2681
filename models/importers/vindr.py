"""VinDr-Mammo (Nguyen et al. 2023, PhysioNet) -> ROI dataset.

Source layout (found under SRC): ``finding_annotations.csv`` with ``study_id, series_id,
image_id, laterality, view_position, height, width, breast_birads, breast_density,
finding_categories, finding_birads, xmin, ymin, xmax, ymax, split`` (categories are a Python
list literal such as ``['Suspicious Calcification']``, BI-RADS values ``BI-RADS 4``, densities
``DENSITY C``, split ``training``/``test``), ``breast-level_annotations.csv`` (the same per
image without the finding columns), and ``images/<study_id>/<image_id>.dicom``; PNG/JPEG
re-distributions with the same stems are read too, their boxes rescaled from the CSV's
``height``/``width`` to the file's size.

VinDr-Mammo has no pathology: only non-benign findings carry boxes, with a BI-RADS
assessment. Labels are therefore suspicion levels, not outcomes: ``--benign-birads 2,3`` vs
``--malignant-birads 4,5`` (the dataset paper's suspicious threshold); say so in any report.
``--categories`` picks the finding categories (default ``Suspicious Calcification``).
``patient_id`` = ``study_id`` (one de-identified exam per woman), prefixed ``VINDR-``.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

from models.importers.common import (
    DatasetWriter,
    FileIndex,
    birads_label,
    normalise_birads,
    parse_birads_set,
    region_from_box,
    spacing_or_default,
)
from models.importers.dicom_io import read_mammogram


def parse_categories(text: str) -> list[str]:
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = [v.strip(" '\"") for v in text.strip("[]").split(",")]
    if isinstance(value, str):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def import_vindr(src: Path, out: Path, *, benign_birads: str = "2,3",
                 malignant_birads: str = "4,5", categories: str = "Suspicious Calcification",
                 patch_mm: float = 48.0, store_spacing_mm: float | None = None,
                 pixel_spacing_mm: float | None = None, limit: int | None = None):
    src = Path(src)
    found = sorted(src.rglob("finding_annotations.csv"))
    if not found:
        raise ValueError(f"no finding_annotations.csv under {src}")
    wanted = {c.strip().lower() for c in categories.split(",") if c.strip()}
    benign, malignant = parse_birads_set(benign_birads), parse_birads_set(malignant_birads)
    writer = DatasetWriter(out, "VinDr-Mammo", patch_mm=patch_mm,
                           store_spacing_mm=store_spacing_mm,
                           options={"benign_birads": sorted(benign),
                                    "malignant_birads": sorted(malignant),
                                    "categories": sorted(wanted)})
    index = FileIndex(src)
    by_image: dict[str, list[dict[str, str]]] = {}
    with open(found[0], newline="", encoding="utf-8-sig") as fh:
        for k, row in enumerate(csv.DictReader(fh), start=2):
            row = {(a or "").strip(): (b or "").strip() for a, b in row.items()}
            cats = {c.lower() for c in parse_categories(row.get("finding_categories", ""))}
            ref = f"finding_annotations.csv line {k}"
            if not cats & wanted:
                continue  # another kind of finding (or No Finding): not an error
            if not all(row.get(c) for c in ("xmin", "ymin", "xmax", "ymax")):
                writer.skip(ref, "finding without a box")
                continue
            label = birads_label(row.get("finding_birads", ""), benign, malignant)
            if label is None:
                writer.skip(ref, f"finding BI-RADS {row.get('finding_birads') or '?'} not in "
                                 f"benign {benign_birads} or malignant {malignant_birads}")
                continue
            row["_label"], row["_ref"], row["_cats"] = label, ref, ",".join(sorted(cats & wanted))
            by_image.setdefault(row.get("image_id", ""), []).append(row)
    n_images = 0
    for image_id, group in by_image.items():
        if limit is not None and n_images >= limit:
            for row in group:
                writer.skip(row["_ref"], "beyond --limit")
            continue
        files = index.by_stem.get(image_id, [])
        if not files:
            for row in group:
                writer.skip(row["_ref"], f"image not found: images/*/{image_id}.dicom")
            continue
        path = sorted(files, key=lambda p: p.suffix.lower() not in (".dicom", ".dcm"))[0]
        try:
            mg = read_mammogram(path)
        except ValueError as exc:
            for row in group:
                writer.skip(row["_ref"], f"image unreadable: {exc}")
            continue
        h, w = mg.image01.shape
        try:
            src_h, src_w = float(group[0].get("height") or h), float(group[0].get("width") or w)
        except ValueError:
            src_h, src_w = float(h), float(w)
        sy, sx = h / src_h, w / src_w  # 1.0 for the DICOMs; < 1 for down-sized PNGs
        try:
            spacing, source = spacing_or_default(
                mg.spacing_mm, mg.spacing_source,
                None if pixel_spacing_mm is None else pixel_spacing_mm / max(sy, 1e-9),
                path.name)
        except ValueError as exc:
            for row in group:
                writer.skip(row["_ref"], f"{exc}")
            continue
        n_images += 1
        for k, row in enumerate(group, start=1):
            box = [float(row[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            region = region_from_box(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            study = row.get("study_id", "")
            writer.add_patch(
                mg.image01, spacing, source, region, name=f"VinDr_{image_id}_{k}",
                label=row["_label"], patient_id=f"VINDR-{study}",
                roi_kind="cluster" if "calcification" in row["_cats"] else "lesion",
                abnormality=row["_cats"], laterality=row.get("laterality", "").upper(),
                view=row.get("view_position", "").upper(),
                birads=normalise_birads(row.get("finding_birads", "")),
                density=row.get("breast_density", "").replace("DENSITY", "").strip(),
                split=row.get("split", ""), source=f"VinDr-Mammo {study}/{image_id} box {k}")
    writer.note("labels are BI-RADS suspicion of the annotated finding (VinDr-Mammo has no "
                f"pathology): benign {benign_birads}, malignant {malignant_birads}")
    return writer.finish()
