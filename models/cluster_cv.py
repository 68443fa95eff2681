"""Benign vs malignant on the 27 located mini-MIAS clusters: patient-grouped CV, calibration.

``python -m models classify`` (see ``--help``). Features per cluster, all computed without the
labels:

* **CNN**: ImageNet EfficientNet-Lite0, Lite1 and Lite2 (offline wheels), frozen, global-pooled
  features of the ROI crop (``models.roi.crop_roi``, the serving crop); heads train on the eight
  flips/rotations of each training crop and score the crop as it is (as the node does);
* **morphology**: the detector's candidates inside the annotated circle
  (:mod:`models.detector`) summarised as the cluster features of the detector's second stage:
  number of calcifications, size and shape spread, contrast, elongation, linear arrangement,
  area, density, background.

Heads: L2 logistic regression on standardised (PCA-reduced, for the CNN) features, one per fold.
Configurations are fixed before looking at results; the primary one is **Lite0+1+2 + morphology**
(mean of the three CNN heads' and the morphology head's logits). CV: stratified group k-fold by
woman, repeated with ``--repeats`` seeds; each cluster's out-of-fold logit is averaged over the
repeats, and the AUC with its 95 % bootstrap interval over women is computed from those. The
decision threshold (Youden) and a Platt calibration are fitted on the out-of-fold predictions;
the calibration's own error is measured by leave-one-woman-out on them (reliability diagram and
expected calibration error).

``--card`` writes the served configuration (Lite0 ImageNet backbone, its fold-ensembled head
folded into the timm classifier layer, so the node serves it unchanged) and its evidence into a
model card; the node decides from that evidence whether it may call benign/malignant
(:func:`models.card.classification_validated`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import arch
from models.metrics import roc_auc
from models.roi import crop_roi

NETS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
SHORT = {"tf_efficientnet_lite0": "Lite0", "tf_efficientnet_lite1": "Lite1",
         "tf_efficientnet_lite2": "Lite2"}
PRIMARY = "Lite0+Lite1+Lite2 + morphology"


@dataclass
class ClusterSet:
    images: list[str]
    patients: np.ndarray
    labels: np.ndarray  # 1 malignant
    crops: dict[str, np.ndarray]  # net -> (n, 8, feat) features
    morphology: np.ndarray  # (n, k) at the annotated centre
    morph_names: tuple[str, ...]
    morphology_detected: np.ndarray  # (n, k) of the detected cluster, NaN when undetected
    n_clusters: int = 0  # rows 0..n_clusters-1 are the annotated clusters, the rest are the
    # detector's false marks on held-out normal images (label 0, morphology_detected only)


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(x, k)
        out += [r, r[:, ::-1]]
    return [np.ascontiguousarray(v) for v in out]


@torch.inference_mode()
def cnn_features(net: str, crops: list[np.ndarray]) -> np.ndarray:
    """(n, 8, C) global-pooled ImageNet features of every crop under the 8 flips/rotations."""
    model = arch.create(net, num_classes=2)
    arch.load_backbone(model, arch.lite_imagenet_state(net))
    model.eval()
    split = arch.as_timm(model)
    mean, std = arch.normalisation(net)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    out = []
    for c in crops:
        x = torch.from_numpy(np.stack(dihedral(c))).unsqueeze(1).expand(-1, 3, -1, -1)
        f = split.forward_head(split.forward_features((x - m) / s), pre_logits=True)
        out.append(f.numpy())
    return np.stack(out)


MORPH_RADIUS_MM = 8.0  # fixed: the annotated radius is not used (it would leak the label)


def morphology_features(mias_dir: Path, truths, detector_path: Path
                        ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Cluster features of each annotated cluster, two ways, both without its annotated radius:

    * ``at_centre``: the detector's candidates within MORPH_RADIUS_MM of the annotated centre
      that pass its first stage (at least the three most likely), summarised with the
      detector's cluster features;
    * ``detected``: the features of the detected cluster that hits the annotation (the best
      scoring one, at any score), exactly what the node computes; NaN rows where none does.

    The detector was trained on synthetic clusters only, so its scores carry no label.
    """
    from models.detector.anatomy import breast_mask
    from models.detector.candidates import find_candidates
    from models.detector.clusters import CLUSTER_FEATURES, cluster_features
    from models.detector.model import DetectorModel
    from models.detector.train import MIAS_MM, read_png01

    det = DetectorModel.load(detector_path)
    at_centre, detected = [], []
    cache: dict[str, tuple] = {}
    for t in truths:
        if t.image not in cache:
            img = read_png01(mias_dir / "png" / f"{t.image}.png")
            mask = breast_mask(img, MIAS_MM)
            c = find_candidates(img, mask, MIAS_MM, det.candidate_params, view="MLO")
            p = det.candidate_forest.predict_proba(c.features.astype(np.float64))
            found = det.detect(img, mask, MIAS_MM, view="MLO", min_score=0.0)
            cache[t.image] = (c, p, found)
        c, p, found = cache[t.image]
        d = np.hypot(c.rows - t.row, c.cols - t.col) * MIAS_MM
        near = np.nonzero(d <= MORPH_RADIUS_MM)[0]
        members = near[p[near] >= det.keep_threshold]
        if len(members) < 3:
            members = near[np.argsort(-p[near])][:3] if len(near) >= 3 else np.argsort(d)[:3]
        _, _, feats = cluster_features(c, np.sort(members), p, MIAS_MM)
        at_centre.append(feats)
        hits = [k for k in found if np.hypot(k.centre_rc[0] - t.row, k.centre_rc[1] - t.col)
                * MIAS_MM <= t.radius_mm + 2.0]
        detected.append(list(max(hits, key=lambda k: k.score).features) if hits
                        else [np.nan] * len(CLUSTER_FEATURES))
    names = tuple(n for n in CLUSTER_FEATURES if n != "spacing_mm")
    keep = [CLUSTER_FEATURES.index(n) for n in names]
    return (np.asarray(at_centre, np.float64)[:, keep], np.asarray(detected, np.float64)[:, keep],
            names)


def build(mias_dir: Path, roi_size_mm: float, input_size: int, detector: Path,
          log=print) -> ClusterSet:
    from models.detector.train import MIAS_MM, read_png01, read_truths

    truths = read_truths(mias_dir)
    crops = []
    for t in truths:
        img = read_png01(mias_dir / "png" / f"{t.image}.png")
        crops.append(crop_roi(img, (t.row, t.col), MIAS_MM, roi_size_mm, input_size))
    feats = {}
    for net in NETS:
        t0 = time.perf_counter()
        feats[net] = cnn_features(net, crops)
        log(f"  {SHORT[net]} features: {feats[net].shape[2]} per view, "
            f"{time.perf_counter() - t0:.0f} s")
    morph, morph_det, names = morphology_features(mias_dir, truths, detector)
    fp_feats, fp_images = false_marks(mias_dir, detector, names)
    log(f"  {len(fp_images)} false marks of the detector on "
        f"{len(set(fp_images))} held-out normal images (negatives of the served head)")
    n = len(truths)
    pad = np.full((len(fp_images), morph.shape[1]), np.nan)
    from models.detector.train import mias_patient

    return ClusterSet(
        [t.image for t in truths] + fp_images,
        np.array([t.patient for t in truths] + [mias_patient(r) for r in fp_images]),
        np.array([t.label for t in truths] + [0] * len(fp_images)), feats,
        np.vstack([morph, pad]), names, np.vstack([morph_det, fp_feats]), n_clusters=n)


def false_marks(mias_dir: Path, detector: Path, names: tuple[str, ...]
                ) -> tuple[np.ndarray, list[str]]:
    """Features of every cluster the detector reports at its operating point on the normal
    images it never trained on (the held-out half of its split): what the node will meet."""
    from models.detector.anatomy import breast_mask
    from models.detector.clusters import CLUSTER_FEATURES
    from models.detector.model import DetectorModel
    from models.detector.train import MIAS_MM, read_png01, split

    det = DetectorModel.load(detector)
    seed = int(det.training.get("seed", 0))
    keep = [CLUSTER_FEATURES.index(n) for n in names]
    rows, images = [], []
    for ref in split(mias_dir, seed=seed).test_normals:
        img = read_png01(mias_dir / "png" / f"{ref}.png")
        for c in det.detect(img, breast_mask(img, MIAS_MM), MIAS_MM, view="MLO"):
            rows.append([c.features[i] for i in keep])
            images.append(ref)
    return np.asarray(rows, np.float64).reshape(-1, len(keep)), images


# ----------------------------------------------------------------------------- heads


class LinearHead:
    """Standardise -> (PCA) -> L2 logistic regression; ``raw`` logit; foldable into one affine
    map of the input features (``affine``)."""

    def __init__(self, n_components: int | None, c: float, seed: int) -> None:
        self.n_components, self.c, self.seed = n_components, c, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearHead:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        self.pca = None
        if self.n_components:
            self.pca = PCA(self.n_components, random_state=self.seed).fit(z)
            z = self.pca.transform(z)
        self.lr = LogisticRegression(C=self.c, class_weight="balanced", max_iter=2000).fit(z, y)
        return self

    def raw(self, x: np.ndarray) -> np.ndarray:
        w, b = self.affine()
        return x @ w + b

    def affine(self) -> tuple[np.ndarray, float]:
        """(w, b) with raw(x) = x @ w + b."""
        coef, b = self.lr.coef_[0], float(self.lr.intercept_[0])
        if self.pca is not None:
            b += float(-self.pca.mean_ @ self.pca.components_.T @ coef)
            coef = self.pca.components_.T @ coef
        w = coef / self.sd
        return w, b - float(self.mu @ w)


def config_logits(cs: ClusterSet, config: str, tr: np.ndarray, te: np.ndarray, seed: int,
                  heads: list | None = None) -> np.ndarray:
    """Out-of-fold logits of ``config`` for the clusters ``te``, trained on ``tr``."""
    parts = []
    nets = [n for n in NETS if SHORT[n] in config]
    for net in nets:
        f = cs.crops[net]  # (n, 8 views, C): train on every view, score the crop as it is
        xtr = f[tr].reshape(-1, f.shape[2])
        ytr = np.repeat(cs.labels[tr], f.shape[1])
        h = LinearHead(n_components=8, c=0.1, seed=seed).fit(xtr, ytr)
        if heads is not None:
            heads.append((net, h))
        parts.append(h.raw(f[te, 0]))
    if "morphology" in config:
        m = cs.morphology_detected if "detected" in config else cs.morphology
        h = LinearHead(None, c=0.1, seed=seed).fit(m[tr], cs.labels[tr])
        if heads is not None:
            heads.append(("morphology", h))
        parts.append(h.raw(m[te]))
    return np.mean(parts, axis=0)


CONFIGS = (PRIMARY, "Lite0+Lite1+Lite2", "Lite0", "Lite1", "Lite2", "morphology",
           "Lite0 + morphology")


SERVED = "morphology of the detected cluster"
SERVED_ALL = "morphology of the detected cluster, all marks (malignant vs benign + false marks)"


def _oof(cs: ClusterSet, config: str, idx: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold logits of ``config`` over the clusters ``idx`` (one stratified group split)."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.zeros(len(idx))
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in split.split(np.zeros(len(idx)), cs.labels[idx], cs.patients[idx]):
        out[te] = config_logits(cs, config, idx[tr], idx[te], seed)
    return out


def summarise(cs: ClusterSet, idx: np.ndarray, oof: np.ndarray, seed: int) -> dict:
    from models.metrics import bootstrap_ci

    y = cs.labels[idx]
    mean_logit = oof.mean(axis=0)
    auc = roc_auc(y, mean_logit)
    lo, hi = bootstrap_ci(y, mean_logit, cs.patients[idx], "auc", n_boot=2000, seed=seed)
    per = [roc_auc(y, o) for o in oof]
    return {"auc": auc, "auc_ci95": [lo, hi], "auc_per_repeat_mean": float(np.mean(per)),
            "auc_per_repeat_sd": float(np.std(per)), "n": int(len(idx)),
            "n_malignant": int(y.sum()), "oof_logit": mean_logit.tolist(),
            "index": idx.tolist()}


def cross_validate(cs: ClusterSet, folds: int, repeats: int, seed: int = 0) -> dict[str, dict]:
    """Every configuration at the annotated centre (all clusters), and the served one on the
    detected clusters; out-of-fold logits averaged over ``repeats`` splits."""
    out = {}
    every = np.arange(cs.n_clusters)
    for config in CONFIGS:
        oof = np.stack([_oof(cs, config, every, folds, seed + r) for r in range(repeats)])
        out[config] = summarise(cs, every, oof, seed)
    # served: every detected cluster and every false mark on held-out normals; AUC reported on
    # the clusters (benign vs malignant) and on all marks (malignant vs the rest)
    marks = np.nonzero(np.isfinite(cs.morphology_detected).all(axis=1))[0]
    oof = np.stack([_oof(cs, SERVED, marks, folds, seed + r) for r in range(repeats)])
    clusters = marks < cs.n_clusters
    out[SERVED] = summarise(cs, marks[clusters], oof[:, clusters], seed)
    out[SERVED_ALL] = summarise(cs, marks, oof, seed)
    return out


def nested_selection(cs: ClusterSet, folds: int, repeats: int, seed: int = 0) -> dict:
    """The whole procedure "choose the configuration with the best inner-CV AUC, fit it" scored
    by an outer patient-grouped CV: the estimate that pays for having looked at the table."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = cs.n_clusters
    oof = np.zeros((repeats, n))
    chosen: dict[str, int] = {}
    for r in range(repeats):
        outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + 100 + r)
        for tr, te in outer.split(np.zeros(n), cs.labels[:n], cs.patients[:n]):
            inner = {c: roc_auc(cs.labels[tr], _oof(cs, c, tr, folds - 1, seed + r))
                     for c in CONFIGS}
            best = max(CONFIGS, key=lambda c: (inner[c], -CONFIGS.index(c)))
            chosen[best] = chosen.get(best, 0) + 1
            oof[r, te] = config_logits(cs, best, tr, te, seed + r)
    res = summarise(cs, np.arange(n), oof, seed)
    res["chosen"] = chosen
    return res


# ----------------------------------------------------------------------------- calibration


def platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of P = sigmoid(a * logit + b), maximum likelihood (lightly regularised)."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=10.0, max_iter=1000).fit(logit.reshape(-1, 1), y)
    return float(m.coef_[0, 0]), float(m.intercept_[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 5) -> tuple[list[dict], float]:
    """Equal-width reliability bins and the expected calibration error (weighted |gap|)."""
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for i in range(bins):
        sel = (p >= edges[i]) & ((p < edges[i + 1]) if i < bins - 1 else (p <= 1))
        if not sel.any():
            continue
        mp, fy = float(p[sel].mean()), float(y[sel].mean())
        rows.append({"bin": [float(edges[i]), float(edges[i + 1])], "n": int(sel.sum()),
                     "mean_predicted": mp, "observed_malignant": fy})
        ece += sel.mean() * abs(mp - fy)
    return rows, float(ece)


def calibration_report(logit: np.ndarray, y: np.ndarray, patients: np.ndarray) -> dict:
    """Platt fitted on all out-of-fold logits (what the card stores), and its honest error:
    each woman's clusters calibrated by a Platt fitted without her (leave-one-woman-out)."""
    a, b = platt(logit, y)
    raw_p = sigmoid(logit)
    cross = np.zeros_like(logit)
    for p in np.unique(patients):
        te = patients == p
        aa, bb = platt(logit[~te], y[~te])
        cross[te] = sigmoid(aa * logit[te] + bb)
    raw_rows, raw_ece = reliability(raw_p, y)
    cal_rows, cal_ece = reliability(cross, y)
    return {"a": a, "b": b, "ece_uncalibrated": raw_ece, "ece_calibrated_lowo": cal_ece,
            "reliability_uncalibrated": raw_rows, "reliability_calibrated_lowo": cal_rows,
            "brier_uncalibrated": float(np.mean((raw_p - y) ** 2)),
            "brier_calibrated_lowo": float(np.mean((cross - y) ** 2)),
            "calibrated_lowo": cross.tolist()}


def youden(p: np.ndarray, y: np.ndarray) -> float:
    from models.train import youden_threshold

    return youden_threshold(y, p)


def plot_reliability(cal: dict, path: Path) -> None:
    """Reliability diagram: out-of-fold uncalibrated vs Platt (leave-one-woman-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for key, label in (("reliability_uncalibrated", "out-of-fold, uncalibrated"),
                       ("reliability_calibrated_lowo", "Platt, leave-one-woman-out")):
        rows = cal[key]
        ax.plot([r["mean_predicted"] for r in rows], [r["observed_malignant"] for r in rows],
                "o-", label=label)
    ax.set_xlabel("predicted P(malignant)")
    ax.set_ylabel("observed fraction malignant")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"ECE {cal['ece_uncalibrated']:.2f} -> {cal['ece_calibrated_lowo']:.2f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- shipping


def served_head(cs: ClusterSet, idx: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, float]:
    """The served morphology head: the mean (w, b) of the fold heads of one CV split over the
    marks ``idx`` (detected clusters and false marks; a fold ensemble: averaging linear logits
    is one linear map)."""
    from sklearn.model_selection import StratifiedGroupKFold

    ws, bs = [], []
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, _ in split.split(np.zeros(len(idx)), cs.labels[idx], cs.patients[idx]):
        h = LinearHead(None, c=0.1, seed=seed).fit(cs.morphology_detected[idx[tr]],
                                                    cs.labels[idx[tr]])
        w, b = h.affine()
        ws.append(w)
        bs.append(b)
    return np.mean(ws, axis=0), float(np.mean(bs))


def main(a: argparse.Namespace, command: str) -> int:
    from models.train import configure_cpu

    if not (Path(a.mias_dir) / "calc_annotations.csv").is_file():
        raise SystemExit(f"mini-MIAS not found in {a.mias_dir} (png/, Info.txt, "
                         "calc_annotations.csv): pass --mias-dir")
    configure_cpu(1)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"benign vs malignant on the mini-MIAS clusters ({a.roi_size_mm:g} mm at "
          f"{a.input_size} px; {a.folds}-fold patient-grouped CV x {a.repeats})")
    cs = build(Path(a.mias_dir), a.roi_size_mm, a.input_size, Path(a.detector))
    res = cross_validate(cs, a.folds, a.repeats, a.seed)
    nested = nested_selection(cs, a.folds, max(1, a.repeats // 4), a.seed)
    print(f"  nested selection (outer CV)      AUC {nested['auc']:.3f} "
          f"[{nested['auc_ci95'][0]:.3f}, {nested['auc_ci95'][1]:.3f}]; chosen {nested['chosen']}")
    for config, r in res.items():
        print(f"  {config:<32} AUC {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, "
              f"{r['auc_ci95'][1]:.3f}]  n = {r['n']}  (per repeat {r['auc_per_repeat_mean']:.3f}"
              f" +- {r['auc_per_repeat_sd']:.3f})")
    served, marks = res[SERVED], res[SERVED_ALL]
    idx = np.asarray(marks["index"])  # calibration and threshold: every mark the node shows
    y = cs.labels[idx]
    logit = np.asarray(marks["oof_logit"])
    cal = calibration_report(logit, y, cs.patients[idx])
    # Platt only where it helps out of sample: with a couple of dozen clusters its own fit can
    # cost more than it corrects (leave-one-woman-out Brier score decides)
    method = "platt" if cal["brier_calibrated_lowo"] < cal["brier_uncalibrated"] else "identity"
    cal["method"] = method
    p_cal = sigmoid(cal["a"] * logit + cal["b"]) if method == "platt" else sigmoid(logit)
    thr = youden(p_cal, y)
    false = idx >= cs.n_clusters
    is_c = ~false
    calls = {
        "false_marks": int(false.sum()),
        "false_marks_called_malignant": int((p_cal[false] >= thr).sum()),
        "malignant_clusters_called_malignant": int((p_cal[is_c & (y == 1)] >= thr).sum()),
        "malignant_clusters": int((is_c & (y == 1)).sum()),
        "benign_clusters_called_malignant": int((p_cal[is_c & (y == 0)] >= thr).sum()),
        "benign_clusters": int((is_c & (y == 0)).sum()),
    }
    plot_reliability(cal, out / "reliability.png")
    w, b = served_head(cs, idx, a.folds, a.seed)
    n_c = int(is_c.sum())
    wall = round(time.perf_counter() - t0, 1)
    evidence = {
        "validation": "patient-grouped cross-validation",
        "task": "benign vs malignant calcification clusters",
        "data": f"mini-MIAS, the {n_c} of the {cs.n_clusters} located clusters that the "
                f"detector finds ({int(y[is_c].sum())} malignant, {int((1 - y[is_c]).sum())} "
                f"benign) and its {int(false.sum())} false marks on held-out normal images "
                f"(negatives), {len(set(cs.patients[idx]))} women, digitised film at 0.2 mm",
        "config": SERVED + " (logistic head on the detector's cluster features)",
        "folds": a.folds, "repeats": a.repeats, "n_clusters": n_c,
        "auc": served["auc"], "auc_ci95": served["auc_ci95"],
        "auc_all_marks": marks["auc"], "auc_all_marks_ci95": marks["auc_ci95"],
        "calls_at_threshold_out_of_fold": calls,
        "threshold_source": "out-of-fold",
        "calibration": {"method": method, "fitted_on": "out-of-fold",
                        "a": cal["a"] if method == "platt" else 1.0,
                        "b": cal["b"] if method == "platt" else 0.0,
                        "platt_a_b": [cal["a"], cal["b"]],
                        "chosen_by": "leave-one-woman-out Brier score of the out-of-fold "
                                     "predictions, Platt vs none",
                        "ece_uncalibrated": cal["ece_uncalibrated"],
                        "ece_calibrated_lowo": cal["ece_calibrated_lowo"],
                        "brier_uncalibrated": cal["brier_uncalibrated"],
                        "brier_calibrated_lowo": cal["brier_calibrated_lowo"]},
        "selection": {"note": "configuration chosen after the table below; the nested CV "
                              "scores the choose-then-fit procedure",
                      "nested_auc": nested["auc"], "nested_auc_ci95": nested["auc_ci95"],
                      "chosen": nested["chosen"]},
        "primary": {"config": PRIMARY, "auc": res[PRIMARY]["auc"],
                    "auc_ci95": res[PRIMARY]["auc_ci95"]},
        "validated_for": {"pixel_spacing_mm": [0.15, 0.25],
                          "images": "digitised screen-film mammograms (MLO), mini-MIAS-like"},
        "head": {"kind": "morphology", "features": list(cs.morph_names),
                 "w": [float(v) for v in w], "b": b},
        "measured_with": command,
    }
    (out / "results.json").write_text(json.dumps(
        {"configs": res, "nested": nested, "calibration": cal, "threshold": thr, "calls": calls,
         "evidence": evidence, "images": cs.images, "labels": cs.labels.tolist(),
         "patients": cs.patients.tolist(), "command": command, "wall_s": wall},
        indent=1) + "\n")
    write_report(out / "report.md", res, nested, cal, thr, evidence, command, wall)
    if a.card:
        write_card(Path(a.card), evidence, thr, a.detector_file, a.version)
    print(f"wrote {out}/report.md ({wall:.0f} s)")
    return 0


def write_card(card_path: Path, evidence: dict, thr: float, detector_file: str,
               version: str) -> None:
    """Put the classification evidence, the served head, the out-of-fold threshold and the
    detector file into an existing card (its CNN weights are kept), as model ``version``
    (a new version: the node's result UIDs follow the model's identity)."""
    from models.card import ModelCard, classification_validated

    card = ModelCard.load(card_path)
    card.version = version
    card.classification = dict(evidence)
    card.threshold = float(min(max(thr, 1e-3), 1 - 1e-3))
    card.detector_file = detector_file
    ok, why = classification_validated(card)
    card.classification["rule_outcome"] = why
    card.save(card_path)
    print(f"wrote {card_path}: classification {'validated' if ok else 'NOT validated'} ({why})")


def write_report(path: Path, res: dict, nested: dict, cal: dict, thr: float, ev: dict,
                 command: str, wall: float) -> None:
    lines = [
        "# Benign vs malignant calcification clusters: patient-grouped CV on mini-MIAS", "",
        f"Command ({wall:.0f} s on 2 shared CPU cores):", "", "    " + command, "",
        f"{ev['folds']}-fold stratified group k-fold by woman, repeated {ev['repeats']} times; "
        "each cluster's out-of-fold logit averaged over the repeats; 95 % interval: bootstrap "
        "over women (2,000 resamples). CNN features: ImageNet EfficientNet-Lite0/1/2, frozen, "
        "32 mm ROI at the annotated centre; morphology: the detector's candidates within "
        f"{MORPH_RADIUS_MM:g} mm of the annotated centre (the annotated radius is never used: "
        "it would leak the label, malignant radii being larger). The primary configuration, "
        f"fixed in advance, is **{PRIMARY}**.", "",
        "| configuration | clusters | AUC | 95 % CI | AUC per repeat (mean ± SD) |",
        "|---|---:|---:|---|---|",
    ]
    for config, r in res.items():
        name = f"**{config}**" if config in (PRIMARY, SERVED, SERVED_ALL) else config
        lines.append(f"| {name} | {r['n']} ({r['n_malignant']} M) | {r['auc']:.3f} | "
                     f"{r['auc_ci95'][0]:.2f}–{r['auc_ci95'][1]:.2f} | "
                     f"{r['auc_per_repeat_mean']:.3f} ± {r['auc_per_repeat_sd']:.3f} |")
    lines += [
        f"| nested CV of choosing the best row above | {nested['n']} | {nested['auc']:.3f} | "
        f"{nested['auc_ci95'][0]:.2f}–{nested['auc_ci95'][1]:.2f} | chosen: "
        + ", ".join(f"{k} ×{v}" for k, v in nested["chosen"].items()) + " |",
        "", f"Target AUC ≥ 0.76: the pre-declared primary reaches {res[PRIMARY]['auc']:.3f} "
        f"({'met' if res[PRIMARY]['auc'] >= 0.76 else 'missed'}); the served configuration "
        f"({SERVED}) {res[SERVED]['auc']:.3f} on the clusters the detector finds "
        f"({'met' if res[SERVED]['auc'] >= 0.76 else 'missed'}). The CNN features alone are at "
        "chance on this data; the signal is in the cluster morphology (number and spread of "
        "specks, elongation, extent).",
        "", "## Served configuration and calibration", "",
        f"The node serves `{ev['config']}`: the heads of the {ev['folds']} folds of one split "
        "averaged, trained on what the node meets: the detected clusters and the detector's "
        "false marks on the normal images it never trained on (label: not malignant). "
        f"Out-of-fold AUC benign vs malignant {ev['auc']:.3f} (95 % CI {ev['auc_ci95'][0]:.2f}–"
        f"{ev['auc_ci95'][1]:.2f}, n = {ev['n_clusters']} clusters); malignant vs every other "
        f"mark {ev['auc_all_marks']:.3f} ({ev['auc_all_marks_ci95'][0]:.2f}–"
        f"{ev['auc_all_marks_ci95'][1]:.2f}). At the threshold, out of fold: "
        f"{ev['calls_at_threshold_out_of_fold']['malignant_clusters_called_malignant']}/"
        f"{ev['calls_at_threshold_out_of_fold']['malignant_clusters']} malignant clusters, "
        f"{ev['calls_at_threshold_out_of_fold']['benign_clusters_called_malignant']}/"
        f"{ev['calls_at_threshold_out_of_fold']['benign_clusters']} benign clusters and "
        f"{ev['calls_at_threshold_out_of_fold']['false_marks_called_malignant']}/"
        f"{ev['calls_at_threshold_out_of_fold']['false_marks']} false marks called malignant.",
        "",
        f"Platt calibration (on every mark) fitted on the out-of-fold logits: a = {cal['a']:.3f}, "
        f"b = {cal['b']:.3f}; scored out of sample by leave-one-woman-out (each woman's marks "
        "calibrated by a fit without her): expected "
        f"calibration error (5 bins) {cal['ece_uncalibrated']:.3f} without, "
        f"{cal['ece_calibrated_lowo']:.3f} with Platt; Brier {cal['brier_uncalibrated']:.3f} "
        f"without, {cal['brier_calibrated_lowo']:.3f} with. Served: "
        f"**{cal['method']}** (the lower out-of-sample Brier score); decision threshold (Youden "
        f"on the served out-of-fold P(malignant)): {thr:.3f}.", "",
        "| bin | n | mean predicted (out-of-fold) | observed malignant | n | mean predicted "
        "(Platt, LOWO) | observed malignant |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    raw = {tuple(r["bin"]): r for r in cal["reliability_uncalibrated"]}
    cald = {tuple(r["bin"]): r for r in cal["reliability_calibrated_lowo"]}
    for b in sorted(set(raw) | set(cald)):
        cells = []
        for table in (raw, cald):
            r = table.get(b)
            cells += ([str(r["n"]), f"{r['mean_predicted']:.2f}", f"{r['observed_malignant']:.2f}"]
                      if r else ["0", "–", "–"])
        lines.append(f"| {b[0]:.1f}–{b[1]:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "![reliability](reliability.png)", ""]
    path.write_text("\n".join(lines))
