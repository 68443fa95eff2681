"""Grad-CAM on the classifier's last convolutional block, with a head-only backward.

A forward hook on the target layer (for timm EfficientNets ``bn2``: conv_head -> BN -> SiLU, the
last convolutional block's output feature map) re-roots its output with
``detach().requires_grad_()``. With the parameters not requiring gradients, the backward pass then
runs only through global pooling and the classifier: ~1.03x the cost of a forward instead of
~3.5x (docs/performance-notes.md), and the map is identical to the full-backward one because the
gradient of the logit with respect to the feature map does not depend on anything before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: ``bn2`` of timm EfficientNets, else the last Conv2d."""
    bn2 = getattr(model, "bn2", None)
    if isinstance(bn2, nn.Module) and hasattr(model, "conv_head"):
        return bn2
    last = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            last = module
    if last is None:
        raise ValueError("model has no Conv2d layer for Grad-CAM")
    return last


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def logits_and_cam(
    model: nn.Module,
    x: torch.Tensor,
    target_class: int = 1,
    layer: nn.Module | None = None,
    head_only: bool = True,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``x`` (N, C, H, W) and return (logits (N, K), Grad-CAM (N, h, w) in [0, 1]).

    Each map is ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d logit[target] / d A_k,
    divided by its own maximum (all-zero when nothing supports the class). ``head_only=False``
    runs the full backward (used by the test that checks both give the same map). ``timings``,
    when given, accumulates seconds spent in the forward ("forward") and in the backward and map
    ("cam").
    """
    import time

    t0 = time.perf_counter()
    layer = layer or target_layer(model)
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        if head_only:
            out = out.detach().requires_grad_(True)
        else:
            out.retain_grad()
        store["a"] = out
        return out

    handle = layer.register_forward_hook(hook)
    ctx = _frozen(model) if head_only else contextlib.nullcontext()
    try:
        with ctx, torch.enable_grad():
            xin = x if head_only else x.detach().requires_grad_(True)
            logits = model(xin)
            acts = store["a"]
            t1 = time.perf_counter()
            grads = torch.autograd.grad(logits[:, target_class].sum(), acts)[0]
    finally:
        handle.remove()
    acts, grads = acts.detach().float(), grads.float()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * acts).sum(dim=1))
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    if timings is not None:
        timings["forward"] = timings.get("forward", 0.0) + (t1 - t0)
        timings["cam"] = timings.get("cam", 0.0) + (time.perf_counter() - t1)
    return logits.detach().float(), cam
