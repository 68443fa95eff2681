"""The pixels of the Grad-CAM Secondary Capture: display image, heat map, numbered ROI outlines
with their labels, a "NOT FOR DIAGNOSTIC USE" banner and the finding site.

:mod:`node.reports.sc` wraps the rendering in the Secondary Capture image.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from node.analysis.result import ImageAnalysis, ModelInfo
from node.reports.labels import is_malignant, legend, mark_label, site_name

BANNER_TEXT = "NOT FOR DIAGNOSTIC USE"
# Drawing colours, RGB.
MALIGNANT_RGB = (255, 40, 40)
BENIGN_RGB = (40, 255, 40)
MARK_RGB = (255, 220, 0)  # marks of a model not validated for classification: no colour code
BANNER_BG_RGB = (0, 0, 0)
BANNER_FG_RGB = (255, 255, 0)
MAX_ALPHA = 0.5  # heat-map opacity where cam == 1


def _fit_text(text: str, width: int, height: int, thickness: int) -> float:
    """The largest font scale (<= height-based cap) at which ``text`` fits ``width``."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.3, height / 40.0)
    while scale > 0.3:
        (w, h), _ = cv2.getTextSize(text, font, scale, thickness)
        if w <= width and h <= height:
            break
        scale *= 0.9
    return scale


def _put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float,
              colour: tuple[int, int, int], thickness: int) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, text, org, font, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, font, scale, colour, thickness, cv2.LINE_AA)


def _strip_text(text: str, width: int, height: int, thick: int, centred: bool
                ) -> tuple[float, tuple[int, int]]:
    """Font scale and origin (relative to the strip's top left) of a strip's text: centred
    (the banner) or at the left (the footer), vertically centred."""
    scale = _fit_text(text, width - 8, int(height * 0.7), thick)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    if centred:
        return scale, ((width - tw) // 2, (height + th) // 2)
    return scale, (4, height - (height - th) // 2)


@functools.lru_cache(maxsize=64)
def _text_strip(text: str, width: int, height: int, thick: int, colour: tuple[int, int, int],
                centred: bool) -> np.ndarray | None:
    """The opaque strip with its text, drawn once (every SC of a study, and of every study at
    the same display size, has the same banner). None when the text would reach outside the
    strip: then it is drawn on the image itself, where those pixels land on the picture."""
    scale, (x, y) = _strip_text(text, width, height, thick, centred)
    canvas = np.zeros((3 * height, width, 3), np.uint8)
    canvas[height:2 * height] = BANNER_BG_RGB
    cv2.putText(canvas, text, (x, y + height), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick,
                cv2.LINE_AA)
    if canvas[:height].any() or canvas[2 * height:].any():
        return None
    strip = canvas[height:2 * height].copy()
    strip.flags.writeable = False
    return strip


def _paste_strip(out: np.ndarray, top: int, text: str, height: int, thick: int,
                 colour: tuple[int, int, int], centred: bool) -> None:
    """Rows ``top`` .. ``top + height`` of ``out`` become the opaque strip with ``text``:
    exactly what filling them and drawing the text there gives."""
    width = out.shape[1]
    strip = _text_strip(text, width, height, thick, colour, centred)
    if strip is not None:
        out[top:top + height] = strip
        return
    out[top:top + height] = BANNER_BG_RGB
    scale, (x, y) = _strip_text(text, width, height, thick, centred)
    cv2.putText(out, text, (x, top + y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick,
                cv2.LINE_AA)


def pixel_buffer(image: ImageAnalysis) -> memoryview:
    """A writable buffer for the RGB rendering of ``image`` (rows x columns x 3 bytes, flat).

    Not zero-filled: :func:`render_overlay` writes every byte of it. A ``bytearray`` of the
    same size costs a memset and one page fault per 4 KiB page of fresh memory (the worker
    hands its free heap back to the OS after each study: 8-18 ms per 10 MB SC); numpy's
    allocation of a large array is advised onto huge pages and is touched only once, by the
    rendering."""
    if image.display is None:
        raise ValueError("the analysed image has no display image or no Grad-CAM map")
    h, w = np.shape(image.display)[:2]
    return np.empty(int(h) * int(w) * 3, np.uint8).data


def render_overlay(image: ImageAnalysis, *, threshold: float, model: ModelInfo,
                   into: bytearray | memoryview | None = None) -> np.ndarray:
    """RGB uint8 rendering: display image, Grad-CAM heat map, numbered ROI outlines with their
    label (:func:`node.reports.labels.mark_label`), a "NOT FOR DIAGNOSTIC USE" banner at the top
    and, at the bottom, the finding site and what the marks mean.

    With ``into`` (rows x columns x 3 bytes, flat, e.g. from :func:`pixel_buffer`) the image is
    drawn in that buffer and the returned array is a view of it: the SC's Pixel Data without a
    copy. Every byte of ``into`` is written (it need not be zeroed)."""
    display, cam = image.display, image.cam
    if display is None or cam is None:
        raise ValueError("the analysed image has no display image or no Grad-CAM map")
    display = np.asarray(display)
    cam = np.asarray(cam)
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(f"display must be a 2-D uint8 array, got {display.dtype} {display.shape}")
    if cam.shape != display.shape:
        raise ValueError(f"cam shape {cam.shape} differs from display shape {display.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or infinite values")
    if not image.display_scale > 0:
        raise ValueError(f"display_scale must be > 0, got {image.display_scale}")
    h, w = display.shape
    if h < 64 or w < 64:
        raise ValueError(f"display image {w}x{h} is too small for the annotations")

    cam32 = cam.astype(np.float32, copy=False)
    if into is None:
        into = pixel_buffer(image)
    size = into.nbytes if isinstance(into, memoryview) else len(into)
    if size != h * w * 3:
        raise ValueError(f"the pixel buffer holds {size} bytes, not {h}x{w}x3")
    out = np.frombuffer(into, dtype=np.uint8).reshape(h, w, 3)
    cv2.cvtColor(display, cv2.COLOR_GRAY2RGB, dst=out)  # RGB; cv2 draws channel-agnostic
    # grey * (1 - alpha) + heat * alpha per pixel, in one OpenCV pass (~10x the numpy speed),
    # only over the rectangles where the map is above 0: elsewhere alpha is 0 and the grey
    # pixel stays as it is (a Grad-CAM map is zero outside its ROIs: a few % of the image).
    hot = cam32 > 0
    hot_rows = hot.any(axis=1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], hot_rows, [0]))))
    for y0, y1 in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        cols = np.flatnonzero(hot[y0:y1].any(axis=0))
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        cam01 = np.clip(cam32[y0:y1, x0:x1], 0.0, 1.0)
        heat_bgr = cv2.applyColorMap(np.round(cam01 * 255).astype(np.uint8), cv2.COLORMAP_JET)
        heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
        alpha = MAX_ALPHA * cam01
        out[y0:y1, x0:x1] = cv2.blendLinear(np.ascontiguousarray(out[y0:y1, x0:x1]), heat,
                                            1.0 - alpha, alpha)

    short = min(h, w)
    line = max(1, round(short / 400))
    label_scale = max(0.4, short / 1200)
    label_thick = max(1, round(short / 600))
    s = float(image.display_scale)
    band = max(20, round(h / 22))  # the banner strip (top)
    fband = max(14, round(band * 0.7))  # the model strip (bottom)
    for finding in sorted(image.findings, key=lambda f: f.index):
        if model.classification_validated:
            colour = MALIGNANT_RGB if is_malignant(finding, threshold) else BENIGN_RGB
        else:
            colour = MARK_RGB
        pts = np.asarray(finding.outline_xy, dtype=np.float64) * s - 0.5  # pixel centres
        pts_i = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [pts_i], isClosed=True, color=colour, thickness=line,
                      lineType=cv2.LINE_AA)
        text = mark_label(finding, model, threshold)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, label_scale,
                                         label_thick)
        x = int(np.clip(pts[:, 0].min(), 2, max(2, w - tw - 2)))
        y = int(pts[:, 1].min()) - 2 * line - base
        if y - th < band:  # no room above the ROI: write below it
            y = int(pts[:, 1].max()) + 2 * line + th
        # Never under the banner or the model strip (a label there would be hidden).
        y = int(np.clip(y, band + th + 2, h - fband - base - 2))
        _put_text(out, text, (x, y), label_scale, colour, label_thick)

    # Banner (top) and model identity (bottom), opaque strips (drawn once per size and text).
    _paste_strip(out, 0, BANNER_TEXT, band, max(1, round(band / 14)), BANNER_FG_RGB, True)
    footer = f"{site_name(image.laterality, image.view)} - {legend(model, threshold)}"
    _paste_strip(out, h - fband, footer, fband, max(1, round(fband / 14)), (255, 255, 255),
                 False)
    return out
