"""Classifier throughput: ROIs/s of the shipped model and of EfficientNet B0-B4.

Every model runs through the node's own :class:`node.analysis.classify.Classifier` (device
selection, precision/autocast, channels_last, batching). B0-B4 get random weights (``timm``,
``pretrained=False``: nothing is downloaded) written as a temporary card + safetensors file, at
timm's default input size for each. Throughput does not depend on the weights' values.
ROIs/s is the best of the timed calls (batch / fastest call): other processes on a shared
machine only ever slow a call down. Each model runs in a fresh process with
``OMP_WAIT_POLICY=PASSIVE`` unless the caller sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models/weights/calc-cluster-lite0.json"


@dataclass
class ClassifierResult:
    model: str
    input_size: int
    batch: int
    device: str
    precision: str
    rois_per_s: float
    with_cam: bool


def _random_card(arch: str, folder: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    from models.card import ModelCard

    model = timm.create_model(arch, pretrained=False, num_classes=2, in_chans=3)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / f"{arch}.safetensors"))
    card = ModelCard(name=f"bench-{arch}", version="random", architecture=arch, input_size=size,
                     roi_size_mm=12.8, weights_file=f"{arch}.safetensors")
    path = folder / f"{arch}.json"
    card.save(path)
    return path


def measure(card: Path, batch: int, *, device: str = "auto", precision: str = "auto",
            seconds: float = 2.0, with_cam: bool = False) -> ClassifierResult:
    import torch

    from node.analysis.classify import Classifier

    # Random-init B0-B4 produce denormal activations that slow a CPU 3-4x; trained weights
    # rarely do. Flushing them measures the network, not the denormal penalty.
    torch.set_flush_denormal(True)
    clf = Classifier(card, device=device, batch_size=batch, precision=precision,
                     network=True)
    size = clf.card.input_size
    rng = np.random.default_rng(0)
    crops = [rng.random((size, size), dtype=np.float32) for _ in range(batch)]
    clf.predict(crops, with_cam=with_cam)  # warm-up (allocator, kernels)
    # Best of several calls: on a shared machine other processes only ever slow a call down.
    calls: list[float] = []
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds or len(calls) < 3:
        t0 = time.perf_counter()
        clf.predict(crops, with_cam=with_cam)
        if clf.device.type == "cuda":
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - t0)
    prec = str(clf.amp_dtype).replace("torch.", "") if clf.amp_dtype else "fp32"
    return ClassifierResult(clf.card.architecture + ("" if card != SHIPPED else " (shipped)"),
                            size, batch, str(clf.device), prec, batch / min(calls), with_cam)


def _measure_model(arch: str, batches: list[int], device: str, precision: str, seconds: float
                   ) -> list[ClassifierResult]:
    """Every batch size of one model (``arch`` "shipped" or a timm name), in this process."""
    if arch == "shipped":
        out = [measure(SHIPPED, b, device=device, precision=precision, seconds=seconds)
               for b in batches]
        out.append(measure(SHIPPED, batches[-1], device=device, precision=precision,
                           seconds=seconds, with_cam=True))
        return out
    with tempfile.TemporaryDirectory(prefix="mammo-bench-clf-") as tmp:
        card = _random_card(arch, Path(tmp))
        return [measure(card, b, device=device, precision=precision, seconds=seconds)
                for b in batches]


def run(archs: list[str], batches: list[int], *, device: str = "auto", precision: str = "auto",
        seconds: float = 2.0) -> list[ClassifierResult]:
    """The shipped model, then each of ``archs``; every model in a fresh process (one model's
    allocator state and caches must not slow the next one down)."""
    out: list[ClassifierResult] = []
    for arch in ["shipped", *archs]:
        res = subprocess.run(
            [sys.executable, "-m", "bench.classifier", "--arch", arch, "--device", device,
             "--precision", precision, "--seconds", str(seconds),
             "--batches", ",".join(map(str, batches))],
            cwd=REPO, capture_output=True, text=True, timeout=900,
            # Sleeping, not spinning, OpenMP workers: on a CPU shared with other processes a
            # spinning worker waits for a descheduled peer and one call can take 10x longer.
            env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
        )
        if res.returncode != 0:
            raise RuntimeError(f"classifier bench of {arch} failed: {res.stderr[-2000:]}")
        out += [ClassifierResult(**r) for r in json.loads(res.stdout.strip().splitlines()[-1])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="shipped", help='"shipped" or a timm EfficientNet name')
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    results = _measure_model(args.arch, [int(b) for b in args.batches.split(",")], args.device,
                             args.precision, args.seconds)
    print(json.dumps([asdict(r) for r in results]))


def table(results: list[ClassifierResult]) -> list[str]:
    rows = ["| model | input px | batch | device | precision | Grad-CAM | ROIs/s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.model} | {r.input_size} | {r.batch} | {r.device} | {r.precision} | "
                    f"{'yes' if r.with_cam else 'no'} | {r.rois_per_s:.1f} |")
    return rows


if __name__ == "__main__":
    main()
