"""Smoke training on tiny synthetic data (CPU, a few steps), CLI and dataset format."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from models.__main__ import main
from models.card import ModelCard
from models.data import load_rois
from models.synth import synthetic_crops, write_synthetic
from models.train import load_model, predict_proba, save_model, train_classifier


def test_train_classifier_smoke(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    crops, labels = synthetic_crops(12, roi_size_mm=16.0, input_size=64, seed=0)
    model, card = train_classifier(crops, labels, input_size=64, roi_size_mm=16.0, epochs=2,
                                   seed=0, init="imagenet", val_fraction=0.25, progress=False)
    assert card.architecture == "tf_efficientnet_lite0" and card.input_size == 64
    assert card.mean == (0.5, 0.5, 0.5)
    assert 0 < card.threshold < 1
    p = predict_proba(model, crops, card)
    assert p.shape == (12,) and np.all((p >= 0) & (p <= 1))
    card_path = tmp_path / "m.json"
    save_model(model, card, card_path)
    model2, card2 = load_model(card_path)
    np.testing.assert_allclose(predict_proba(model2, crops, card2), p, atol=1e-5)


def test_train_is_seeded() -> None:
    crops, labels = synthetic_crops(8, roi_size_mm=16.0, input_size=48, seed=1)
    kw = dict(architecture="efficientnet_b0", input_size=48, roi_size_mm=16.0, epochs=1, seed=3,
              init="scratch", val_fraction=0.0, progress=False, max_steps=2, batch_size=4)
    m1, c1 = train_classifier(crops, labels, **kw)
    m2, _ = train_classifier(crops, labels, **kw)
    np.testing.assert_allclose(predict_proba(m1, crops, c1), predict_proba(m2, crops, c1),
                               atol=1e-5)


def test_dataset_format_and_cli_train(tmp_path: Path) -> None:
    csv_path = write_synthetic(tmp_path / "syn", 10, seed=0, size_mm=24.0, spacing_mm=0.2)
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert {"path", "label", "patient_id", "fold", "pixel_spacing_mm"} <= set(rows[0])
    rois = load_rois(csv_path, roi_size_mm=16.0, input_size=48)
    assert len(rois) == 10 and rois.crops[0].shape == (48, 48)
    assert rois.labels.tolist() == [0, 1] * 5
    out = tmp_path / "card.json"
    main(["train", "--csv", str(csv_path), "--out", str(out), "--init", "scratch",
          "--arch", "efficientnet_b0", "--input-size", "48", "--roi-size-mm", "16",
          "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
          "--threads", "1"])
    card = ModelCard.load(out)
    assert card.weights_file == "card.safetensors" and card.weights_sha256
    assert card.training["data"]["n_rois"] == 10


def test_cli_evaluate_writes_report(tmp_path: Path) -> None:
    csv_path = write_synthetic(tmp_path / "syn", 12, seed=2, size_mm=24.0, spacing_mm=0.2)
    out = tmp_path / "cv"
    common = ["evaluate", "--csv", str(csv_path), "--out", str(out), "--folds", "2",
              "--epochs", "1", "--input-size", "48", "--roi-size-mm", "16", "--device", "cpu",
              "--threads", "1", "--quiet"]
    main([*common, "--archs", "efficientnet_b0"])
    # a second run into the same folder adds configurations on the same folds
    main([*common, "--archs", "efficientnet_b0,tf_efficientnet_lite0:scratch"])
    report = (out / "report.md").read_text()
    assert "Wilcoxon" in report and "efficientnet_b0 (scratch)" in report
    import json

    res = json.loads((out / "results.json").read_text())
    assert len(res["configs"]["efficientnet_b0 (scratch)"]["per_fold"]) == 2
    assert all(0 <= p <= 1 for p in res["configs"]["efficientnet_b0 (scratch)"]["oof"])
    assert list(res["configs"]) == ["efficientnet_b0 (scratch)", "tf_efficientnet_lite0 (scratch)"]
    assert len(res["commands"]) == 2
