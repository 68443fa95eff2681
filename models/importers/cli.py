"""``python -m models import KIND SRC --out DIR`` (argument parsing only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    imp = sub.add_parser("import", formatter_class=fmt,
                         help="import a public dataset or a site's DICOM + outcomes CSV into "
                              "the ROI dataset format")
    kinds = imp.add_subparsers(dest="kind", required=True)

    def base(name: str, help_: str, spacing: float | None) -> argparse.ArgumentParser:
        q = kinds.add_parser(name, help=help_, formatter_class=fmt)
        q.add_argument("src", help="folder holding the dataset as downloaded")
        q.add_argument("--out", required=True, help="output folder (rois.csv, png/, ...)")
        q.add_argument("--patch-mm", type=float, default=48.0,
                       help="side of the stored patch around each ROI (ROIs up to this size "
                            "can be cut later at true scale)")
        q.add_argument("--store-spacing-mm", type=float, default=None,
                       help="resample stored patches to this pixel size (default: the image's)")
        q.add_argument("--pixel-spacing-mm", type=float, default=spacing,
                       help="pixel size to assume when a file does not give one")
        q.set_defaults(fn=run)
        return q

    def birads(q: argparse.ArgumentParser, benign: str, malignant: str) -> None:
        q.add_argument("--benign-birads", default=benign, help="BI-RADS values labelled benign")
        q.add_argument("--malignant-birads", default=malignant,
                       help="BI-RADS values labelled malignant (others are left out)")

    def limit(q: argparse.ArgumentParser) -> None:
        q.add_argument("--limit", type=int, default=None,
                       help="import at most N images (a quick look at a large set)")

    c = base("cbis-ddsm", "CBIS-DDSM (TCIA)", 0.05)
    c.add_argument("--abnormality", choices=("calc", "mass", "all"), default="calc")
    c.add_argument("--bwc", choices=("benign", "drop"), default="benign",
                   help="BENIGN_WITHOUT_CALLBACK: count as benign or leave out")
    limit(c)
    i = base("inbreast", "INbreast", 0.07)
    birads(i, "1,2", "5,6")
    i.add_argument("--abnormality", choices=("calc", "mass", "all"), default="calc")
    i.add_argument("--roi", choices=("annotation", "breast"), default="annotation",
                   help="one ROI per annotated cluster/mass, or one whole-breast ROI per image")
    i.add_argument("--cluster-link-mm", type=float, default=10.0,
                   help="calcifications closer than this form one cluster (images without a "
                        "Cluster annotation)")
    i.add_argument("--min-calcifications", type=int, default=3)
    i.add_argument("--breast-px", type=int, default=512)
    limit(i)
    v = base("vindr-mammo", "VinDr-Mammo (PhysioNet)", None)
    birads(v, "2,3", "4,5")
    v.add_argument("--categories", default="Suspicious Calcification",
                   help="comma-separated finding categories to import")
    limit(v)
    m = base("cmmd", "CMMD (TCIA), image-level labels", None)
    m.add_argument("--clinical", default=None, help="clinical table (default: found in SRC)")
    m.add_argument("--abnormality", choices=("calc", "mass", "all"), default="calc")
    m.add_argument("--candidates", default=None,
                   help="CSV of candidate points (file or sop_instance_uid, row, col) to cut "
                        "instead of whole breasts")
    m.add_argument("--breast-px", type=int, default=512)
    limit(m)
    d = base("dicom-csv", "a folder of DICOM files, or the node's data directory, + outcomes",
             None)
    d.add_argument("--csv", required=True, dest="labels_csv", help="labels/outcomes CSV")
    d.add_argument("--node-db", default=None,
                   help="SQLAlchemy URL of the node's database (default: SRC/node.sqlite3 "
                        "when SRC is a node data directory)")
    d.add_argument("--id-key", default=None,
                   help="pseudonym key file (default OUT/.pseudonym-key; reuse it per site)")
    d.add_argument("--breast-px", type=int, default=512)


def run(a: argparse.Namespace) -> None:
    from models import importers

    common = dict(patch_mm=a.patch_mm, store_spacing_mm=a.store_spacing_mm,
                  pixel_spacing_mm=a.pixel_spacing_mm)
    src, out = Path(a.src), Path(a.out)
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder")
    try:
        if a.kind == "cbis-ddsm":
            s = importers.import_cbis_ddsm(src, out, abnormality=a.abnormality, bwc=a.bwc,
                                           limit=a.limit, **common)
        elif a.kind == "inbreast":
            s = importers.import_inbreast(
                src, out, benign_birads=a.benign_birads, malignant_birads=a.malignant_birads,
                abnormality=a.abnormality, roi=a.roi, cluster_link_mm=a.cluster_link_mm,
                min_calcifications=a.min_calcifications, breast_px=a.breast_px, limit=a.limit,
                **common)
        elif a.kind == "vindr-mammo":
            s = importers.import_vindr(src, out, benign_birads=a.benign_birads,
                                       malignant_birads=a.malignant_birads,
                                       categories=a.categories, limit=a.limit, **common)
        elif a.kind == "cmmd":
            s = importers.import_cmmd(
                src, out, clinical=Path(a.clinical) if a.clinical else None,
                abnormality=a.abnormality,
                candidates=Path(a.candidates) if a.candidates else None,
                breast_px=a.breast_px, limit=a.limit, **common)
        else:
            s = importers.import_dicom_csv(
                src, out, labels_csv=Path(a.labels_csv), node_db=a.node_db,
                id_key=Path(a.id_key) if a.id_key else None, breast_px=a.breast_px, **common)
    except ValueError as exc:
        raise SystemExit(f"import {a.kind}: {exc}") from None
    print(s.text())
