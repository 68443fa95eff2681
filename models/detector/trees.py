"""Boosted decision trees as plain arrays: exported from scikit-learn, evaluated with NumPy.

The node must load the detector offline, quickly, and without unpickling code, so the trained
``HistGradientBoostingClassifier`` is stored as JSON (per node: feature, threshold, children,
leaf value, where missing values go) and evaluated here. :func:`export_hgb` reads the fitted
model's tree arrays; the research harness checks on every export that :meth:`Forest.decision`
reproduces scikit-learn's ``decision_function`` (tests/test_detector.py does too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Forest:
    """A binary gradient-boosted forest: P = sigmoid(baseline + sum of the trees' leaf values)."""

    features: tuple[str, ...]
    baseline: float
    feature: np.ndarray  # int32 (nodes,) feature index, -1 at leaves
    threshold: np.ndarray  # float64: x <= threshold goes left
    left: np.ndarray  # int32, absolute node index
    right: np.ndarray
    missing_left: np.ndarray  # bool
    value: np.ndarray  # float64 leaf value (0 at inner nodes)
    roots: np.ndarray  # int32 root node of each tree
    depth: int

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Raw score (log-odds) per row of ``x`` (n, len(features)).

        All (row, tree) pairs walk down together, one level per step; a pair that has reached
        its leaf leaves the active set, so each step touches only the pairs still inside a
        tree. The leaves reached, and the sum of their values, are those of the plain
        level-by-level walk (:meth:`decision_reference`, tests/test_detector.py)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"expected (n, {len(self.features)}) features, got {x.shape}")
        n, trees = len(x), len(self.roots)
        if n == 0 or trees == 0:
            return np.full(n, self.baseline)
        inner, feature, child, missing_right = self._walk
        node = np.tile(self.roots.astype(np.intp), n)  # (row, tree) pairs, row-major
        row_start = np.repeat(np.arange(n, dtype=np.intp) * x.shape[1], trees)
        flat = x.ravel()
        has_nan = bool(np.isnan(flat).any())
        active = np.arange(n * trees, dtype=np.intp)
        cur = node
        for _ in range(self.depth):
            still = inner[cur]
            active, cur = active[still], cur[still]
            if len(active) == 0:
                break
            v = flat[row_start[active] + feature[cur]]
            # x <= threshold goes left; a missing value goes where the tree learned to send it
            right = v > self.threshold[cur]
            if has_nan:
                right |= np.isnan(v) & missing_right[cur]
            cur = child[2 * cur + right]
            node[active] = cur
        return self.baseline + self.value[node.reshape(n, trees)].sum(axis=1)

    @functools.cached_property
    def _walk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inner, feature, child, missing_right) for :meth:`decision`: feature 0 at leaves,
        ``child[2 * node + go_right]``, a leaf its own child."""
        inner = self.feature >= 0
        nodes = np.arange(len(self.feature), dtype=np.intp)
        child = np.empty(2 * len(nodes), np.intp)
        child[0::2] = np.where(inner, self.left, nodes)
        child[1::2] = np.where(inner, self.right, nodes)
        return inner, np.where(inner, self.feature, 0).astype(np.intp), child, ~self.missing_left

    def decision_reference(self, x: np.ndarray) -> np.ndarray:
        """:meth:`decision` as a plain walk of every (row, tree) pair for ``depth`` levels."""
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        if n == 0 or len(self.roots) == 0:
            return np.full(n, self.baseline)
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.depth):
            f = self.feature[node]
            inner = f >= 0
            if not inner.any():
                break
            v = x[rows, np.maximum(f, 0)]
            go_left = np.where(np.isnan(v), self.missing_left[node], v <= self.threshold[node])
            node = np.where(inner, np.where(go_left, self.left[node], self.right[node]), node)
        return self.baseline + self.value[node].sum(axis=1)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(x)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "baseline": self.baseline,
            "depth": self.depth,
            "roots": self.roots.tolist(),
            "feature": self.feature.tolist(),
            "threshold": [float(f"{t:.9g}") for t in self.threshold],
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "missing_left": [int(b) for b in self.missing_left],
            "value": [float(f"{v:.9g}") for v in self.value],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forest:
        try:
            forest = cls(
                features=tuple(d["features"]),
                baseline=float(d["baseline"]),
                feature=np.asarray(d["feature"], dtype=np.int32),
                threshold=np.asarray(d["threshold"], dtype=np.float64),
                left=np.asarray(d["left"], dtype=np.int32),
                right=np.asarray(d["right"], dtype=np.int32),
                missing_left=np.asarray(d["missing_left"], dtype=bool),
                value=np.asarray(d["value"], dtype=np.float64),
                roots=np.asarray(d["roots"], dtype=np.int32),
                depth=int(d["depth"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a forest: {exc}") from None
        n = len(forest.feature)
        arrays = (forest.threshold, forest.left, forest.right, forest.missing_left, forest.value)
        if any(len(a) != n for a in arrays):
            raise ValueError("forest arrays differ in length")
        inner = forest.feature >= 0
        if inner.any() and (forest.feature.max() >= len(forest.features)
                            or forest.left[inner].max() >= n or forest.right[inner].max() >= n):
            raise ValueError("forest node indices out of range")
        return forest


def export_hgb(model: Any, features: tuple[str, ...]) -> Forest:
    """A fitted binary ``sklearn.ensemble.HistGradientBoostingClassifier`` as a :class:`Forest`.

    Reads the fitted predictors' node arrays (``value``, ``feature_idx``, ``num_threshold``,
    ``missing_go_to_left``, ``left``, ``right``, ``is_leaf``); numeric features only.
    """
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    missing: list[bool] = []
    value: list[float] = []
    roots: list[int] = []
    depth = 0
    for (predictor,) in model._predictors:  # binary: one tree per iteration
        nodes = predictor.nodes
        base = len(feature)
        roots.append(base)
        leaf = nodes["is_leaf"].astype(bool)
        feature.extend(np.where(leaf, -1, nodes["feature_idx"]).tolist())
        threshold.extend(np.where(leaf, 0.0, nodes["num_threshold"]).tolist())
        left.extend(np.where(leaf, 0, nodes["left"] + base).tolist())
        right.extend(np.where(leaf, 0, nodes["right"] + base).tolist())
        missing.extend(nodes["missing_go_to_left"].astype(bool).tolist())
        value.extend(np.where(leaf, nodes["value"], 0.0).tolist())
        depth = max(depth, int(nodes["depth"].max()))
    baseline = float(np.ravel(model._baseline_prediction)[0])
    return Forest(
        features=tuple(features), baseline=baseline,
        feature=np.asarray(feature, np.int32), threshold=np.asarray(threshold, np.float64),
        left=np.asarray(left, np.int32), right=np.asarray(right, np.int32),
        missing_left=np.asarray(missing, bool), value=np.asarray(value, np.float64),
        roots=np.asarray(roots, np.int32), depth=depth,
    )


def fit_forest(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], *, seed: int = 0,
               max_iter: int = 150, max_leaf_nodes: int = 15, learning_rate: float = 0.08,
               sample_weight: np.ndarray | None = None) -> Forest:
    """Train a HistGradientBoostingClassifier (fixed recipe) and export it; the export is checked
    against scikit-learn's own decision function on the training rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=max_iter, max_leaf_nodes=max_leaf_nodes, learning_rate=learning_rate,
        min_samples_leaf=20, l2_regularization=1.0, early_stopping=False, random_state=seed,
    )
    model.fit(x, y, sample_weight=sample_weight)
    forest = export_hgb(model, features)
    probe = x[:: max(1, len(x) // 2000)]
    if not np.allclose(forest.decision(probe), model.decision_function(probe), atol=1e-6):
        raise RuntimeError("exported forest disagrees with scikit-learn; export needs updating")
    return forest
