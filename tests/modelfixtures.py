"""Second models for the lifecycle tests: the shipped CNN with its malignant logit shifted (so
its probabilities, hence its calls, really differ) under another name/version.

The shipped card serves a morphology head (its classification evidence, models.card); a variant
drops that evidence, so the node runs the card's CNN (head "cnn", not validated for a call), and
keeps the shipped detector file beside it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from models.card import ModelCard, sha256_of
from tests.netutil import REPO

SHIPPED_CARD = REPO / "models/weights/calc-cluster-lite0.json"


def variant_card(out_dir: Path, name: str = "calc-cluster-lite0-shift", version: str = "0.2.0",
                 *, logit_shift: float = 1.5, threshold: float | None = None,
                 **changes: object) -> Path:
    """Write ``out_dir/<name>-<version>.json`` + weights; returns the card path.

    ``logit_shift`` is added to the malignant logit (0: the shipped weights unchanged);
    ``changes`` replace other card fields (e.g. ``intended_use=""`` for a refused card).
    """
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    card = ModelCard.load(SHIPPED_CARD)
    state = load_file(str(card.weights_path(SHIPPED_CARD)))
    if logit_shift:
        bias = state["classifier.bias"].clone()
        bias[1] += logit_shift
        state["classifier.bias"] = bias
    weights = out_dir / f"{name}-{version}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    detector = card.detector_path(SHIPPED_CARD)
    if detector is not None:
        shutil.copyfile(detector, out_dir / detector.name)
    new = dataclasses.replace(card, name=name, version=version, weights_file=weights.name,
                              weights_sha256=sha256_of(weights),
                              threshold=card.threshold if threshold is None else threshold,
                              classification={}, **changes)
    path = out_dir / f"{name}-{version}.json"
    new.save(path)
    return path
