"""ROI finding in the node: the calcification-cluster detector shared with training.

The detector itself lives in :mod:`models.detector` (multi-scale blob candidates on the prepared
image, shape and context features, a learned false-positive reduction in two boosted-tree
stages, clusters scored in [0, 1]); training and serving run the same code, as they share
:func:`models.roi.crop_roi` for the classifier. This module loads the detector file once and
applies the node's operating point: clusters scoring below it are not reported.

The default detector file is ``models/weights/calc-detector.json``; a model card may name its
own (``detector_file``). Its operating point (the lowest score with at most one false cluster
per normal image on the training data) is the default; ``[analysis] detector_operating_point``
overrides it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import models
from models.detector.clusters import Cluster
from models.detector.model import DetectorModel

DEFAULT_DETECTOR = Path(models.__file__).resolve().parent / "weights" / "calc-detector.json"

__all__ = ["Cluster", "DEFAULT_DETECTOR", "DetectorParams", "find_clusters", "load_detector"]


@dataclass(frozen=True)
class DetectorParams:
    """The node's detector settings: the file (None: the one the model card names, else the
    shipped one) and the operating point (None: the file's)."""

    path: Path | None = None
    min_score: float | None = None


def load_detector(path: Path | str | None = None) -> DetectorModel:
    """The detector in ``path`` (cached per path); RuntimeError with a clear message when it is
    missing or unusable."""
    return _load(str(Path(path or DEFAULT_DETECTOR).resolve()))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> DetectorModel:
    try:
        return DetectorModel.load(Path(path))
    except ValueError as exc:
        raise RuntimeError(f"cannot load the cluster detector: {exc}") from None


def find_clusters(
    image01: np.ndarray,
    mask: np.ndarray,
    spacing_mm: float,
    params: DetectorParams = DetectorParams(),
    *,
    view: str = "",
    detector: DetectorModel | None = None,
) -> list[Cluster]:
    """Scored calcification clusters of one prepared image, strongest first."""
    model = detector or load_detector(params.path)
    return model.detect(image01, mask, spacing_mm, view=view, min_score=params.min_score)
