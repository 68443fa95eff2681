"""The heat map drawn on the display image: ROI Grad-CAM maps pasted at their ROIs, or a
morphology head's evidence painted at its calcifications, then smoothed and kept to the breast.

numpy and OpenCV only (no torch): a node whose card has a morphology head never imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np


def roi_window(n: int) -> np.ndarray:
    """(n, n) weights that fall smoothly from 1 at the centre to 0 at the inscribed circle
    (raised cosine of the radius): a map pasted through it has no square edge."""
    r = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    rad = np.sqrt(r[None, :] ** 2 + r[:, None] ** 2)
    return np.where(rad < 1.0, 0.5 * (1.0 + np.cos(np.pi * np.minimum(rad, 1.0))), 0.0
                    ).astype(np.float32)


def paste_cam(
    canvas: np.ndarray,
    cam: np.ndarray,
    centre_rc: tuple[float, float],
    side_px: float,
    scale: float,
) -> None:
    """Max-composite a ROI's map onto ``canvas`` (display image coordinates), feathered.

    ``centre_rc`` is the ROI centre in source numpy coordinates, ``side_px`` the ROI side in source
    pixels (``roi_size_mm / spacing``), ``scale`` display pixels per source pixel. The map covers
    the same square the classifier saw (``models.roi.crop_roi``), so each CAM cell lands on the
    tissue it describes; it is upsampled bicubically and weighted by :func:`roi_window`, so it
    fades out towards the edge of the ROI instead of ending in a square.
    """
    side = side_px * scale
    n = max(2, int(round(side)))
    up = cv2.resize(cam.astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    up = np.clip(up, 0.0, 1.0) * roi_window(n)
    # corner coordinates of the square in display pixels
    x0 = (centre_rc[1] + 0.5) * scale - side / 2.0
    y0 = (centre_rc[0] + 0.5) * scale - side / 2.0
    c0, r0 = int(round(x0)), int(round(y0))
    rows, cols = canvas.shape
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + n, rows), min(c0 + n, cols)
    if rr1 <= rr0 or cc1 <= cc0:
        return
    patch = up[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    np.maximum(canvas[rr0:rr1, cc0:cc1], patch, out=canvas[rr0:rr1, cc0:cc1])


def paint_evidence(canvas: np.ndarray, points: tuple[tuple[float, float, float], ...],
                   scale: float, sigma_px: float) -> None:
    """Max-composite Gaussian spots at a cluster's calcifications onto ``canvas`` (display
    coordinates): ``points`` are (row, col, P) in source pixels, each spot peaks at its P.

    The map a model with a morphology head shows instead of a Grad-CAM: the evidence its call
    rests on (which specks the detector took for calcifications, and how sure it was)."""
    rows, cols = canvas.shape
    half = int(np.ceil(3 * sigma_px))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    for r, c, p in points:
        cy, cx = (r + 0.5) * scale - 0.5, (c + 0.5) * scale - 0.5
        iy, ix = int(round(cy)), int(round(cx))
        spot = float(p) * np.exp(-((yy + iy - cy) ** 2 + (xx + ix - cx) ** 2)
                                 / (2 * sigma_px * sigma_px))
        r0, c0 = iy - half, ix - half
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r0 + 2 * half + 1, rows), \
            min(c0 + 2 * half + 1, cols)
        if rr1 <= rr0 or cc1 <= cc0:
            continue
        sub = spot[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0]
        np.maximum(canvas[rr0:rr1, cc0:cc1], sub, out=canvas[rr0:rr1, cc0:cc1])


def finish_cam(canvas: np.ndarray, breast: np.ndarray | None, smooth_px: float) -> None:
    """Smooth the composited map and confine it to the breast (in place): overlapping ROIs blend
    into one surface, and nothing is painted on the background or the film labels. The peak
    keeps its value (smoothing would otherwise fade small spots)."""
    if not canvas.any():
        return
    before = float(canvas.max())
    rows, cols = canvas.shape
    # the map is smooth at this scale: blur a copy f times smaller and interpolate back
    f = max(1, int(smooth_px // 2))
    small = (max(1, cols // f), max(1, rows // f))

    def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
        if f == 1:
            return cv2.GaussianBlur(a, (0, 0), sigma)
        s = cv2.resize(a, small, interpolation=cv2.INTER_AREA)
        s = cv2.GaussianBlur(s, (0, 0), sigma / f)
        return cv2.resize(s, (cols, rows), interpolation=cv2.INTER_LINEAR)

    # The smoothed breast mask does not depend on the map: made in a helper thread while this
    # one smooths the map (OpenCV releases the GIL; the same operations, the same values).
    mask: list[np.ndarray] = []
    failed: list[BaseException] = []

    def smooth_mask() -> None:
        assert breast is not None
        try:
            b = breast if breast.shape == (rows, cols) and breast.dtype == np.uint8 else \
                cv2.resize(breast.astype(np.uint8), (cols, rows),
                           interpolation=cv2.INTER_NEAREST)  # same size: resize is a copy
            mask.append(smooth(b.astype(np.float32), max(1.0, smooth_px)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(exc)

    helper = threading.Thread(target=smooth_mask, name="heatmap-mask", daemon=True) \
        if breast is not None else None
    if helper is not None:
        helper.start()
    try:
        if smooth_px > 0:
            canvas[...] = smooth(canvas, smooth_px)
    finally:
        if helper is not None:
            helper.join()
    if failed:
        raise failed[0]
    if mask:
        canvas *= mask[0]
    peak = float(canvas.max())
    if peak > 0:
        canvas *= min(before, 1.0) / peak


def evidence_map(canvas: np.ndarray,
                 clusters: Iterable[tuple[tuple[float, float, float], ...]], scale: float,
                 pixel_spacing_mm: float, breast: np.ndarray | None) -> None:
    """The finished heat map of a morphology head on one image, into ``canvas`` (display
    size, all zero): each cluster's calcifications painted (:func:`paint_evidence`, spots of
    ~0.6 mm), smoothed by ~1 mm and confined to the breast (:func:`finish_cam`). ``clusters``:
    each cluster's ``member_points``. It depends on this image alone (not on the other images
    of the study, nor on the head's probabilities), so it can be made as soon as the image is
    analysed."""
    px_per_mm = scale / pixel_spacing_mm  # display pixels per mm
    for points in clusters:
        paint_evidence(canvas, points, scale, max(1.0, 0.6 * px_per_mm))
    # ~1 mm of smoothing at display scale: one continuous surface over the breast
    finish_cam(canvas, breast, px_per_mm)


@dataclass(frozen=True)
class SparseMap:
    """A heat map kept as the row bands where it is non-zero, each with the columns between
    its first and last non-zero value (exact values; zero elsewhere): what an image's finished
    map costs to keep is a few ROI-sized patches, not a display-sized float canvas.
    ``seconds``: what making the map took."""

    shape: tuple[int, int]
    bands: tuple[tuple[int, int, np.ndarray], ...]  # (top row, left column, values)
    seconds: float = 0.0

    @classmethod
    def of(cls, canvas: np.ndarray, seconds: float = 0.0) -> SparseMap:
        nonzero = canvas != 0
        rows = nonzero.any(axis=1).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], rows, [0]))))
        bands = []
        for y0, y1 in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            cols = np.flatnonzero(nonzero[y0:y1].any(axis=0))
            x0, x1 = int(cols[0]), int(cols[-1]) + 1
            bands.append((y0, x0, canvas[y0:y1, x0:x1].copy()))
        return cls((int(canvas.shape[0]), int(canvas.shape[1])), tuple(bands), seconds)

    def paste(self, canvas: np.ndarray) -> None:
        """Write the map into ``canvas`` (all zero, of :attr:`shape`): the map as it was made."""
        if tuple(canvas.shape) != self.shape:
            raise ValueError(f"canvas {canvas.shape} is not the map's {self.shape}")
        for y0, x0, values in self.bands:
            canvas[y0:y0 + values.shape[0], x0:x0 + values.shape[1]] = values

    def dense(self) -> np.ndarray:
        canvas = np.zeros(self.shape, np.float32)
        self.paste(canvas)
        return canvas
