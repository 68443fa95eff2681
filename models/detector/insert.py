"""Synthetic calcification clusters inserted into real normal mammograms (detector training data).

The detector is trained without the real clusters: each training image is a real normal
mini-MIAS breast with synthetic clusters added, so the negatives are real tissue, film grain,
vessels and artefacts and only the positives are simulated. A cluster is drawn
(:func:`_draw_cluster`: 3-30 specks of 0.15-0.8 mm, round, oval, pleomorphic or rod-like,
scattered or along short branching lines) on a canvas four times finer than the target pixel,
blurred by the imaging MTF, area-averaged to the target pixel (the detector element or
film-scanner aperture) and added to the background:

    I' = I + a * m * (1 - I / 2)

with ``m`` the rendered calcium map in [0, 1] and ``a`` the cluster's peak contrast (log-uniform;
a little lower in dense tissue, as on film). Two acquisition models:

* ``film`` at 0.2 mm: MTF sigma 0.04-0.09 mm, 8-bit quantisation (mini-MIAS itself);
* ``digital`` at 0.07-0.1 mm: the normal image is resampled to the finer grid (bicubic), white
  detector noise is added (SD 0.002-0.008), MTF sigma 0.03-0.06 mm, 12-bit quantisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from models import synth


@dataclass(frozen=True)
class InsertedCluster:
    centre_rc: tuple[float, float]  # target-image numpy coordinates
    radius_mm: float  # radius holding the drawn calcium
    kind: str  # morphology name from models.synth
    label: int  # 0 benign-like, 1 malignant-like
    contrast: float


@dataclass
class SyntheticImage:
    image01: np.ndarray
    spacing_mm: float
    delta: np.ndarray  # the added calcium signal (same shape), for labelling candidates
    clusters: list[InsertedCluster]
    acquisition: str


CANVAS_MM = 36.0


def _draw_cluster(canvas: np.ndarray, rng: np.random.Generator, px_per_mm: float
                  ) -> tuple[str, int]:
    """A microcalcification cluster on ``canvas`` (drawn at ``px_per_mm``); (kind, label).

    Specks of 0.15-0.8 mm (a cluster-wide median, jittered per speck), round, oval, irregular
    (pleomorphic) or rod-like (casts); 3-30 of them, scattered (Gaussian, SD 1-5 mm) or along
    one to three short branching lines. "Malignant-like" are the pleomorphic, rod-rich or linear
    arrangements, "benign-like" the round, regular scattered ones (a weak label: the detector
    does not use it).
    """
    n_px = canvas.shape[0]
    ctr = np.array([n_px / 2.0, n_px / 2.0])
    n = int(round(math.exp(rng.uniform(math.log(3), math.log(30)))))
    size_mm = math.exp(rng.uniform(math.log(0.15), math.log(0.6)))
    linear = rng.random() < 0.25
    shapes = rng.dirichlet(np.ones(4))  # round, oval, irregular, rod
    if linear:
        points: list[np.ndarray] = []
        for _ in range(int(rng.integers(1, 4))):
            p0 = ctr + rng.normal(0, 1.5 * px_per_mm, 2)
            ang = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(3, 12) * px_per_mm
            for t in rng.uniform(0, 1, max(2, n // 2)):
                points.append(p0 + t * length * np.array([math.sin(ang), math.cos(ang)])
                           + rng.normal(0, 0.3 * px_per_mm, 2))
        pts = np.array(points[:max(n, 3)])
    else:
        pts = ctr + rng.normal(0, rng.uniform(1.0, 5.0) * px_per_mm, (n, 2))
    for p in pts:
        d = size_mm * rng.uniform(0.5, 1.5) * px_per_mm
        v = float(rng.uniform(0.5, 1.0))
        shape = int(rng.choice(4, p=shapes))
        centre = (int(round(p[1] * 4)), int(round(p[0] * 4)))
        if shape == 0:
            cv2.circle(canvas, centre, max(1, int(round(d * 2))), v, -1, cv2.LINE_AA, 2)
        elif shape == 1:
            axes = (max(1, int(round(d * 2))), max(1, int(round(d * 2 / rng.uniform(1.2, 2.5)))))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, v, -1,
                        cv2.LINE_AA, 2)
        elif shape == 2:
            synth._irregular(canvas, (float(p[0]), float(p[1])), d / 2.0, rng)
        else:
            ang = rng.uniform(0, math.pi)
            half = d * rng.uniform(1.0, 2.5)
            dx, dy = half * math.cos(ang), half * math.sin(ang)
            cv2.line(canvas, (int((p[1] - dx) * 4), int((p[0] - dy) * 4)),
                     (int((p[1] + dx) * 4), int((p[0] + dy) * 4)), v,
                     max(1, int(round(d * 0.5))), cv2.LINE_AA, 2)
    irregular = shapes[2] + shapes[3]
    label = int(linear or irregular > 0.6)
    kind = ("linear" if linear else "scattered") + f"-{'irregular' if irregular > 0.5 else 'round'}"
    return kind, label


def _render(rng: np.random.Generator, spacing_mm: float, mtf_mm: float
            ) -> tuple[np.ndarray, str, int]:
    """One cluster's calcium map on a CANVAS_MM square at ``spacing_mm`` (values in [0, 1])."""
    fine = spacing_mm / 4.0
    n_fine = int(round(CANVAS_MM / fine))
    canvas: np.ndarray = np.zeros((n_fine, n_fine), np.float32)
    kind, label = _draw_cluster(canvas, rng, 1.0 / fine)
    canvas = cv2.GaussianBlur(canvas, (0, 0), mtf_mm / fine)
    n_out = n_fine // 4
    return cv2.resize(canvas, (n_out, n_out), interpolation=cv2.INTER_AREA), kind, label


def _place(mask: np.ndarray, spacing_mm: float, taken: list[tuple[float, float]],
           rng: np.random.Generator, margin_mm: float = 6.0, apart_mm: float = 30.0
           ) -> tuple[int, int] | None:
    step = max(1, int(round(2.0 / spacing_mm)))
    small: np.ndarray = mask[::step, ::step].astype(np.uint8)
    k = max(1, int(round(margin_mm / (spacing_mm * step))))
    small = cv2.erode(small, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    rr, cc = np.nonzero(small)
    if len(rr) == 0:
        return None
    for _ in range(50):
        i = int(rng.integers(len(rr)))
        r, c = int(rr[i]) * step, int(cc[i]) * step
        if all(math.hypot(r - a, c - b) * spacing_mm >= apart_mm for a, b in taken):
            return r, c
    return None


def to_digital(image01: np.ndarray, spacing_mm: float, target_mm: float,
               rng: np.random.Generator) -> np.ndarray:
    """A film image resampled to a finer digital grid with white detector noise added."""
    rows, cols = image01.shape
    f = spacing_mm / target_mm
    size = (int(round(cols * f)), int(round(rows * f)))
    out: np.ndarray = cv2.resize(image01, size, interpolation=cv2.INTER_CUBIC)
    out += rng.normal(0.0, rng.uniform(0.002, 0.008), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def insert_clusters(
    image01: np.ndarray,
    mask: np.ndarray,
    spacing_mm: float,
    rng: np.random.Generator,
    *,
    n_clusters: int = 3,
    acquisition: str = "film",
    digital_mm: float | None = None,
) -> SyntheticImage:
    """``image01`` (a normal image at ``spacing_mm``) with ``n_clusters`` synthetic clusters.

    ``acquisition`` "film" keeps the grid; "digital" resamples to ``digital_mm`` (default: 0.1 or
    0.07 mm at random) first. ``mask`` is the breast mask at the source grid.
    """
    if acquisition == "digital":
        target = digital_mm or float(rng.choice([0.1, 0.1, 0.07]))
        img = to_digital(image01, spacing_mm, target, rng)
        mask = cv2.resize(mask.astype(np.uint8), img.shape[::-1],
                          interpolation=cv2.INTER_NEAREST).astype(bool)
        mtf = (0.03, 0.06)
        levels = 4095.0
    elif acquisition == "film":
        target, img, mtf, levels = spacing_mm, image01.astype(np.float32).copy(), (0.04, 0.09), \
            255.0
    else:
        raise ValueError(f"acquisition must be 'film' or 'digital', not {acquisition!r}")
    delta = np.zeros_like(img)
    clusters: list[InsertedCluster] = []
    taken: list[tuple[float, float]] = []
    for _ in range(n_clusters):
        at = _place(mask, target, taken, rng)
        if at is None:
            break
        calc, kind, label = _render(rng, target, float(rng.uniform(*mtf)))
        a = float(math.exp(rng.uniform(math.log(0.03), math.log(0.3))))
        peak = float(calc.max())
        if peak <= 0:
            continue
        m = np.clip(calc / max(peak, 0.25), 0.0, 1.0)  # small specks stay faint after the MTF
        half = m.shape[0] // 2
        r0, c0 = at[0] - half, at[1] - half
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + m.shape[0], img.shape[0]), min(c0 + m.shape[1], img.shape[1])
        patch = m[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] * mask[rr0:rr1, cc0:cc1]
        base = img[rr0:rr1, cc0:cc1]
        add = a * patch * (1.0 - 0.5 * base)
        img[rr0:rr1, cc0:cc1] = base + add
        delta[rr0:rr1, cc0:cc1] += add
        ys, xs = np.nonzero(patch > 0.05)
        if len(ys) == 0:
            continue
        ys, xs = ys + rr0, xs + cc0
        centre = (float(ys.mean()), float(xs.mean()))
        radius = float(np.max(np.hypot(ys - centre[0], xs - centre[1]))) * target
        clusters.append(InsertedCluster(centre, radius, kind, label, a))
        taken.append(at)
    img = np.round(np.clip(img, 0.0, 1.0) * levels) / levels
    return SyntheticImage(img.astype(np.float32), target, delta, clusters, acquisition)
