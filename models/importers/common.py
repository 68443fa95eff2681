"""What every importer shares: the output folder (patches, ``rois.csv``, the skip list and the
import summary), label mapping, pseudonyms, and ROI geometry from masks and boxes.

Output of ``python -m models import KIND SRC --out DIR``:

``DIR/rois.csv``      the ROI dataset (models/README.md, "ROI dataset format") plus descriptive
                      columns (``roi_kind``, ``abnormality``, ``birads``, ...); the only patient
                      key is ``patient_id``: the dataset's own pseudonym, or an HMAC of an
                      identifying source key.
``DIR/png/``          16-bit PNG patches (``--patch-mm`` square at the image's own pixel size,
                      or ``--store-spacing-mm``), or whole-breast images for ``roi_kind=breast``.
``DIR/skipped.csv``   every source item not imported, with the reason.
``DIR/import.json``   command, options, counts per label/kind/reason, pixel-size sources.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.data import CSV_FIELDS
from models.roi import crop_roi

#: descriptive columns written after the loader's columns (the loader ignores them)
EXTRA_FIELDS = [
    "roi_kind",  # cluster | lesion | breast | candidate (how the ROI centre was obtained)
    "abnormality",  # calcification | mass | ... (source vocabulary, lower case)
    "roi_height_mm", "roi_width_mm",  # extent of the annotation (mask / box / cluster hull)
    "laterality", "view", "birads", "density", "pathology", "calc_type", "calc_distribution",
    "subtlety", "split",  # the dataset's official split, when it has one
]
ROI_FIELDS = CSV_FIELDS + EXTRA_FIELDS

ROI_KINDS = ("cluster", "lesion", "breast", "candidate")


def command_line() -> str:
    return "python -m models " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def safe_name(text: str) -> str:
    """A file-name-safe version of a (non-identifying) dataset key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


# --------------------------------------------------------------------------- labels


def parse_birads_set(spec: str) -> set[str]:
    """"1,2" -> {"1", "2"}; "4" also stands for 4a/4b/4c."""
    out: set[str] = set()
    for part in spec.split(","):
        p = part.strip().lower()
        if not p:
            continue
        out.add(p)
        if p == "4":
            out |= {"4a", "4b", "4c"}
    return out


def normalise_birads(value: str) -> str:
    """"BI-RADS 4" / "4A" / " 4a " / "4.0" -> "4" / "4a"; "" when absent."""
    v = str(value or "").strip().lower().replace("bi-rads", "").replace("birads", "").strip()
    if not v or v in ("nan", "none"):
        return ""
    m = re.match(r"^(\d)(?:\.0)?\s*([abc]?)$", v)
    return (m.group(1) + m.group(2)) if m else v


def birads_label(birads: str, benign: set[str], malignant: set[str]) -> str | None:
    b = normalise_birads(birads)
    if b in malignant:
        return "malignant"
    if b in benign:
        return "benign"
    return None


# --------------------------------------------------------------------------- pseudonyms


class Pseudonymiser:
    """HMAC-SHA256 pseudonyms for identifying keys (a site's Patient IDs).

    A plain hash of a medical record number can be reversed by hashing every possible number;
    a keyed hash cannot without the key. The key lives in a file (created with mode 0600 on
    first use); reuse it for later imports of the same site so that one woman keeps one
    pseudonym, and never ship it with the dataset.
    """

    def __init__(self, key_file: Path) -> None:
        key_file = Path(key_file)
        if key_file.exists():
            self.key = bytes.fromhex(key_file.read_text().strip())
            self.created = False
        else:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            self.key = secrets.token_bytes(32)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.key.hex() + "\n")
            self.created = True
        self.key_file = key_file

    def __call__(self, value: str, prefix: str = "PT") -> str:
        digest = hmac.new(self.key, value.strip().encode(), hashlib.sha256).hexdigest()
        return f"{prefix}-{digest[:16]}"


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Region:
    """ROI centre (row, col) in image pixel coordinates and its extent in pixels."""

    row: float
    col: float
    height_px: float
    width_px: float


def region_from_mask(mask: np.ndarray) -> Region | None:
    """Centre of the bounding box of the mask's foreground and its extent (None when empty).

    Masks from JPEG re-distributions are lossy: foreground = above half the maximum."""
    m = np.asarray(mask, dtype=np.float32)
    if m.size == 0 or float(m.max()) <= 0:
        return None
    rr, cc = np.nonzero(m > 0.5 * float(m.max()))
    if len(rr) == 0:
        return None
    r0, r1, c0, c1 = int(rr.min()), int(rr.max()), int(cc.min()), int(cc.max())
    return Region((r0 + r1) / 2.0, (c0 + c1) / 2.0, r1 - r0 + 1.0, c1 - c0 + 1.0)


def region_from_points(points: list[tuple[float, float]], min_extent_px: float = 1.0) -> Region:
    """Bounding box of (row, col) points (contour or calcification positions)."""
    rr = [p[0] for p in points]
    cc = [p[1] for p in points]
    return Region((min(rr) + max(rr)) / 2.0, (min(cc) + max(cc)) / 2.0,
                  max(max(rr) - min(rr), min_extent_px), max(max(cc) - min(cc), min_extent_px))


def region_from_box(xmin: float, ymin: float, xmax: float, ymax: float) -> Region:
    return Region((ymin + ymax) / 2.0, (xmin + xmax) / 2.0, max(ymax - ymin, 1.0),
                  max(xmax - xmin, 1.0))


# --------------------------------------------------------------------------- writer


@dataclass
class ImportSummary:
    dataset: str
    out_dir: Path
    n_rois: int
    labels: dict[str, int]
    kinds: dict[str, int]
    skipped: dict[str, int]
    n_patients: int
    csv_path: Path
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.dataset}: {self.n_rois} ROIs from {self.n_patients} patients "
                 f"({', '.join(f'{v} {k}' for k, v in sorted(self.labels.items())) or 'none'}; "
                 f"kinds {', '.join(f'{v} {k}' for k, v in sorted(self.kinds.items()))}) "
                 f"-> {self.csv_path}"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} (see skipped.csv):")
            lines += [f"  {n:6d}  {reason}" for reason, n in
                      sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class DatasetWriter:
    """Writes patches and rows; collects skips; ``finish()`` writes the CSVs and the summary.

    ``patch_mm``: side of the stored square around each ROI centre, cut with
    :func:`models.roi.crop_roi` at the image's own pixel size (or ``store_spacing_mm`` when
    given), so any ROI up to that size can be cut later at true scale. Larger annotations are
    stored larger (1.25 x their extent) so that nothing of them is cut off.
    """

    def __init__(self, out_dir: Path, dataset: str, *, patch_mm: float = 48.0,
                 store_spacing_mm: float | None = None, breast_px: int = 512,
                 options: dict | None = None) -> None:
        self.out = Path(out_dir)
        (self.out / "png").mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.patch_mm = patch_mm
        self.store_spacing_mm = store_spacing_mm
        self.breast_px = breast_px
        self.options = options or {}
        self.rows: list[dict[str, object]] = []
        self.skips: list[tuple[str, str]] = []
        self.spacing_sources: Counter[str] = Counter()
        self.notes: list[str] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, k = safe_name(name), 1
        name = base
        while name in self._names:
            k += 1
            name = f"{base}-{k}"
        self._names.add(name)
        return name

    def _save(self, img01: np.ndarray, name: str) -> str:
        rel = f"png/{self._unique(name)}.png"
        u16 = np.round(np.clip(img01, 0.0, 1.0) * 65535.0).astype(np.uint16)
        if not cv2.imwrite(str(self.out / rel), u16):
            raise OSError(f"cannot write {self.out / rel}")
        return rel

    def add_patch(self, image01: np.ndarray, spacing_mm: float, spacing_source: str,
                  region: Region, *, name: str, label: str, patient_id: str,
                  roi_kind: str, **fields: object) -> None:
        """Cut and store one ROI patch around ``region`` and add its row."""
        if roi_kind not in ROI_KINDS:
            raise ValueError(f"roi_kind {roi_kind!r} not in {ROI_KINDS}")
        extent_mm = max(region.height_px, region.width_px) * spacing_mm
        side_mm = max(self.patch_mm, 1.25 * extent_mm)
        out_sp = self.store_spacing_mm or spacing_mm
        side_px = max(16, int(round(side_mm / out_sp)))
        patch = crop_roi(image01, (region.row, region.col), spacing_mm, side_px * out_sp,
                         side_px)
        rel = self._save(patch, name)
        self.spacing_sources[spacing_source] += 1
        self.rows.append({
            "path": rel, "label": label, "patient_id": patient_id,
            "pixel_spacing_mm": f"{out_sp:.6g}", "roi_kind": roi_kind,
            "roi_height_mm": f"{region.height_px * spacing_mm:.2f}",
            "roi_width_mm": f"{region.width_px * spacing_mm:.2f}", **fields,
        })

    def add_breast(self, image01: np.ndarray, *, name: str, label: str, patient_id: str,
                   **fields: object) -> None:
        """Store the breast (its bounding box, padded to a square) as an image-level ROI.

        No ``pixel_spacing_mm`` is written, so the loader takes the whole image as the ROI:
        the model sees the breast, not a cluster (state it in the report: such a model is not
        the node's cluster classifier)."""
        from models.importers.dicom_io import breast_box

        top, left, bottom, right = breast_box(image01)
        h, w = bottom - top, right - left
        centre = ((top + bottom - 1) / 2.0, (left + right - 1) / 2.0)
        side = max(h, w, 1)
        square = crop_roi(image01, centre, 1.0, float(side), self.breast_px)
        rel = self._save(square, name)
        self.rows.append({"path": rel, "label": label, "patient_id": patient_id,
                          "roi_kind": "breast", "abnormality": fields.pop("abnormality", ""),
                          **fields})

    def skip(self, ref: str, reason: str) -> None:
        """Record a source item that is not imported (``ref`` must not identify a patient)."""
        self.skips.append((ref, reason))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def finish(self) -> ImportSummary:
        csv_path = self.out / "rois.csv"
        with open(csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=ROI_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in ROI_FIELDS})
        with open(self.out / "skipped.csv", "w", newline="") as fh:
            w2 = csv.writer(fh)
            w2.writerow(["item", "reason"])
            w2.writerows(self.skips)
        # reasons are grouped by their text before any ":" detail
        reasons = Counter(r.split(": ")[0] for _, r in self.skips)
        summary = ImportSummary(
            self.dataset, self.out, len(self.rows),
            dict(Counter(str(r["label"]) for r in self.rows)),
            dict(Counter(str(r["roi_kind"]) for r in self.rows)), dict(reasons),
            len({r["patient_id"] for r in self.rows}), csv_path, list(self.notes))
        info = {
            "dataset": self.dataset, "command": command_line(), "options": self.options,
            "n_rois": summary.n_rois, "n_patients": summary.n_patients,
            "labels": summary.labels, "roi_kinds": summary.kinds, "skipped": summary.skipped,
            "pixel_spacing_sources": dict(self.spacing_sources), "notes": self.notes,
            "patch_mm": self.patch_mm, "store_spacing_mm": self.store_spacing_mm,
        }
        (self.out / "import.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
        return summary


def spacing_or_default(spacing: float | None, source: str, default_mm: float | None,
                       what: str) -> tuple[float, str]:
    """The image's own pixel size, else the dataset default (ValueError when neither)."""
    if spacing is not None and math.isfinite(spacing) and spacing > 0:
        return spacing, source
    if default_mm is None:
        raise ValueError(f"{what}: no pixel spacing in the file and no --pixel-spacing-mm")
    return float(default_mm), f"default {default_mm:g} mm (--pixel-spacing-mm)"


class FileIndex:
    """Every image file under a folder, found by its exact relative path, its name, or the name
    of any folder above it (TCIA trees name folders by case or by Series Instance UID)."""

    def __init__(self, root: Path, suffixes: set[str] | None = None) -> None:
        from models.importers.dicom_io import DICOM_SUFFIXES, RASTER_SUFFIXES

        suffixes = suffixes or (DICOM_SUFFIXES | RASTER_SUFFIXES) - {""}
        self.root = Path(root)
        self.by_dir: dict[str, list[Path]] = {}
        self.by_name: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        self.files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_parts = Path(dirpath).relative_to(self.root).parts
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if p.suffix.lower() not in suffixes:
                    continue
                self.files.append(p)
                self.by_name.setdefault(fn, []).append(p)
                self.by_stem.setdefault(p.stem, []).append(p)
                for part in rel_parts:
                    self.by_dir.setdefault(part, []).append(p)

    def under(self, dirname: str) -> list[Path]:
        return list(self.by_dir.get(dirname, []))
