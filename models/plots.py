"""Figures of the protocol reports: per-fold box plots and a test-set ROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fold_boxplots(results: dict, out_dir: Path,
                  metrics: tuple[str, ...] = ("accuracy", "auc", "weighted_f1")) -> list[str]:
    """``box_<metric>.png``: one box of per-fold values per configuration; returns file names."""
    plt = _plt()
    names = []
    labels = list(results["configs"])
    for metric in metrics:
        data = [[m[metric] for m in results["configs"][lab]["per_fold"]
                 if m[metric] == m[metric]] for lab in labels]
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 4), dpi=100)
        ax.boxplot(data, showmeans=True)
        for i, vals in enumerate(data, start=1):  # the folds themselves, jittered
            ax.plot(np.full(len(vals), i) + np.linspace(-0.08, 0.08, len(vals)), vals, "k.",
                    alpha=0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"{metric} per fold")
        ax.set_title(f"{results['n_folds']}-fold patient-level CV: {metric}", fontsize=10)
        fig.tight_layout()
        name = f"box_{metric}.png"
        fig.savefig(Path(out_dir) / name)
        plt.close(fig)
        names.append(name)
    return names


def roc_test(path: Path, y: np.ndarray, curves: dict[str, np.ndarray], title: str) -> None:
    from sklearn.metrics import roc_curve

    from models.metrics import roc_auc

    if len(np.unique(y)) < 2:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    for label, p in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.6 if label.startswith("ensemble") else 0.8,
                label=f"{label} AUC {roc_auc(y, p):.2f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
