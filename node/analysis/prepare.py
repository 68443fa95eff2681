"""Image preparation: decode, VOI/rescale, polarity, pixel size, laterality/view, breast mask.

Everything downstream works on a :class:`PreparedImage`: a float32 image in [0, 1] where bright
means dense (whatever the PhotometricInterpretation), the physical pixel size in millimetres, and
a mask of the breast (background, film labels and markers excluded).

Decoding goes through pydicom 3 and its installed plugins (pylibjpeg-openjpeg for JPEG 2000,
pylibjpeg-rle / pydicom for RLE, python-gdcm for JPEG Lossless SV1, pyjpegls for JPEG-LS; deflate
and the uncompressed syntaxes are native).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.detector.anatomy import breast_mask
from node.analysis.jpeg2000 import decode_pixels
from node.decode_limits import (
    ImageLimits,
    check_codestream,
    check_declared,
    first_frame_of_value,
    geometry,
)
from node.dicom_header import (  # noqa: F401  (re-exported)
    FOR_PROCESSING_SOP_CLASSES,
    is_for_processing,
    laterality_and_view,
)

log = logging.getLogger("node.analysis.prepare")



@dataclass
class PreparedImage:
    """One decoded image, ready for ROI finding. ``image01`` is float32 in [0, 1], bright=dense."""

    sop_instance_uid: str
    sop_class_uid: str
    image01: np.ndarray
    pixel_spacing_mm: float
    spacing_source: str
    laterality: str
    view: str
    for_presentation: bool
    breast_mask: np.ndarray  # bool, same shape as image01

    @property
    def rows(self) -> int:
        return int(self.image01.shape[0])

    @property
    def columns(self) -> int:
        return int(self.image01.shape[1])


class SkipImage(Exception):
    """Raised when an image is deliberately not analysed (the message says why)."""


def read_dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def prepare(
    path: Path | str,
    *,
    for_processing: Literal["analyse", "skip"] = "analyse",
    fallback_spacing_mm: float = 0.1,
    ds: Dataset | None = None,
    limits: ImageLimits | None = None,
) -> PreparedImage:
    """Decode and prepare one image. Raises :class:`SkipImage` for images not to analyse and
    :class:`node.decode_limits.LimitExceeded` for images that are not decoded at all.
    ``for_processing`` and ``fallback_spacing_mm`` are ``[analysis]``'s, checked by
    node.config (``for_processing``, ``fallback_pixel_spacing_mm``)."""
    ds = ds if ds is not None else read_dataset(Path(path))
    uid = str(ds.get("SOPInstanceUID", ""))
    presentation = not is_for_processing(ds)
    if not presentation and for_processing == "skip":
        raise SkipImage("FOR PROCESSING image skipped (analysis.for_processing = 'skip')")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SkipImage("not a greyscale image (SamplesPerPixel != 1)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SkipImage("multi-frame images (tomosynthesis) are not analysed")
    check_before_decoding(ds, limits or ImageLimits())
    raw = decode_pixels(ds)  # JPEG 2000/HTJ2K: imagecodecs, threaded, GIL released
    image01 = to_unit_range(raw, ds, for_presentation=presentation)
    spacing, source = pixel_spacing(ds, fallback_spacing_mm)
    laterality, view = laterality_and_view(ds)
    mask = breast_mask(image01, spacing)
    if log.isEnabledFor(logging.DEBUG):  # the breast fraction is a pass over the whole mask
        log.debug(
            "prepared %s: %dx%d, %.4f mm (%s), %s %s, %s, breast %.0f%%",
            uid, image01.shape[0], image01.shape[1], spacing, source, laterality or "?",
            view or "?", "presentation" if presentation else "processing",
            100.0 * mask.mean(),
        )
    return PreparedImage(
        sop_instance_uid=uid,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        image01=image01,
        pixel_spacing_mm=spacing,
        spacing_source=source,
        laterality=laterality,
        view=view,
        for_presentation=presentation,
        breast_mask=mask,
    )


def check_before_decoding(ds: Dataset, limits: ImageLimits) -> None:
    """The decode entry's guard: declared geometry within ``limits`` and, for a compressed
    frame, its codestream header agreeing with the DICOM header (node.decode_limits)."""
    g = geometry(ds)
    check_declared(g, limits)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed and syntax != "1.2.840.10008.1.2.1.99" and "PixelData" in ds:
        check_codestream(str(syntax), first_frame_of_value(ds.PixelData), g)


# --------------------------------------------------------------------------------- grey levels


def _first(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def to_unit_range(raw: np.ndarray, ds: Dataset, *, for_presentation: bool) -> np.ndarray:
    """Stored values -> float32 [0, 1], bright = dense.

    Order as in the DICOM grayscale pipeline: Modality LUT (rescale), VOI (window or VOI LUT),
    then polarity (MONOCHROME1 is inverted). For Processing images carry no usable VOI; they are
    normalised instead (:func:`_for_processing`). Pixels equal to Pixel Padding Value (up to
    Pixel Padding Range Limit; compared with the stored values, PS3.3 C.7.5.1.1.2) are
    background: 0, and left out of every statistic.

    For Presentation images with 8- or 16-bit integer stored values go through one lookup table
    indexed by the stored value (:func:`grey_lookup_table`): the same float32 maths run once per
    possible value (65,536) instead of once per pixel (13.6 million for a 3328 x 4096 image), and
    one gather replaces the full-resolution float temporaries. Everything else (For Processing,
    whose stretch depends on the image's percentiles; 32-bit or float pixel data) takes
    :func:`to_unit_range_per_pixel`, the reference the table is tested against.
    """
    if for_presentation:
        table = grey_lookup_table(raw, ds)
        if table is not None:
            return apply_table(table, _table_index(raw))
    return to_unit_range_per_pixel(raw, ds, for_presentation=for_presentation)


def apply_table(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` as float32, gathered ~64k pixels at a time: numpy converts each block's
    indices to intp, and a block's stay in cache (measured 23 ms vs 43 ms for one
    ``np.take`` over a 3328 x 4096 image)."""
    out = np.empty(index.shape, dtype=table.dtype)
    if index.ndim != 2:
        np.take(table, index, out=out)
        return out
    step = max(1, 65536 // max(1, index.shape[1]))
    for r in range(0, index.shape[0], step):
        np.take(table, index[r:r + step], out=out[r:r + step])
    return out


_TABLE_DTYPES = {np.dtype(np.uint8): np.uint8, np.dtype(np.int8): np.uint8,
                 np.dtype(np.uint16): np.uint16, np.dtype(np.int16): np.uint16}


def _table_index(raw: np.ndarray) -> np.ndarray:
    """The stored values as unsigned table indices (a view: signed values wrap like the table)."""
    return raw.view(_TABLE_DTYPES[raw.dtype])


def grey_lookup_table(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """float32 table ``t`` with ``to_unit_range(raw) == t[raw.view(unsigned)]`` for a For
    Presentation image, or None when the image needs the per-pixel path.

    Entry ``i`` is :func:`to_unit_range_per_pixel` of the stored value whose unsigned bit
    pattern is ``i``, with the image's own statistics where the pipeline uses any (the value
    range when there is no VOI, the padding present): the maths are element-wise, so each
    pixel gets exactly the value the per-pixel path gives it.
    """
    unsigned = _TABLE_DTYPES.get(raw.dtype)
    if unsigned is None or raw.size < 4096:  # small images: the per-pixel path is as fast
        return None
    n = 1 << (8 * raw.dtype.itemsize)
    values = np.arange(n, dtype=unsigned).view(raw.dtype)  # every stored value, in index order
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    if has_lut and not has_window:
        try:
            nbits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        if nbits not in range(8, 17):  # the per-pixel path sizes it from the image's maximum
            return None
    padding = _padding_mask(values, ds)
    present: np.ndarray | None = None
    if padding is not None or not (has_window or has_lut):
        present = np.bincount(_table_index(raw).ravel(), minlength=n) > 0
    if padding is not None:
        assert present is not None
        in_image = padding & present
        if not in_image.any():
            padding = None  # no pixel is padding: nothing to zero, no pixel to leave out
        elif not (present & ~padding).any():
            return None  # every pixel is padding: the per-pixel path's special case
    data_range = None
    if not (has_window or has_lut):
        assert present is not None
        used = present if padding is None else present & ~padding
        x = _rescaled(values[used], ds)
        data_range = float(x.min()), float(x.max())
    return to_unit_range_per_pixel(values, ds, for_presentation=True, padding=padding,
                                   data_range=data_range)


def _rescaled(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT's rescale, float32 (the stored values when slope 1, intercept 0)."""
    x = raw.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0 or intercept != 0.0:
        x = x * np.float32(slope) + np.float32(intercept)
    return x


_UNSET = object()


def to_unit_range_per_pixel(
    raw: np.ndarray, ds: Dataset, *, for_presentation: bool,
    padding: np.ndarray | None | object = _UNSET,
    data_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """:func:`to_unit_range` computed pixel by pixel. ``padding`` (the padding mask) and
    ``data_range`` (min, max of the rescaled non-padding values, used when there is no VOI)
    default to the image's own; :func:`grey_lookup_table` passes the image's when ``raw`` is
    the table's domain."""
    if padding is _UNSET:
        padding = _padding_mask(raw, ds)
    assert padding is None or isinstance(padding, np.ndarray)
    x = _rescaled(raw, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    mono1 = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1"

    if not for_presentation:
        y = _for_processing(x, ds, mono1, padding)
        mono1 = False  # polarity already decided from the intensity relationship
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0 and "WindowCenter" not in ds:
        y = _apply_voi_lut_sequence(raw, x, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        y = _window(x, centre, width, function)
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        y = _apply_voi_lut_sequence(raw, x, ds)
    else:
        # No VOI: the full stored range (or the data's actual range when that is much smaller).
        bits = int(ds.get("BitsStored", 16))
        if data_range is None:
            values = x[~padding] if padding is not None and not padding.all() else x
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = data_range
        if hi - lo < 1e-6:
            hi = lo + 1.0
        if hi - lo < 0.25 * ((1 << bits) - 1):
            y = (x - lo) / (hi - lo)
        else:
            lo = min(lo, 0.0) if slope == 1.0 and intercept == 0.0 else lo
            y = (x - lo) / max(hi - lo, 1e-6)
    y = y.astype(np.float32, copy=False)
    np.clip(y, 0.0, 1.0, out=y)  # in place: a full-field image is 54 MB per float32 copy
    if mono1:
        np.subtract(1.0, y, out=y)
    if padding is not None:
        y[padding] = 0.0
    return y


def _padding_mask(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels that are padding (outside the breast), or None when the header declares none."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(_first(ds.PixelPaddingValue))
        limit = ds.get("PixelPaddingRangeLimit")
        limit = int(_first(limit)) if limit is not None else value
    except (TypeError, ValueError):
        return None
    lo, hi = min(value, limit), max(value, limit)
    mask = (raw >= lo) & (raw <= hi)
    return mask if mask.any() and not mask.all() else None


def _for_processing(x: np.ndarray, ds: Dataset, mono1: bool,
                    padding: np.ndarray | None) -> np.ndarray:
    """For Processing values -> bright = dense, stretched between the 0.5th and 99.8th
    percentiles of the non-background pixels.

    Pixel Intensity Relationship says how values relate to the X-ray intensity reaching the
    detector: LIN (proportional) or LOG; its sign +1 means higher values for more intensity
    (less dense tissue), -1 the opposite. When the sign is absent it follows the photometric
    interpretation (MONOCHROME1 shows high values dark: +1). LIN data are log-transformed."""
    relationship = str(ds.get("PixelIntensityRelationship", "") or "").upper()
    try:
        sign = int(ds.get("PixelIntensityRelationshipSign"))
    except (TypeError, ValueError):
        sign = 0
    if sign not in (-1, 1):
        sign = 1 if mono1 else -1
    valid = x[~padding] if padding is not None else x
    if relationship == "LIN":
        # intensity = x (sign +1) or max - x (sign -1); attenuation = -log(intensity)
        intensity = (x - float(valid.min())) if sign > 0 else (float(valid.max()) - x)
        y = -np.log1p(np.maximum(intensity, 0.0))
    else:
        y = -x if sign > 0 else x
    return _percentile_stretch(y, padding)


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return (x - centre) / max(width, 1e-6) + 0.5
    # LINEAR (PS3.3 C.11.2.1.2.1)
    return (x - (centre - 0.5)) / max(width - 1.0, 1e-6) + 0.5


def _apply_voi_lut_sequence(raw: np.ndarray, x: np.ndarray, ds: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_voi

    item = ds.VOILUTSequence[0]
    rescaled = float(ds.get("RescaleSlope", 1) or 1) != 1.0 or \
        float(ds.get("RescaleIntercept", 0) or 0) != 0.0
    out = apply_voi(x if rescaled else raw, ds, index=0).astype(np.float32)
    nbits = int(item.LUTDescriptor[2])
    if nbits not in range(8, 17):
        nbits = int(math.ceil(math.log2(max(float(out.max()), 1.0) + 1)))
    return out / float((1 << nbits) - 1)


def _percentile_stretch(x: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    step_r, step_c = max(1, x.shape[0] // 512), max(1, x.shape[1] // 512)
    sample = x[::step_r, ::step_c]
    if padding is not None:
        sample = sample[~padding[::step_r, ::step_c]]
    fg = sample[sample > sample.min()]
    if fg.size < 16:
        fg = sample.ravel()
    lo, hi = np.percentile(fg, [0.5, 99.8])
    return (x - lo) / max(float(hi - lo), 1e-6)


# --------------------------------------------------------------------------------- geometry


def pixel_spacing(ds: Dataset, fallback_mm: float) -> tuple[float, str]:
    """Physical pixel size (mm) at the breast, and where it came from.

    * PixelSpacing, when present, is already calibrated to the patient plane (PS3.3 10.7.1.3):
      used as it is.
    * ImagerPixelSpacing is at the detector plane; the object is magnified by the geometry, so it
      is divided by EstimatedRadiographicMagnificationFactor when that is present and sensible
      (1 < f <= 4: contact views ~1.1, magnification views ~1.5-2).
    * NominalScannedPixelSpacing (digitised film, SC) is used next.
    * Otherwise ``fallback_mm`` is used and a warning is logged.
    Non-square pixels use the mean of row and column spacing.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if not value:
            continue
        try:
            spacing = float(np.mean([float(v) for v in value]))
        except (TypeError, ValueError):
            continue
        if not 0.0 < spacing < 5.0:
            log.warning("%s %s of %s ignored (not a plausible size in mm)", keyword, value,
                        ds.get("SOPInstanceUID", ""))
            continue
        source = keyword
        if keyword == "ImagerPixelSpacing":
            factor = ds.get("EstimatedRadiographicMagnificationFactor")
            try:
                f = float(factor) if factor is not None else 1.0
            except (TypeError, ValueError):
                f = 1.0
            if 1.0 < f <= 4.0:
                spacing /= f
                source = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        return spacing, source
    log.warning(
        "image %s has no PixelSpacing, ImagerPixelSpacing or NominalScannedPixelSpacing; "
        "using the configured fallback %.4f mm (analysis.fallback_pixel_spacing_mm)",
        ds.get("SOPInstanceUID", ""), fallback_mm,
    )
    return float(fallback_mm), "fallback"


# --------------------------------------------------------------------------------- breast mask
# breast_mask lives with the detector (models.detector.anatomy) so that training and serving
# share it; re-exported here.


def display_image(image01: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """uint8 rendering for the Secondary Capture with long side <= ``max_side``, and its scale."""
    rows, cols = image01.shape
    scale = min(1.0, float(max_side) / float(max(rows, cols)))
    if scale < 1.0:
        size = (max(1, int(round(cols * scale))), max(1, int(round(rows * scale))))
        small = cv2.resize(image01, size, interpolation=cv2.INTER_AREA)
        scale = size[0] / cols
        if small.dtype == np.float32:  # our own copy: the same float32 steps, in place
            np.multiply(small, np.float32(255.0), out=small)
            np.add(small, np.float32(0.5), out=small)
            np.clip(small, 0, 255, out=small)
            return small.astype(np.uint8), scale
    else:
        small = image01
    return np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8), scale
