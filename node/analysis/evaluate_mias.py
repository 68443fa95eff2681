"""Evaluate the analysis stage on mini-MIAS: ``python -m node.analysis.evaluate_mias``.

The 27 located calcification clusters (22 images) and the 207 normal images are written as MG For
Presentation DICOM (the node's own input form, ``node.testdata.mias_to_mg``) and read back through
:func:`node.analysis.prepare.prepare`, then:

* Detection: every image goes through :func:`node.analysis.rois.find_clusters`. A ground-truth
  cluster is detected when a reported ROI's centre lies within its radius + 2 mm. Sensitivity is
  over the 27 clusters, false clusters are counted on the 207 normal images. FROC points come from
  sweeping the cluster score; the node's operating point is ``[analysis] min_cluster_score``
  (``DetectorParams.min_score``).
* Classification: benign-vs-malignant AUC of the detected clusters, each scored by a model that
  never saw its patient: patient-grouped stratified k-fold (mini-MIAS pairs mdb(2k-1), mdb(2k) are
  one woman), one ``models.train.train_classifier`` per fold on crops of the training clusters
  (``models.roi.crop_roi``, the serving crop). 95 % CI: bootstrap over patients.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.roi import crop_roi
from node.analysis.prepare import PreparedImage, prepare
from node.analysis.rois import Cluster, DetectorParams, find_clusters
from node.testdata import full_mias_dir, mias_clusters, mias_normals, mias_to_mg

MATCH_MARGIN_MM = 2.0


def mias_patient(refnum: str) -> int:
    return (int(refnum[3:]) + 1) // 2


def prepare_all(refs: list[str], tmp: Path, mias_dir: Path) -> dict[str, PreparedImage]:
    out = {}
    for ref in refs:
        path = tmp / f"{ref}.dcm"
        mias_to_mg(ref, path, mias_dir=mias_dir)
        out[ref] = prepare(path)
    return out


def hit(cluster: Cluster, gt, spacing: float) -> bool:  # noqa: ANN001 - MiasCluster
    d = np.hypot(cluster.centre_rc[0] - gt.y, cluster.centre_rc[1] - gt.x) * spacing
    return bool(d <= gt.radius_px * spacing + MATCH_MARGIN_MM)


def froc(gts, found, normals_found, n_normals):  # noqa: ANN001
    """Return (thresholds, sensitivity, FP per normal image) for a sweep of cluster scores."""
    fp_scores = np.sort(np.array([c.score for cl in normals_found.values() for c in cl]))[::-1]
    best = []
    for g in gts:
        im_spacing = found[g.refnum][1]
        s = [c.score for c in found[g.refnum][0] if hit(c, g, im_spacing)]
        best.append(max(s) if s else -np.inf)
    best = np.array(best)
    thresholds = np.unique(np.concatenate([fp_scores, best[np.isfinite(best)], [np.inf]]))[::-1]
    sens = np.array([(best >= t).mean() for t in thresholds])
    fpi = np.array([(fp_scores >= t).sum() / n_normals for t in thresholds])
    return thresholds, sens, fpi, best


def sens_at(fpi_target: float, sens: np.ndarray, fpi: np.ndarray) -> float:
    ok = fpi <= fpi_target + 1e-12
    return float(sens[ok].max()) if ok.any() else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m node.analysis.evaluate_mias", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    full = full_mias_dir()
    ap.add_argument("--mias-dir", type=Path, default=full, required=full is None,
                    help="the full mini-MIAS (png/, Info.txt, calc_annotations.csv); default: "
                         "../shared/data/mini-mias beside the repository when it exists. The "
                         "35-image subset in tests/data/mini-mias (10 normals) gives no "
                         "meaningful false-positive figures")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--architecture", default="tf_efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--roi-size-mm", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-auc", action="store_true", help="detection only (no training)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    gts = mias_clusters(a.mias_dir)
    normals = mias_normals(a.mias_dir)
    cluster_refs = sorted({g.refnum for g in gts})
    params = DetectorParams()
    detect = DetectorParams(**{**params.__dict__, "min_score": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_all(cluster_refs + normals, Path(tmp), a.mias_dir)
    found = {}
    for ref, im in prepared.items():
        cl, _ = find_clusters(im.image01, im.breast_mask, im.pixel_spacing_mm, detect)
        found[ref] = (cl, im.pixel_spacing_mm)
    t_det = time.perf_counter() - t0
    thresholds, sens, fpi, best = froc(
        gts, found, {r: found[r][0] for r in normals}, len(normals)
    )
    op = params.min_score
    op_sens = float((best >= op).mean())
    op_fpi = sum(sum(c.score >= op for c in found[r][0]) for r in normals) / len(normals)

    print("mini-MIAS evaluation of the analysis stage (node input form: MG DICOM, 0.2 mm)")
    print(f"  {len(gts)} located calcification clusters on {len(cluster_refs)} images "
          f"({sum(g.severity == 'B' for g in gts)} benign, {sum(g.severity == 'M' for g in gts)} "
          f"malignant); {len(normals)} normal images; detection {t_det:.0f} s")
    print(f"  hit = ROI centre within cluster radius + {MATCH_MARGIN_MM:g} mm")
    print(f"Detection at the operating point (min_score {op:g}): sensitivity {op_sens:.1%} "
          f"({int(round(op_sens * len(gts)))}/{len(gts)}), {op_fpi:.2f} false clusters per normal"
          " image")
    print("FROC (false clusters per normal image -> sensitivity):")
    for target in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        ok = fpi <= target + 1e-12
        thr = thresholds[ok][np.argmax(sens[ok])] if ok.any() else np.inf
        print(f"  {target:>5g} -> {sens_at(target, sens, fpi):.1%}   (cluster score >= {thr:.1f})")
    print(f"  max sensitivity {sens.max():.1%} at {fpi[np.argmax(sens)]:.2f} FP/image")
    s1 = sens_at(1.0, sens, fpi)
    print(f"Target: sensitivity >= 90 % at <= 1 FP/normal image: {s1:.1%} "
          f"({'met' if s1 >= 0.9 else f'missed by {90 - 100 * s1:.1f} points'})")
    missed = [g.refnum for g, b in zip(gts, best, strict=True) if not np.isfinite(b)]
    print(f"  never detected at any threshold: {', '.join(missed) or 'none'}")
    if a.no_auc:
        return 0
    return _auc(a, gts, prepared, found, best)


def _auc(a, gts, prepared, found, best) -> int:  # noqa: ANN001
    import torch
    from sklearn.model_selection import StratifiedGroupKFold

    from models.metrics import bootstrap_ci, roc_auc
    from models.train import configure_cpu, predict_proba, train_classifier
    from node.analysis.classify import resolve_device

    configure_cpu()
    device = str(resolve_device(a.device))
    y = np.array([1 if g.severity == "M" else 0 for g in gts])
    groups = np.array([mias_patient(g.refnum) for g in gts])

    def crop(ref: str, rc: tuple[float, float]) -> np.ndarray:
        im = prepared[ref]
        return crop_roi(im.image01, rc, im.pixel_spacing_mm, a.roi_size_mm, a.input_size)

    gt_crops = [crop(g.refnum, (g.y, g.x)) for g in gts]
    # the detected ROI for each ground-truth cluster: the best-scoring hitting cluster
    det_crops: list[np.ndarray | None] = []
    for g, b in zip(gts, best, strict=True):
        if not np.isfinite(b):
            det_crops.append(None)
            continue
        sp = found[g.refnum][1]
        c = max((c for c in found[g.refnum][0] if hit(c, g, sp)), key=lambda c: c.score)
        det_crops.append(crop(g.refnum, c.centre_rc))
    p_gt = np.full(len(gts), np.nan)
    p_det = np.full(len(gts), np.nan)
    folds = StratifiedGroupKFold(n_splits=a.folds, shuffle=True, random_state=a.seed)
    t0 = time.perf_counter()
    for k, (tr, te) in enumerate(folds.split(np.zeros(len(y)), y, groups)):
        train_crops = [gt_crops[i] for i in tr]
        model, card = train_classifier(
            train_crops, y[tr].tolist(), architecture=a.architecture, input_size=a.input_size,
            roi_size_mm=a.roi_size_mm, epochs=a.epochs, seed=a.seed + k, device=device,
            val_fraction=0.0, groups=[str(v) for v in groups[tr]], progress=False,
        )
        p_gt[te] = predict_proba(model, [gt_crops[i] for i in te], card, device=device)
        det_idx = [i for i in te if det_crops[i] is not None]
        if det_idx:
            p_det[det_idx] = predict_proba(model, [det_crops[i] for i in det_idx], card,
                                           device=device)
        print(f"  fold {k + 1}/{a.folds}: trained on {len(tr)} clusters, tested on {len(te)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del model
        torch.set_num_threads(torch.get_num_threads())
    print(f"Benign vs malignant, {a.folds}-fold patient-grouped CV, {a.architecture} "
          f"(ImageNet init), {a.input_size} px for {a.roi_size_mm:g} mm, {a.epochs} epochs:")
    for name, p in (("detected clusters (ROI at the detected centre)", p_det),
                    ("all 27 clusters (ROI at the annotated centre)", p_gt)):
        ok = np.isfinite(p)
        if ok.sum() < 4 or len(np.unique(y[ok])) < 2:
            print(f"  {name}: too few to score")
            continue
        auc = roc_auc(y[ok], p[ok])
        lo, hi = bootstrap_ci(y[ok], p[ok], groups[ok], "auc")
        n_m, n_b = int(y[ok].sum()), int((1 - y[ok]).sum())
        verdict = "met" if auc >= 0.8 else f"missed by {0.8 - auc:.2f}"
        print(f"  {name}: AUC {auc:.3f} (95 % CI {lo:.3f}-{hi:.3f}), n = {ok.sum()} "
              f"({n_m} M / {n_b} B); target >= 0.80 {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
