"""Breast anatomy on a prepared image: breast mask, chest-wall side, pectoral muscle (MLO).

All functions take the prepared image (float32 in [0, 1], bright = dense) and its pixel size in
millimetres, and work on a ~1 mm copy, so they cost a few milliseconds whatever the detector.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

_downscaled = threading.local()


@contextmanager
def reuse_downscaled() -> Iterator[None]:
    """Inside this block (in this thread), :func:`breast_mask` and :func:`anatomy` share the
    ~1 mm area-averaged copy of the same image object (the same ``cv2.resize``, done once: ~40
    ms for a 3328 x 4096 image). The caller promises not to change the image in place inside
    the block (the node's per-image preparation; training code, which edits images between
    the calls, does not use it)."""
    _downscaled.entries = {}
    try:
        yield
    finally:
        _downscaled.entries = None


def _area_downscaled(image01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image01, size, interpolation=cv2.INTER_AREA)``, shared inside
    :func:`reuse_downscaled` (read-only then)."""
    entries = getattr(_downscaled, "entries", None)
    if entries is None:
        return cv2.resize(image01, size, interpolation=cv2.INTER_AREA)
    hit = entries.get(size)
    if hit is not None and hit[0]() is image01:
        return hit[1]
    small = cv2.resize(image01, size, interpolation=cv2.INTER_AREA)
    small.flags.writeable = False
    entries.clear()  # one image at a time
    entries[size] = (weakref.ref(image01), small)
    return small


def breast_mask(image01: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Boolean mask of the breast.

    Works on a ~1 mm copy: Otsu threshold of the smoothed image, the largest connected component
    (film labels, markers and scanner edges are separate, smaller blobs), holes filled, then
    eroded by 1.5 mm so that the skin line and the film edge do not produce candidates.
    """
    rows, cols = image01.shape
    step = max(1.0, 1.0 / spacing_mm)  # source pixels per ~1 mm
    small = _area_downscaled(
        image01, (max(8, int(round(cols / step))), max(8, int(round(rows / step)))))
    small = cv2.GaussianBlur(small, (0, 0), 2.0)
    u8 = np.clip(small * 255.0, 0, 255).astype(np.uint8)
    thr, binary = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu on a film splits breast from background; keep a lower cut so the faint skin edge stays.
    low = max(1, int(0.6 * thr))
    binary = (u8 >= low).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.zeros_like(image01, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    comp = (labels == largest).astype(np.uint8)
    # fill holes: flood the background from the border
    inv = 1 - comp
    nb, lb = cv2.connectedComponents(inv, connectivity=4)
    border = set(np.unique(np.concatenate([lb[0], lb[-1], lb[:, 0], lb[:, -1]])).tolist())
    holes = np.isin(lb, [i for i in range(1, nb) if i not in border])
    comp = (comp.astype(bool) | holes).astype(np.uint8)
    erode = max(1, int(round(1.5 / max(spacing_mm * step, 1e-6))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode + 1, 2 * erode + 1))
    comp = cv2.erode(comp, kernel)
    full = cv2.resize(comp, (cols, rows), interpolation=cv2.INTER_NEAREST)
    return full.view(np.bool_)  # 0/1 bytes: the mask without a copy


@dataclass(frozen=True)
class Anatomy:
    """Coarse anatomy of one image, on a grid of ``grid_mm`` (>= the source pixel size).

    ``edge_mm``: distance of every coarse pixel to the breast boundary (0 outside the breast);
    ``pectoral_mm``: signed distance to the pectoral-muscle line, positive inside the muscle,
    ``-inf`` everywhere when no muscle was found (CC views, or none visible);
    ``chest_wall``: "left" or "right" (the side of the image the chest wall is on).
    """

    grid_mm: float
    scale: float  # coarse pixels per source pixel
    edge_mm: np.ndarray
    pectoral_mm: np.ndarray
    chest_wall: str
    pectoral_found: bool

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance to the breast edge, signed pectoral distance) in mm at source coordinates."""
        r = np.clip(np.round(np.asarray(rows) * self.scale).astype(int), 0,
                    self.edge_mm.shape[0] - 1)
        c = np.clip(np.round(np.asarray(cols) * self.scale).astype(int), 0,
                    self.edge_mm.shape[1] - 1)
        return self.edge_mm[r, c], self.pectoral_mm[r, c]


def chest_wall_side(mask_small: np.ndarray) -> str:
    """The side the chest wall is on: the breast is widest there, so its tissue centroid lies
    on that side of the middle of its bounding box."""
    rr, cc = np.nonzero(mask_small)
    if len(cc) == 0:
        return "left"
    mid = (cc.min() + cc.max()) / 2.0
    return "right" if cc.mean() > mid else "left"


def anatomy(image01: np.ndarray, mask: np.ndarray, spacing_mm: float, view: str = "",
            grid_mm: float = 1.0) -> Anatomy:
    """Breast-edge distance and pectoral muscle (MLO or unknown view only) of one image."""
    rows, cols = image01.shape
    grid = max(grid_mm, spacing_mm)
    scale = spacing_mm / grid
    size = (max(8, int(round(cols * scale))), max(8, int(round(rows * scale))))
    small = _area_downscaled(image01, size)
    m8 = mask.view(np.uint8) if mask.dtype == np.bool_ and mask.flags.c_contiguous \
        else mask.astype(np.uint8)  # 0/1, no copy
    msmall = cv2.resize(m8, size, interpolation=cv2.INTER_NEAREST)
    scale = size[0] / cols
    edge = cv2.distanceTransform(msmall, cv2.DIST_L2, 5).astype(np.float32) * grid
    side = chest_wall_side(msmall.astype(bool))
    pect: np.ndarray = np.full(msmall.shape, -np.inf, dtype=np.float32)
    found = False
    if view.upper() not in ("CC", "XCCL", "XCCM", "FB"):
        line = pectoral_line(small, msmall.astype(bool), side)
        if line is not None:
            found = True
            pect = _signed_distance(msmall.shape, line, side) * grid
    return Anatomy(grid, scale, edge, pect, side, found)


def pectoral_line(small: np.ndarray, mask: np.ndarray, side: str
                  ) -> tuple[float, float] | None:
    """The pectoral muscle boundary on an MLO view as ``x = a + b * y`` (coarse pixels, chest
    wall flipped to the left), or None when no plausible muscle is found.

    The muscle is the bright, smooth triangle in the upper chest-wall corner: the upper half of
    the breast is thresholded at Otsu's level of its own intensities, the bright component that
    touches the chest-wall edge of the breast in its top rows is kept, and a line is fitted to its
    outer boundary row by row. It is accepted when the boundary runs from the top towards the
    chest wall (x shrinking with y) and the triangle holds 2-35 % of the breast.
    """
    img = small if side == "left" else small[:, ::-1]
    m = mask if side == "left" else mask[:, ::-1]
    rr = np.nonzero(m.any(axis=1))[0]
    if len(rr) < 20:
        return None
    top, bottom = int(rr[0]), int(rr[-1])
    upper = slice(top, top + max(10, int(0.45 * (bottom - top))))
    sub = cv2.GaussianBlur(img, (0, 0), 2.0)[upper]
    msub = m[upper]
    vals = sub[msub]
    if vals.size < 100:
        return None
    u8 = np.clip(vals * 255, 0, 255).astype(np.uint8).reshape(-1, 1)
    thr, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = ((sub * 255 >= thr) & msub).astype(np.uint8)
    # chest-wall edge of the breast per row: its first mask column; the muscle is the run of
    # bright pixels starting there, in consecutive rows from the top of the breast
    first = np.where(msub.any(axis=1), msub.argmax(axis=1), -1)
    ys: list[int] = []
    xs: list[float] = []
    for y in range(sub.shape[0]):
        x0 = int(first[y])
        if x0 < 0 or not bright[y, x0]:
            if ys or y > 5:
                break
            continue
        row = bright[y, x0:]
        run = int(np.argmin(row)) if not row.all() else len(row)
        ys.append(y + top)
        xs.append(float(x0 + run))
    if len(ys) < 8:
        return None
    ys_a, xs_a = np.asarray(ys, float), np.asarray(xs, float)
    b, a = np.polyfit(ys_a, xs_a, 1)
    resid = np.abs(xs_a - (a + b * ys_a))
    keep = resid <= max(3.0, np.percentile(resid, 70))
    if keep.sum() >= 8:
        b, a = np.polyfit(ys_a[keep], xs_a[keep], 1)
    if b >= -0.05:  # must run towards the chest wall going down
        return None
    yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
    inside = (xx < a + b * yy) & m
    frac = inside.sum() / max(1, m.sum())
    if not 0.02 <= frac <= 0.35:
        return None
    return float(a), float(b)


def _signed_distance(shape: tuple[int, int], line: tuple[float, float], side: str) -> np.ndarray:
    """Distance (coarse px) to the line x = a + b*y, positive on the chest-wall side."""
    a, b = line
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    if side == "right":
        xx = (shape[1] - 1) - xx
    return ((a + b * yy) - xx) / np.float32(np.hypot(1.0, b))
