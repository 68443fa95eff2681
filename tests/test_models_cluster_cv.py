"""Pieces of the benign/malignant CV (models/cluster_cv.py): heads, calibration, reliability."""

from __future__ import annotations

import numpy as np
import pytest

from models.cluster_cv import LinearHead, calibration_report, platt, reliability, sigmoid


@pytest.mark.parametrize("pca", [None, 3])
def test_linear_head_folds_into_one_affine_map(pca: int | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)) * rng.uniform(0.1, 10, 12) + rng.normal(size=12)
    y = (x[:, 0] / 3 + rng.normal(size=60) > 0).astype(int)
    h = LinearHead(pca, c=1.0, seed=0).fit(x, y)
    z = (x - h.mu) / h.sd
    if h.pca is not None:
        z = h.pca.transform(z)
    np.testing.assert_allclose(h.raw(x), h.lr.decision_function(z), atol=1e-8)
    w, b = h.affine()
    np.testing.assert_allclose(x @ w + b, h.raw(x), atol=1e-8)


def test_reliability_and_platt() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # perfectly calibrated
    rows, ece = reliability(p, y, bins=5)
    assert ece < 0.02 and sum(r["n"] for r in rows) == p.size
    logit = 3.0 * np.log(p / (1 - p)) + 1.0  # over-confident and shifted scores
    a, b = platt(logit, y)
    assert a == pytest.approx(1 / 3, rel=0.1) and b == pytest.approx(-1 / 3, abs=0.1)
    rep = calibration_report(logit[:300], y[:300], np.arange(300) // 3)
    assert rep["ece_calibrated_lowo"] < rep["ece_uncalibrated"]
    assert 0 <= rep["brier_calibrated_lowo"] <= 1 and len(rep["calibrated_lowo"]) == 300
    np.testing.assert_allclose(sigmoid(np.array([0.0])), [0.5])
