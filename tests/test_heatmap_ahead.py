"""A morphology head's heat map is made per image, ahead of the study's completion, and is the
same map (bit for bit) as the study-level painting made it before; the SC pixels built on it
are the same bytes.

The reference is the painting as node.analysis.pipeline did it at the study's end up to
i18e-completion: a zero display-sized canvas, each cluster's calcifications painted with
``paint_evidence`` (sigma max(1, 0.6 px/mm)), then ``finish_cam`` with the display-size breast
mask and px/mm of smoothing.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from node.analysis.heatmap import SparseMap, finish_cam, paint_evidence
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput, StudyAnalysis
from node.config import AnalysisSettings, LimitsSettings, ModelSettings
from node.reports.sc_content import pixel_buffer, render_overlay
from tests.testdata import mias_four_view


def _finish_cam_as_before(canvas: np.ndarray, breast: np.ndarray | None, smooth_px: float
                          ) -> None:
    """node.analysis.heatmap.finish_cam as it was up to i18e-completion (one thread, the mask
    always resized), kept as the reference."""
    if not canvas.any():
        return
    before = float(canvas.max())
    rows, cols = canvas.shape
    f = max(1, int(smooth_px // 2))
    small = (max(1, cols // f), max(1, rows // f))

    def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
        if f == 1:
            return cv2.GaussianBlur(a, (0, 0), sigma)
        s = cv2.resize(a, small, interpolation=cv2.INTER_AREA)
        s = cv2.GaussianBlur(s, (0, 0), sigma / f)
        return cv2.resize(s, (cols, rows), interpolation=cv2.INTER_LINEAR)

    if smooth_px > 0:
        canvas[...] = smooth(canvas, smooth_px)
    if breast is not None:
        m = cv2.resize(breast.astype(np.uint8), (cols, rows),
                       interpolation=cv2.INTER_NEAREST).astype(np.float32)
        canvas *= smooth(m, max(1.0, smooth_px))
    peak = float(canvas.max())
    if peak > 0:
        canvas *= min(before, 1.0) / peak


# mini-MIAS calcification cases (two right, two left) and one without findings
REFS = ("mdb209", "mdb226", "mdb211", "mdb216")


@pytest.fixture(scope="module")
def pipeline() -> AnalysisPipeline:
    p = AnalysisPipeline(ModelSettings(), AnalysisSettings(), LimitsSettings(), max_workers=2)
    assert p.classifier.head_kind == "morphology"  # the shipped card
    return p


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[ImageInput]]:
    paths = mias_four_view(tmp_path_factory.mktemp("ahead"), refs=REFS)
    items = []
    for p in paths:
        h = pydicom.dcmread(p, stop_before_pixels=True)
        items.append(ImageInput(Path(p), str(h.SOPInstanceUID), str(h.SOPClassUID)))
    return str(h.StudyInstanceUID), items


def _reference_cams(pipeline: AnalysisPipeline, items: list[ImageInput]) -> list[np.ndarray]:
    """Each image's map as the study-level painting made it (see the module docstring)."""
    out = []
    for item in items:
        ia, crops, clusters, _, _, breast = pipeline._prepare_image(item)
        assert crops is not None and ia.display is not None
        canvas = np.zeros(ia.display.shape, np.float32)
        px_per_mm = ia.display_scale / ia.pixel_spacing_mm
        for c in clusters:
            paint_evidence(canvas, c.member_points, ia.display_scale, max(1.0, 0.6 * px_per_mm))
        _finish_cam_as_before(canvas, breast, px_per_mm)
        out.append(canvas)
    return out


def _sc_pixels(analysis: StudyAnalysis) -> list[bytes]:
    return [render_overlay(ia, threshold=analysis.model.threshold, model=analysis.model).tobytes()
            for ia in analysis.images]


def test_map_made_ahead_or_at_completion_is_the_study_level_painting(
        pipeline: AnalysisPipeline, study: tuple[str, list[ImageInput]]) -> None:
    study_uid, items = study
    reference = _reference_cams(pipeline, items)
    assert sum(bool(c.any()) for c in reference) >= 3  # the maps are not trivially empty

    at_completion = pipeline.analyse(study_uid, items)  # nothing prepared ahead
    ahead = {str(i.path): pipeline.prepare_one(i) for i in items}  # as node.preanalysis does
    for hit in ahead.values():
        assert isinstance(hit[5], SparseMap) and hit[0].cam is None  # no display-sized canvas
        assert sum(v.nbytes for _, _, v in hit[5].bands) < hit[0].display.nbytes
    from_ahead = pipeline.analyse(study_uid, items, cache=ahead)

    for analysis in (at_completion, from_ahead):
        assert [ia.cam_source for ia in analysis.images] == \
            ["calcification evidence of the detector"] * 4
        for ia, ref in zip(analysis.images, reference, strict=True):
            assert ia.cam is not None and ia.cam.dtype == np.float32
            assert ia.cam.tobytes() == ref.tobytes()
        assert analysis.timings_ms["gradcam"] >= 0.0
    assert _sc_pixels(at_completion) == _sc_pixels(from_ahead)
    # the kept map is reused as it is: a second analysis of the same cache paints the same
    again = pipeline.analyse(study_uid, items, cache=ahead)
    assert [ia.cam.tobytes() for ia in again.images] == [r.tobytes() for r in reference]  # type: ignore[union-attr]


def test_sparse_map_round_trip_is_exact() -> None:
    rng = np.random.default_rng(7)
    canvas = np.zeros((300, 200), np.float32)
    canvas[0:5, 0:3] = rng.random((5, 3), np.float32)  # at the corner
    canvas[100:140, 150:200] = rng.random((40, 50), np.float32)  # at the right edge
    canvas[120, 10] = 0.25  # same rows as the block above, far to the left
    canvas[299, 199] = 1.0  # last pixel
    m = SparseMap.of(canvas, 0.5)
    assert m.dense().tobytes() == canvas.tobytes() and m.seconds == 0.5
    assert SparseMap.of(np.zeros((4, 4), np.float32)).bands == ()
    with pytest.raises(ValueError, match="not the map's"):
        m.paste(np.zeros((10, 10), np.float32))


def test_sc_pixel_buffer_needs_no_zeroing(pipeline: AnalysisPipeline,
                                          study: tuple[str, list[ImageInput]]) -> None:
    """render_overlay writes every byte of the SC's pixel buffer: one full of garbage gives
    the bytes a zeroed one gives (pixel_buffer does not zero it)."""
    study_uid, items = study
    analysis = pipeline.analyse(study_uid, items)
    for ia in analysis.images:
        zeroed = bytearray(len(pixel_buffer(ia)))
        garbage = pixel_buffer(ia)
        np.frombuffer(garbage, np.uint8)[:] = np.arange(len(zeroed), dtype=np.uint64) % 251
        a = render_overlay(ia, threshold=0.5, model=analysis.model, into=zeroed)
        b = render_overlay(ia, threshold=0.5, model=analysis.model, into=garbage)
        assert a.tobytes() == b.tobytes() == bytes(zeroed) == garbage.tobytes()


@pytest.mark.parametrize(("shape", "mask_shape", "mask_dtype", "smooth_px"), [
    ((400, 300), (400, 300), np.uint8, 7.14),  # the node's case: a display-size uint8 mask
    ((400, 300), (200, 150), np.bool_, 7.14),  # another size: resized
    ((257, 199), (257, 199), np.bool_, 2.5),  # odd sizes, f = 1 (no downscale)
    ((400, 300), None, None, 7.14),  # no mask
])
def test_finish_cam_is_the_single_threaded_one(shape, mask_shape, mask_dtype,  # type: ignore[no-untyped-def]
                                               smooth_px) -> None:
    rng = np.random.default_rng(3)
    canvas = np.zeros(shape, np.float32)
    for _ in range(5):
        paint_evidence(canvas, tuple((float(rng.uniform(0, shape[0] * 2)),
                                      float(rng.uniform(0, shape[1] * 2)),
                                      float(rng.uniform(0.1, 0.9))) for _ in range(6)),
                       0.5, 3.0)
    breast = None
    if mask_shape is not None:
        yy, xx = np.mgrid[:mask_shape[0], :mask_shape[1]]
        breast = ((yy - mask_shape[0] / 2) ** 2 + (xx / 1.5) ** 2 < (mask_shape[0] / 2.2) ** 2
                  ).astype(mask_dtype)
    expected = canvas.copy()
    _finish_cam_as_before(expected, breast, smooth_px)
    finish_cam(canvas, breast, smooth_px)
    assert expected.any() and canvas.tobytes() == expected.tobytes()
