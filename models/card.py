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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
