"""FROC analysis of a cluster detector: sensitivity against false clusters per normal image.

A ground-truth cluster is detected at threshold t when some reported cluster with score >= t has
its centre within the cluster's radius + ``margin_mm`` (2 mm, as in the node's earlier
evaluation). False clusters are every cluster reported on a normal image. Intervals come from a
bootstrap over patients: the women with clusters and the women with normal images are resampled
with replacement, separately, and the sensitivity at each FP rate recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FP_RATES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MATCH_MARGIN_MM = 2.0


@dataclass(frozen=True)
class Truth:
    image: str
    patient: str
    row: float
    col: float
    radius_mm: float
    label: int = -1  # 1 malignant, 0 benign, -1 unknown


def best_hit_scores(truths: Sequence[Truth], found: dict[str, list[tuple[float, float, float]]],
                    spacing: dict[str, float], margin_mm: float = MATCH_MARGIN_MM) -> np.ndarray:
    """Per truth, the highest score of a reported cluster (row, col, score) that hits it; -inf
    when none does."""
    out = np.full(len(truths), -np.inf)
    for i, t in enumerate(truths):
        sp = spacing[t.image]
        for r, c, s in found.get(t.image, []):
            if np.hypot(r - t.row, c - t.col) * sp <= t.radius_mm + margin_mm and s > out[i]:
                out[i] = s
    return out


def sensitivity_at(best: np.ndarray, fp_scores: np.ndarray, n_normals: int,
                   rates: Sequence[float] = FP_RATES) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, score threshold) at each FP rate: the lowest threshold whose false clusters
    per normal image stay <= the rate."""
    fp = np.sort(np.asarray(fp_scores, dtype=np.float64))[::-1]
    sens, thr = [], []
    for rate in rates:
        k = int(np.floor(rate * n_normals + 1e-9))  # false clusters allowed
        # threshold just above the (k+1)-th highest FP score; every FP below it is excluded
        t = np.nextafter(fp[k], np.inf) if k < len(fp) else -np.inf
        t = max(t, 0.0) if np.isfinite(t) else 0.0
        sens.append(float(np.mean(best >= t)) if len(best) else float("nan"))
        thr.append(float(t))
    return np.asarray(sens), np.asarray(thr)


def froc_curve(best: np.ndarray, fp_scores: np.ndarray, n_normals: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(FP per normal image, sensitivity) at every distinct threshold, for plotting."""
    thr = np.unique(np.concatenate([best[np.isfinite(best)], fp_scores, [np.inf]]))[::-1]
    fpi = np.array([(fp_scores >= t).sum() / n_normals for t in thr])
    sens = np.array([(best >= t).mean() for t in thr])
    return fpi, sens


def bootstrap_froc(truths: Sequence[Truth], best: np.ndarray,
                   normal_fp: dict[str, np.ndarray], normal_patient: dict[str, str],
                   rates: Sequence[float] = FP_RATES, n_boot: int = 2000, seed: int = 0
                   ) -> np.ndarray:
    """(len(rates), 2) 95 % percentile intervals of the sensitivity at each FP rate."""
    rng = np.random.default_rng(seed)
    pos_pat = sorted({t.patient for t in truths})
    pos_idx = {p: [i for i, t in enumerate(truths) if t.patient == p] for p in pos_pat}
    neg_pat = sorted(set(normal_patient.values()))
    neg_imgs = {p: [im for im, q in normal_patient.items() if q == p] for p in neg_pat}
    vals = np.zeros((n_boot, len(rates)))
    for b in range(n_boot):
        pp = rng.choice(len(pos_pat), len(pos_pat))
        idx = np.concatenate([pos_idx[pos_pat[i]] for i in pp]).astype(int)
        nn = rng.choice(len(neg_pat), len(neg_pat))
        imgs = [im for i in nn for im in neg_imgs[neg_pat[i]]]
        fps = np.concatenate([normal_fp[im] for im in imgs]) if imgs else np.zeros(0)
        vals[b], _ = sensitivity_at(best[idx], fps, len(imgs), rates)
    return np.percentile(vals, [2.5, 97.5], axis=0).T
