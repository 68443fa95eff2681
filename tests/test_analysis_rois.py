"""Cluster finding on real mini-MIAS pixels: a known cluster is found, in millimetres."""

from __future__ import annotations

import numpy as np
import pytest

from node.analysis.prepare import prepare
from node.analysis.rois import find_clusters
from node.testdata import mias_clusters, mias_to_mg

REF = "mdb241"  # malignant cluster, radius 38 px (7.6 mm) at (x 453, y 345)


def _gt():
    return next(g for g in mias_clusters() if g.refnum == REF)


def _clusters(upsample: int = 1, monochrome1: bool = False):
    im = prepare(None, ds=mias_to_mg(REF, upsample=upsample, monochrome1=monochrome1))
    clusters, cands = find_clusters(im.image01, im.breast_mask, im.pixel_spacing_mm)
    return im, clusters, cands


def _centres_mm(im, clusters) -> np.ndarray:
    return np.array([c.centre_rc for c in clusters]) * im.pixel_spacing_mm


@pytest.fixture(scope="module")
def base():
    return _clusters(1)


def test_known_cluster_is_found_and_is_on_the_breast(base) -> None:
    im, clusters, cands = base
    g = _gt()
    d = [np.hypot(c.centre_rc[0] - g.y, c.centre_rc[1] - g.x) * 0.2 for c in clusters]
    assert min(d) <= g.radius_px * 0.2 + 2.0
    hit = clusters[int(np.argmin(d))]
    assert hit.n if hasattr(hit, "n") else len(hit.members) >= 3
    for c in clusters:  # nothing on background or film labels
        assert im.breast_mask[int(round(c.centre_rc[0])), int(round(c.centre_rc[1]))]
    # outlines are closed polygons in DICOM (x, y) pixel coordinates around the centre
    for c in clusters:
        xy = np.array(c.outline_xy)
        assert tuple(xy[0]) == tuple(xy[-1]) and len(xy) >= 4
        cx, cy = c.centre_xy
        assert xy[:, 0].min() < cx < xy[:, 0].max() and xy[:, 1].min() < cy < xy[:, 1].max()
    # candidates are speck-sized
    assert all(0.01 <= k.area_mm2 <= 1.0 for k in cands)


@pytest.mark.parametrize("upsample", [2, 4])
def test_same_clusters_at_0_1_and_0_05_mm(base, upsample) -> None:
    im1, c1, _ = base
    im2, c2, _ = _clusters(upsample)
    assert im2.pixel_spacing_mm == pytest.approx(0.2 / upsample)
    a, b = _centres_mm(im1, c1), _centres_mm(im2, c2)
    assert abs(len(a) - len(b)) <= max(1, len(a) // 5)
    # every strong cluster at 0.2 mm has a counterpart within 2 mm at the finer spacing
    for p in a[:5]:
        assert np.min(np.hypot(*(b - p).T)) < 2.0
    # radii agree in millimetres
    assert abs(c1[0].radius_mm - min(c2, key=lambda c: np.hypot(
        *(np.array(c.centre_rc) * im2.pixel_spacing_mm - a[0]))).radius_mm) < 2.0


def test_monochrome1_gives_the_same_clusters(base) -> None:
    _, c1, _ = base
    _, c2, _ = _clusters(1, monochrome1=True)
    a = np.array([c.centre_rc for c in c1])
    b = np.array([c.centre_rc for c in c2])
    assert len(a) == len(b)
    np.testing.assert_allclose(a, b, atol=0.5)


def test_deterministic(base) -> None:
    _, c1, k1 = base
    _, c2, k2 = _clusters(1)
    assert c1 == c2 and k1 == k2
