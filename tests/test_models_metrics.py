"""Metric code checked against scikit-learn / scipy on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from models.metrics import binary_metrics, bootstrap_ci, roc_auc, weighted_f1, wilcoxon_p
from models.train import youden_threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 57)
    y[:2] = [0, 1]
    p = np.round(rng.random(57), 1)  # coarse scores -> many ties
    m = binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))


def test_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, p) == pytest.approx(0.75)
    m = binary_metrics(y, p, 0.5)
    assert (m["sensitivity"], m["specificity"], m["ppv"]) == (0.5, 1.0, 1.0)
    assert math.isnan(roc_auc(np.ones(3), np.arange(3)))
    # all predicted negative: F1 of the positive class is 0 (sklearn's zero_division=0)
    assert weighted_f1(y, np.zeros(4)) == pytest.approx(
        f1_score(y, np.zeros(4), average="weighted", zero_division=0))


def test_wilcoxon_matches_scipy() -> None:
    a = np.array([0.81, 0.75, 0.90, 0.66, 0.72])
    b = np.array([0.70, 0.74, 0.80, 0.60, 0.75])
    assert wilcoxon_p(a, b) == pytest.approx(wilcoxon(a, b).pvalue)
    assert wilcoxon_p(a, a) == 1.0
    # 5 folds all in one direction: the smallest exact two-sided p is 2 / 2**5
    assert wilcoxon_p(a + 0.1 * np.arange(1, 6), a) == pytest.approx(0.0625)


def test_bootstrap_ci_brackets_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(30)].astype(int)
    p = np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1)
    lo, hi = bootstrap_ci(y, p, np.arange(60), "auc", n_boot=300)
    assert lo < roc_auc(y, p) < hi


def test_youden_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert binary_metrics(y, p, t)["accuracy"] == 1.0
