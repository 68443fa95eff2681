"""The contract a model card + weights must meet before the node may serve them.

``python -m models verify-card CARD.json`` runs it here; ``mammo-node model install CARD``
(node/modelstore.py) runs the same :func:`verify_card` and refuses the model on any problem.
Checks (models/README.md, "Installing a model"):

1. the card parses (:meth:`models.card.ModelCard.load`: known keys, required keys, format,
   threshold in (0, 1), sane sizes);
2. the weights file exists next to the card and its SHA-256 equals ``weights_sha256``;
3. ``architecture`` is a timm model; ``num_classes`` 2, ``in_chans`` and ``mean``/``std``
   agree; ``input_size`` >= 32 and ``roi_size_mm`` > 0;
4. ``data_licence`` and ``intended_use`` are present (a model is derived from its data and
   carries its licence);
5. the weights load strictly into ``timm.create_model(architecture, num_classes, in_chans)``
   and a forward pass of one ``input_size`` ROI gives finite logits;
6. the model was trained on cluster/lesion ROIs (``training.data.roi_kinds``): a model of
   whole-breast or candidate ROIs is not the node's cluster classifier.

Warnings (reported, not refusing): no cross-validated metrics (``metrics`` empty), no
``measured_with`` command.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from models.card import ModelCard, sha256_of

SERVABLE_ROI_KINDS = {"cluster", "lesion"}


@dataclass
class Verification:
    card_path: Path
    card: ModelCard | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = (f"{self.card_path}: OK" if self.ok
                else f"{self.card_path}: REFUSED ({len(self.problems)} problem(s))")
        if self.card is not None:
            c = self.card
            head += (f" — {c.name} {c.version}, {c.architecture}, {c.input_size} px over "
                     f"{c.roi_size_mm:g} mm, threshold {c.threshold:.4f}")
        return "\n".join([head] + [f"  problem: {p}" for p in self.problems]
                         + [f"  warning: {w}" for w in self.warnings])


def verify_card(card_path: Path, *, load: bool = True) -> Verification:
    """Check a card and its weights against the node's contract (module docstring)."""
    v = Verification(Path(card_path))
    try:
        card = ModelCard.load(v.card_path)
    except ValueError as exc:
        v.problems.append(str(exc))
        return v
    v.card = card
    weights = card.weights_path(v.card_path)
    if not weights.is_file():
        v.problems.append(f"weights file {card.weights_file} not found next to the card")
    elif not card.weights_sha256:
        v.problems.append("weights_sha256 is empty: the weights cannot be verified")
    elif sha256_of(weights) != card.weights_sha256:
        v.problems.append(f"{card.weights_file} does not match the card's weights_sha256")
    detector_path = card.detector_path(v.card_path)
    if detector_path is not None:  # the cluster detector the card was evaluated with
        from models.detector.model import DetectorModel

        try:
            DetectorModel.load(detector_path)
        except ValueError as exc:
            v.problems.append(f"detector: {exc}")
    import timm

    if not timm.is_model(card.architecture):
        v.problems.append(f"architecture {card.architecture!r} is not a timm model")
    if card.num_classes != 2:
        v.problems.append(f"num_classes {card.num_classes}: the node reads [benign, malignant]")
    if len(card.mean) != card.in_chans or len(card.std) != card.in_chans:
        v.problems.append("mean/std do not have in_chans values")
    if any(s <= 0 for s in card.std):
        v.problems.append("std has a value <= 0")
    if not card.data_licence.strip():
        v.problems.append("data_licence is empty (the weights carry their training data's "
                          "terms)")
    if not card.intended_use.strip():
        v.problems.append("intended_use is empty")
    kinds = (card.training.get("data") or {}).get("roi_kinds")
    if isinstance(kinds, dict) and kinds and not set(kinds) <= SERVABLE_ROI_KINDS:
        bad = sorted(set(kinds) - SERVABLE_ROI_KINDS)
        v.problems.append(f"trained on {', '.join(bad)} ROIs: not a cluster classifier for the "
                          "node (the node classifies ROIs centred on detected clusters)")
    elif not kinds:
        v.warnings.append("training.data.roi_kinds not recorded (card from an older harness)")
    if not card.metrics:
        v.warnings.append("no cross-validated metrics (python -m models attach-cv)")
    if not card.measured_with:
        v.warnings.append("measured_with is empty: the metrics cannot be reproduced")
    if load and not v.problems:
        _load_and_run(card, weights, v)
    return v


def _load_and_run(card: ModelCard, weights: Path, v: Verification) -> None:
    import torch
    from safetensors.torch import load_file

    from models import arch

    try:
        model = arch.create(card.architecture, num_classes=card.num_classes,
                            in_chans=card.in_chans)
        state = {k: t.float() if t.is_floating_point() else t
                 for k, t in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any load failure refuses the model
        v.problems.append(f"weights do not load strictly into {card.architecture}: "
                          f"{str(exc).splitlines()[0][:200]}")
        return
    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, card.in_chans, card.input_size, card.input_size))
    if tuple(out.shape) != (1, card.num_classes) or not all(
            math.isfinite(float(x)) for x in out.flatten()):
        v.problems.append(f"forward pass gave {tuple(out.shape)} / non-finite logits")


def roi_kinds_of(csv_path: Path, normals: str = "benign") -> dict[str, int] | None:
    """Counts of the ``roi_kind`` column of a ROI CSV (None when the CSV has no such column);
    recorded in a trained card as ``training.data.roi_kinds`` for check 6."""
    import csv
    from collections import Counter

    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "roi_kind" not in (reader.fieldnames or []):
            return None
        counts = Counter((r.get("roi_kind") or "").strip() or "unspecified" for r in reader
                         if not (normals == "drop" and r["label"].strip().lower() in
                                 ("normal", "n")))
    return dict(counts)


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("verify-card", help="check a card + weights against the node's contract",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("card", nargs="+", help="model card JSON file(s)")
    q.add_argument("--no-load", action="store_true", help="skip loading the weights")
    q.set_defaults(fn=_cmd)


def _cmd(a: argparse.Namespace) -> None:
    results = [verify_card(Path(c), load=not a.no_load) for c in a.card]
    for r in results:
        print(r.text())
    if not all(r.ok for r in results):
        raise SystemExit(1)
