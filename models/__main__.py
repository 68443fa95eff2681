"""Command line of the model research harness.

``python -m models {build-mias,synth,train,evaluate,attach-cv,model-card,import,...}``.

See models/README.md for the dataset format and worked examples.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

DEFAULT_ARCHS = (
    "tf_efficientnet_lite0:double,tf_efficientnet_lite0:imagenet,tf_efficientnet_lite0:scratch,"
    "efficientnet_b0,efficientnet_b1,efficientnet_b2,efficientnet_b3,efficientnet_b4,"
    "resnet50,resnet101,resnext50_32x4d"
)


def _command() -> str:
    return "python -m models " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_build_mias(a: argparse.Namespace) -> None:
    from models.data import build_mias

    p = build_mias(Path(a.mias_dir), Path(a.out), patch_mm=a.patch_mm, n_normals=a.normals,
                   seed=a.seed)
    print(f"wrote {p}")


def cmd_synth(a: argparse.Namespace) -> None:
    from models.synth import write_synthetic

    p = write_synthetic(Path(a.out), a.n, seed=a.seed, size_mm=a.size_mm,
                        spacing_mm=a.spacing_mm)
    print(f"wrote {p}")


def apply_cv(card, results_path: Path, label: str) -> None:
    """Copy the pooled out-of-fold Youden threshold and CV metrics of ``label`` into ``card``."""
    res = json.loads(Path(results_path).read_text())
    r = res["configs"][label]
    if r["input_size"] != card.input_size or res["roi_size_mm"] != card.roi_size_mm:
        raise SystemExit(f"CV config {label} used {r['input_size']} px / {res['roi_size_mm']} mm,"
                         f" the model {card.input_size} px / {card.roi_size_mm} mm")
    card.threshold = float(r["youden_threshold"])
    card.metrics = {
        "source": f"{res['n_folds']}-fold patient-level CV, pooled out-of-fold, config {label}",
        "data": res.get("data", ""),
        "n_rois": res["n_rois"],
        "mean_sd_over_folds_at_0.5": {k: [r["mean"][k], r["sd"][k]] for k in r["mean"]},
        "pooled_auc": r["pooled_oof"]["auc"],
        "pooled_auc_ci95": r["pooled_auc_ci95"],
        "cluster_only_auc": r["cluster_only_auc"],
        "cluster_only_auc_ci95": r["cluster_only_auc_ci95"],
        "pooled_at_threshold": r["pooled_oof_at_youden"],
        "infer_ms_cpu": r["infer_ms"],
    }
    card.measured_with = r.get("command", res["command"])


def cmd_attach_cv(a: argparse.Namespace) -> None:
    from models.card import ModelCard

    card = ModelCard.load(Path(a.card))
    apply_cv(card, Path(a.cv_results), a.cv_config)
    card.save(Path(a.card))
    print(f"{a.card}: threshold {card.threshold:.4f}, pooled AUC {card.metrics['pooled_auc']:.3f}")


def cmd_model_card(a: argparse.Namespace) -> None:
    from models.card import ModelCard
    from models.card_md import render_model_card

    card = ModelCard.load(Path(a.card))
    detector = None
    detector_path = card.detector_path(Path(a.card))
    if detector_path is not None:
        from models.detector.model import DetectorModel

        detector = DetectorModel.load(detector_path)
    Path(a.out).write_text(render_model_card(card, Path(a.card).name, a.report, detector),
                           encoding="utf-8")
    print(f"wrote {a.out}")


def cmd_train(a: argparse.Namespace) -> None:
    from models import arch
    from models.data import load_rois
    from models.evaluate import pretrain_synthetic
    from models.train import configure_cpu, save_model, train_classifier

    configure_cpu(a.threads)
    device = _device(a.device)
    size = a.input_size or arch.native_input_size(a.arch)
    rois = load_rois(Path(a.csv), roi_size_mm=a.roi_size_mm, input_size=size, normals=a.normals)
    init = a.init
    extra: dict = {}
    if init == "double":
        inter = Path(a.out).with_name(Path(a.out).stem + "-intermediate.safetensors")
        if a.intermediate:
            inter = Path(a.intermediate)
        if not inter.exists():
            _, m = pretrain_synthetic(a.arch, inter, roi_size_mm=a.roi_size_mm, input_size=size,
                                      n=a.synth_n, epochs=a.synth_epochs, seed=a.seed,
                                      device=device)
            extra["intermediate_synthetic_test"] = m
        extra["intermediate"] = {"n_synthetic": a.synth_n, "epochs": a.synth_epochs}
        init = str(inter)
    model, card = train_classifier(
        rois.crops, rois.labels.tolist(), architecture=a.arch, input_size=size,
        roi_size_mm=a.roi_size_mm, epochs=a.epochs, seed=a.seed, init=init, device=device,
        val_fraction=a.val_fraction, groups=rois.patients.tolist(), batch_size=a.batch_size,
        lr=a.lr, patience=a.patience, max_steps=a.max_steps,
    )
    card.name, card.version = a.name, a.version
    card.training.update(extra)
    card.training["init"] = a.init
    card.training["data"] = {
        "csv": str(a.csv), "n_rois": len(rois),
        "kinds": {k: int((rois.kinds == k).sum()) for k in sorted(set(rois.kinds.tolist()))},
        "n_patients": len(set(rois.patients.tolist())), "normals": a.normals,
        "description": a.data_desc,
    }
    from models.verify import roi_kinds_of

    kinds = roi_kinds_of(Path(a.csv), a.normals)  # checked by verify-card / model install
    if kinds is not None:
        card.training["data"]["roi_kinds"] = kinds
    card.training["command"] = _command()
    card.data_licence = a.data_licence
    if a.cv_results:
        apply_cv(card, Path(a.cv_results), a.cv_config or f"{a.arch} ({a.init})")
    elif a.threshold is not None:
        card.threshold = a.threshold
    card = save_model(model, card, Path(a.out), fp16=a.fp16)
    print(f"wrote {a.out} and {card.weights_file} (threshold {card.threshold:.4f}, "
          f"{card.training['epochs_run']} epochs, {card.training['wall_s']:.0f}s)")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from models import arch
    from models.data import load_rois
    from models.evaluate import cross_validate, parse_config
    from models.train import configure_cpu

    configure_cpu(a.threads)
    configs = [parse_config(s) for s in a.archs.split(",") if s.strip()]
    sizes = {a.input_size or arch.native_input_size(c.architecture) for c in configs}
    out = Path(a.out)
    t = time.perf_counter()
    results = None
    for size in sorted(sizes):
        rois = load_rois(Path(a.csv), roi_size_mm=a.roi_size_mm, input_size=size,
                         normals=a.normals)
        these = [c for c in configs
                 if (a.input_size or arch.native_input_size(c.architecture)) == size]
        sub = out if len(sizes) == 1 else out / f"{size}px"
        results = cross_validate(
            rois, these, sub, n_folds=a.folds, epochs=a.epochs, input_size=size,
            roi_size_mm=a.roi_size_mm, seed=a.seed, device=_device(a.device), synth_n=a.synth_n,
            synth_epochs=a.synth_epochs, patience=a.patience, command=_command(),
            data_desc=a.data_desc, progress=not a.quiet, lr=a.lr,
        )
    print(f"done in {(time.perf_counter() - t) / 60:.1f} min; report in {out}")
    del results


def cmd_detector(a: argparse.Namespace) -> None:
    from models.detector.run import main as run

    run(a, _command())


def cmd_classify(a: argparse.Namespace) -> None:
    from models.cluster_cv import main as run

    run(a, _command())


def _default_mias_dir() -> str | None:
    """The full mini-MIAS beside the repository (``../shared/data/mini-mias``), if there."""
    here = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mini-mias"
    return str(here) if (here / "Info.txt").exists() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    b = sub.add_parser("build-mias", formatter_class=fmt,
                       help="build a ROI dataset (CSV + PNG patches) from mini-MIAS")
    b.add_argument("--mias-dir", default=_default_mias_dir(),
                   required=_default_mias_dir() is None,
                   help="folder with png/, Info.txt and calc_annotations.csv: the full "
                        "mini-MIAS (322 images); default: ../shared/data/mini-mias beside the "
                        "repository when it exists. tests/data/mini-mias holds a 35-image "
                        "subset (10 normals), enough for a smoke run only")
    b.add_argument("--out", required=True, help="output folder (rois.csv + png/)")
    b.add_argument("--patch-mm", type=float, default=48.0,
                   help="side of the stored patches; any ROI up to this size can be cut later")
    b.add_argument("--normals", type=int, default=54,
                   help="number of normal images that each give one normal-tissue negative")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_build_mias)

    s = sub.add_parser("synth", formatter_class=fmt,
                       help="write synthetic calcification ROIs in the dataset format")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=1000, help="number of ROIs (half malignant)")
    s.add_argument("--size-mm", type=float, default=48.0)
    s.add_argument("--spacing-mm", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--csv", required=True, help="ROI dataset CSV (see models/README.md)")
        q.add_argument("--roi-size-mm", type=float, default=32.0,
                       help="physical side of the ROI cut around each cluster")
        q.add_argument("--input-size", type=int, default=None,
                       help="network input in px (default: each architecture's native size)")
        q.add_argument("--epochs", type=int, default=10, help="maximum epochs")
        q.add_argument("--patience", type=int, default=4, help="early-stopping patience (epochs)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        q.add_argument("--threads", type=int, default=None,
                       help="CPU intra-op threads (default 1: on shared CPUs, more threads than "
                            "free cores is much slower)")
        q.add_argument("--normals", choices=("benign", "drop"), default="benign",
                       help="treat normal-tissue ROIs as negatives, or drop them")
        q.add_argument("--synth-n", type=int, default=600,
                       help="synthetic ROIs for the intermediate stage of double transfer")
        q.add_argument("--synth-epochs", type=int, default=3)
        q.add_argument("--data-desc", default="", help="free-text description for the report")
        q.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")

    t = sub.add_parser("train", formatter_class=fmt,
                       help="train one model and write safetensors + model card JSON")
    common(t)
    t.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture")
    t.add_argument("--init", default="double",
                   help="imagenet | scratch | double (ImageNet/scratch -> synthetic -> target) | "
                        "path to weights of the same architecture")
    t.add_argument("--intermediate", default=None,
                   help="reuse this intermediate (synthetic-stage) weights file for --init double")
    t.add_argument("--out", required=True, help="card path, e.g. models/weights/x.json")
    t.add_argument("--name", default="calc-cluster-classifier")
    t.add_argument("--version", default="0.1.0")
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke runs)")
    t.add_argument("--threshold", type=float, default=None, help="fixed decision threshold")
    t.add_argument("--cv-results", default=None,
                   help="results.json of `evaluate`: copy the pooled-OOF Youden threshold and "
                        "metrics of --cv-config into the card")
    t.add_argument("--cv-config", default=None, help='e.g. "tf_efficientnet_lite0 (double)"')
    t.add_argument("--data-licence", default="")
    t.add_argument("--fp16", action="store_true", help="store weights as fp16")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", formatter_class=fmt,
                       help="patient-level k-fold CV over architectures -> markdown report")
    common(e)
    e.add_argument("--archs", default=DEFAULT_ARCHS,
                   help="comma-separated arch[:init], init in imagenet|scratch|double")
    e.add_argument("--folds", type=int, default=5)
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=cmd_evaluate)

    c = sub.add_parser("attach-cv", formatter_class=fmt,
                       help="put CV metrics + pooled-OOF Youden threshold into an existing card")
    c.add_argument("--card", required=True)
    c.add_argument("--cv-results", required=True, help="results.json written by evaluate")
    c.add_argument("--cv-config", required=True, help='e.g. "tf_efficientnet_lite0 (double)"')
    c.set_defaults(fn=cmd_attach_cv)

    mc = sub.add_parser("model-card", formatter_class=fmt,
                        help="render a human-readable MODEL_CARD.md from a card JSON")
    mc.add_argument("--card", required=True)
    mc.add_argument("--out", required=True)
    mc.add_argument("--report", default="", help="path of the CV report to refer to")
    mc.set_defaults(fn=cmd_model_card)

    from models.importers.cli import add_parser as add_import_parser
    from models.protocols_cli import add_parsers as add_protocol_parsers
    from models.verify import add_parser as add_verify_parser

    add_import_parser(sub)  # python -m models import KIND SRC --out DIR (models/importers/)
    add_protocol_parsers(sub, common)  # seed000 / seed001 (models/protocols.py)
    add_verify_parser(sub)  # verify-card (models/verify.py)

    d = sub.add_parser("detector", formatter_class=fmt,
                       help="train the cluster detector on synthetic clusters in real normals, "
                            "FROC on the real clusters (models/detector/train.py)")
    d.add_argument("--mias-dir", default=_default_mias_dir(),
                   required=_default_mias_dir() is None,
                   help="the full mini-MIAS (default: ../shared/data/mini-mias beside the "
                        "repository when it exists)")
    d.add_argument("--out", default="models/reports/detector", help="report folder")
    d.add_argument("--weights", default="models/weights/calc-detector.json",
                   help="detector file to write ('' = none)")
    d.add_argument("--cache", default=".cache/detector", help="per-image feature cache")
    d.add_argument("--film", type=int, default=3, help="synthetic film copies per normal")
    d.add_argument("--digital", type=int, default=2, help="synthetic digital copies per normal")
    d.add_argument("--target-fp", type=float, default=1.0,
                   help="false clusters per normal training image at the operating point")
    d.add_argument("--cv", type=int, default=5,
                   help="folds of the CV that fine-tunes on real clusters (0 = none)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_detector)

    k = sub.add_parser("classify", formatter_class=fmt,
                       help="benign vs malignant on the real clusters: Lite0/1/2 + morphology, "
                            "patient-grouped CV, calibration (models/cluster_cv.py)")
    k.add_argument("--mias-dir", default=_default_mias_dir(),
                   required=_default_mias_dir() is None,
                   help="the full mini-MIAS (default: ../shared/data/mini-mias beside the "
                        "repository when it exists)")
    k.add_argument("--out", default="models/reports/classification", help="report folder")
    k.add_argument("--roi-size-mm", type=float, default=32.0)
    k.add_argument("--input-size", type=int, default=224)
    k.add_argument("--folds", type=int, default=5)
    k.add_argument("--repeats", type=int, default=20)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--card", default="", help="write the served model + evidence to this card")
    k.add_argument("--version", default="0.2.0")
    k.add_argument("--detector", default="models/weights/calc-detector.json",
                   help="detector whose candidates and clusters give the morphology")
    k.add_argument("--detector-file", default="calc-detector.json",
                   help="detector file named by the card (relative to it)")
    k.set_defaults(fn=cmd_classify)

    a = p.parse_args(argv)
    if a.cmd == "train" and a.init not in ("imagenet", "scratch", "double") \
            and not Path(a.init).exists():
        p.error(f"--init {a.init}: not imagenet/scratch/double and no such file")
    a.fn(a)


if __name__ == "__main__":
    main()
