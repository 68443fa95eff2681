"""The ROI crop shared by training and serving.

A ROI is a square of ``roi_size_mm`` millimetres centred on a cluster, cut from a grey image whose
values are already in [0, 1] (VOI and polarity applied, bright = dense), and resampled to
``input_size`` pixels. Because training and the node both call :func:`crop_roi`, the model always
sees the same physical scale whatever the detector pixel size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def crop_roi(
    image01: np.ndarray,
    centre_rc: tuple[float, float],
    pixel_spacing_mm: float,
    roi_size_mm: float,
    input_size: int,
) -> np.ndarray:
    """Return a float32 ``(input_size, input_size)`` crop in [0, 1].

    ``centre_rc`` is (row, column) in numpy index coordinates of ``image01`` (the centre of pixel
    ``[r, c]`` is ``(r, c)``). Outside the image the crop is padded with 0 (background). When the
    crop shrinks the image it is area-averaged first, so fine specks are not aliased away.
    """
    if image01.ndim != 2:
        raise ValueError(f"crop_roi expects a 2-D image, got shape {image01.shape}")
    if pixel_spacing_mm <= 0 or roi_size_mm <= 0 or input_size <= 0:
        raise ValueError("crop_roi needs positive spacing, ROI size and input size")
    side = roi_size_mm / pixel_spacing_mm  # crop side in source pixels
    scale = input_size / side  # output pixels per source pixel
    r, c = centre_rc
    half = int(math.ceil(side / 2.0)) + 2
    top, left = int(math.floor(r)) - half, int(math.floor(c)) - half
    window = _padded_window(image01, top, left, 2 * half + 1, 2 * half + 1)
    s = 1.0
    if scale < 1.0:
        size = max(1, int(round(window.shape[1] * scale)))
        s = size / window.shape[1]
        window = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA)
    # Corner coordinates: the crop starts at X0 = (c + 0.5) - side / 2 in source pixels. Output
    # pixel u (centre u + 0.5) samples the source corner coordinate X0 + (u + 0.5) / scale, which
    # is window index (X - left) * s - 0.5.
    a = s / scale
    bx = ((c + 0.5) - side / 2.0 - left) * s + 0.5 * a - 0.5
    by = ((r + 0.5) - side / 2.0 - top) * s + 0.5 * a - 0.5
    m = np.array([[a, 0.0, bx], [0.0, a, by]], dtype=np.float64)
    out = cv2.warpAffine(
        window,
        m,
        (input_size, input_size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _padded_window(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.float32)
    rows, cols = image.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, rows), min(left + w, cols)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out
