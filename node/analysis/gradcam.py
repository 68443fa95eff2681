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

import cv2
import numpy as np
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


def roi_window(n: int) -> np.ndarray:
    """(n, n) weights that fall smoothly from 1 at the centre to 0 at the inscribed circle
    (raised cosine of the radius): a map pasted through it has no square edge."""
    r = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    rad = np.sqrt(r[None, :] ** 2 + r[:, None] ** 2)
    return np.where(rad < 1.0, 0.5 * (1.0 + np.cos(np.pi * np.minimum(rad, 1.0))), 0.0
                    ).astype(np.float32)


def paste_cam(
    canvas: np.ndarray,
    cam: np.ndarray,
    centre_rc: tuple[float, float],
    side_px: float,
    scale: float,
) -> None:
    """Max-composite a ROI's map onto ``canvas`` (display image coordinates), feathered.

    ``centre_rc`` is the ROI centre in source numpy coordinates, ``side_px`` the ROI side in source
    pixels (``roi_size_mm / spacing``), ``scale`` display pixels per source pixel. The map covers
    the same square the classifier saw (``models.roi.crop_roi``), so each CAM cell lands on the
    tissue it describes; it is upsampled bicubically and weighted by :func:`roi_window`, so it
    fades out towards the edge of the ROI instead of ending in a square.
    """
    side = side_px * scale
    n = max(2, int(round(side)))
    up = cv2.resize(cam.astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    up = np.clip(up, 0.0, 1.0) * roi_window(n)
    # corner coordinates of the square in display pixels
    x0 = (centre_rc[1] + 0.5) * scale - side / 2.0
    y0 = (centre_rc[0] + 0.5) * scale - side / 2.0
    c0, r0 = int(round(x0)), int(round(y0))
    rows, cols = canvas.shape
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + n, rows), min(c0 + n, cols)
    if rr1 <= rr0 or cc1 <= cc0:
        return
    patch = up[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    np.maximum(canvas[rr0:rr1, cc0:cc1], patch, out=canvas[rr0:rr1, cc0:cc1])


def paint_evidence(canvas: np.ndarray, points: tuple[tuple[float, float, float], ...],
                   scale: float, sigma_px: float) -> None:
    """Max-composite Gaussian spots at a cluster's calcifications onto ``canvas`` (display
    coordinates): ``points`` are (row, col, P) in source pixels, each spot peaks at its P.

    The map a model with a morphology head shows instead of a Grad-CAM: the evidence its call
    rests on (which specks the detector took for calcifications, and how sure it was)."""
    rows, cols = canvas.shape
    half = int(np.ceil(3 * sigma_px))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    for r, c, p in points:
        cy, cx = (r + 0.5) * scale - 0.5, (c + 0.5) * scale - 0.5
        iy, ix = int(round(cy)), int(round(cx))
        spot = float(p) * np.exp(-((yy + iy - cy) ** 2 + (xx + ix - cx) ** 2)
                                 / (2 * sigma_px * sigma_px))
        r0, c0 = iy - half, ix - half
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r0 + 2 * half + 1, rows), \
            min(c0 + 2 * half + 1, cols)
        if rr1 <= rr0 or cc1 <= cc0:
            continue
        sub = spot[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0]
        np.maximum(canvas[rr0:rr1, cc0:cc1], sub, out=canvas[rr0:rr1, cc0:cc1])


def finish_cam(canvas: np.ndarray, breast: np.ndarray | None, smooth_px: float) -> None:
    """Smooth the composited map and confine it to the breast (in place): overlapping ROIs blend
    into one surface, and nothing is painted on the background or the film labels. The peak
    keeps its value (smoothing would otherwise fade small spots)."""
    if not canvas.any():
        return
    before = float(canvas.max())
    rows, cols = canvas.shape
    # the map is smooth at this scale: blur a copy f times smaller and interpolate back
    f = max(1, int(smooth_px // 2))
    small = (max(1, cols // f), max(1, rows // f))

    def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
        if f == 1:
            return cv2.GaussianBlur(a, (0, 0), sigma)
        s = cv2.resize(a, small, interpolation=cv2.INTER_AREA)
        s = cv2.GaussianBlur(s, (0, 0), sigma / f)
        return cv2.resize(s, (cols, rows), interpolation=cv2.INTER_LINEAR)

    if smooth_px > 0:
        canvas[...] = smooth(canvas, smooth_px)
    if breast is not None:
        m = cv2.resize(breast.astype(np.uint8), (cols, rows),
                       interpolation=cv2.INTER_NEAREST).astype(np.float32)
        canvas *= smooth(m, max(1.0, smooth_px))
    peak = float(canvas.max())
    if peak > 0:
        canvas *= min(before, 1.0) / peak
