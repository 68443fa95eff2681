"""The ROI classifier: model card + safetensors weights -> timm EfficientNet, batched inference.

Nothing is downloaded: the network is built with ``pretrained=False`` and filled from the file the
card names. Every way the card/weights can be unusable stops start-up with a ``RuntimeError``
naming the file and the problem.

The network is built only for a card whose classification head is the CNN. A card with a
morphology head (the shipped one) calls benign/malignant from the detector's cluster features, so
its node never imports torch or timm: about 700 MiB less resident memory with the default CUDA
build of torch (``import torch`` 507 MiB, ``timm`` another 194 MiB on the 2-core bench machine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.card import ModelCard, calibrate, classification_validated, sha256_of
from node.analysis.result import ModelInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("node.analysis.classify")


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device (checked)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device = {device!r} but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"model.device = {device!r} is not supported (auto, cpu, cuda, cuda:N)")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    "auto": bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on the CPU (bf16 is
    emulated on CPUs without AVX-512-BF16/AMX and runs 10-50x slower). "bf16"/"fp16" are honoured
    on any device (used by the tests to exercise the GPU code path on the CPU).
    """
    import torch

    if precision not in PRECISIONS:
        raise RuntimeError(f"model.precision must be one of {', '.join(PRECISIONS)}, "
                           f"not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


class Classifier:
    """Loaded once; scores grey ROI crops (``models.roi.crop_roi`` outputs) with Grad-CAM maps."""

    def __init__(
        self,
        card_path: Path | str,
        *,
        architecture: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
        threshold: float | None = None,
        precision: str = "auto",
        network: bool | None = None,
    ) -> None:
        """``network``: build the card's CNN (None: only when its head is the CNN; True also for
        a morphology head, for benchmarks and tests of the CNN path on the shipped weights)."""
        card_path = Path(card_path)
        try:
            card = ModelCard.load(card_path)
        except ValueError as exc:
            raise RuntimeError(f"cannot load the classifier: {exc}") from None
        if architecture and card.architecture != architecture:
            raise RuntimeError(
                f"model card {card_path} is for architecture {card.architecture!r} but "
                f"model.architecture is {architecture!r}; point model.card at a card for "
                f"{architecture!r} or change model.architecture"
            )
        weights = card.weights_path(card_path)
        if not weights.is_file():
            raise RuntimeError(
                f"weights file {weights} named by model card {card_path} does not exist"
            )
        if card.weights_sha256:
            digest = sha256_of(weights)
            if digest != card.weights_sha256:
                raise RuntimeError(
                    f"weights file {weights} does not match model card {card_path} "
                    f"(sha256 {digest[:12]}..., card says {card.weights_sha256[:12]}...)"
                )
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise RuntimeError(f"model.threshold {threshold} is not in (0, 1)")
        self.card = card
        self.card_path = card_path
        self.batch_size = max(1, int(batch_size))
        self.threshold = float(threshold) if threshold is not None else card.threshold
        self._parse_head(card, card_path)
        # No network for a head that does not use it: it reads the detector's features. The
        # weights file's digest is still checked above, so a damaged file is refused either way.
        self.model: nn.Module | None = None
        self.device: torch.device | None = None
        self.amp_dtype: torch.dtype | None = None
        if network or (network is None and self.head_kind == "cnn"):
            self.device = resolve_device(device)
            self.model = self._build_network(card, card_path, weights)
            # Reduced precision on the GPU by default (bf16 is emulated, 10-50x slower, on CPUs).
            self.amp_dtype = resolve_precision(self.device, precision)
        validated, why = classification_validated(card)
        self.validated_reason = why
        domain = (card.classification or {}).get("validated_for", {}).get("pixel_spacing_mm")
        self.validated_spacing = (float(domain[0]), float(domain[1])) if domain else None
        self.info = ModelInfo(
            name=card.name, version=card.version, architecture=card.architecture,
            threshold=self.threshold, classification_validated=validated,
        )
        where = (f"on {self.device}" + (f" ({self.amp_dtype})" if self.amp_dtype else "")
                 if self.model is not None else f"no CNN ({self.head_kind} head)")
        log.info("classifier %s %s (%s, %d px for %.1f mm) %s, threshold %.3f", card.name,
                 card.version, card.architecture, card.input_size, card.roi_size_mm, where,
                 self.threshold)
        log.log(logging.INFO if validated else logging.WARNING,
                "classifier %s %s benign/malignant call: %s (%s)", card.name, card.version,
                "validated" if validated else "NOT validated, reports show cluster marks and "
                "scores only", why)

    def _parse_head(self, card: ModelCard, card_path: Path) -> None:
        """The card's classification head: "cnn" (the network's P(malignant)) or "morphology"
        (a logistic head on named detector features, its weights in the card)."""
        head = (card.classification or {}).get("head") or {"kind": "cnn"}
        self.head_kind = str(head.get("kind", "cnn"))
        if self.head_kind not in ("cnn", "morphology"):
            raise RuntimeError(f"model card {card_path}: classification head "
                               f"{self.head_kind!r} is not 'cnn' or 'morphology'")
        self.head_features: tuple[str, ...] = ()
        if self.head_kind == "morphology":
            try:
                self.head_features = tuple(str(f) for f in head["features"])
                self.head_w = np.asarray(head["w"], dtype=np.float64)
                self.head_b = float(head["b"])
            except (KeyError, TypeError, ValueError) as exc:
                raise RuntimeError(f"model card {card_path}: unusable morphology head: {exc}"
                                   ) from None
            if len(self.head_w) != len(self.head_features):
                raise RuntimeError(f"model card {card_path}: morphology head has "
                                   f"{len(self.head_w)} weights for "
                                   f"{len(self.head_features)} features")

    def _build_network(self, card: ModelCard, card_path: Path, weights: Path) -> nn.Module:
        """The timm network of the card, filled from ``weights``, on ``self.device`` in eval
        mode; every way it cannot be built is a ``RuntimeError`` naming the file."""
        import timm
        import torch

        try:
            model = timm.create_model(
                card.architecture, pretrained=False, num_classes=card.num_classes,
                in_chans=card.in_chans,
            )
        except Exception as exc:  # noqa: BLE001 - unknown timm name etc.
            raise RuntimeError(
                f"model card {card_path}: cannot build {card.architecture!r}: {exc}"
            ) from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RuntimeError(f"weights file {weights} is not a readable safetensors file: {exc}"
                               ) from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise RuntimeError(
                f"weights file {weights} does not fit {card.architecture!r} "
                f"(num_classes={card.num_classes}, in_chans={card.in_chans}): {first}"
            ) from None
        # channels_last is a free ~13 % on this CPU and the preferred layout on CUDA.
        return model.to(self.device).eval().to(memory_format=torch.channels_last)

    def malignancy(self, cnn_p: np.ndarray, cluster_features: np.ndarray | None
                   ) -> np.ndarray:
        """The served P(malignant) per ROI, through the card's out-of-fold calibration.

        ``cnn_p`` are :meth:`predict`'s probabilities (ignored by a morphology head);
        ``cluster_features`` (n, len(head_features)) the detector's features of each cluster in
        the head's order (a morphology head needs them)."""
        if self.head_kind == "morphology":
            if cluster_features is None:
                raise ValueError("a morphology head needs the clusters' features")
            z = np.asarray(cluster_features, np.float64) @ self.head_w + self.head_b
            p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        else:
            p = np.asarray(cnn_p, dtype=np.float64)
        return np.asarray(calibrate(p, self.card), dtype=np.float64).reshape(-1)

    def in_validated_domain(self, pixel_spacing_mm: float) -> bool:
        """Whether an image of this pixel size lies in what the card is validated for."""
        if self.validated_spacing is None:
            return True
        lo, hi = self.validated_spacing
        return lo <= pixel_spacing_mm <= hi

    def _tensor(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        import torch

        x = torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in crops]))
        assert self.device is not None  # only called with a network (predict checks)
        if self.device.type == "cuda":  # copy once, normalise on the device
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.unsqueeze(1).expand(-1, self.card.in_chans, -1, -1)
        mean = torch.tensor(self.card.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.card.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def predict(
        self, crops: Sequence[np.ndarray], with_cam: bool = True
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, float]]:
        """The CNN's P(malignant) per crop (uncalibrated; see :meth:`malignancy`), its Grad-CAM
        map (h x w in [0, 1]) and timings in ms.

        With ``with_cam`` one pass gives both (Grad-CAM's forward is the classifier's forward);
        ``classify`` times the forward, ``gradcam`` the head-only backward and the maps.
        """
        import torch

        from node.analysis.gradcam import logits_and_cam

        if self.model is None:
            raise RuntimeError(f"model card {self.card_path} has a {self.head_kind} head: "
                               "there is no CNN to run")
        model, device = self.model, self.device
        assert device is not None  # set with the network
        probs: list[np.ndarray] = []
        cams: list[np.ndarray] = []
        t: dict[str, float] = {"forward": 0.0, "cam": 0.0}
        for i in range(0, len(crops), self.batch_size):
            x = self._tensor(crops[i : i + self.batch_size])
            autocast = torch.autocast(
                device.type, dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            )
            if with_cam:
                # One pass gives both: the head-only backward costs ~3 % of the forward.
                with autocast:
                    logits, cam = logits_and_cam(model, x, target_class=1, timings=t)
                cams.extend(list(cam.cpu().numpy()))
            else:
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast:
                    logits = model(x).float()
                t["forward"] += time.perf_counter() - t0
            probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        t_cls, t_cam = t["forward"], t["cam"]
        p = np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)
        return p.astype(np.float64), cams, {"classify": 1000 * t_cls, "gradcam": 1000 * t_cam}
