"""Grad-CAM for the research reports (seed 001 protocol): panels of test ROIs with the map of
the malignant logit over the ROI, for correct and misclassified cases.

Generic for timm classifiers: the map is taken on ``forward_features`` (the last convolutional
feature map) and back-propagated through ``forward_head`` only, which gives the same map as a
full backward (the logit's gradient with respect to the feature map does not depend on
earlier layers). The node has its own serving implementation (node/analysis/gradcam.py);
``models`` never imports ``node``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import arch
from models.card import ModelCard
from models.train import normalise, to_tensor


def gradcam(model: nn.Module, crops: Sequence[np.ndarray], card: ModelCard, *,
            device: str = "cpu", target_class: int = 1) -> np.ndarray:
    """(N, H, W) maps in [0, 1] at the crops' size (each divided by its maximum)."""
    model.eval()
    net = arch.as_timm(model)
    out = []
    for i in range(0, len(crops), 16):
        x = normalise(to_tensor(crops[i:i + 16]).to(device), card)
        with torch.enable_grad():
            feats = net.forward_features(x).detach().requires_grad_(True)
            logits = net.forward_head(feats)
            (grad,) = torch.autograd.grad(logits[:, target_class].sum(), feats)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1)
        out.append((cam / peak).detach().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, card.input_size, card.input_size))


def panel(path: Path, crops: Sequence[np.ndarray], cams: Sequence[np.ndarray] | np.ndarray,
          titles: Sequence[str], heading: str, cols: int = 4) -> None:
    """A grid of ROI | ROI with Grad-CAM overlay pairs, one per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(crops)
    if n == 0:
        return
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.2 * rows + 0.4),
                             dpi=110, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        r, c = divmod(k, cols)
        axes[r, 2 * c].imshow(crops[k], cmap="gray", vmin=0, vmax=1)
        axes[r, 2 * c].set_title(titles[k], fontsize=7)
        axes[r, 2 * c + 1].imshow(crops[k], cmap="gray", vmin=0, vmax=1)
        axes[r, 2 * c + 1].imshow(cams[k], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        axes[r, 2 * c + 1].set_title("Grad-CAM (malignant)", fontsize=7)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
