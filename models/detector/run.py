"""``python -m models detector``: train the detector, evaluate it cleanly, write file and report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from models.detector import train as T
from models.detector.froc import FP_RATES
from models.detector.model import feature_fingerprint


def variants_of(a: argparse.Namespace) -> tuple[str, ...]:
    """Each training normal as it is, ``--film`` times with synthetic film clusters and
    ``--digital`` times as a digital image with synthetic clusters."""
    return ("clean", *[f"film{i}" for i in range(a.film)],
            *[f"digital{i}" for i in range(a.digital)])


def build_records(a: argparse.Namespace, s: T.MiasSplit, log=print):
    t0 = time.perf_counter()
    cache = Path(a.cache)
    variants = variants_of(a)
    train = [T.cached_record(cache, Path(a.mias_dir), ref, v) for ref in s.train_normals
             for v in variants]
    log(f"  training images: {len(train)} ({len(s.train_normals)} normals x {len(variants)}: "
        f"{', '.join(variants)}), {time.perf_counter() - t0:.0f} s")
    real = [T.cached_record(cache, Path(a.mias_dir), ref, "cluster", s.truths)
            for ref in s.cluster_images]
    normals = [T.cached_record(cache, Path(a.mias_dir), ref, "clean") for ref in s.test_normals]
    log(f"  test images: {len(real)} with clusters, {len(normals)} normals, "
        f"{time.perf_counter() - t0:.0f} s in all")
    return train, real, normals


def froc_rows(res: dict) -> list[str]:
    head = "| false clusters / normal image | " + " | ".join(f"{r:g}" for r in FP_RATES) + " |"
    sep = "|---|" + "---:|" * len(FP_RATES)
    sens = "| sensitivity (27 clusters) | " + " | ".join(
        f"{100 * f['sensitivity']:.1f} %" for f in res["froc"]) + " |"
    ci = "| 95 % bootstrap interval | " + " | ".join(
        f"{100 * f['ci95'][0]:.0f}–{100 * f['ci95'][1]:.0f} %" for f in res["froc"]) + " |"
    return [head, sep, sens, ci]


def plot_froc(res: dict, cv: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    c = res["curve"]
    ax.step(c["fp_per_normal"], c["sensitivity"], where="post", label="clean protocol")
    xs = [f["fp_per_normal"] for f in res["froc"]]
    lo = [f["ci95"][0] for f in res["froc"]]
    hi = [f["ci95"][1] for f in res["froc"]]
    ax.fill_between(xs, lo, hi, alpha=0.2, step=None, label="95 % bootstrap interval")
    if cv:
        ax.plot([f["fp_per_normal"] for f in cv["froc"]], [f["sensitivity"] for f in cv["froc"]],
                "o--", label="CV with real clusters")
    op = res["operating_point"]
    ax.plot([op["fp_per_normal"]], [op["sensitivity"]], "r*", ms=12,
            label="default operating point")
    ax.set_xscale("log")
    ax.set_xlim(0.05, 10)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false clusters per normal image")
    ax.set_ylabel("sensitivity (27 mini-MIAS clusters)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(a: argparse.Namespace, command: str) -> int:
    if not (Path(a.mias_dir) / "calc_annotations.csv").is_file():
        raise SystemExit(f"mini-MIAS not found in {a.mias_dir} (png/, Info.txt, "
                         "calc_annotations.csv): pass --mias-dir")
    t_all = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = T.split(Path(a.mias_dir), seed=a.seed)
    print(f"mini-MIAS: {len(s.truths)} located clusters on {len(s.cluster_images)} images; "
          f"normals: {len(s.train_normals)} training, {len(s.test_normals)} test (split by woman)")
    train, real, normals = build_records(a, s)
    t0 = time.perf_counter()
    model, info = T.train_detector(train, seed=a.seed, target_fp=a.target_fp)
    print(f"trained in {time.perf_counter() - t0:.0f} s: keep {info['keep_threshold']}, "
          f"operating point {info['operating_point']:.3f}")
    res = T.evaluate(model, real + normals, s.truths, seed=a.seed)
    op = res["operating_point"]
    print(f"clean test: operating point {op['score']:.3f}: sensitivity {op['sensitivity']:.1%} "
          f"({op['detected']}/{res['n_clusters']}) at {op['fp_per_normal']:.2f} FP/normal image")
    for f in res["froc"]:
        print(f"  {f['fp_per_normal']:>5g} FP/normal -> {f['sensitivity']:.1%} "
              f"[{f['ci95'][0]:.1%}, {f['ci95'][1]:.1%}]")
    cv = None
    if a.cv:
        cv = T.cross_validate(train, real, normals, s.truths, folds=a.cv, seed=a.seed)
        for f in cv["froc"]:
            print(f"  CV {f['fp_per_normal']:>5g} FP/normal -> {f['sensitivity']:.1%} "
                  f"[{f['ci95'][0]:.1%}, {f['ci95'][1]:.1%}]")
    wall = round(time.perf_counter() - t_all, 1)
    model.metrics = {
        "clean_test": {k: v for k, v in res.items() if k not in ("curve", "best_scores")},
        "cv_with_real_clusters": cv, "measured_with": command, "wall_s": wall,
    }
    model.training = {**info, "feature_fingerprint": feature_fingerprint(),
                      "data": "mini-MIAS normal images (training half, split by woman) "
                      "with synthetic clusters (models.detector.insert)",
                      "n_train_normals": len(s.train_normals), "variants": list(variants_of(a)),
                      "seed": a.seed}
    if a.weights:
        model.save(Path(a.weights))
        print(f"wrote {a.weights}")
    (out / "results.json").write_text(json.dumps({"clean_test": res, "cv": cv, "training": info,
                                                  "command": command, "wall_s": wall},
                                                 indent=1) + "\n")
    plot_froc(res, cv, out / "froc.png")
    write_report(out / "report.md", res, cv, info, s, command, wall)
    print(f"wrote {out}/report.md, results.json, froc.png ({wall:.0f} s)")
    return 0


def write_report(path: Path, res: dict, cv: dict | None, info: dict, s: T.MiasSplit,
                 command: str, wall: float) -> None:
    op = res["operating_point"]
    lines = [
        "# Calcification-cluster detector: FROC on mini-MIAS",
        "",
        f"Command ({wall:.0f} s on 2 shared CPU cores, features cached after the first run):",
        "", "    " + command, "",
        "## Clean protocol (trained on synthetic clusters in real normals only)",
        "",
        f"Training: {len(s.train_normals)} normal images (one half of the women with normal "
        f"images), each as it is and with synthetic clusters (film at 0.2 mm, digital at "
        f"0.07–0.1 mm); {info['n_train_candidates']} candidates, {info['n_train_clusters']} "
        f"training clusters ({info['n_train_positive_clusters']} synthetic). Test: the "
        f"{res['n_clusters']} located real clusters on {res['n_cluster_images']} images and "
        f"{res['n_normals']} held-out normal images, never used in training or for any "
        "threshold. Hit: reported centre within the annotated radius + 2 mm.",
        "",
        *froc_rows(res),
        "",
        f"Default operating point (score ≥ {op['score']:.3f}, chosen on the training images' "
        f"out-of-fold scores for {info['target_fp_per_normal']:g} false cluster per normal "
        f"image): **{100 * op['sensitivity']:.1f} % ({op['detected']}/{res['n_clusters']}) at "
        f"{op['fp_per_normal']:.2f} false clusters per normal test image**.",
        "",
        f"Never detected at any threshold: {', '.join(res['never_detected']) or 'none'}. "
        f"Missed at the operating point: {', '.join(res['missed_at_operating_point']) or 'none'}.",
        "",
    ]
    if cv:
        lines += [
            f"## Patient-grouped {cv['folds']}-fold CV, fine-tuned on real clusters",
            "",
            "Each fold trains on the synthetic training set plus the real cluster images and "
            "held-out normals of the other folds, and is tested on its own women (scores "
            "pooled over folds).",
            "",
            *froc_rows(cv),
            "",
        ]
    lines += ["![FROC](froc.png)", ""]
    path.write_text("\n".join(lines))
