"""Model card: the JSON file written next to the weights by training and read by the node.

A card is the contract between training and serving: it names the timm architecture, the input
size, the physical size of the ROI crop (so the node crops the same millimetres the model saw), the
normalisation, the decision threshold and the measured metrics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_FORMAT = 1


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: str  # timm model name, e.g. "tf_efficientnet_lite0"
    input_size: int  # square input, pixels
    roi_size_mm: float  # physical side of the ROI crop that is resized to input_size
    in_chans: int = 3  # grey ROI replicated to in_chans
    num_classes: int = 2  # logits [benign, malignant]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    threshold: float = 0.5  # P(malignant) >= threshold -> "Malignant"
    weights_file: str = "weights.safetensors"  # relative to the card
    weights_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    measured_with: str = ""  # the exact command that produced the metrics
    training: dict[str, Any] = field(default_factory=dict)  # data, epochs, seed, ...
    data_licence: str = ""
    intended_use: str = "Research only; not for diagnosis."
    # Cross-validated benign/malignant evidence and the out-of-fold calibration of P(malignant)
    # (see classification_validated); empty: the model is not validated for classification.
    classification: dict[str, Any] = field(default_factory=dict)
    # The cluster detector file (models.detector), relative to the card; "" = none named.
    detector_file: str = ""
    card_format: int = CARD_FORMAT

    @property
    def mm_per_pixel(self) -> float:
        return self.roi_size_mm / self.input_size

    def to_json(self) -> str:
        d = asdict(self)
        d["mm_per_pixel"] = self.mm_per_pixel
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read and validate a card; raise ValueError naming the file and the problem."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"model card {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model card {path} is not valid JSON: {exc}") from None
        raw.pop("mm_per_pixel", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"model card {path} has unknown keys: {', '.join(unknown)}")
        if raw.get("card_format", CARD_FORMAT) != CARD_FORMAT:
            raise ValueError(
                f"model card {path} has card_format {raw.get('card_format')}, "
                f"this node reads {CARD_FORMAT}"
            )
        for key in ("name", "version", "architecture", "input_size", "roi_size_mm"):
            if key not in raw:
                raise ValueError(f"model card {path} lacks the required key {key!r}")
        for key in ("mean", "std"):
            if key in raw:
                raw[key] = tuple(raw[key])
        card = cls(**raw)
        if not 0.0 < card.threshold < 1.0:
            raise ValueError(f"model card {path}: threshold {card.threshold} is not in (0, 1)")
        if card.input_size < 32 or card.roi_size_mm <= 0:
            raise ValueError(f"model card {path}: input_size/roi_size_mm are not sensible")
        return card

    def weights_path(self, card_path: Path) -> Path:
        return Path(card_path).parent / self.weights_file

    def detector_path(self, card_path: Path) -> Path | None:
        return Path(card_path).parent / self.detector_file if self.detector_file else None


#: The documented rule (docs/analysis-evaluation.md): a card supports a categorical
#: Benign/Malignant call only when its classification evidence is a patient-grouped
#: cross-validation on real clusters whose benign-vs-malignant AUC has a lower 95 % bound above
#: 0.5, on at least MIN_CLUSTERS clusters, with the decision threshold and the calibration of
#: P(malignant) both chosen on out-of-fold predictions (calibration "platt", or "identity" when
#: the out-of-fold probabilities were better calibrated without it).
MIN_CLUSTERS = 20
MIN_AUC_LOWER_BOUND = 0.5


def classification_validated(card: ModelCard) -> tuple[bool, str]:
    """(validated, why) for ``card`` under the rule above; the node never trusts a flag, it
    re-checks the evidence."""
    c = card.classification or {}
    if not c:
        return False, "the model card holds no cross-validated classification evidence"
    if c.get("validation") != "patient-grouped cross-validation":
        return False, (f"classification evidence is {c.get('validation')!r}, not a "
                       "patient-grouped cross-validation")
    try:
        auc = float(c["auc"])
        lo, hi = (float(v) for v in c["auc_ci95"])
        n = int(c["n_clusters"])
    except (KeyError, TypeError, ValueError):
        return False, "classification evidence lacks auc, auc_ci95 or n_clusters"
    if n < MIN_CLUSTERS:
        return False, f"cross-validated on {n} clusters (< {MIN_CLUSTERS})"
    if c.get("threshold_source") != "out-of-fold":
        return False, "the decision threshold was not chosen on out-of-fold predictions"
    cal = c.get("calibration") or {}
    if cal.get("method") not in ("platt", "identity") or cal.get("fitted_on") != "out-of-fold":
        return False, "P(malignant) is not calibrated on out-of-fold predictions"
    if not lo > MIN_AUC_LOWER_BOUND:
        return False, (f"benign-vs-malignant AUC {auc:.2f} (95 % CI {lo:.2f}-{hi:.2f}): the "
                       f"lower bound is not above {MIN_AUC_LOWER_BOUND}")
    return True, f"benign-vs-malignant AUC {auc:.2f} (95 % CI {lo:.2f}-{hi:.2f}, n = {n})"


def calibrate(p: Any, card: ModelCard) -> Any:
    """P(malignant) through the card's out-of-fold Platt calibration, sigmoid(a * logit(p) + b);
    unchanged for "identity" or without a calibration."""
    import numpy as np

    cal = (card.classification or {}).get("calibration") or {}
    if cal.get("method") != "platt":
        return p
    a, b = float(cal["a"]), float(cal["b"])
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(a * np.log(q / (1 - q)) + b)))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
