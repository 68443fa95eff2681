"""ROI datasets: the CSV format, its loader, and the mini-MIAS builder.

Dataset format (documented in models/README.md)
------------------------------------------------
A folder with image files and ``rois.csv`` (any name; pass the CSV path). Columns:

``path``            image file relative to the CSV (PNG/TIFF/JPEG, 8/16-bit grey, bright = dense)
``label``           ``benign`` / ``malignant`` (or 0 / 1); ``normal`` marks normal-tissue negatives
``patient_id``      used for patient-level splits (all ROIs of a patient land in one fold)
``fold``            optional, integer: a fixed CV fold to use instead of the stratified split
``pixel_spacing_mm`` optional: pixel size of the image; default: the image spans ``roi_size_mm``
``row``, ``col``    optional: centre of the cluster in the image (index coordinates);
                    default: the image centre
``source``          optional, free text (e.g. ``cluster`` / ``normal`` / ``synthetic``)

Every ROI is cut with :func:`models.roi.crop_roi` at load time, so one dataset serves any
``roi_size_mm`` / ``input_size`` as long as the stored patches are large enough, and training
sees the same millimetres as the node.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.roi import crop_roi

MIAS_SPACING_MM = 0.2
CSV_FIELDS = ["path", "label", "patient_id", "fold", "pixel_spacing_mm", "row", "col", "source"]


@dataclass
class RoiSet:
    """ROIs loaded for training/evaluation (crops already at ``input_size``)."""

    crops: list[np.ndarray]
    labels: np.ndarray  # 0 benign / normal, 1 malignant
    patients: np.ndarray  # str
    folds: np.ndarray  # int, -1 when not given
    kinds: np.ndarray  # "benign" / "malignant" / "normal"
    paths: list[str]

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, idx: np.ndarray) -> RoiSet:
        return RoiSet(
            [self.crops[i] for i in idx],
            self.labels[idx],
            self.patients[idx],
            self.folds[idx],
            self.kinds[idx],
            [self.paths[i] for i in idx],
        )


def read_grey01(path: Path) -> np.ndarray:
    """Read an 8/16-bit grey image as float32 in [0, 1] (scaled by the dtype's maximum)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    img = img.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _label_kind(raw: str, path: str) -> tuple[int, str]:
    v = raw.strip().lower()
    if v in ("malignant", "m", "1"):
        return 1, "malignant"
    if v in ("benign", "b", "0"):
        return 0, "benign"
    if v in ("normal", "n"):
        return 0, "normal"
    raise ValueError(f"unknown label {raw!r} for {path} (use benign/malignant/normal or 0/1)")


def _crop_row(base: Path, row: dict[str, str], roi_size_mm: float,
              input_size: int) -> np.ndarray:
    img = read_grey01(base / row["path"])
    h, w = img.shape
    spacing = row.get("pixel_spacing_mm") or ""
    sp = float(spacing) if spacing.strip() else roi_size_mm / max(h, w)
    r = float(row["row"]) if (row.get("row") or "").strip() else (h - 1) / 2.0
    c = float(row["col"]) if (row.get("col") or "").strip() else (w - 1) / 2.0
    return crop_roi(img, (r, c), sp, roi_size_mm, input_size)


def load_rois(
    csv_path: Path,
    *,
    roi_size_mm: float,
    input_size: int,
    normals: str = "benign",
    workers: int = 0,
) -> RoiSet:
    """Load a ROI CSV and crop every ROI to ``roi_size_mm`` at ``input_size`` px.

    ``normals``: "benign" counts normal-tissue ROIs as the negative class (the node also sees
    detector false positives in normal tissue), "drop" leaves them out (pure benign vs malignant).
    ``workers`` > 0 decodes and crops in that many DataLoader worker processes (large imported
    sets: thousands of 16-bit patches); the result is the same, in CSV order.
    """
    if normals not in ("benign", "drop"):
        raise ValueError("normals must be 'benign' or 'drop'")
    csv_path = Path(csv_path)
    base = csv_path.parent
    crops, labels, patients, folds, kinds, paths = [], [], [], [], [], []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path} lacks columns {sorted(missing)}")
        rows = []
        for row in reader:
            label, kind = _label_kind(row["label"], row["path"])
            if kind == "normal" and normals == "drop":
                continue
            rows.append(row)
            labels.append(label)
            kinds.append(kind)
            patients.append(row["patient_id"])
            f = (row.get("fold") or "").strip()
            folds.append(int(f) if f else -1)
            paths.append(row["path"])
    if workers > 0 and len(rows) > 1:
        from torch.utils.data import DataLoader

        # _RowCrops is a map-style dataset (__len__ + __getitem__), all DataLoader needs; it does
        # not subclass torch's Dataset so that importing this module does not import torch.
        # Workers are spawned, not forked: a fork of a process with threads (a test runner's,
        # a progress monitor's) can copy a held lock and hang the worker for good.
        loader: DataLoader[np.ndarray] = DataLoader(
            _RowCrops(base, rows, roi_size_mm, input_size),  # type: ignore[arg-type]
            batch_size=None, num_workers=workers, shuffle=False,
            multiprocessing_context="spawn")
        crops = [np.asarray(c, dtype=np.float32) for c in loader]
    else:
        crops = [_crop_row(base, row, roi_size_mm, input_size) for row in rows]
    if not crops:
        raise ValueError(f"{csv_path} holds no usable ROIs")
    return RoiSet(
        crops,
        np.asarray(labels, dtype=np.int64),
        np.asarray(patients),
        np.asarray(folds, dtype=np.int64),
        np.asarray(kinds),
        paths,
    )


class _RowCrops:
    """Map-style dataset of ROI crops (for DataLoader workers in :func:`load_rois`)."""

    def __init__(self, base: Path, rows: list[dict[str, str]], roi_size_mm: float,
                 input_size: int) -> None:
        self.base, self.rows = base, rows
        self.roi_size_mm, self.input_size = roi_size_mm, input_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return _crop_row(self.base, self.rows[i], self.roi_size_mm, self.input_size)


def write_csv(csv_path: Path, rows: list[dict[str, object]]) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


# --------------------------------------------------------------------------- mini-MIAS builder


@dataclass(frozen=True)
class MiasCluster:
    refnum: str
    severity: str  # "B" / "M"
    row: float  # top-left origin
    col: float
    radius_px: float


def mias_patient(refnum: str) -> str:
    """mini-MIAS images come in left/right pairs of one woman: mdb001+mdb002 -> P001."""
    n = int(refnum[3:])
    return f"MIAS-P{(n + 1) // 2:03d}"


def read_mias_clusters(mias_dir: Path) -> list[MiasCluster]:
    """The located CALC rows of ``calc_annotations.csv`` (y already flipped to top origin)."""
    out = []
    with open(Path(mias_dir) / "calc_annotations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if not row["x"]:
                continue  # diffuse calcifications without a centre
            out.append(
                MiasCluster(row["refnum"], row["severity"], float(row["y_top_origin"]),
                            float(row["x"]), float(row["radius"]))
            )
    return out


def read_mias_normals(mias_dir: Path) -> list[str]:
    refs = set()
    for line in (Path(mias_dir) / "Info.txt").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("mdb") and parts[2] == "NORM":
            refs.add(parts[0])
    return sorted(refs)


def _breast_point(img01: np.ndarray, margin_px: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random pixel well inside the breast (away from skin line, film edge and pectoral-free
    background), for normal-tissue negatives."""
    import cv2

    small = cv2.resize(img01, (img01.shape[1] // 4, img01.shape[0] // 4),
                       interpolation=cv2.INTER_AREA)
    mask: np.ndarray = (cv2.GaussianBlur(small, (9, 9), 0) > 0.25).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask)
    if n > 1:
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask = (lab == biggest).astype(np.uint8)
    k = max(3, 2 * (margin_px // 4) + 1)
    mask = cv2.erode(mask, np.ones((k, k), np.uint8))
    # stay off the film borders, where markers and labels are burnt in
    b = max(1, margin_px // 4)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = 0, 0, 0, 0
    rr, cc = np.nonzero(mask)
    if len(rr) == 0:
        return img01.shape[0] // 2, img01.shape[1] // 2
    i = int(rng.integers(len(rr)))
    return int(rr[i]) * 4 + 2, int(cc[i]) * 4 + 2


def build_mias(
    mias_dir: Path,
    out_dir: Path,
    *,
    patch_mm: float = 48.0,
    n_normals: int = 54,
    seed: int = 0,
) -> Path:
    """Build a ROI dataset from mini-MIAS; returns the CSV path.

    Each located calcification cluster gives one patch of ``patch_mm`` (at the native 0.2 mm, cut
    with ``crop_roi``) centred on the annotated centre, labelled benign/malignant; ``n_normals``
    normal images (spread evenly over the NORM list) each give one patch centred on a random point
    inside the breast, labelled ``normal``. Patches are stored large so that any ROI up to
    ``patch_mm`` can be cut from them later at the same physical scale.
    """
    from PIL import Image

    mias_dir, out_dir = Path(mias_dir), Path(out_dir)
    (out_dir / "png").mkdir(parents=True, exist_ok=True)
    side = int(round(patch_mm / MIAS_SPACING_MM))
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []

    def save(img01: np.ndarray, centre: tuple[float, float], name: str) -> str:
        patch = crop_roi(img01, centre, MIAS_SPACING_MM, patch_mm, side)
        rel = f"png/{name}.png"
        Image.fromarray(np.round(patch * 255).astype(np.uint8)).save(out_dir / rel)
        return rel

    def pixels(refnum: str) -> np.ndarray:
        return np.asarray(Image.open(mias_dir / "png" / f"{refnum}.png").convert("L"),
                          dtype=np.float32) / 255.0

    seen: dict[str, int] = {}
    for cl in read_mias_clusters(mias_dir):
        k = seen[cl.refnum] = seen.get(cl.refnum, 0) + 1
        rel = save(pixels(cl.refnum), (cl.row, cl.col), f"{cl.refnum}_c{k}")
        rows.append({"path": rel, "label": "malignant" if cl.severity == "M" else "benign",
                     "patient_id": mias_patient(cl.refnum), "pixel_spacing_mm": MIAS_SPACING_MM,
                     "source": f"cluster {cl.refnum} r={cl.radius_px:g}px"})
    normals = read_mias_normals(mias_dir)
    if n_normals > 0 and normals:
        pick = np.unique(np.linspace(0, len(normals) - 1, min(n_normals, len(normals)))
                         .round().astype(int))
        for i in pick:
            ref = normals[i]
            img = pixels(ref)
            centre = _breast_point(img, int(16.0 / MIAS_SPACING_MM), rng)
            rel = save(img, centre, f"{ref}_n")
            rows.append({"path": rel, "label": "normal", "patient_id": mias_patient(ref),
                         "pixel_spacing_mm": MIAS_SPACING_MM,
                         "source": f"normal {ref} at r={centre[0]} c={centre[1]}"})
    csv_path = out_dir / "rois.csv"
    write_csv(csv_path, rows)
    return csv_path
