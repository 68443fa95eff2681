"""The faster candidate search gives exactly the candidates, features and clusters of the dense one.

``models.detector.candidates.find_candidates`` filters only the breast's bounding box and groups
the local maxima from the peak pixels; tests/reference_candidates.py is the search as it was
(whole-grid filtering, OpenCV's labelling). The shipped detector's validated figures rest on its
features, so they must not move: both run on real mini-MIAS films (at their 0.2 mm, and enlarged
to 0.1 mm and 0.067 mm so that the work-grid resampling runs) and on the benchmark's 3328 x 4096
synthetic mammograms, and must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import tests.reference_candidates as reference
from bench.studies import FORMATS, synthetic_mammogram
from models.detector import candidates
from models.detector.anatomy import breast_mask
from node.analysis.prepare import prepare
from node.analysis.rois import DEFAULT_DETECTOR, load_detector
from tests.testdata import mg_dataset, mias_to_mg


def _mias(refnum: str, upsample: int, view: str) -> tuple[np.ndarray, np.ndarray, float, str]:
    im = prepare(None, ds=mias_to_mg(refnum, upsample=upsample, view=view))
    return im.image01, im.breast_mask, im.pixel_spacing_mm, im.view


def _bench(fmt: str, laterality: str, view: str, seed: int
           ) -> tuple[np.ndarray, np.ndarray, float, str]:
    f = FORMATS[fmt]
    px = synthetic_mammogram(f, laterality, view, seed)
    ds = mg_dataset(px, patient_id="P", study_uid="1.2.3", sop_uid=f"1.2.3.{seed}",
                    laterality=laterality, view=view, spacing_mm=f.spacing_mm, bits_stored=f.bits)
    im = prepare(None, ds=ds)
    return im.image01, im.breast_mask, im.pixel_spacing_mm, im.view


IMAGES = {
    "mias-mdb219-0.2mm": lambda: _mias("mdb219", 1, "MLO"),
    "mias-mdb209-0.1mm": lambda: _mias("mdb209", 2, "MLO"),
    "mias-mdb223-0.067mm": lambda: _mias("mdb223", 3, "CC"),
    "bench-small-RCC": lambda: _bench("small", "R", "CC", 2),
    "bench-big-LMLO": lambda: _bench("big", "L", "MLO", 1),
}


def _same_candidates(a: candidates.Candidates, b: reference.Candidates) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.cols, b.cols)
    np.testing.assert_array_equal(a.features, b.features)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_candidates_and_clusters_are_unchanged(name: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    image01, mask, spacing, view = IMAGES[name]()
    new = candidates.find_candidates(image01, mask, spacing, view=view)
    old = reference.find_candidates(image01, mask, spacing, view=view)
    assert len(new) > 20  # real work: the images have calcification-like specks
    _same_candidates(new, old)
    detector = load_detector(DEFAULT_DETECTOR)
    got = detector.detect(image01, mask, spacing, view=view, min_score=0.0)
    monkeypatch.setattr("models.detector.model.find_candidates", reference.find_candidates)
    want = detector.detect(image01, mask, spacing, view=view, min_score=0.0)
    assert got == want  # every cluster: centre, members, outline, features, score


def test_a_mask_reaching_every_edge_and_an_empty_mask() -> None:
    image01, _, spacing, view = IMAGES["mias-mdb219-0.2mm"]()
    full = np.ones(image01.shape, bool)  # the box is the whole grid
    _same_candidates(candidates.find_candidates(image01, full, spacing, view=view),
                     reference.find_candidates(image01, full, spacing, view=view))
    small = np.zeros(image01.shape, bool)
    small[400:470, 500:530] = True  # a box narrower than the margin, off the 32-column grid
    _same_candidates(candidates.find_candidates(image01, small, spacing, view=view),
                     reference.find_candidates(image01, small, spacing, view=view))
    none = np.zeros(image01.shape, bool)
    assert len(candidates.find_candidates(image01, none, spacing, view=view)) == 0


def test_peak_groups_match_opencv_labelling() -> None:
    """Plateaus (touching peak pixels, 8-connected, across rows and at the image's edges) are
    grouped as cv2.connectedComponentsWithStats groups them."""
    import cv2

    rng = np.random.default_rng(7)
    peak = rng.random((300, 257)) > 0.93
    peak[0, :3] = peak[-1, -3:] = peak[:4, -1] = True
    peak[10, 0] = peak[11, 256] = True  # not neighbours: different rows' ends
    n, _, _, cent = cv2.connectedComponentsWithStats(peak.astype(np.uint8), connectivity=8)
    r, c = candidates._peak_centroids(peak)
    got = sorted(zip(r.tolist(), c.tolist(), strict=True))
    want = sorted(zip(cent[1:, 1].tolist(), cent[1:, 0].tolist(), strict=True))
    assert len(got) == n - 1
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-9)


def test_breast_mask_of_the_bench_image_is_the_one_searched() -> None:
    # guards the test images above: a real breast, neither empty nor the whole frame
    image01, mask, spacing, _ = IMAGES["bench-small-RCC"]()
    assert 0.2 < mask.mean() < 0.8
    np.testing.assert_array_equal(mask, breast_mask(image01, spacing))


def test_breast_mask_and_anatomy_share_one_downscaled_copy_inside_the_block() -> None:
    from models.detector import anatomy as anatomy_module

    image01, _, spacing, view = IMAGES["bench-small-RCC"]()
    calls: list[tuple[int, int]] = []
    real = anatomy_module._area_downscaled

    def counting(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        out = real(img, size)
        calls.append((id(img), id(out)))
        return out

    outside_mask = breast_mask(image01, spacing)
    outside = reference.find_candidates(image01, outside_mask, spacing, view=view)
    anatomy_module._area_downscaled = counting  # type: ignore[assignment]
    try:
        with anatomy_module.reuse_downscaled():
            mask = breast_mask(image01, spacing)
            got = candidates.find_candidates(image01, mask, spacing, view=view)
            other = image01.copy()  # another image object: never served the first one's copy
            breast_mask(other, spacing)
    finally:
        anatomy_module._area_downscaled = real  # type: ignore[assignment]
    assert calls[0][1] == calls[1][1]  # the anatomy got the breast mask's copy
    assert calls[2][1] != calls[0][1]
    np.testing.assert_array_equal(mask, outside_mask)
    _same_candidates(got, outside)
    assert got.anatomy is not None and outside.anatomy is not None
    np.testing.assert_array_equal(got.anatomy.pectoral_mm, outside.anatomy.pectoral_mm)
    assert getattr(anatomy_module._downscaled, "entries", None) is None  # dropped on exit


def test_forest_walk_gives_the_plain_walks_scores_bit_for_bit() -> None:
    """The active-set tree walk reaches the leaves of the plain level-by-level walk (the
    667f167 code, kept as ``Forest.decision_reference``): real candidate and cluster features,
    with and without missing values, and a tree that is one leaf."""
    from models.detector.clusters import build_clusters
    from models.detector.trees import Forest

    detector = load_detector(DEFAULT_DETECTOR)
    image01, mask, spacing, view = IMAGES["bench-big-LMLO"]()
    cands = candidates.find_candidates(image01, mask, spacing, view=view)
    x = cands.features
    assert len(x) > 100
    forest = detector.candidate_forest
    np.testing.assert_array_equal(forest.decision(x), forest.decision_reference(x))
    holes = x.astype(np.float64)
    rng = np.random.default_rng(3)
    holes[rng.random(holes.shape) < 0.15] = np.nan  # both of each node's missing-value routes
    np.testing.assert_array_equal(forest.decision(holes), forest.decision_reference(holes))
    assert len(forest.decision(x[:0])) == 0
    p = forest.predict_proba(x)
    clusters = build_clusters(cands, p, p >= detector.keep_threshold, spacing,
                              detector.cluster_params, image_shape=image01.shape)
    assert clusters
    xc = np.array([c.features for c in clusters])
    cf = detector.cluster_forest
    np.testing.assert_array_equal(cf.decision(xc), cf.decision_reference(xc))
    stump = Forest(features=("a", "b"), baseline=0.25,
                   feature=np.array([-1, 1, -1, -1], np.int32),
                   threshold=np.array([0.0, 0.5, 0.0, 0.0]),
                   left=np.array([0, 2, 0, 0], np.int32), right=np.array([0, 3, 0, 0], np.int32),
                   missing_left=np.array([False, True, False, False]),
                   value=np.array([0.5, 0.0, -1.0, 2.0]), roots=np.array([0, 1], np.int32),
                   depth=1)
    xs = np.array([[0.0, 0.2], [0.0, 0.5], [0.0, 0.9], [0.0, np.nan]])
    np.testing.assert_array_equal(stump.decision(xs), [-0.25, -0.25, 2.75, -0.25])
    np.testing.assert_array_equal(stump.decision(xs), stump.decision_reference(xs))


@pytest.mark.parametrize("origin", [(0, 0), (37, 64), (38, 32), (101, 98), (3, 5)])
def test_coarse_noise_of_a_region_is_that_of_the_whole_grid(origin: tuple[int, int]) -> None:
    """A region at any origin (odd rows and columns too: the stride-2 and quantile sampling
    stay on the whole grid's lattice) gives the whole grid's estimate bit for bit, band after
    band with the cached mask."""
    rng = np.random.default_rng(11)
    shape = (2100, 2010)  # > 1e6 strided pixels: the quantile reads every 2nd of them
    oy, ox = origin
    region = (slice(oy, oy + 1800), slice(ox, ox + 1700))
    mask = np.zeros(shape, bool)
    mask[oy + 30:oy + 1750, ox + 20:ox + 1650] = True
    cache_whole: dict = {}
    cache_region: dict = {}
    region_mask = mask[region].copy()  # one mask object: its coarse copy is cached
    for band in range(3):
        resp = np.zeros(shape, np.float32)
        resp[region] = rng.normal(0, 1 + band, (1800, 1700)).astype(np.float32)
        want = reference.coarse_noise(resp, mask, 120.0)
        got_whole = candidates.coarse_noise(resp, mask, 120.0, mask_cache=cache_whole)
        got = candidates.coarse_noise(resp[region].copy(), region_mask, 120.0,
                                      mask_cache=cache_region, origin=origin, shape=shape)
        np.testing.assert_array_equal(got_whole, want)
        np.testing.assert_array_equal(got, want)


def test_windows_at_the_edge_come_from_the_reflected_grid() -> None:
    """With a border narrower than the windows some windows reach past the grid: they are
    read from the padded (reflected) grid as before, the others straight from the grid: the
    same features."""
    image01, _, spacing, view = IMAGES["mias-mdb219-0.2mm"]()
    full = np.ones(image01.shape, bool)
    p = candidates.CandidateParams(border_mm=0.4)  # 2 px at 0.2 mm
    got = candidates.find_candidates(image01, full, spacing, p, view=view)
    want = reference.find_candidates(image01, full, spacing, reference.CandidateParams(
        border_mm=0.4), view=view)
    assert len(got) > 20
    radius = 8  # the windows' half size at 0.2 mm: some candidates lie closer to the edge
    assert (np.minimum(got.rows, got.cols).min() < radius
            or (np.array(image01.shape)[None] - 1 - np.stack([got.rows, got.cols], 1)).min()
            < radius)
    _same_candidates(got, want)


def test_local_maxima_are_those_of_the_whole_grid_dilation() -> None:
    """The sparse local-maximum test gives the pixels of ``(b >= snr) & (b >= dilate(b))`` with
    ``b`` zero outside the mask: plateaus of equal values, maxima on every edge and corner, a
    mask with holes."""
    import cv2

    rng = np.random.default_rng(21)
    best = np.round(rng.gamma(2.0, 1.5, (203, 157)), 1).astype(np.float32)  # many ties
    best[0, 0] = best[-1, -1] = best[0, -1] = best[-1, 0] = 40.0
    best[100:103, 50:53] = 30.0  # a 3 x 3 plateau
    mask = rng.random(best.shape) > 0.1
    mask[:, :3] = True
    mask[0, 0] = mask[-1, -1] = mask[0, -1] = mask[-1, 0] = True
    zeroed = np.where(mask, best, np.float32(0.0))
    dense = (zeroed >= 4.0) & (zeroed >= cv2.dilate(zeroed, np.ones((5, 5), np.uint8)))
    got = candidates._local_maxima(best, mask, 4.0)
    np.testing.assert_array_equal(got, np.flatnonzero(dense))
    region = mask[10:150, 7:120]  # a non-contiguous view, as find_candidates passes it
    z = np.where(region, best[10:150, 7:120], np.float32(0.0))
    want = np.flatnonzero((z >= 4.0) & (z >= cv2.dilate(z, np.ones((5, 5), np.uint8))))
    np.testing.assert_array_equal(
        candidates._local_maxima(np.ascontiguousarray(best[10:150, 7:120]), region, 4.0), want)


def test_display_copy_is_the_plain_expression() -> None:
    """display_image's in-place steps give ``clip(small * 255 + 0.5, 0, 255)`` as uint8."""
    import cv2

    from node.analysis.prepare import display_image

    image01, _, _, _ = IMAGES["bench-small-RCC"]()
    got, scale = display_image(image01, 1024)
    size = (got.shape[1], got.shape[0])
    small = cv2.resize(image01, size, interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(got, np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8))
    same, one = display_image(image01[:500, :400], 1024)  # no resize: the input is untouched
    assert one == 1.0
    np.testing.assert_array_equal(same, np.clip(image01[:500, :400] * 255.0 + 0.5, 0, 255)
                                  .astype(np.uint8))
