"""CBIS-DDSM (TCIA "Curated Breast Imaging Subset of DDSM") -> ROI dataset.

Source layout (any of them, found under SRC):

* the case-description CSVs ``calc_case_description_{train,test}_set.csv`` (and the ``mass_``
  ones with ``--abnormality mass|all``), columns ``patient_id, breast density (calc) /
  breast_density (mass), left or right breast, image view, abnormality id, abnormality type,
  calc type, calc distribution, assessment, pathology, subtlety, image file path, cropped image
  file path, ROI mask file path``;
* the images, either as TCIA serves them, ``<case folder>/<StudyInstanceUID>/<SeriesUID>/
  000000.dcm`` (the paths in the CSVs) or as the NBIA retriever names them,
  ``CBIS-DDSM/<case folder>/<date-desc>/<series-desc>/1-1.dcm``, or as the common JPEG/PNG
  re-distribution, ``jpeg/<SeriesInstanceUID>/1-NNN.jpg``. The case folder is the first
  component of each CSV path (``Calc-Training_P_00005_RIGHT_CC`` for the mammogram,
  ``..._1`` for abnormality 1), the Series UID the third.

The ROI mask and the cropped image of an abnormality share a folder and their names are
swapped in parts of the CSVs, so they are told apart by content: the mask has the mammogram's
size (within 2 %; a few masks are a few pixels off and are rescaled), the crop is small.
ROI centre = centre of the mask's bounding box, extent = that box. Labels: MALIGNANT ->
malignant, BENIGN -> benign, BENIGN_WITHOUT_CALLBACK -> benign (``--bwc drop`` leaves them
out). ``patient_id`` = the dataset's own case pseudonym (``P_00005``), prefixed ``CBIS-``.
Pixel size: from the DICOM when present, else ``--pixel-spacing-mm`` (default 0.05 mm: DDSM
digitisers scanned at 42-50 µm).
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2

from models.importers.common import (
    DatasetWriter,
    FileIndex,
    Region,
    region_from_mask,
    spacing_or_default,
)
from models.importers.dicom_io import image_shape, read_mammogram

CSV_GLOB = "*case_description*.csv"
PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}


def _clean(value: object) -> str:
    return str(value or "").strip().strip('"').strip()


def _get(row: dict[str, str], *names: str) -> str:
    for n in names:
        if n in row:
            return _clean(row[n])
    return ""


def read_case_csvs(src: Path, abnormality: str) -> list[dict[str, str]]:
    """All rows of the case-description CSVs under ``src`` for ``abnormality``
    ("calc", "mass" or "all"), with the CSV's file name in ``_csv``."""
    rows: list[dict[str, str]] = []
    for path in sorted(Path(src).rglob(CSV_GLOB)):
        name = path.name.lower()
        if abnormality != "all" and not name.startswith(abnormality):
            continue
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                row = {(k or "").strip(): v for k, v in row.items()}
                row["_csv"] = path.name
                rows.append(row)
    return rows


class _Resolver:
    """CSV path -> files present under SRC, for every layout listed in the module doc."""

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        self.index = FileIndex(src)

    def candidates(self, csv_path: str) -> list[Path]:
        rel = csv_path.replace("\\", "/").strip().strip("/")
        exact = self.src / rel
        if rel and exact.is_file():
            return [exact]
        parts = [p for p in rel.split("/") if p]
        found: list[Path] = []
        if len(parts) >= 3:  # TCIA / JPEG re-distribution: folder named by Series UID
            found = self.index.under(parts[2])
        if not found and parts:  # NBIA descriptive layout: the case folder
            found = self.index.under(parts[0])
        return found


def _split_of(case_folder: str) -> str:
    low = case_folder.lower()
    return "test" if "-test" in low else "train" if "-training" in low else ""


def import_cbis_ddsm(src: Path, out: Path, *, abnormality: str = "calc", bwc: str = "benign",
                     patch_mm: float = 48.0, store_spacing_mm: float | None = None,
                     pixel_spacing_mm: float = 0.05, limit: int | None = None):
    if abnormality not in ("calc", "mass", "all"):
        raise ValueError("abnormality must be calc, mass or all")
    if bwc not in ("benign", "drop"):
        raise ValueError("bwc must be benign or drop")
    writer = DatasetWriter(out, "CBIS-DDSM", patch_mm=patch_mm, store_spacing_mm=store_spacing_mm,
                           options={"abnormality": abnormality, "bwc": bwc,
                                    "pixel_spacing_mm": pixel_spacing_mm})
    rows = read_case_csvs(src, abnormality)
    if not rows:
        raise ValueError(f"no {CSV_GLOB} for --abnormality {abnormality} under {src}")
    resolver = _Resolver(src)
    # group by mammogram so that each is decoded once
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        ref = (f"{row['_csv']}: {_get(row, 'patient_id')} {_get(row, 'left or right breast')} "
               f"{_get(row, 'image view')} abnormality {_get(row, 'abnormality id')}")
        row["_ref"] = ref
        label = PATHOLOGY.get(_get(row, "pathology").upper())
        if label is None:
            writer.skip(ref, f"unknown pathology: {_get(row, 'pathology')!r}")
            continue
        if bwc == "drop" and _get(row, "pathology").upper() == "BENIGN_WITHOUT_CALLBACK":
            writer.skip(ref, "BENIGN_WITHOUT_CALLBACK left out (--bwc drop)")
            continue
        row["_label"] = label
        by_image.setdefault(_get(row, "image file path"), []).append(row)
    n_done = 0
    for image_path, group in by_image.items():
        if limit is not None and n_done >= limit:
            for row in group:
                writer.skip(row["_ref"], "beyond --limit")
            continue
        full = _largest(resolver.candidates(image_path))
        if full is None:
            for row in group:
                writer.skip(row["_ref"], f"mammogram not found: {image_path}")
            continue
        try:
            mg = read_mammogram(full)
            spacing, source = spacing_or_default(mg.spacing_mm, mg.spacing_source,
                                                 pixel_spacing_mm, str(full))
        except ValueError as exc:
            for row in group:
                writer.skip(row["_ref"], f"mammogram unreadable: {exc}")
            continue
        for row in group:
            region, why = _region_for(row, resolver, full, mg.image01.shape)
            if region is None:
                writer.skip(row["_ref"], why)
                continue
            case = image_path.replace("\\", "/").split("/")[0]
            patient = _get(row, "patient_id")
            writer.add_patch(
                mg.image01, spacing, source, region,
                name=f"{case}_{_get(row, 'abnormality id') or 'x'}", label=row["_label"],
                patient_id=f"CBIS-{patient}", roi_kind="lesion" if "mass" in
                _get(row, "abnormality type").lower() else "cluster",
                abnormality=_get(row, "abnormality type").lower(),
                laterality={"LEFT": "L", "RIGHT": "R"}.get(
                    _get(row, "left or right breast").upper(), ""),
                view=_get(row, "image view").upper(), birads=_get(row, "assessment"),
                density=_get(row, "breast density", "breast_density"),
                pathology=_get(row, "pathology").upper(), calc_type=_get(row, "calc type"),
                calc_distribution=_get(row, "calc distribution"),
                subtlety=_get(row, "subtlety"), split=_split_of(case),
                source=f"CBIS-DDSM {case} abnormality {_get(row, 'abnormality id')}",
            )
            n_done += 1
    if any(s.startswith("default") for s in writer.spacing_sources):
        writer.note(f"pixel size not in the files: {pixel_spacing_mm:g} mm assumed "
                    "(--pixel-spacing-mm; DDSM scanners 0.042-0.050 mm)")
    return writer.finish()


def _largest(files: list[Path]) -> Path | None:
    best, best_area = None, -1
    for f in files:
        shape = image_shape(f)
        if shape and shape[0] * shape[1] > best_area:
            best, best_area = f, shape[0] * shape[1]
    return best


def _region_for(row: dict[str, str], resolver: _Resolver, full: Path,
                shape: tuple[int, int]) -> tuple[Region | None, str]:
    """The abnormality's region from its ROI mask (found by content, see module doc)."""
    files: list[Path] = []
    for key in ("ROI mask file path", "cropped image file path"):
        for f in resolver.candidates(_get(row, key)):
            if f != full and f not in files:
                files.append(f)
    if not files:
        return None, f"ROI mask not found: {_get(row, 'ROI mask file path')}"
    rows_, cols_ = shape
    for f in files:
        s = image_shape(f)
        if s is None:
            continue
        if abs(s[0] - rows_) <= 0.02 * rows_ and abs(s[1] - cols_) <= 0.02 * cols_:
            try:
                mask = read_mammogram(f).image01
            except ValueError:
                continue
            if s != shape:  # a few CBIS masks are some pixels off: rescale to the mammogram
                mask = cv2.resize(mask, (cols_, rows_), interpolation=cv2.INTER_NEAREST)
            sample = mask[:: max(1, rows_ // 256), :: max(1, cols_ // 256)]
            if ((sample < 0.1) | (sample > 0.9)).mean() < 0.97:  # grey levels: not a mask
                continue
            region = region_from_mask(mask)
            if region is None:
                return None, "ROI mask is empty"
            return region, ""
    return None, (f"no ROI mask of the mammogram's size {rows_}x{cols_} among "
                  f"{len(files)} ROI files")
