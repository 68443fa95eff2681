"""Cluster finding on real mini-MIAS pixels through the node's preparation, in millimetres."""

from __future__ import annotations

import numpy as np
import pytest

from node.analysis.prepare import prepare
from node.analysis.rois import DetectorParams, find_clusters, load_detector
from tests.testdata import mias_clusters, mias_to_mg

REF = "mdb241"  # malignant cluster, radius 38 px (7.6 mm) at (x 453, y 345)


def _gt():
    return next(g for g in mias_clusters() if g.refnum == REF)


def _clusters(upsample: int = 1, monochrome1: bool = False, min_score: float | None = None):
    im = prepare(None, ds=mias_to_mg(REF, upsample=upsample, monochrome1=monochrome1))
    clusters = find_clusters(im.image01, im.breast_mask, im.pixel_spacing_mm,
                             DetectorParams(min_score=min_score), view=im.view)
    return im, clusters


def _centres_mm(im, clusters) -> np.ndarray:
    return np.array([c.centre_rc for c in clusters]).reshape(-1, 2) * im.pixel_spacing_mm


@pytest.fixture(scope="module")
def base():
    return _clusters(1)


def test_known_cluster_is_found_and_is_on_the_breast(base) -> None:
    im, clusters = base
    g = _gt()
    d = [np.hypot(c.centre_rc[0] - g.y, c.centre_rc[1] - g.x) * 0.2 for c in clusters]
    assert min(d) <= g.radius_px * 0.2 + 2.0
    hit = clusters[int(np.argmin(d))]
    assert len(hit.members) >= 3 and hit.score >= load_detector().operating_point
    for c in clusters:  # nothing on background or film labels
        assert im.breast_mask[int(round(c.centre_rc[0])), int(round(c.centre_rc[1]))]
    # outlines are closed polygons in DICOM (x, y) pixel coordinates around the centre
    for c in clusters:
        xy = np.array(c.outline_xy)
        assert tuple(xy[0]) == tuple(xy[-1]) and len(xy) >= 4
        cx, cy = c.centre_xy
        assert xy[:, 0].min() < cx < xy[:, 0].max() and xy[:, 1].min() < cy < xy[:, 1].max()
        assert all(0.0 < p <= 1.0 for _, _, p in c.member_points)


@pytest.mark.parametrize("upsample", [2, 4])
def test_same_cluster_at_0_1_and_0_05_mm(base, upsample) -> None:
    """The same film replicated to 0.1 and 0.05 mm is searched on the same 0.1 mm grid: the
    known cluster is found at the same place (in mm) with a similar radius."""
    im1, c1 = base
    im2, c2 = _clusters(upsample, min_score=0.0)
    assert im2.pixel_spacing_mm == pytest.approx(0.2 / upsample)
    g = _gt()
    centre = np.array([g.y, g.x]) * 0.2
    b = _centres_mm(im2, c2)
    near = np.hypot(*(b - centre).T) <= g.radius_px * 0.2 + 2.0
    assert near.any()
    a = _centres_mm(im1, c1)
    hit1 = c1[int(np.argmin(np.hypot(*(a - centre).T)))]
    hit2 = c2[int(np.argmin(np.where(near, np.hypot(*(b - centre).T), np.inf)))]
    assert abs(hit1.radius_mm - hit2.radius_mm) < 4.0


def test_monochrome1_gives_the_same_clusters(base) -> None:
    _, c1 = base
    _, c2 = _clusters(1, monochrome1=True)
    a = np.array([c.centre_rc for c in c1])
    b = np.array([c.centre_rc for c in c2])
    assert len(a) == len(b)
    np.testing.assert_allclose(a, b, atol=0.5)


def test_operating_point_and_determinism(base) -> None:
    _, c1 = base
    _, again = _clusters(1)
    assert c1 == again
    _, every = _clusters(1, min_score=0.0)
    assert len(every) >= len(c1)
    assert [c.score for c in every] == sorted((c.score for c in every), reverse=True)
    _, none = _clusters(1, min_score=1.0)
    assert none == []
