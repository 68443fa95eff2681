"""Classifier loading, Grad-CAM against a known case, and the whole pipeline on a real study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import timm
import torch

from models.card import ModelCard
from models.train import default_card, save_model
from node.analysis.classify import Classifier
from node.analysis.gradcam import logits_and_cam
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput
from node.config import AnalysisSettings, ModelSettings
from tests.testdata import mias_four_view

ARCH = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def card_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=2, in_chans=3)
    card = default_card(ARCH, 96, 12.8)
    card.name, card.version = "test-random", "0.0.1"
    path = tmp_path_factory.mktemp("card") / "c.json"
    save_model(model, card, path)
    return path


def test_card_errors_are_clear(card_path: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="efficientnet_b0"):
        Classifier(card_path, architecture="efficientnet_b0", device="cpu")
    with pytest.raises(RuntimeError, match="does not exist"):
        Classifier(tmp_path / "none.json", device="cpu")
    card = ModelCard.load(card_path)
    bad = tmp_path / "bad.json"
    card.weights_file = str(card_path.with_suffix(".safetensors"))
    card.weights_sha256 = "0" * 64
    card.save(bad)
    with pytest.raises(RuntimeError, match="does not match"):
        Classifier(bad, device="cpu")
    card.weights_sha256 = ""
    card.num_classes = 3
    card.save(bad)
    with pytest.raises(RuntimeError, match="does not fit"):
        Classifier(bad, device="cpu")
    card.num_classes, card.weights_file = 2, "missing.safetensors"
    card.save(bad)
    with pytest.raises(RuntimeError, match="does not exist"):
        Classifier(bad, device="cpu")


def test_gradcam_matches_full_backward_and_cam_analytics(card_path: Path) -> None:
    clf = Classifier(card_path, device="cpu")
    model = clf.model
    torch.manual_seed(1)
    x = torch.randn(3, 3, 96, 96)
    logits, cam = logits_and_cam(model, x, head_only=True)
    logits_f, cam_f = logits_and_cam(model, x, head_only=False)
    torch.testing.assert_close(logits, logits_f)
    torch.testing.assert_close(cam, cam_f, atol=1e-5, rtol=1e-4)
    # known case: global average pooling + linear head => Grad-CAM == CAM = ReLU(sum_k w_k A_k)
    with torch.no_grad():
        feats = model.forward_features(x)
        w = model.classifier.weight[1]
        ref = torch.relu(torch.einsum("k,nkhw->nhw", w, feats))
        ref = ref / ref.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(cam, ref, atol=1e-5, rtol=1e-4)
    assert cam.shape == (3, 3, 3) and float(cam.max()) == pytest.approx(1.0)
    # parameters are left trainable as they were
    assert all(p.requires_grad for p in model.parameters())


def test_pipeline_on_a_real_four_view_study(card_path: Path, tmp_path: Path) -> None:
    paths = mias_four_view(tmp_path / "study", refs=("mdb239", "mdb240", "mdb241", "mdb242"))
    images = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        images.append(ImageInput(p, ds.SOPInstanceUID, ds.SOPClassUID))
    pipe = AnalysisPipeline(ModelSettings(card=card_path, architecture=ARCH, device="auto",
                                          batch_size=4), AnalysisSettings(sc_max_side=512))
    a = pipe.analyse("1.2.3.4", images)
    b = pipe.analyse("1.2.3.4", images)
    assert {(i.laterality, i.view) for i in a.images} == {
        ("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    assert a.findings, "mdb239/mdb241 carry malignant clusters"
    assert [f.index for f in a.findings] == list(range(1, len(a.findings) + 1))
    for ia in a.images:
        assert ia.analysed and ia.display.dtype == np.uint8 and max(ia.display.shape) <= 512
        assert ia.cam.shape == ia.display.shape and 0.0 <= ia.cam.min() <= ia.cam.max() <= 1.0
        assert ia.display_scale == pytest.approx(512 / 1024)
        for f in ia.findings:
            assert 0.0 <= f.probability <= 1.0
            # the CAM is painted where the finding is
            r = int(f.centre_xy[1] * ia.display_scale)
            c = int(f.centre_xy[0] * ia.display_scale)
            assert ia.cam[max(r - 20, 0): r + 20, max(c - 20, 0): c + 20].max() > 0
        if not ia.findings:
            assert ia.cam.max() == 0
        else:  # Grad-CAM feathered and smoothed: no square patch edges, nothing off the breast
            assert ia.cam_source == "Grad-CAM"
            assert np.abs(np.diff(ia.cam, axis=0)).max() < 0.2
            assert np.abs(np.diff(ia.cam, axis=1)).max() < 0.2
            assert ia.cam[:8, :8].max() == ia.cam[-8:, -8:].max() == 0.0
    assert set(a.timings_ms) >= {"decode", "rois", "classify", "gradcam"}
    # determinism: same input, same output
    assert a.findings == b.findings
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_array_equal(x.cam, y.cam)
    assert set(a.max_probability_per_breast()) == {"L", "R"}


def test_unreadable_image_is_skipped_not_fatal(card_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    pipe = AnalysisPipeline(ModelSettings(card=card_path, device="cpu"))
    out = pipe.analyse("1.2.3", [ImageInput(bad, "1.2.3.9", "1.2.840.10008.5.1.4.1.1.1.2")])
    assert not out.images[0].analysed and "decode" in out.images[0].skipped_reason
