"""The detector file (``calc-detector.json``) and the whole detection of one image.

``detect()``: candidates (:mod:`~models.detector.candidates`) -> first-stage forest P(speck is
a calcification) -> candidates at or above ``keep_threshold`` grouped into clusters
(:mod:`~models.detector.clusters`) -> second-stage forest: the cluster score in [0, 1], the
probability, under the synthetic training distribution, that the group is a calcification
cluster -> a weaker cluster within ``merge_mm`` of a stronger one is dropped (one mark per
region). Clusters below ``min_score`` are dropped; the rest come back strongest first.

The file holds the two forests, the parameters, the default operating point and the measured
FROC (so a node reading it can say what the operating point means), plus the SHA-256 of its
own content (``content_sha256``) which :meth:`DetectorModel.load` checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.detector.candidates import CANDIDATE_FEATURES, CandidateParams, find_candidates
from models.detector.clusters import (
    CLUSTER_FEATURES,
    Cluster,
    ClusterParams,
    build_clusters,
    suppress_neighbours,
)
from models.detector.trees import Forest

DETECTOR_FORMAT = 1


@dataclass
class DetectorModel:
    name: str
    version: str
    candidate_forest: Forest
    cluster_forest: Forest
    keep_threshold: float  # first-stage P at or above which a candidate joins clusters
    operating_point: float  # default second-stage score threshold (the card's)
    candidate_params: CandidateParams = field(default_factory=CandidateParams)
    cluster_params: ClusterParams = field(default_factory=ClusterParams)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def detect(self, image01: np.ndarray, mask: np.ndarray, spacing_mm: float, *,
               view: str = "", min_score: float | None = None) -> list[Cluster]:
        """Scored clusters of one prepared image, strongest first (ties: by position).

        ``min_score`` None uses the operating point; 0 returns every cluster (FROC sweeps).
        """
        cands = find_candidates(image01, mask, spacing_mm, self.candidate_params, view=view)
        if len(cands) == 0:
            return []
        p = self.candidate_forest.predict_proba(cands.features)
        clusters = build_clusters(cands, p, p >= self.keep_threshold, spacing_mm,
                                  self.cluster_params, image_shape=image01.shape)
        if not clusters:
            return []
        scores = self.cluster_forest.predict_proba(np.array([c.features for c in clusters]))
        keep = suppress_neighbours(np.array([c.centre_rc for c in clusters]), scores,
                                   spacing_mm, self.cluster_params.merge_mm)
        floor = self.operating_point if min_score is None else float(min_score)
        return [replace(clusters[i], score=float(scores[i])) for i in keep
                if scores[i] >= floor]

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector_format": DETECTOR_FORMAT,
            "name": self.name,
            "version": self.version,
            "keep_threshold": self.keep_threshold,
            "operating_point": self.operating_point,
            "candidate_params": asdict(self.candidate_params),
            "cluster_params": asdict(self.cluster_params),
            "metrics": self.metrics,
            "training": self.training,
            "candidate_forest": self.candidate_forest.to_dict(),
            "cluster_forest": self.cluster_forest.to_dict(),
        }

    def save(self, path: Path) -> None:
        body = self.to_dict()
        body["content_sha256"] = _digest(body)
        Path(path).write_text(json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n",
                              encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str) -> DetectorModel:
        """Read and check a detector file; ValueError naming the file and the problem."""
        path = Path(path)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"detector file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"detector file {path} is not valid JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("detector_format") != DETECTOR_FORMAT:
            raise ValueError(f"detector file {path}: detector_format must be {DETECTOR_FORMAT}")
        digest = body.pop("content_sha256", None)
        if digest != _digest(body):
            raise ValueError(f"detector file {path} is damaged (content_sha256 does not match)")
        try:
            model = cls(
                name=str(body["name"]), version=str(body["version"]),
                candidate_forest=Forest.from_dict(body["candidate_forest"]),
                cluster_forest=Forest.from_dict(body["cluster_forest"]),
                keep_threshold=float(body["keep_threshold"]),
                operating_point=float(body["operating_point"]),
                candidate_params=CandidateParams(**body["candidate_params"]),
                cluster_params=ClusterParams(**body["cluster_params"]),
                metrics=dict(body.get("metrics", {})), training=dict(body.get("training", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"detector file {path}: {exc}") from None
        if model.candidate_forest.features != CANDIDATE_FEATURES:
            raise ValueError(f"detector file {path} was trained on other candidate features")
        if model.cluster_forest.features != CLUSTER_FEATURES:
            raise ValueError(f"detector file {path} was trained on other cluster features")
        if not (0.0 <= model.operating_point <= 1.0 and 0.0 <= model.keep_threshold <= 1.0):
            raise ValueError(f"detector file {path}: thresholds must lie in [0, 1]")
        problem = fingerprint_problem(model.training.get("feature_fingerprint"))
        if problem:
            raise ValueError(f"detector file {path}: {problem}")
        return model


def _fingerprint_image(spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed synthetic test image (flat noise, specks of three sizes, a line) at 0.2 or
    0.1 mm; deterministic."""
    rng = np.random.default_rng(12345)
    n = int(round(60.0 / spacing_mm))
    img = (0.5 + rng.normal(0, 0.01, (n, n))).astype(np.float32)
    f = 0.2 / spacing_mm
    for k, (r, c, size) in enumerate([(60, 60, 1), (60, 150, 2), (150, 60, 3), (200, 200, 2),
                                      (205, 206, 1), (198, 210, 2)]):
        r0, c0, sz = int(r * f), int(c * f), max(1, int(size * f))
        img[r0:r0 + sz, c0:c0 + sz] += 0.05 + 0.03 * k
    img[int(240 * f):int(242 * f), int(30 * f):int(270 * f)] += 0.1
    mask = np.zeros((n, n), bool)
    mask[10:-10, 10:-10] = True
    return np.clip(img, 0, 1), mask


def feature_fingerprint() -> dict[str, Any]:
    """The candidate features of the fixed test image at 0.2 and 0.1 mm: stored in the detector
    file at training and compared at load, so a detector is never served with feature code
    other than the one it was trained with."""
    out: dict[str, Any] = {}
    for sp in (0.2, 0.1):
        img, mask = _fingerprint_image(sp)
        c = find_candidates(img, mask, sp)
        out[str(sp)] = np.round(c.features[:12].astype(np.float64), 5).tolist()
    return out


def fingerprint_problem(stored: dict[str, Any] | None) -> str | None:
    """None when ``stored`` matches the running feature code (to float tolerance)."""
    if not stored:
        return None
    now = feature_fingerprint()
    for key, rows in stored.items():
        a, b = np.asarray(rows, dtype=np.float64), np.asarray(now.get(key, []), dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=2e-3, atol=2e-4):
            return (f"it was trained with other candidate features than this code computes (test "
                    f"image at {key} mm); retrain it with `python -m models detector`")
    return None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), sort_keys=True)
                          .encode()).hexdigest()
