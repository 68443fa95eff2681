"""Training and clean evaluation of the calcification-cluster detector on mini-MIAS.

``python -m models detector`` (see ``--help``):

1. **Split.** The normal mini-MIAS images are split by woman (mdb(2k-1), mdb(2k) are one
   woman) into training and test halves; a woman who also has a cluster image is always test.
2. **Training images** (training normals only): each normal as it is, twice with synthetic
   clusters as film at 0.2 mm and once as digital at 0.07-0.1 mm (:mod:`models.detector.insert`).
   Candidates inside the synthetic calcium are positives, the real tissue's are negatives.
3. **Stage 1** (boosted trees on candidate features) gives out-of-fold (patient-grouped)
   P(calcification) per training candidate; **stage 2** (boosted trees on cluster features) is
   trained on the clusters formed from those out-of-fold scores (stacking). The candidate keep
   threshold and the default operating point are chosen on the training images' out-of-fold
   scores only: the operating point is the lowest score with at most ``--target-fp`` false
   clusters per normal training image.
4. **Clean test.** The 27 located real clusters (never seen in training) and the held-out
   normals: FROC with 95 % bootstrap intervals over women, and the operating point's
   sensitivity and false clusters per normal image.
5. ``--cv`` adds a patient-grouped k-fold CV that also fine-tunes on the real clusters of the
   training folds (their candidates inside the annotated radius as positives).

Features are cached per image (``--cache``), so a second run only retrains (seconds).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from models.detector.anatomy import breast_mask
from models.detector.candidates import (
    CANDIDATE_FEATURES,
    CandidateParams,
    Candidates,
    find_candidates,
)
from models.detector.clusters import (
    CLUSTER_FEATURES,
    ClusterParams,
    build_clusters,
    suppress_neighbours,
)
from models.detector.froc import (
    FP_RATES,
    Truth,
    best_hit_scores,
    bootstrap_froc,
    froc_curve,
    sensitivity_at,
)
from models.detector.insert import insert_clusters
from models.detector.model import DetectorModel
from models.detector.trees import Forest, fit_forest

MIAS_MM = 0.2


def _cache_version() -> str:
    """Cached features are valid for the code that computed them: a hash of the candidate,
    anatomy and insertion modules' source."""
    from models.detector import anatomy, candidates, insert

    h = hashlib.sha256()
    for mod in (anatomy, candidates, insert, synth_module()):
        if mod.__file__ is None:  # only a namespace package has none; these are source files
            raise RuntimeError(f"{mod.__name__} has no source file to hash")
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def synth_module() -> ModuleType:
    from models import synth

    return synth


CACHE_VERSION = _cache_version()


def mias_patient(ref: str) -> str:
    return f"P{(int(ref[3:]) + 1) // 2:03d}"


def read_png01(path: Path) -> np.ndarray:
    """A mini-MIAS PNG as the node prepares it: 8-bit values / 255, bright = dense."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read {path}")
    return img.astype(np.float32) / 255.0


@dataclass
class Record:
    """The candidates of one (possibly synthetic) training or test image."""

    key: str
    ref: str
    patient: str
    kind: str  # "normal", "synthetic", "cluster"
    spacing_mm: float
    rows: np.ndarray
    cols: np.ndarray
    features: np.ndarray
    labels: np.ndarray  # int8 per candidate: 1 calcification, 0 not, -1 ambiguous
    targets: list[tuple[float, float, float]] = field(default_factory=list)  # (r, c, radius_mm)
    shape: tuple[int, int] = (0, 0)

    def candidates(self) -> Candidates:
        return Candidates(self.rows, self.cols, self.features)


def _label_synthetic(c: Candidates, delta: np.ndarray) -> np.ndarray:
    """1 where the inserted calcium dominates the candidate's contrast, 0 where it is absent."""
    if len(c) == 0:
        return np.zeros(0, np.int8)
    d = cv2.dilate(delta, np.ones((3, 3), np.uint8))
    r = np.clip(np.round(c.rows).astype(int), 0, delta.shape[0] - 1)
    k = np.clip(np.round(c.cols).astype(int), 0, delta.shape[1] - 1)
    add = d[r, k]
    contrast = np.maximum(np.abs(c.feature("contrast")), 1e-3)
    lab = np.full(len(c), -1, np.int8)
    lab[(add >= 0.5 * contrast) & (add >= 0.004)] = 1
    lab[add < 0.2 * contrast] = 0
    return lab


def _record_from(key: str, ref: str, kind: str, img: np.ndarray, spacing: float,
                 labels_fn, targets) -> Record:
    mask = breast_mask(img, spacing)
    c = find_candidates(img, mask, spacing, CandidateParams(), view="MLO")
    return Record(key, ref, mias_patient(ref), kind, spacing, c.rows, c.cols, c.features,
                  labels_fn(c), list(targets), img.shape)


def make_record(mias_dir: Path, ref: str, variant: str, truths: Sequence[Truth] = ()) -> Record:
    """Candidates of ``ref`` as ``variant``: "clean", "cluster", "film<k>" or "digital<k>"."""
    img = read_png01(mias_dir / "png" / f"{ref}.png")
    key = f"{ref}-{variant}"
    if variant in ("clean", "cluster"):
        tr = [t for t in truths if t.image == ref]

        def labels(c: Candidates) -> np.ndarray:
            lab = np.zeros(len(c), np.int8)
            for t in tr:
                d = np.hypot(c.rows - t.row, c.cols - t.col) * MIAS_MM
                lab[(d > t.radius_mm) & (d <= t.radius_mm + 5.0) & (lab == 0)] = -1
                lab[d <= t.radius_mm] = 1
            return lab

        return _record_from(key, ref, "cluster" if tr else "normal", img, MIAS_MM, labels,
                            [(t.row, t.col, t.radius_mm) for t in tr])
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    mask = breast_mask(img, MIAS_MM)
    acq = "film" if variant.startswith("film") else "digital"
    syn = insert_clusters(img, mask, MIAS_MM, rng, n_clusters=3, acquisition=acq)
    return _record_from(key, ref, "synthetic", syn.image01, syn.spacing_mm,
                        lambda c: _label_synthetic(c, syn.delta),
                        [(k.centre_rc[0], k.centre_rc[1], k.radius_mm) for k in syn.clusters])


def cached_record(cache: Path, mias_dir: Path, ref: str, variant: str,
                  truths: Sequence[Truth] = ()) -> Record:
    path = cache / f"{ref}-{variant}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta.get("version") == CACHE_VERSION:
            return Record(meta["key"], ref, meta["patient"], meta["kind"], meta["spacing_mm"],
                          z["rows"], z["cols"], z["features"], z["labels"],
                          [tuple(t) for t in meta["targets"]], tuple(meta["shape"]))
    rec = make_record(mias_dir, ref, variant, truths)
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "key": rec.key, "patient": rec.patient, "kind": rec.kind,
            "spacing_mm": rec.spacing_mm, "targets": rec.targets, "shape": list(rec.shape)}
    np.savez_compressed(path, rows=rec.rows, cols=rec.cols, features=rec.features,
                        labels=rec.labels, meta=json.dumps(meta))
    return rec


# ----------------------------------------------------------------------------- data


@dataclass
class MiasSplit:
    truths: list[Truth]
    cluster_images: list[str]
    train_normals: list[str]
    test_normals: list[str]


def read_truths(mias_dir: Path) -> list[Truth]:
    import csv

    out = []
    with open(mias_dir / "calc_annotations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if not row["x"]:
                continue  # diffuse, no centre
            out.append(Truth(row["refnum"], mias_patient(row["refnum"]),
                             float(row["y_top_origin"]), float(row["x"]),
                             float(row["radius"]) * MIAS_MM, 1 if row["severity"] == "M" else 0))
    return out


def read_normals(mias_dir: Path) -> list[str]:
    refs = set()
    for line in (mias_dir / "Info.txt").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("mdb") and parts[2] == "NORM":
            refs.add(parts[0])
    return sorted(refs)


def split(mias_dir: Path, seed: int = 0, test_fraction: float = 0.5) -> MiasSplit:
    truths = read_truths(mias_dir)
    cluster_images = sorted({t.image for t in truths})
    normals = read_normals(mias_dir)
    cluster_patients = {t.patient for t in truths}
    patients = sorted({mias_patient(r) for r in normals} - cluster_patients)
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_test = int(round(test_fraction * len(patients)))
    test_p = set(patients[:n_test]) | cluster_patients
    return MiasSplit(
        truths, cluster_images,
        [r for r in normals if mias_patient(r) not in test_p],
        [r for r in normals if mias_patient(r) in test_p],
    )


# ----------------------------------------------------------------------------- training


@dataclass
class StageData:
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    weight: np.ndarray


def _stage1_data(records: Sequence[Record]) -> StageData:
    xs, ys, gs, ws = [], [], [], []
    for rec in records:
        ok = rec.labels >= 0
        xs.append(rec.features[ok])
        ys.append(rec.labels[ok])
        gs.append(np.full(int(ok.sum()), rec.patient))
        # real clusters' candidates are weak labels (not every speck in the radius is calcium)
        ws.append(np.full(int(ok.sum()), 0.5 if rec.kind == "cluster" else 1.0))
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(int)
    w = np.concatenate(ws)
    pos = y == 1
    w[pos] *= max(1.0, (~pos).sum() / max(pos.sum(), 1) / 5.0)  # positives: ~1/6 of the weight
    return StageData(x, y, np.concatenate(gs), w)


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(uniq))
    return [np.isin(groups, uniq[perm[i::k]]) for i in range(k)]


def oof_candidate_scores(records: Sequence[Record], k: int = 5, seed: int = 0
                         ) -> dict[str, np.ndarray]:
    """Out-of-fold stage-1 P per candidate of every record (folds by woman)."""
    data = _stage1_data(records)
    patients = np.array([r.patient for r in records])
    out: dict[str, np.ndarray] = {}
    for test in _folds(patients, k, seed):
        test_p = set(patients[test])
        tr = ~np.isin(data.groups, list(test_p))
        forest = fit_forest(data.x[tr], data.y[tr], CANDIDATE_FEATURES, seed=seed,
                            sample_weight=data.weight[tr])
        for rec in records:
            if rec.patient in test_p:
                out[rec.key] = forest.predict_proba(rec.features.astype(np.float64))
    return out


def clusters_of(rec: Record, p: np.ndarray, keep: float) -> list:
    return build_clusters(rec.candidates(), p, p >= keep, rec.spacing_mm, ClusterParams())


def _cluster_label(rec: Record, cl, margin_mm: float = 3.0) -> int:
    if rec.kind == "normal":
        return 0
    near = [np.hypot(cl.centre_rc[0] - r, cl.centre_rc[1] - c) * rec.spacing_mm <= rad + margin_mm
            for r, c, rad in rec.targets]
    if rec.kind == "cluster":
        if any(np.hypot(cl.centre_rc[0] - r, cl.centre_rc[1] - c) * rec.spacing_mm <= rad + 2.0
               for r, c, rad in rec.targets):
            return 1
        far = all(np.hypot(cl.centre_rc[0] - r, cl.centre_rc[1] - c) * rec.spacing_mm > rad + 10
                  for r, c, rad in rec.targets)
        return 0 if far else -1
    n_pos = int((rec.labels[list(cl.members)] == 1).sum())
    if n_pos >= 2 and any(near):
        return 1
    if n_pos == 0 and not any(near):
        return 0
    return -1


def stage2_table(records: Sequence[Record], scores: dict[str, np.ndarray], keep: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, object]]]:
    xs, ys, gs, refs = [], [], [], []
    for rec in records:
        for cl in clusters_of(rec, scores[rec.key], keep):
            lab = _cluster_label(rec, cl)
            if lab < 0:
                continue
            xs.append(cl.features)
            ys.append(lab)
            gs.append(rec.patient)
            refs.append((rec.key, cl))
    x = np.asarray(xs, np.float64).reshape(-1, len(CLUSTER_FEATURES))
    return x, np.asarray(ys, int), np.asarray(gs), refs


def fit_stage2(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Forest:
    pos = y == 1
    w = np.ones(len(y))
    w[pos] = max(1.0, (~pos).sum() / max(pos.sum(), 1))
    return fit_forest(x, y, CLUSTER_FEATURES, seed=seed, max_iter=120, max_leaf_nodes=8,
                      learning_rate=0.06, sample_weight=w)


def synthetic_froc(records: Sequence[Record], scored: dict[str, list[tuple[float, float, float]]]
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(best hit score per synthetic cluster, FP scores on clean normals, number of normals)."""
    truths, spacing = [], {}
    for rec in records:
        spacing[rec.key] = rec.spacing_mm
        if rec.kind == "synthetic":
            truths += [Truth(rec.key, rec.patient, r, c, rad) for r, c, rad in rec.targets]
    best = best_hit_scores(truths, scored, spacing)
    normals = [r for r in records if r.kind == "normal"]
    fps = np.array([s for r in normals for _, _, s in scored.get(r.key, [])])
    return best, fps, len(normals)


def score_records(records: Sequence[Record], cand_scores: dict[str, np.ndarray], keep: float,
                  forest: Forest) -> dict[str, list[tuple[float, float, float]]]:
    out: dict[str, list[tuple[float, float, float]]] = {}
    for rec in records:
        cls = clusters_of(rec, cand_scores[rec.key], keep)
        if not cls:
            out[rec.key] = []
            continue
        s = forest.predict_proba(np.array([c.features for c in cls]))
        kept = suppress_neighbours(np.array([c.centre_rc for c in cls]), s, rec.spacing_mm,
                                   ClusterParams().merge_mm)
        out[rec.key] = [(cls[i].centre_rc[0], cls[i].centre_rc[1], float(s[i])) for i in kept]
    return out


def train_detector(records: Sequence[Record], *, seed: int = 0, target_fp: float = 1.0,
                   keep_grid: Sequence[float] = (0.1, 0.2, 0.35, 0.5), folds: int = 5,
                   log=print) -> tuple[DetectorModel, dict]:
    """Both stages, keep threshold and operating point, all chosen on ``records`` alone."""
    t0 = time.perf_counter()
    oof1 = oof_candidate_scores(records, folds, seed)
    log(f"  stage 1 out-of-fold scores: {time.perf_counter() - t0:.0f} s")
    patients = np.array([r.patient for r in records])
    choice = {}
    for keep in keep_grid:
        x, y, g, _ = stage2_table(records, oof1, keep)
        oof2: dict[str, list[tuple[float, float, float]]] = {}
        for test in _folds(patients, folds, seed + 1):
            test_p = set(patients[test])
            tr = ~np.isin(g, list(test_p))
            forest2 = fit_stage2(x[tr], y[tr], seed)
            oof2.update(score_records([r for r in records if r.patient in test_p], oof1, keep,
                                      forest2))
        best, fps, n_norm = synthetic_froc(records, oof2)
        sens_k, thr_k = sensitivity_at(best, fps, n_norm, (target_fp,))
        choice[keep] = (float(sens_k[0]), float(thr_k[0]), best, fps, n_norm)
        log(f"  keep {keep:.2f}: {len(y)} training clusters ({int(y.sum())} positive); "
            f"out-of-fold synthetic sensitivity {sens_k[0]:.1%} at {target_fp:g} FP/normal")
    keep = max(keep_grid, key=lambda k: (choice[k][0], -k))
    sens, op, best, fps, n_norm = choice[keep]
    forest1 = fit_forest(*_xy1(records), CANDIDATE_FEATURES, seed=seed,
                         sample_weight=_stage1_data(records).weight)
    x, y, _, _ = stage2_table(records, oof1, keep)
    forest2 = fit_stage2(x, y, seed)
    curve = {str(r): float(v) for r, v in zip(FP_RATES, sensitivity_at(best, fps, n_norm)[0],
                                              strict=True)}
    info = {"keep_threshold": keep, "operating_point": op, "target_fp_per_normal": target_fp,
            "train_oof_synthetic_sensitivity_at_target": sens,
            "train_oof_synthetic_froc": curve, "n_train_clusters": int(len(y)),
            "n_train_positive_clusters": int(y.sum()),
            "n_train_candidates": int(sum(len(r.labels) for r in records)),
            "wall_s": round(time.perf_counter() - t0, 1)}
    model = DetectorModel(name="calc-detector", version="0.2.0", candidate_forest=forest1,
                          cluster_forest=forest2, keep_threshold=keep, operating_point=op)
    return model, info


def _xy1(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    d = _stage1_data(records)
    return d.x, d.y


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: DetectorModel, test: Sequence[Record], truths: Sequence[Truth],
             n_boot: int = 2000, seed: int = 0) -> dict:
    """FROC on the real clusters and held-out normals (records from the clean test set)."""
    cand = {r.key: model.candidate_forest.predict_proba(r.features.astype(np.float64))
            for r in test}
    scored = score_records(test, cand, model.keep_threshold, model.cluster_forest)
    by_ref = {r.ref: scored[r.key] for r in test}
    spacing = {r.ref: r.spacing_mm for r in test}
    best = best_hit_scores(truths, by_ref, spacing)
    normals = [r for r in test if r.kind == "normal"]
    normal_fp = {r.ref: np.array([s for _, _, s in scored[r.key]]) for r in normals}
    fps = np.concatenate(list(normal_fp.values())) if normals else np.zeros(0)
    sens, thr = sensitivity_at(best, fps, len(normals))
    ci = bootstrap_froc(truths, best, normal_fp, {r.ref: r.patient for r in normals},
                        n_boot=n_boot, seed=seed)
    op = model.operating_point
    op_sens = float(np.mean(best >= op))
    op_fp = float((fps >= op).sum() / max(len(normals), 1))
    fpi, sc = froc_curve(best, fps, len(normals))
    return {
        "n_clusters": len(truths), "n_cluster_images": len({t.image for t in truths}),
        "n_normals": len(normals),
        "froc": [{"fp_per_normal": r, "sensitivity": float(s), "ci95": [float(a), float(b)],
                  "threshold": float(t)} for r, s, (a, b), t in zip(FP_RATES, sens, ci, thr,
                                                                     strict=True)],
        "operating_point": {"score": op, "sensitivity": op_sens, "fp_per_normal": op_fp,
                            "detected": int(round(op_sens * len(truths)))},
        "never_detected": sorted({t.image for t, b in zip(truths, best, strict=True)
                                  if not np.isfinite(b)}),
        "missed_at_operating_point": sorted({t.image for t, b in zip(truths, best, strict=True)
                                             if b < op}),
        "best_scores": [float(b) if np.isfinite(b) else None for b in best],
        "curve": {"fp_per_normal": fpi.tolist(), "sensitivity": sc.tolist()},
    }


def cross_validate(train: Sequence[Record], real: Sequence[Record], normals: Sequence[Record],
                   truths: Sequence[Truth], *, folds: int = 5, seed: int = 0,
                   log=print) -> dict:
    """Patient-grouped k-fold over the real cluster images and the held-out normals: each fold
    trains on the synthetic training set plus the other folds' real images, tests on its own."""
    pool = list(real) + list(normals)
    patients = np.array([r.patient for r in pool])
    all_best = np.full(len(truths), -np.inf)
    normal_fp: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for k, test in enumerate(_folds(patients, folds, seed + 7)):
        test_p = set(patients[test])
        fit = list(train) + [r for r in pool if r.patient not in test_p]
        model, _ = train_detector(fit, seed=seed, keep_grid=(0.2,), folds=3,
                                  log=lambda *_: None)
        held = [r for r in pool if r.patient in test_p]
        idx = [i for i, t in enumerate(truths) if t.patient in test_p]
        res = evaluate(model, held, [truths[i] for i in idx], n_boot=1)
        for j, i in enumerate(idx):
            b = res["best_scores"][j]
            all_best[i] = -np.inf if b is None else b
        cand = {r.key: model.candidate_forest.predict_proba(r.features.astype(np.float64))
                for r in held if r.kind == "normal"}
        scored = score_records([r for r in held if r.kind == "normal"], cand,
                               model.keep_threshold, model.cluster_forest)
        for r in held:
            if r.kind == "normal":
                normal_fp[r.ref] = np.array([s for _, _, s in scored[r.key]])
        log(f"  CV fold {k + 1}/{folds}: {len(idx)} clusters, "
            f"{sum(r.kind == 'normal' for r in held)} normals ({time.perf_counter() - t0:.0f} s)")
    fps = np.concatenate(list(normal_fp.values()))
    sens, thr = sensitivity_at(all_best, fps, len(normal_fp))
    ci = bootstrap_froc(truths, all_best, normal_fp,
                        {r.ref: r.patient for r in normals}, seed=seed)
    return {"folds": folds, "n_normals": len(normal_fp),
            "froc": [{"fp_per_normal": r, "sensitivity": float(s), "ci95": [float(a), float(b)]}
                     for r, s, (a, b) in zip(FP_RATES, sens, ci, strict=True)],
            "note": "fold-wise scores pooled; each fold has its own model and thresholds"}
