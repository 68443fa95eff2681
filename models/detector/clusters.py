"""Grouping calcification candidates into clusters, and the features of a cluster.

Candidates that passed the first (per-candidate) stage are linked when closer than ``link_mm``
(single linkage); a group of at least ``min_calcs`` is a cluster (the BI-RADS notion: several
calcifications within about a square centimetre). Groups wider than ``max_radius_mm`` (e.g. a
long vascular calcification) are split into grid cells of that size.

Cluster features describe what a reader looks at: how many specks, how strong, how big and how
varied (size and shape spread), how elongated the specks are and whether they line up (a vessel
wall or a duct gives a line of specks; benign vascular calcifications are linear, malignant
casting calcifications are linear *and* branching), the cluster's size and density, and the
context (distance to the skin and to the pectoral muscle, candidate density around it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from models.detector.candidates import Candidates

CLUSTER_FEATURES = (
    "n", "p_sum", "p_mean", "p_max", "p_top3", "snr_mean", "snr_max", "snr_top3",
    "scale_mean", "scale_sd", "contrast_mean", "contrast_sd", "elong_mean", "elong_min",
    "line_ctx_mean", "radius_mm", "area_mm2", "density", "linearity", "nn_mean_mm",
    "nn_cv", "bg_rate", "p_bg_rate", "edge_mm", "pectoral_mm", "background", "spacing_mm",
)


@dataclass(frozen=True)
class ClusterParams:
    link_mm: float = 4.0
    min_calcs: int = 3
    max_radius_mm: float = 25.0
    outline_margin_mm: float = 1.0
    merge_mm: float = 10.0  # a weaker cluster centred this close to a stronger one is dropped


@dataclass(frozen=True)
class Cluster:
    centre_rc: tuple[float, float]  # source-image numpy coordinates
    radius_mm: float
    members: tuple[int, ...]  # indices into the image's Candidates
    outline_xy: tuple[tuple[float, float], ...]  # closed polygon, DICOM pixel coordinates
    features: tuple[float, ...]  # CLUSTER_FEATURES
    score: float = 0.0  # the second stage's score in [0, 1] (0 before scoring)
    # (row, col, first-stage P) of every member: where the calcifications are, for display
    member_points: tuple[tuple[float, float, float], ...] = ()

    @property
    def centre_xy(self) -> tuple[float, float]:
        """DICOM SCOORD (column, row) of the centre: pixel [r, c] has its centre at (c+.5, r+.5)."""
        return (self.centre_rc[1] + 0.5, self.centre_rc[0] + 0.5)

    @property
    def n_calcifications(self) -> int:
        return len(self.members)

    def feature(self, name: str) -> float:
        return self.features[CLUSTER_FEATURES.index(name)]


def group(cands: Candidates, keep: np.ndarray, spacing_mm: float,
          p: ClusterParams = ClusterParams()) -> list[np.ndarray]:
    """Index groups (into ``cands``) of the kept candidates linked closer than ``link_mm``."""
    idx = np.nonzero(keep)[0]
    if len(idx) < p.min_calcs:
        return []
    pts = np.stack([cands.rows[idx], cands.cols[idx]], axis=1) * spacing_mm
    pairs = cKDTree(pts).query_pairs(p.link_mm, output_type="ndarray")
    if len(pairs) == 0:
        return []
    n = len(idx)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    ncomp, labels = connected_components(graph, directed=False)
    out = []
    for lab in range(ncomp):
        members = np.nonzero(labels == lab)[0]
        if len(members) < p.min_calcs:
            continue
        for part in _split_large(pts, members, p.max_radius_mm):
            if len(part) >= p.min_calcs:
                out.append(idx[np.sort(part)])
    return out


def _split_large(pts: np.ndarray, idx: np.ndarray, max_radius_mm: float) -> list[np.ndarray]:
    sub = pts[idx]
    if np.max(np.linalg.norm(sub - sub.mean(axis=0), axis=1)) <= max_radius_mm:
        return [idx]
    keys = np.floor(sub / max_radius_mm).astype(np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, k in zip(idx.tolist(), map(tuple, keys.tolist()), strict=True):
        groups.setdefault(k, []).append(i)
    return [np.array(groups[k]) for k in sorted(groups)]


def cluster_features(cands: Candidates, members: np.ndarray, p_cand: np.ndarray,
                     spacing_mm: float) -> tuple[tuple[float, float], float, list[float]]:
    """(centre (row, col), radius mm, features) of one group of candidates."""
    f = cands.feature
    pts = np.stack([cands.rows[members], cands.cols[members]], axis=1) * spacing_mm
    centre_mm = pts.mean(axis=0)
    d = np.linalg.norm(pts - centre_mm, axis=1)
    radius = float(d.max())
    n = len(members)
    pm = p_cand[members]
    snr = f("snr")[members]
    top3 = lambda v: float(np.sort(v)[::-1][:3].mean())  # noqa: E731
    area = math.pi * max(radius, 0.5) ** 2
    # arrangement: ratio of the minor to the major spread of the member positions (0 = a line)
    if n >= 3:
        ev = np.linalg.eigvalsh(np.cov((pts - centre_mm).T))
        linearity = float(1.0 - math.sqrt(max(ev[0], 0) / max(ev[1], 1e-9)))
        # distances (an array: many query points) to the nearest other member
        nn = np.asarray(cKDTree(pts).query(pts, k=2)[0])[:, 1]
    else:  # pragma: no cover - groups have >= 3 members
        linearity, nn = 0.0, np.zeros(1)
    # background candidate rate: all candidates (any score) within 15 mm, per cm^2, and the
    # summed first-stage score there: a cluster in film grain or a dense patch has many
    all_pts = np.stack([cands.rows, cands.cols], axis=1) * spacing_mm
    near = np.linalg.norm(all_pts - centre_mm, axis=1) <= 15.0
    bg_rate = float(near.sum() - n) / (math.pi * 1.5 ** 2)
    p_bg = float(p_cand[near].sum() - pm.sum()) / (math.pi * 1.5 ** 2)
    feats = [
        n, float(pm.sum()), float(pm.mean()), float(pm.max()), top3(pm), float(snr.mean()),
        float(snr.max()), top3(snr), float(f("scale_mm")[members].mean()),
        float(f("scale_mm")[members].std()), float(f("contrast")[members].mean()),
        float(f("contrast")[members].std()), float(f("elong")[members].mean()),
        float(f("elong")[members].min()), float(f("line_ctx1")[members].mean()), radius, area,
        n / area * 100.0, linearity, float(nn.mean()), float(nn.std() / max(nn.mean(), 1e-6)),
        bg_rate, p_bg, float(f("edge_mm")[members].min()), float(f("pectoral_mm")[members].max()),
        float(f("background")[members].mean()), spacing_mm,
    ]
    centre_rc = (float(centre_mm[0] / spacing_mm), float(centre_mm[1] / spacing_mm))
    return centre_rc, radius, feats


def suppress_neighbours(centres_rc: np.ndarray, scores: np.ndarray, spacing_mm: float,
                        merge_mm: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, strongest first: a cluster whose centre
    lies within ``merge_mm`` of a stronger kept one is part of the same finding for a reader
    (one mark per region, not three overlapping outlines)."""
    order = np.lexsort((centres_rc[:, 1], centres_rc[:, 0], -scores)) if len(scores) else \
        np.zeros(0, int)
    kept: list[int] = []
    pts = centres_rc * spacing_mm
    for i in order:
        if all(np.hypot(*(pts[i] - pts[j])) > merge_mm for j in kept):
            kept.append(int(i))
    return np.asarray(kept, dtype=int)


def outline(points_rc: np.ndarray, margin_px: float) -> tuple[tuple[float, float], ...]:
    """Closed polygon (DICOM x=col+.5, y=row+.5) around the members, ``margin_px`` outside."""
    angles = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * max(margin_px, 1.0)
    cloud = (points_rc[:, None, :] + ring[None, :, :]).reshape(-1, 2)
    xy = np.stack([cloud[:, 1] + 0.5, cloud[:, 0] + 0.5], axis=1).astype(np.float32)
    hull = cv2.convexHull(xy).reshape(-1, 2)
    poly = [(round(float(x), 2), round(float(y), 2)) for x, y in hull]
    poly.append(poly[0])
    return tuple(poly)


def build_clusters(cands: Candidates, p_cand: np.ndarray, keep: np.ndarray, spacing_mm: float,
                   p: ClusterParams = ClusterParams(),
                   image_shape: tuple[int, int] | None = None) -> list[Cluster]:
    """Clusters of the kept candidates with their features (unscored, in a stable order).

    Outlines are clipped to ``image_shape`` (rows, cols) when given.
    """
    out = []
    for members in group(cands, keep, spacing_mm, p):
        centre, radius, feats = cluster_features(cands, members, p_cand, spacing_mm)
        pts = np.stack([cands.rows[members], cands.cols[members]], axis=1)
        poly = outline(pts, p.outline_margin_mm / spacing_mm)
        if image_shape is not None:
            h, w = image_shape
            poly = tuple((min(max(x, 0.0), float(w)), min(max(y, 0.0), float(h)))
                         for x, y in poly)
        points = tuple((float(cands.rows[i]), float(cands.cols[i]), float(p_cand[i]))
                       for i in members)
        out.append(Cluster(centre_rc=centre, radius_mm=max(radius + p.outline_margin_mm, 2.0),
                           members=tuple(int(i) for i in members), outline_xy=poly,
                           features=tuple(float(v) for v in feats), member_points=points))
    out.sort(key=lambda c: (c.centre_rc[0], c.centre_rc[1]))
    return out
