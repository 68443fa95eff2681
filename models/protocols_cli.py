"""``python -m models seed000`` / ``seed001`` (argument parsing only; see models/protocols.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction,
                common: Callable[[argparse.ArgumentParser], None]) -> None:
    from models.protocols import SEED000_ARCHS

    fmt = argparse.ArgumentDefaultsHelpFormatter

    def shared(q: argparse.ArgumentParser) -> None:
        common(q)
        q.add_argument("--out", required=True, help="report folder (rerun it to resume)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--workers", type=int, default=0,
                       help="DataLoader workers decoding and cropping the ROIs")
        q.add_argument("--imagenet-weights", action="append", default=[],
                       metavar="ARCH=FILE",
                       help="timm-layout ImageNet weights for an architecture without offline "
                            "weights (repeatable)")

    s0 = sub.add_parser("seed000", formatter_class=fmt,
                        help="EfficientNet-B0..B4 vs ResNet-50/101: patient-level k-fold CV, "
                             "Wilcoxon, inference time, box/ROC plots")
    shared(s0)
    s0.add_argument("--archs", default=",".join(SEED000_ARCHS),
                    help="comma-separated arch[:init] (init imagenet|scratch|double)")
    s0.add_argument("--folds", type=int, default=5)
    s0.set_defaults(fn=cmd_seed000, input_size_default=224)

    s1 = sub.add_parser("seed001", formatter_class=fmt,
                        help="ResNeXt, double transfer learning, balanced held-out test split, "
                             "ensemble, Grad-CAM panels")
    shared(s1)
    s1.add_argument("--arch", default="resnext50_32x4d")
    s1.add_argument("--inits", default="double",
                    help="comma-separated arms: double (ImageNet -> intermediate -> target), "
                         "imagenet, scratch")
    s1.add_argument("--intermediate-csv", default=None,
                    help="ROI CSV of the intermediate mammography set (e.g. an imported "
                         "CBIS-DDSM); default: synthetic calcification ROIs")
    s1.add_argument("--intermediate-epochs", type=int, default=5)
    s1.add_argument("--test-fraction", type=float, default=0.2,
                    help="test split size per class, as a fraction of the minority class")
    s1.add_argument("--ensemble", type=int, default=5, help="k of the development CV = members")
    s1.add_argument("--threshold", default="youden",
                    help="youden (pooled out-of-fold development predictions) or a number")
    s1.add_argument("--gradcam", type=int, default=8, help="ROIs per Grad-CAM panel")
    s1.add_argument("--data-licence", default="",
                    help="licence of the training data, written into the member cards")
    s1.set_defaults(fn=cmd_seed001, input_size_default=224, normals="drop")


def _command() -> str:
    return "python -m models " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def _prepare(a: argparse.Namespace):
    from models import imagenet
    from models.__main__ import _device
    from models.data import load_rois
    from models.train import configure_cpu

    configure_cpu(a.threads)
    imagenet.parse_registrations(a.imagenet_weights)
    a.data_desc = a.data_desc or f"ROIs of {a.csv}"
    size = a.input_size or a.input_size_default
    rois = load_rois(Path(a.csv), roi_size_mm=a.roi_size_mm, input_size=size, normals=a.normals,
                     workers=a.workers)
    return rois, size, _device(a.device)


def cmd_seed000(a: argparse.Namespace) -> None:
    from models.protocols import run_seed000

    t = time.perf_counter()
    rois, size, device = _prepare(a)
    run_seed000(rois, Path(a.out), archs=[s for s in a.archs.split(",") if s.strip()],
                n_folds=a.folds, epochs=a.epochs, input_size=size, roi_size_mm=a.roi_size_mm,
                seed=a.seed, device=device, synth_n=a.synth_n, synth_epochs=a.synth_epochs,
                patience=a.patience, lr=a.lr, command=_command(), data_desc=a.data_desc,
                progress=not a.quiet)
    print(f"done in {(time.perf_counter() - t) / 60:.1f} min; report in {a.out}/report.md")


def cmd_seed001(a: argparse.Namespace) -> None:
    from models.protocols import run_seed001

    t = time.perf_counter()
    rois, size, device = _prepare(a)
    try:
        run_seed001(rois, Path(a.out), architecture=a.arch,
                    inits=tuple(s.strip() for s in a.inits.split(",") if s.strip()),
                    intermediate_csv=Path(a.intermediate_csv) if a.intermediate_csv else None,
                    test_fraction=a.test_fraction, k=a.ensemble, epochs=a.epochs,
                    inter_epochs=a.intermediate_epochs, input_size=size,
                    roi_size_mm=a.roi_size_mm, seed=a.seed, device=device,
                    threshold=a.threshold, patience=a.patience, lr=a.lr, synth_n=a.synth_n,
                    synth_epochs=a.synth_epochs, normals=a.normals, gradcam_n=a.gradcam,
                    command=_command(), data_desc=a.data_desc, progress=not a.quiet,
                    data_licence=a.data_licence, csv_path=Path(a.csv))
    except ValueError as exc:
        raise SystemExit(f"seed001: {exc}") from None
    print(f"done in {(time.perf_counter() - t) / 60:.1f} min; report in {a.out}/report.md")
