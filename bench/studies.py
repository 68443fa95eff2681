"""Synthetic but realistic four-view screening studies for the benchmarks.

Two detector formats: "big" 3328 x 4096 (columns x rows) at 0.07 mm, 12 bits stored (27 MB raw)
and "small" 1914 x 2294 at 0.1 mm, 14 bits stored (8.8 MB raw); "raw" (Explicit VR Little
Endian) or "j2k" (JPEG 2000 lossless, pylibjpeg-openjpeg). Each image holds a breast-shaped
region of smooth, textured tissue against a dark background, quantum-like noise, and
calcification-like specks (clusters and isolated ones), so that the breast mask, the top-hat
search and the clustering do their real work and the classifier sees a realistic number of ROIs.

Pixels are generated once per (format, view, variant) and the encoded datasets are reused with
new UIDs for every study, so writing a study costs a file write, not a JPEG 2000 encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEG2000Lossless

from tests.testdata import mg_dataset, uid_from


def storescu_args(files: list[Path]) -> list[str]:
    """dcmtk storescu options for these files: JPEG 2000 ones need ``-xv -R`` (propose J2K)."""
    if files and dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID in (
            JPEG2000Lossless, JPEG2000):
        return ["-xv", "-R"]
    return []


VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


@dataclass(frozen=True)
class Format:
    name: str
    rows: int
    cols: int
    spacing_mm: float
    bits: int


FORMATS = {
    "big": Format("big", 4096, 3328, 0.07, 12),
    "small": Format("small", 2294, 1914, 0.1, 14),
    # for --tiny runs only: keeps CI fast, same code paths
    "tiny": Format("tiny", 1024, 832, 0.1, 12),
}


def synthetic_mammogram(fmt: Format, laterality: str, view: str, seed: int) -> np.ndarray:
    """uint16 image, ``fmt.bits`` bits stored, chest wall on the left for L, right for R."""
    rng = np.random.default_rng(seed)
    rows, cols = fmt.rows, fmt.cols
    maxval = (1 << fmt.bits) - 1
    # Geometry on a 1/8 grid, then resized: a half ellipse from the chest wall (MLO: taller,
    # with a pectoral triangle at the top).
    sr, sc = rows // 8, cols // 8
    yy, xx = np.mgrid[0:sr, 0:sc].astype(np.float32)
    cy = sr * (0.5 if view == "CC" else 0.55)
    ry, rx = sr * (0.42 if view == "CC" else 0.5), sc * rng.uniform(0.68, 0.8)
    d = np.sqrt(((yy - cy) / ry) ** 2 + (xx / rx) ** 2)
    breast = np.clip((1.0 - d) / 0.08, 0.0, 1.0)  # soft skin edge
    thickness = np.clip(1.0 - d, 0.0, 1.0) ** 0.35  # brighter towards the chest wall
    texture = np.zeros((sr, sc), dtype=np.float32)
    for sigma, weight in ((24, 0.5), (8, 0.3), (3, 0.2)):
        n = rng.standard_normal((sr, sc)).astype(np.float32)
        n = cv2.GaussianBlur(n, (0, 0), sigma)
        texture += weight * n / (n.std() + 1e-6)
    tissue = 0.08 + breast * (0.35 + 0.25 * thickness + 0.06 * texture)
    if view == "MLO":  # pectoral muscle: a bright triangle at the top of the chest wall
        pect = (xx < sc * 0.35 * (1.0 - yy / (sr * 0.45))) & (yy < sr * 0.45) & (breast > 0)
        tissue = np.where(pect, np.maximum(tissue, 0.75), tissue)
    img = cv2.resize(tissue, (cols, rows), interpolation=cv2.INTER_CUBIC)
    mask = cv2.resize(breast, (cols, rows), interpolation=cv2.INTER_LINEAR) > 0.5
    # Calcification-like specks: a few clusters and isolated specks inside the breast.
    r_px = lambda mm: max(1, int(round(mm / fmt.spacing_mm)))  # noqa: E731
    inside = np.argwhere(mask[:: 16, :: 16]) * 16
    for _ in range(int(rng.integers(3, 7))):
        cr, cc = inside[rng.integers(len(inside))]
        for _ in range(int(rng.integers(4, 12))):
            pr = int(cr + rng.normal(0, r_px(2.5)))
            pc = int(cc + rng.normal(0, r_px(2.5)))
            cv2.circle(img, (pc, pr), r_px(rng.uniform(0.12, 0.3)),
                       float(rng.uniform(0.04, 0.1)) + float(img[min(max(pr, 0), rows - 1),
                                                                 min(max(pc, 0), cols - 1)]), -1)
    for _ in range(40):
        pr, pc = inside[rng.integers(len(inside))]
        cv2.circle(img, (int(pc), int(pr)), r_px(rng.uniform(0.1, 0.25)),
                   float(img[pr, pc]) + float(rng.uniform(0.03, 0.08)), -1)
    img += rng.standard_normal((rows, cols), dtype=np.float32) * 0.006
    if laterality == "R":
        img = img[:, ::-1]
    return np.clip(img * maxval, 0, maxval).astype(np.uint16)


class StudyFactory:
    """Writes four-view studies of one format and transfer syntax with fresh UIDs."""

    def __init__(self, fmt: str, syntax: str = "raw", variants: int = 2, tag: str = "bench"
                 ) -> None:
        if syntax not in ("raw", "j2k"):
            raise ValueError(f"syntax must be raw or j2k, not {syntax!r}")
        self.fmt = FORMATS[fmt]
        self.syntax = syntax
        self.tag = f"{tag}-{fmt}-{syntax}"
        self._templates: dict[tuple[int, int], Dataset] = {}
        self.variants = variants

    def _template(self, view_index: int, variant: int) -> Dataset:
        key = (view_index, variant)
        if key not in self._templates:
            lat, view = VIEWS[view_index]
            pixels = synthetic_mammogram(self.fmt, lat, view, seed=1000 * variant + view_index)
            ds = mg_dataset(pixels, patient_id="BENCH", study_uid=uid_from(self.tag, "t"),
                            sop_uid=uid_from(self.tag, "t", str(key)), laterality=lat,
                            view=view, spacing_mm=self.fmt.spacing_mm, bits_stored=self.fmt.bits)
            if self.syntax == "j2k":
                ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
            self._templates[key] = ds
        return self._templates[key]

    def warm(self) -> None:
        """Generate (and encode) every template now, outside any timed section."""
        for view_index in range(len(VIEWS)):
            for variant in range(self.variants):
                self._template(view_index, variant)

    def study_uid(self, index: int) -> str:
        return uid_from(self.tag, str(index))

    def write_study(self, index: int, out_dir: Path) -> list[Path]:
        """Write study ``index`` (four files) under ``out_dir``; returns the paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        study_uid = self.study_uid(index)
        paths = []
        for v, (lat, view) in enumerate(VIEWS):
            ds = self._template(v, index % self.variants)
            sop = uid_from(self.tag, str(index), lat, view)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = uid_from(study_uid, lat, view, "series")
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.PatientID = f"BENCH{index:05d}"
            ds.AccessionNumber = f"ACC{index:05d}"
            path = out_dir / f"{index:05d}-{lat}{view}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths
