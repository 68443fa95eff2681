"""The Grad-CAM blend of render_overlay (only over the rectangles where the map is above 0)
gives the pixels of the full-frame blend it replaced, for maps with spread, row-sharing,
negative, above-1 and no hot regions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from node.analysis.result import ImageAnalysis, ModelInfo
from node.reports.sc_content import MAX_ALPHA, render_overlay

MODEL = ModelInfo("calc-cluster-lite0", "0.1.0", "tf_efficientnet_lite0", 0.41)


def full_frame_blend(display: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The blend as render_overlay did it before: every pixel through blendLinear."""
    cam01 = np.clip(cam.astype(np.float32, copy=False), 0.0, 1.0)
    grey = cv2.cvtColor(display, cv2.COLOR_GRAY2RGB)
    heat = cv2.cvtColor(cv2.applyColorMap(np.round(cam01 * 255).astype(np.uint8),
                                          cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = MAX_ALPHA * cam01
    return cv2.blendLinear(grey, heat, 1.0 - alpha, alpha)


def _maps(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    spread = np.zeros((h, w), np.float32)
    for cy, cx in ((40, 50), (300, 400), (310, 90), (600, 20), (h - 30, w - 40)):
        yy, xx = np.mgrid[0:h, 0:w]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 15.0 ** 2)).astype(np.float32)
        blob[blob < 0.01] = 0
        spread = np.maximum(spread, blob)
    odd = np.zeros((h, w), np.float32)
    odd[100:140, 200:260] = rng.uniform(-0.5, 1.5, (40, 60)).astype(np.float32)
    odd[120, 10] = 0.75  # a single hot pixel sharing rows with the block
    return {"spread": spread, "odd values": odd, "none": np.zeros((h, w), np.float32),
            "everywhere": rng.uniform(0, 1, (h, w)).astype(np.float32)}


@pytest.mark.parametrize("name", ["spread", "odd values", "none", "everywhere"])
def test_blend_equals_the_full_frame_blend(name: str) -> None:
    h, w = 700, 512
    display = np.random.default_rng(3).integers(0, 255, (h, w), dtype=np.uint8)
    cam = _maps(h, w)[name]
    image = ImageAnalysis("1.2.3", "1.2.840.10008.5.1.4.1.1.1.2", "L", "CC", h, w, 0.1,
                          "ImagerPixelSpacing", True, [], display, cam, 1.0)
    out = render_overlay(image, threshold=0.41, model=MODEL)
    band = max(20, round(h / 22))
    fband = max(14, round(band * 0.7))
    # between the banner (top) and the model strip (bottom): the blend alone (no finding)
    expected = full_frame_blend(display, cam)
    assert np.array_equal(out[band:h - fband], expected[band:h - fband])


def _strips_drawn_in_place(img: np.ndarray, image: ImageAnalysis, model: ModelInfo,
                           threshold: float) -> np.ndarray:
    """The banner and footer as render_overlay drew them before they were cached: the rows
    filled, then the text drawn on the image itself."""
    from node.reports.labels import legend, site_name
    from node.reports.sc_content import BANNER_BG_RGB, BANNER_FG_RGB, BANNER_TEXT, _fit_text

    out = img.copy()
    h, w = out.shape[:2]
    band = max(20, round(h / 22))
    fband = max(14, round(band * 0.7))
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, round(band / 14))
    out[:band] = BANNER_BG_RGB
    scale = _fit_text(BANNER_TEXT, w - 8, int(band * 0.7), thick)
    (tw, th), _ = cv2.getTextSize(BANNER_TEXT, font, scale, thick)
    cv2.putText(out, BANNER_TEXT, ((w - tw) // 2, (band + th) // 2), font, scale,
                BANNER_FG_RGB, thick, cv2.LINE_AA)
    footer = f"{site_name(image.laterality, image.view)} - {legend(model, threshold)}"
    fthick = max(1, round(fband / 14))
    out[h - fband:] = BANNER_BG_RGB
    fscale = _fit_text(footer, w - 8, int(fband * 0.7), fthick)
    (fw, fh), _ = cv2.getTextSize(footer, font, fscale, fthick)
    cv2.putText(out, footer, (4, h - (fband - fh) // 2), font, fscale, (255, 255, 255),
                fthick, cv2.LINE_AA)
    return out


@pytest.mark.parametrize("shape", [(2048, 1664), (1024, 1024), (64, 300), (700, 64),
                                   (4096, 3328)])
@pytest.mark.parametrize("lat_view", [("R", "CC"), ("L", "MLO"), ("", "")])
def test_cached_strips_are_the_drawn_ones(shape: tuple[int, int],
                                          lat_view: tuple[str, str]) -> None:
    h, w = shape
    rng = np.random.default_rng(3)
    display = rng.integers(0, 255, (h, w), dtype=np.uint8)
    image = ImageAnalysis("1.2.3", "1.2.840.10008.5.1.4.1.1.1.2", lat_view[0], lat_view[1],
                          h, w, 0.1, "ImagerPixelSpacing", True, [], display,
                          np.zeros((h, w), np.float32), 1.0)
    for model in (MODEL, ModelInfo("m", "1", "a", 0.5, classification_validated=True)):
        for _ in range(2):  # the second time from the cache
            out = render_overlay(image, threshold=0.41, model=model)
            expected = _strips_drawn_in_place(out, image, model, 0.41)
            assert np.array_equal(out, expected)
