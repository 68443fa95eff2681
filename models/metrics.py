"""Binary classification metrics and paired tests for the CV report.

Implemented with NumPy so that the definitions are explicit (and checked against scikit-learn in
the tests): positive class = malignant (1).
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U).

    NaN when only one class is present.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks handle ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp)."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return (int((~y & ~p).sum()), int((~y & p).sum()), int((y & ~p).sum()), int((y & p).sum()))


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Support-weighted mean of the per-class F1 (sklearn's ``average='weighted'``)."""
    tn, fp, fn, tp = confusion(y_true, y_pred)
    f1_pos = _div(2 * tp, 2 * tp + fp + fn)
    f1_neg = _div(2 * tn, 2 * tn + fn + fp)
    n_pos, n_neg = tp + fn, tn + fp
    total = 0.0
    for f, n in ((f1_pos, n_pos), (f1_neg, n_neg)):
        if n:
            total += (0.0 if math.isnan(f) else f) * n
    return total / (n_pos + n_neg) if n_pos + n_neg else float("nan")


def binary_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, auc, weighted_f1, sensitivity, specificity, ppv, npv at ``p >= threshold``."""
    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion(y, pred)
    return {
        "accuracy": _div(tp + tn, len(y)),
        "auc": roc_auc(y, p),
        "weighted_f1": weighted_f1(y, pred),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
    }


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-fold scores.

    scipy's exact distribution is used for small n (with 5 folds the smallest attainable p is
    0.0625, so no 5-fold comparison can reach 0.05 — the report says so). Returns 1.0 when all
    differences are zero and NaN when fewer than one non-NaN pair exists.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return float("nan")
    if np.allclose(a, b):
        return 1.0
    return float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def bootstrap_ci(
    y_true: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray,
    metric: str = "auc",
    *,
    n_boot: int = 2000,
    seed: int = 0,
    threshold: float = 0.5,
) -> tuple[float, float]:
    """95 % percentile CI of a pooled metric, resampling patients (clusters) with replacement."""
    rng = np.random.default_rng(seed)
    y, p, g = np.asarray(y_true), np.asarray(p), np.asarray(groups)
    uniq = np.unique(g)
    members = [np.nonzero(g == u)[0] for u in uniq]
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[i] for i in pick])
        v = binary_metrics(y[idx], p[idx], threshold)[metric]
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)
