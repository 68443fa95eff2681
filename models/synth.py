"""Synthetic calcification ROIs: the intermediate domain of double transfer learning.

ImageNet -> synthetic calcifications -> real ROIs. The synthetic task teaches the morphology cues
that radiologists use (BI-RADS descriptors) on mammogram-like texture, without touching the real
target data (so no leakage across cross-validation folds):

* benign: round/punctate and smooth, scattered over a wide area; or a few coarse
  ("popcorn"-like) calcifications; or eggshell/rim calcifications;
* malignant: fine pleomorphic (small, irregular, varied shapes and sizes) or fine
  linear-branching (casting) calcifications, tightly clustered.

Background: anatomical-noise texture with a power-law spectrum 1/f^beta, beta ~ 3 (the measured
exponent of mammographic parenchyma), plus a smooth density gradient. Calcifications are drawn at
0.05 mm, blurred (detector/film MTF), area-averaged to ``spacing_mm`` and added with random
contrast. Images are then cut with :func:`models.roi.crop_roi` like every other ROI.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from models.roi import crop_roi

FINE_MM = 0.05  # drawing resolution


def background(size_px: int, rng: np.random.Generator, beta: float | None = None) -> np.ndarray:
    """Power-law ("anatomical noise") texture in [0, 1], mean ~0.4-0.75."""
    beta = float(rng.uniform(2.6, 3.4)) if beta is None else beta
    fy = np.fft.fftfreq(size_px)[:, None]
    fx = np.fft.rfftfreq(size_px)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, amp.shape)
    tex = np.fft.irfft2(amp * np.exp(1j * phase), s=(size_px, size_px))
    tex = (tex - tex.mean()) / (tex.std() + 1e-8)
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) * rng.uniform(0, 0.2)
    img = rng.uniform(0.4, 0.75) + rng.uniform(0.05, 0.12) * tex + grad
    # fibro-glandular strands / vessels: long faint curvilinear structures, mostly one direction
    strands: np.ndarray = np.zeros((size_px, size_px), np.float32)
    main = rng.uniform(0, np.pi)
    for _ in range(int(rng.integers(5, 20))):
        a = main + rng.normal(0, 0.35)
        p = rng.uniform(0, size_px, 2)
        d = np.array([np.cos(a), np.sin(a)]) * size_px
        cv2.line(strands, (int(p[0] - d[0]), int(p[1] - d[1])), (int(p[0] + d[0]),
                 int(p[1] + d[1])), float(rng.uniform(0.3, 1.0)),
                 int(rng.integers(1, max(2, size_px // 60))), lineType=cv2.LINE_AA)
    strands = cv2.GaussianBlur(strands, (0, 0), max(1.0, size_px / 300))
    img = img + rng.uniform(0.02, 0.08) * strands
    return np.clip(img, 0, 1).astype(np.float32)


def _disc(canvas: np.ndarray, c: tuple[float, float], r: float, v: float = 1.0) -> None:
    cv2.circle(canvas, (int(round(c[1] * 4)), int(round(c[0] * 4))), max(1, int(round(r * 4))),
               v, -1, lineType=cv2.LINE_AA, shift=2)


def _irregular(canvas: np.ndarray, c: tuple[float, float], r: float,
               rng: np.random.Generator) -> None:
    """A jagged polygon (pleomorphic calcification) of mean radius ``r`` px."""
    k = int(rng.integers(4, 8))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.4, 1.4, k)
    stretch = rng.uniform(1.0, 2.5)
    rot = rng.uniform(0, np.pi)
    x = rad * np.cos(ang) * stretch
    y = rad * np.sin(ang)
    xr = x * np.cos(rot) - y * np.sin(rot) + c[1]
    yr = x * np.sin(rot) + y * np.cos(rot) + c[0]
    pts = np.round(np.stack([xr, yr], 1) * 4).astype(np.int32)
    cv2.fillPoly(canvas, [pts], float(rng.uniform(0.6, 1.0)), lineType=cv2.LINE_AA, shift=2)


def _draw_benign(canvas: np.ndarray, rng: np.random.Generator, px_per_mm: float) -> str:
    n_px = canvas.shape[0]
    ctr = np.array([n_px / 2, n_px / 2])
    kind = str(rng.choice(["round-scattered", "punctate-diffuse", "coarse", "rim"]))
    if kind == "round-scattered":
        for _ in range(int(rng.integers(3, 10))):
            p = ctr + rng.normal(0, 6.0 * px_per_mm, 2)
            _disc(canvas, tuple(p), rng.uniform(0.3, 1.0) * px_per_mm, rng.uniform(0.7, 1.0))
    elif kind == "punctate-diffuse":
        for _ in range(int(rng.integers(5, 15))):
            p = ctr + rng.uniform(-12, 12, 2) * px_per_mm
            _disc(canvas, tuple(p), rng.uniform(0.2, 0.35) * px_per_mm, rng.uniform(0.6, 0.9))
    elif kind == "coarse":
        for _ in range(int(rng.integers(1, 4))):
            p = ctr + rng.normal(0, 4.0 * px_per_mm, 2)
            for _ in range(int(rng.integers(3, 7))):  # popcorn: clumped discs
                q = p + rng.normal(0, 0.6 * px_per_mm, 2)
                _disc(canvas, tuple(q), rng.uniform(0.5, 1.2) * px_per_mm, 1.0)
    else:
        for _ in range(int(rng.integers(1, 4))):
            p = ctr + rng.normal(0, 5.0 * px_per_mm, 2)
            r = rng.uniform(1.0, 2.5) * px_per_mm
            cv2.circle(canvas, (int(p[1] * 4), int(p[0] * 4)), int(r * 4), 1.0,
                       max(1, int(0.25 * px_per_mm)), lineType=cv2.LINE_AA, shift=2)
    return kind


def _draw_malignant(canvas: np.ndarray, rng: np.random.Generator, px_per_mm: float) -> str:
    n_px = canvas.shape[0]
    ctr = np.array([n_px / 2, n_px / 2]) + rng.normal(0, 1.5 * px_per_mm, 2)
    spread = rng.uniform(1.5, 4.0) * px_per_mm  # tight: a cluster of ~5-15 mm
    kind = str(rng.choice(["fine-pleomorphic", "fine-linear-branching"]))
    if kind == "fine-pleomorphic":
        for _ in range(int(rng.integers(8, 35))):
            p = ctr + rng.normal(0, spread, 2)
            _irregular(canvas, tuple(p), rng.uniform(0.12, 0.4) * px_per_mm, rng)
    else:
        for _ in range(int(rng.integers(2, 5))):  # branching ducts filled with casts
            p = ctr + rng.normal(0, spread / 2, 2)
            ang = rng.uniform(0, 2 * np.pi)
            stack = [(p, ang, 0)]
            while stack:
                p0, a0, depth = stack.pop()
                length = rng.uniform(1.5, 4.0) * px_per_mm
                t = np.linspace(0, 1, int(rng.integers(3, 7)))
                for t0, t1 in zip(t[:-1], t[1:], strict=True):  # dashed: fragmented casts
                    if rng.random() < 0.8:
                        a = p0 + t0 * length * np.array([math.sin(a0), math.cos(a0)])
                        b = p0 + (t0 + 0.8 * (t1 - t0)) * length * np.array(
                            [math.sin(a0), math.cos(a0)])
                        w = max(1, int(round(rng.uniform(0.1, 0.3) * px_per_mm)))
                        cv2.line(canvas, (int(a[1] * 4), int(a[0] * 4)),
                                 (int(b[1] * 4), int(b[0] * 4)), float(rng.uniform(0.6, 1.0)),
                                 w, lineType=cv2.LINE_AA, shift=2)
                end = p0 + length * np.array([math.sin(a0), math.cos(a0)])
                if depth < 2:
                    for _ in range(int(rng.integers(1, 3))):
                        stack.append((end, a0 + rng.uniform(-0.8, 0.8), depth + 1))
        for _ in range(int(rng.integers(0, 8))):  # a few pleomorphic specks around the casts
            _irregular(canvas, tuple(ctr + rng.normal(0, spread, 2)),
                       rng.uniform(0.08, 0.2) * px_per_mm, rng)
    return kind


def synth_image(
    label: int, rng: np.random.Generator, *, size_mm: float = 48.0, spacing_mm: float = 0.1
) -> tuple[np.ndarray, str]:
    """One synthetic ROI (``size_mm`` square at ``spacing_mm``), label 0 benign / 1 malignant.

    Returns (image in [0, 1], morphology name).
    """
    n_fine = int(round(size_mm / FINE_MM))
    px_per_mm = 1.0 / FINE_MM
    calc: np.ndarray = np.zeros((n_fine, n_fine), np.float32)
    kind = (_draw_malignant if label else _draw_benign)(calc, rng, px_per_mm)
    calc = cv2.GaussianBlur(calc, (0, 0), rng.uniform(0.06, 0.12) * px_per_mm)
    n_out = int(round(size_mm / spacing_mm))
    calc = cv2.resize(calc, (n_out, n_out), interpolation=cv2.INTER_AREA)
    img = background(n_out, rng)
    contrast = rng.uniform(0.12, 0.35)
    img = img + contrast * np.clip(calc * 1.5, 0, 1)
    img = img + rng.normal(0, rng.uniform(0.005, 0.02), img.shape)  # quantum/film noise
    return np.clip(img, 0, 1).astype(np.float32), kind


def synthetic_crops(
    n: int, *, roi_size_mm: float, input_size: int, seed: int, spacing_mm: float = 0.1
) -> tuple[list[np.ndarray], list[int]]:
    """``n`` balanced synthetic crops already cut by ``crop_roi`` (for in-memory pre-training)."""
    rng = np.random.default_rng(seed)
    size_mm = roi_size_mm + 4.0
    crops, labels = [], []
    for i in range(n):
        label = i % 2
        img, _ = synth_image(label, rng, size_mm=size_mm, spacing_mm=spacing_mm)
        c = (img.shape[0] - 1) / 2.0
        crops.append(crop_roi(img, (c, c), spacing_mm, roi_size_mm, input_size))
        labels.append(label)
    return crops, labels


def write_synthetic(
    out_dir: Path, n: int, *, seed: int = 0, size_mm: float = 48.0, spacing_mm: float = 0.1
) -> Path:
    """Write ``n`` synthetic ROIs (16-bit PNG) + ``rois.csv`` in the dataset format."""
    from models.data import write_csv

    out_dir = Path(out_dir)
    (out_dir / "png").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        label = i % 2
        img, kind = synth_image(label, rng, size_mm=size_mm, spacing_mm=spacing_mm)
        rel = f"png/synth_{i:05d}.png"
        cv2.imwrite(str(out_dir / rel), np.round(img * 65535).astype(np.uint16))
        rows.append({"path": rel, "label": "malignant" if label else "benign",
                     "patient_id": f"SYN{i:05d}", "pixel_spacing_mm": spacing_mm,
                     "source": f"synthetic {kind}"})
    csv_path = out_dir / "rois.csv"
    write_csv(csv_path, rows)
    return csv_path
