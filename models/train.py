"""Training of a calcification-cluster classifier (benign vs malignant) from ROI crops.

:func:`train_classifier` is the programmatic entry point (also used by the node's detection
evaluation, per fold); keep its signature stable. Crops are ``crop_roi`` outputs (float32 in
[0, 1], already ``input_size`` square) so training sees the same millimetres as serving.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import arch
from models.card import ModelCard, sha256_of

LABELS = ("benign", "malignant")


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and torch seeds (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        # reproducible kernels on the GPU (cuDNN autotuning picks differently run to run)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def to_tensor(crops: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Stack grey crops ``(N, H, W)`` in [0, 1] into a float32 ``(N, 1, H, W)`` tensor."""
    arr = np.stack([np.asarray(c, dtype=np.float32) for c in crops])
    if arr.ndim != 3:
        raise ValueError(f"crops must be 2-D grey images, got stacked shape {arr.shape}")
    return torch.from_numpy(arr).unsqueeze(1)


def normalise(x: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """Grey ``(N, 1, H, W)`` in [0, 1] -> replicated to ``card.in_chans`` and normalised."""
    x = x.expand(-1, card.in_chans, -1, -1)
    mean = torch.tensor(card.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(card.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mammography-safe augmentation of a grey batch ``(N, 1, H, W)`` in [0, 1].

    Flips and 90-degree rotations (a cluster has no canonical orientation in the ROI), small
    translations (reflect-padded, so no artificial black borders appear), mild gamma/contrast
    jitter (different film/detector processing) and faint noise. No elastic warps, colour or
    blur: calcification shape and sharpness are the diagnostic signal.
    """
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        img = x[i]
        if torch.rand((), generator=gen) < 0.5:
            img = img.flip(-1)
        if torch.rand((), generator=gen) < 0.5:
            img = img.flip(-2)
        k = int(torch.randint(0, 4, (), generator=gen))
        if k:
            img = torch.rot90(img, k, dims=(-2, -1))
        max_shift = max(1, h // 16)
        dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        if dy or dx:
            p = max_shift
            img = F.pad(img.unsqueeze(0), (p, p, p, p), mode="reflect")[0]
            img = img[:, p + dy : p + dy + h, p + dx : p + dx + w]
        gamma = math.exp(float(torch.empty(()).uniform_(-0.2, 0.2, generator=gen)))
        contrast = 1.0 + float(torch.empty(()).uniform_(-0.1, 0.1, generator=gen))
        bright = float(torch.empty(()).uniform_(-0.05, 0.05, generator=gen))
        img = img.clamp(0, 1) ** gamma
        img = (img - 0.5) * contrast + 0.5 + bright
        img = img + 0.01 * torch.randn(img.shape, generator=gen).to(img.device)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def default_card(architecture: str, input_size: int, roi_size_mm: float) -> ModelCard:
    mean, std = arch.normalisation(architecture)
    return ModelCard(
        name="calc-cluster-classifier",
        version="0.0.0",
        architecture=architecture,
        input_size=input_size,
        roi_size_mm=roi_size_mm,
        mean=mean,
        std=std,
    )


def _split(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (and, given ``groups``, group-disjoint) train/validation index split."""
    idx = np.arange(len(labels))
    if val_fraction <= 0 or len(labels) < 4:
        return idx, idx[:0]
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_splits = max(2, round(1.0 / val_fraction))
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        return idx, idx[:0]
    n_splits = int(min(n_splits, counts.min()))
    if n_splits < 2:
        return idx, idx[:0]
    if groups is not None and len(np.unique(groups)) >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        tr, va = next(splitter.split(idx, labels, groups))
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        tr, va = next(splitter.split(idx, labels))
    return tr, va


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    crops: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    card: ModelCard,
    *,
    device: str = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """P(malignant) = softmax(logits)[:, 1] for grey crops, as the node computes it."""
    x = crops if isinstance(crops, torch.Tensor) else to_tensor(crops)
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalise(x[i : i + batch_size].to(device), card)
        if device == "cpu":
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(xb).float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def youden_threshold(y_true: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (clipped into (0, 1))."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y_true, p)
    best = int(np.argmax(tpr - fpr))
    t = float(thr[best])
    return float(min(max(t, 1e-4), 1 - 1e-4))


def train_classifier(
    crops: list[np.ndarray],
    labels: list[int],
    *,
    architecture: str = "tf_efficientnet_lite0",
    input_size: int,
    roi_size_mm: float,
    epochs: int,
    seed: int,
    init: str = "imagenet",
    device: str = "cpu",
    val_fraction: float = 0.2,
    groups: list[str] | None = None,
    batch_size: int = 16,
    lr: float = 3e-4,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.1,
    patience: int = 5,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, ModelCard]:
    """Train a 2-class (benign=0, malignant=1) classifier on grey ROI crops.

    ``crops`` are float32 ``(input_size, input_size)`` outputs of :func:`models.roi.crop_roi`.
    ``init`` is "imagenet" (tf_efficientnet_lite0 only), "scratch", or a path to weights of the
    same architecture (the intermediate model of double transfer learning). A stratified
    ``val_fraction`` split (patient-disjoint when ``groups`` is given) drives early stopping on the
    validation loss; the best epoch's weights are returned. Loss is class-weighted cross-entropy.
    On CUDA, mixed precision (fp16 autocast + GradScaler) is used.

    Returns the model (eval mode, on ``device``) and a card with architecture, sizes,
    normalisation, the Youden threshold on the validation split (0.5 without one) and training
    metadata; name/version/metrics are for the caller to fill in.
    """
    if len(crops) != len(labels) or not crops:
        raise ValueError("crops and labels must be non-empty and of equal length")
    for c in crops[:1]:
        if c.shape != (input_size, input_size):
            raise ValueError(f"crop shape {c.shape} != ({input_size}, {input_size})")
    seed_everything(seed)
    torch.set_flush_denormal(True)  # denormal gradients/moments are very slow on x86
    t_start = time.perf_counter()
    y = np.asarray(labels, dtype=np.int64)
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    g = np.asarray(groups) if groups is not None else None
    tr_idx, va_idx = _split(y, g, val_fraction, seed)

    card = default_card(architecture, input_size, roi_size_mm)
    model = arch.build(architecture, init=init, num_classes=2).to(device)
    if device == "cpu":
        model = model.to(memory_format=torch.channels_last)
    x_all = to_tensor(crops)
    x_tr, y_tr = x_all[tr_idx], torch.from_numpy(y[tr_idx])
    x_va, y_va = x_all[va_idx], y[va_idx]

    counts = np.bincount(y[tr_idx], minlength=2).astype(np.float64)
    weights = len(tr_idx) / (2.0 * np.maximum(counts, 1.0))
    class_w = torch.tensor(weights, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr_idx) / batch_size))
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(max_steps, total)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15
    )
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(seed)

    best_loss, best_state, best_epoch, bad = math.inf, None, -1, 0
    history: list[dict[str, float]] = []
    step = 0
    bar = _progress(total, progress, f"train {architecture}")
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(len(tr_idx), generator=gen)
        # BatchNorm cannot train on a batch of one: drop a trailing singleton.
        batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches = batches[:-1]
        run_loss, seen = 0.0, 0
        for b in batches:
            if max_steps is not None and step >= max_steps:
                break
            # augmented where the batch is going: on a GPU the per-ROI ops run there (same
            # random draws from the CPU generator, so CPU results are unchanged)
            xb = normalise(augment(x_tr[b].to(device), gen), card)
            if device == "cpu":
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_tr[b].to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(model(xb).float(), yb, weight=class_w,
                                       label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step < total - 1:
                sched.step()
            step += 1
            run_loss += float(loss.detach()) * len(b)
            seen += len(b)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{run_loss / max(seen, 1):.3f}")
        rec = {"epoch": epoch + 1, "train_loss": run_loss / max(seen, 1),
               "s": round(time.perf_counter() - t_epoch, 2)}
        if len(va_idx):
            p = predict_proba(model, x_va, card, device=device)
            w = weights[y_va]
            eps = 1e-6
            ll = -(y_va * np.log(p + eps) + (1 - y_va) * np.log(1 - p + eps))
            val_loss = float(np.sum(w * ll) / np.sum(w))
            rec["val_loss"] = val_loss
            if val_loss < best_loss - 1e-4:
                best_loss, best_epoch, bad = val_loss, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        history.append(rec)
        if max_steps is not None and step >= max_steps:
            break
        if len(va_idx) and bad >= patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if len(va_idx):
        card.threshold = youden_threshold(y_va, predict_proba(model, x_va, card, device=device))
    card.training = {
        "init": init if init in ("imagenet", "scratch") else f"weights:{Path(init).name}",
        "epochs_max": epochs,
        "epochs_run": len(history),
        "best_epoch": best_epoch if best_state is not None else len(history),
        "seed": seed,
        "n_train": int(len(tr_idx)),
        "n_val": int(len(va_idx)),
        "class_counts_train": [int(c) for c in counts],
        "batch_size": batch_size,
        "lr": lr,
        "label_smoothing": label_smoothing,
        "device": device,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "history": history,
    }
    return model, card


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def save_model(
    model: nn.Module, card: ModelCard, card_path: Path, *, fp16: bool = False
) -> ModelCard:
    """Write ``<card>.safetensors`` (fp32, or fp16 if asked) and the card JSON next to it.

    The weights file name is the card's stem + ``.safetensors``; the card records its SHA-256.
    Returns the updated card.
    """
    from safetensors.torch import save_file

    card_path = Path(card_path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path = card_path.with_suffix(".safetensors")
    state = {
        k: (v.detach().cpu().half() if fp16 and v.is_floating_point() else v.detach().cpu())
        .contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights_path), metadata={"architecture": card.architecture})
    card.weights_file = weights_path.name
    card.weights_sha256 = sha256_of(weights_path)
    card.save(card_path)
    return card


def load_model(card_path: Path, device: str = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a card and its weights exactly as the node does (strict, SHA-256 checked)."""
    from safetensors.torch import load_file

    card = ModelCard.load(card_path)
    wpath = card.weights_path(card_path)
    if card.weights_sha256 and sha256_of(wpath) != card.weights_sha256:
        raise ValueError(f"{wpath} does not match the card's weights_sha256")
    model = arch.create(card.architecture, num_classes=card.num_classes, in_chans=card.in_chans)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(wpath)).items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


def configure_cpu(threads: int | None = None) -> None:
    """CPU settings for training: thread count (default 1) and flush-to-zero for denormals.

    On a shared machine, more intra-op threads than free cores makes every OpenMP barrier wait
    for a descheduled thread: measured here (2 shared cores, other jobs running) one Lite0 step
    at 128 px took 0.5 s with 1 thread and 1-9 s with 2. Use ``threads`` = free cores only on a
    dedicated machine.
    """
    torch.set_num_threads(max(1, threads or 1))
    torch.set_flush_denormal(True)
