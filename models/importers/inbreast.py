"""INbreast (Moreira et al. 2012) -> ROI dataset.

Source layout (found under SRC): ``INbreast.csv`` (``;``-separated: ``Patient ID;Patient age;
Laterality;View;Acquisition date;File Name;ACR;Bi-Rads``; Patient ID and age read "removed"),
``AllDICOMs/<File Name>_<patient hash>_MG_<L|R>_<CC|ML>_ANON.dcm`` and
``AllXML/<File Name>.xml``: an OsiriX plist, ``Images[0].ROIs[]`` with ``Name``
(``Calcification``, ``Cluster``, ``Mass``, ...), ``NumberOfPoints`` and ``Point_px`` (strings
``"(x, y)"``: column, row from the top-left).

Labels are per image from the BI-RADS column, as in the EfficientNet comparison (seed 000):
``--benign-birads 1,2`` vs ``--malignant-birads 5,6``; 3 and 4a-4c are left out (reported).
ROIs: ``--abnormality calc`` (default) gives one ROI per ``Cluster`` annotation; an image whose
calcifications carry no cluster annotation has them grouped by single linkage
(``--cluster-link-mm``) into clusters of at least ``--min-calcifications``; ``mass`` gives one
per ``Mass``; ``--roi breast`` gives one whole-breast ROI per labelled image instead.
``patient_id`` = the patient hash in the file name (the dataset's pseudonym), prefixed ``INB-``.
Pixel size from the DICOM, else ``--pixel-spacing-mm`` (0.07 mm).
"""

from __future__ import annotations

import csv
import plistlib
import re
from pathlib import Path

from models.importers.common import (
    DatasetWriter,
    Region,
    birads_label,
    normalise_birads,
    parse_birads_set,
    region_from_points,
    spacing_or_default,
)
from models.importers.dicom_io import read_mammogram


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_table(path: Path) -> list[dict[str, str]]:
    """INbreast.csv (``;`` or ``,``) or INbreast.xls(x), keys normalised (``birads``,
    ``filename``, ``laterality``, ``view``, ``acr``)."""
    if path.suffix.lower() in (".xls", ".xlsx"):
        from models.importers.tables import read_spreadsheet

        raw = read_spreadsheet(path)
    else:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        first = text.splitlines()[0] if text else ""
        delim = ";" if first.count(";") >= first.count(",") else ","
        raw = list(csv.DictReader(text.splitlines(), delimiter=delim))
    return [{_key(k or ""): str(v or "").strip() for k, v in r.items()} for r in raw]


def parse_point(text: str) -> tuple[float, float]:
    """``"(x, y)"`` or ``"(x, y, z)"`` -> (row, col)."""
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]
    if len(nums) < 2:
        raise ValueError(f"not a point: {text!r}")
    return nums[1], nums[0]


def read_rois(xml_path: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """[(name, [(row, col), ...]), ...] of every ROI in an INbreast XML."""
    with open(xml_path, "rb") as fh:
        plist = plistlib.load(fh, fmt=plistlib.FMT_XML)
    out = []
    for image in plist.get("Images", []):
        for roi in image.get("ROIs", []):
            pts = [parse_point(p) for p in roi.get("Point_px", [])]
            if pts:
                out.append((str(roi.get("Name", "")).strip(), pts))
    return out


def group_points(points: list[tuple[float, float]], link_px: float) -> list[list[int]]:
    """Single-linkage groups of points closer than ``link_px`` (indices)."""
    parent = list(range(len(points)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            if (points[i][0] - points[j][0]) ** 2 + (points[i][1] - points[j][1]) ** 2 \
                    <= link_px ** 2:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _centre(pts: list[tuple[float, float]]) -> tuple[float, float]:
    r = region_from_points(pts)
    return r.row, r.col


def find_regions(rois: list[tuple[str, list[tuple[float, float]]]], abnormality: str,
                 spacing: float, link_mm: float, min_calcs: int) -> tuple[list[tuple[str, Region]],
                                                                        list[str]]:
    """[(abnormality, region)], [skip reasons] for one image's annotations."""
    out: list[tuple[str, Region]] = []
    why: list[str] = []
    if abnormality in ("calc", "all"):
        clusters = [pts for name, pts in rois if name.lower() == "cluster"]
        calcs = [_centre(pts) for name, pts in rois if name.lower().startswith("calcification")]
        for pts in clusters:
            out.append(("calcification", region_from_points(pts, 1.0 / spacing)))
        if not clusters and calcs:
            for g in group_points(calcs, link_mm / spacing):
                if len(g) >= min_calcs:
                    out.append(("calcification", region_from_points([calcs[i] for i in g],
                                                                    1.0 / spacing)))
                else:
                    why.append(f"isolated calcifications (< {min_calcs} within "
                               f"{link_mm:g} mm): {len(g)}")
    if abnormality in ("mass", "all"):
        for name, pts in rois:
            if name.lower() == "mass":
                out.append(("mass", region_from_points(pts, 1.0 / spacing)))
    return out, why


def import_inbreast(src: Path, out: Path, *, benign_birads: str = "1,2",
                    malignant_birads: str = "5,6", abnormality: str = "calc",
                    roi: str = "annotation", cluster_link_mm: float = 10.0,
                    min_calcifications: int = 3, patch_mm: float = 48.0,
                    store_spacing_mm: float | None = None, pixel_spacing_mm: float = 0.07,
                    breast_px: int = 512, limit: int | None = None):
    if abnormality not in ("calc", "mass", "all") or roi not in ("annotation", "breast"):
        raise ValueError("abnormality must be calc|mass|all and roi annotation|breast")
    src = Path(src)
    tables = sorted(p for p in src.rglob("INbreast.*")
                    if p.suffix.lower() in (".csv", ".xls", ".xlsx"))
    if not tables:
        raise ValueError(f"no INbreast.csv / INbreast.xls under {src}")
    benign, malignant = parse_birads_set(benign_birads), parse_birads_set(malignant_birads)
    writer = DatasetWriter(out, "INbreast", patch_mm=patch_mm, store_spacing_mm=store_spacing_mm,
                           breast_px=breast_px,
                           options={"benign_birads": sorted(benign),
                                    "malignant_birads": sorted(malignant),
                                    "abnormality": abnormality, "roi": roi,
                                    "cluster_link_mm": cluster_link_mm,
                                    "min_calcifications": min_calcifications})
    dicoms: dict[str, Path] = {}
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() in (".dcm", ".dicom") and "_" in p.name:
            dicoms.setdefault(p.name.split("_")[0], p)
    xmls = {p.stem: p for p in sorted(src.rglob("*.xml"))}
    n_images = 0
    for row in read_table(tables[0]):
        file_name = row.get("filename", "").split(".")[0]
        if not file_name:
            continue
        ref = f"INbreast image {file_name}"
        birads = normalise_birads(row.get("birads", ""))
        label = birads_label(birads, benign, malignant)
        if label is None:
            writer.skip(ref, f"BI-RADS {birads or '?'} not in benign {benign_birads} or "
                             f"malignant {malignant_birads}")
            continue
        dcm = dicoms.get(file_name)
        if dcm is None:
            writer.skip(ref, "DICOM not found in AllDICOMs")
            continue
        xml = xmls.get(file_name)
        if roi == "annotation" and xml is None:
            writer.skip(ref, "no XML annotation (no ROI to cut)")
            continue
        if limit is not None and n_images >= limit:
            writer.skip(ref, "beyond --limit")
            continue
        parts = dcm.stem.split("_")
        patient = f"INB-{parts[1]}" if len(parts) > 1 else f"INB-{file_name}"
        lat = row.get("laterality", "") or (parts[3] if len(parts) > 3 else "")
        view = row.get("view", "") or (parts[4] if len(parts) > 4 else "")
        try:
            mg = read_mammogram(dcm)
            spacing, source = spacing_or_default(mg.spacing_mm, mg.spacing_source,
                                                 pixel_spacing_mm, dcm.name)
        except ValueError as exc:
            writer.skip(ref, f"DICOM unreadable: {exc}")
            continue
        n_images += 1
        common = dict(label=label, patient_id=patient, laterality=lat.upper(), view=view.upper(),
                      birads=birads, density=row.get("acr", ""))
        if roi == "breast":
            writer.add_breast(mg.image01, name=f"INbreast_{file_name}", abnormality="breast",
                              source=f"INbreast {file_name} whole breast", **common)
            continue
        assert xml is not None  # an annotation ROI without its XML was skipped above
        try:
            annotations = read_rois(xml)
        except (ValueError, plistlib.InvalidFileException, OSError) as exc:
            writer.skip(ref, f"XML unreadable: {exc}")
            continue
        regions, why = find_regions(annotations, abnormality, spacing, cluster_link_mm,
                                    min_calcifications)
        for reason in why:
            writer.skip(ref, reason)
        if not regions:
            writer.skip(ref, f"no {abnormality} annotation in the XML")
        for k, (abn, region) in enumerate(regions, start=1):
            writer.add_patch(mg.image01, spacing, source, region,
                             name=f"INbreast_{file_name}_{abn[:4]}{k}",
                             roi_kind="cluster" if abn == "calcification" else "lesion",
                             abnormality=abn, source=f"INbreast {file_name} {abn} {k}", **common)
    if any(s.startswith("default") for s in writer.spacing_sources):
        writer.note(f"pixel size not in the files: {pixel_spacing_mm:g} mm assumed")
    writer.note("labels are BI-RADS assessments per image (not biopsy per cluster): "
                f"benign {benign_birads}, malignant {malignant_birads}")
    return writer.finish()
