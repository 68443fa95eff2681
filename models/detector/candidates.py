"""Microcalcification candidates: multi-scale bright blobs and their features.

The image is area-averaged to a working grid of ``work_mm`` (0.1 mm) when the source is finer;
a coarser source (film at 0.2 mm) keeps its own grid. Every filter is set in millimetres, so the
same detector runs on film and on digital detectors at 0.05-0.1 mm (the trees also see the pixel
size). On it:

* differences of Gaussians in four bands between sigma 0.07 and 0.36 mm (bright
  blobs of ~0.25-1 mm diameter), each divided by its own local robust noise level, so the
  response is a contrast-to-noise ratio (SNR) whatever the VOI or the film grain;
* candidates are the local maxima of the best-scale SNR inside the breast above ``snr``
  (pass 1 keeps only the running maximum, so memory stays at a few image copies);
* features per candidate, from Gaussian stencils of local windows (pass 2; all in physical
  units or ratios): SNR per scale, best scale, contrast
  and background level, Hessian eigenvalue ratio at the best scale (elongation: a speck is round,
  a vessel or duct wall is a line) and at two context scales (0.6 and 1.2 mm: lines, edges),
  gradient at the context scale (edges of dense tissue), distance to the breast edge, signed
  distance to the pectoral muscle, and the density of other candidates around it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
from scipy.spatial import cKDTree

from models.detector.anatomy import Anatomy, anatomy

# DoG band edges (sigma, mm): band k lies between EDGES_MM[k] and EDGES_MM[k + 1]; its centre
# scale (geometric mean) is SCALES_MM[k].
EDGES_MM = (0.07, 0.105, 0.16, 0.24, 0.36)
SCALES_MM = tuple(round(float(np.sqrt(a * b)), 3) for a, b in zip(EDGES_MM[:-1], EDGES_MM[1:],
                                                                   strict=True))
CONTEXT_MM = (0.6, 1.2)

CANDIDATE_FEATURES = (
    "snr", "snr_s0", "snr_s1", "snr_s2", "snr_s3", "scale_mm", "contrast", "background",
    "noise", "elong", "curv_ratio", "line_ctx1", "line_ctx2", "ridge_ctx1", "grad_ctx",
    "edge_mm", "pectoral_mm", "n_2mm", "n_5mm", "n_15mm", "snr_rank_5mm", "spacing_mm",
)


@dataclass(frozen=True)
class CandidateParams:
    work_mm: float = 0.1
    snr: float = 4.0  # candidate threshold on the best-scale SNR
    border_mm: float = 3.0  # no candidates this close to the image edge
    noise_window_mm: float = 12.0
    max_candidates: int = 2500  # per image, strongest first


@dataclass
class Candidates:
    """Candidates of one image: source-image (row, col) and a feature matrix."""

    rows: np.ndarray  # float64, source numpy coordinates
    cols: np.ndarray
    features: np.ndarray  # float32 (n, len(CANDIDATE_FEATURES))
    anatomy: Anatomy | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def feature(self, name: str) -> np.ndarray:
        return self.features[:, CANDIDATE_FEATURES.index(name)]


def to_work_grid(
    image01: np.ndarray, mask: np.ndarray, spacing_mm: float, work_mm: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resample image and mask to ``work_mm``; returns (image, mask, work px per source px)."""
    rows, cols = image01.shape
    f = spacing_mm / work_mm
    if abs(f - 1.0) < 1e-3:
        return image01.astype(np.float32, copy=False), mask, 1.0
    size = (max(1, int(round(cols * f))), max(1, int(round(rows * f))))
    # Finer images are area-averaged; coarser ones are replicated, not interpolated, so a speck
    # keeps the contrast it was measured with (interpolation would blur it and change its SNR).
    interp = cv2.INTER_AREA if f < 1.0 else cv2.INTER_NEAREST
    work = cv2.resize(image01.astype(np.float32, copy=False), size, interpolation=interp)
    bool_c = mask.dtype == np.bool_ and mask.flags.c_contiguous
    m8 = mask.view(np.uint8) if bool_c else mask.astype(np.uint8)  # 0/1, no copy
    w8 = cv2.resize(m8, size, interpolation=cv2.INTER_NEAREST)
    wmask = w8.view(np.bool_) if bool_c else w8.astype(bool)  # 0/1 bytes: a view, no copy
    return work, wmask, size[0] / cols


def coarse_noise(resp: np.ndarray, mask: np.ndarray, window_px: float, stride: int = 2,
                 *, mask_cache: dict | None = None, origin: tuple[int, int] = (0, 0),
                 shape: tuple[int, int] | None = None) -> np.ndarray:
    """Local robust noise SD of a filter response inside the breast, on a coarse grid.

    Computed from every ``stride``-th pixel on a grid of a quarter window (the window is
    ~12 mm) as the RMS of the response after clipping its strongest values (the specks
    themselves). Only the response inside ``mask`` is read. ``mask_cache`` (one dict per
    image, while ``mask`` is alive and unchanged) keeps the coarse mask across the bands.

    ``resp`` and ``mask`` may be a region at ``origin`` of a grid of ``shape`` (default: the
    whole grid), the mask being False outside the region: the estimate is then the one of the
    whole grid (the same pixels, sampled on the whole grid's stride, in the same order).
    """
    rows, cols = shape if shape is not None else resp.shape
    oy, ox = origin
    # the whole grid's every stride-th pixel that falls in the region
    iy, ix = (-oy) % stride, (-ox) % stride
    r2, m2 = resp[iy::stride, ix::stride], mask[iy::stride, ix::stride]
    gy, gx = (oy + iy) // stride, (ox + ix) // stride  # where they sit in the strided grid
    h2, w2 = -(-rows // stride), -(-cols // stride)
    step = max(1, int(window_px // (4 * stride)))
    sr, sc = max(1, h2 // step), max(1, w2 // step)
    # coarse first (area average = box filter + decimation), then the window blur on the coarse
    # grid: ~20x cheaper than blurring the full-resolution map with a 12 mm box.
    sub = max(1, int(np.sqrt(h2 * w2 / 250000)))  # the 98th percentile from ~250k pixels
    jy, jx = (-gy) % sub, (-gx) % sub
    key = (mask.ctypes.data, mask.shape, stride, sc, sr, origin, rows, cols)
    cached = mask_cache.get(key) if mask_cache is not None else None
    if cached is not None:
        # the same mask for every band of one image: resized, inverted and sampled once
        m, t2, outside, sample = cached
    else:
        m2_whole = np.zeros((h2, w2), np.float32)
        m2_whole[gy:gy + r2.shape[0], gx:gx + r2.shape[1]] = m2
        m = cv2.resize(m2_whole, (sc, sr), interpolation=cv2.INTER_AREA)
        t2 = np.zeros((h2, w2), np.float32)  # zero outside the region, whatever the band
        outside = ~m2
        sample = np.ascontiguousarray(m2[jy::sub, jx::sub])  # the quantile's pixels in the mask
        if mask_cache is not None:
            mask_cache[key] = (m, t2, outside, sample)
    inside = r2[jy::sub, jx::sub][sample]
    cap = max(float(np.quantile(inside, 0.98)) if inside.size else 1.0, 1e-6)
    part = t2[gy:gy + r2.shape[0], gx:gx + r2.shape[1]]
    # min(|r|, cap)^2 as min(r^2, cap^2): rounding a square is monotonic in |r|, so the two are
    # equal bit for bit, and the square reads the strided response once (no abs pass)
    cap32 = np.float32(cap)
    np.square(r2, out=part)
    np.minimum(part, np.square(cap32), out=part)
    np.copyto(part, np.float32(0.0), where=outside)
    num = cv2.resize(t2, (sc, sr), interpolation=cv2.INTER_AREA)
    k = (5, 5)
    num, den = cv2.blur(num, k), cv2.blur(m, k)
    # OpenCV's running-sum box filter can leave -1e-12 where the breast is absent: NaN cells
    # there are missing values (the forests route them as learned), never inside the breast
    with np.errstate(invalid="ignore"):
        sd = np.sqrt(num / np.maximum(den, 1e-3))
    ok = den > 0.5
    floor = max(float(np.median(sd[ok])) * 0.5 if ok.any() else 1e-5, 1e-5)
    return np.maximum(sd, floor).astype(np.float32)


def sample_like_resize(coarse: np.ndarray, shape: tuple[int, int], rows: np.ndarray,
                       cols: np.ndarray) -> np.ndarray:
    """Values of ``cv2.resize(coarse, shape[::-1], INTER_LINEAR)`` at full-resolution integer
    (rows, cols), without building the full-resolution map."""
    def axis(x: np.ndarray, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (x + 0.5) * (n_in / n_out) - 0.5
        f = np.clip(f, 0.0, n_in - 1.0)
        i0 = np.floor(f).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, f - i0

    r0, r1, wr = axis(rows.astype(np.float64), shape[0], coarse.shape[0])
    c0, c1, wc = axis(cols.astype(np.float64), shape[1], coarse.shape[1])
    top = coarse[r0, c0] * (1 - wc) + coarse[r0, c1] * wc
    bottom = coarse[r1, c0] * (1 - wc) + coarse[r1, c1] * wc
    return top * (1 - wr) + bottom * wr


def _gauss(sigma: float) -> tuple[np.ndarray, int]:
    k = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-k, k + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum(), k


def _stencils(windows: np.ndarray, radius: int, sigma: float, h: int) -> np.ndarray:
    """Gaussian-blurred values (sigma px) at the 3 x 3 stencil of step ``h`` around each window
    centre: (n, 3, 3), rows/cols offsets (-h, 0, +h). ``windows`` are (n, 2R+1, 2R+1)."""
    g, k = _gauss(sigma)
    out = np.empty((len(windows), 3, 3))
    for j, dc in enumerate((-h, 0, h)):
        c0 = radius + dc - k
        cols = windows[:, :, c0:c0 + 2 * k + 1] @ g  # (n, 2R+1): rows blurred along x
        for i, dr in enumerate((-h, 0, h)):
            r0 = radius + dr - k
            out[:, i, j] = cols[:, r0:r0 + 2 * k + 1] @ g
    return out


def _hessian_from(st: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (l1 <= l2) and gradient magnitude from (n, 3, 3) stencils of step ``h``."""
    centre = st[:, 1, 1]
    dxx = (st[:, 1, 2] - 2 * centre + st[:, 1, 0]) / (h * h)
    dyy = (st[:, 2, 1] - 2 * centre + st[:, 0, 1]) / (h * h)
    dxy = (st[:, 2, 2] - st[:, 2, 0] - st[:, 0, 2] + st[:, 0, 0]) / (4 * h * h)
    tr, det = dxx + dyy, dxx * dyy - dxy * dxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    grad = np.hypot(st[:, 1, 2] - st[:, 1, 0], st[:, 2, 1] - st[:, 0, 1]) / (2 * h)
    return tr / 2 - disc, tr / 2 + disc, grad


def _hessian_at(g: np.ndarray, r: np.ndarray, c: np.ndarray, h: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (l1 <= l2) and gradient magnitude of blurred image ``g`` at integer (r, c),
    by central differences with step ``h`` pixels."""
    rows, cols = g.shape
    rp, rm = np.minimum(r + h, rows - 1), np.maximum(r - h, 0)
    cp, cm = np.minimum(c + h, cols - 1), np.maximum(c - h, 0)
    centre = g[r, c]
    dxx = (g[r, cp] - 2 * centre + g[r, cm]) / (h * h)
    dyy = (g[rp, c] - 2 * centre + g[rm, c]) / (h * h)
    dxy = (g[rp, cp] - g[rp, cm] - g[rm, cp] + g[rm, cm]) / (4 * h * h)
    tr, det = dxx + dyy, dxx * dyy - dxy * dxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    l1, l2 = tr / 2 - disc, tr / 2 + disc
    grad = np.hypot(g[r, cp] - g[r, cm], g[rp, c] - g[rm, c]) / (2 * h)
    return l1, l2, grad


def _filter_box(mask: np.ndarray, sigmas: list[float]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1): the bounding box of ``mask`` widened by more than the reach of the
    chained Gaussian blurs ``sigmas`` (OpenCV's float kernels reach 4 sigma), clipped to the
    image; the left edge rounded down to a multiple of 32 columns."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    reach = sum(int(np.ceil(4.0 * s)) + 1 for s in sigmas)
    margin = 2 * reach + 32
    r0 = max(0, int(rows[0]) - margin)
    r1 = min(mask.shape[0], int(rows[-1]) + 1 + margin)
    c0 = max(0, (int(cols[0]) - margin) // 32 * 32)
    c1 = min(mask.shape[1], int(cols[-1]) + 1 + margin)
    return r0, r1, c0, c1


def _peak_centroids(peak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (row, col; float64) of the 8-connected groups of ``peak`` pixels: what
    ``cv2.connectedComponentsWithStats(peak, connectivity=8)`` gives (without the background),
    in another order, from the few thousand peak pixels instead of a labelling of the whole
    grid. Local maxima touch only on a plateau of equal values, so most groups are one pixel."""
    return _centroids_of(np.flatnonzero(peak), peak.shape[1])


def _centroids_of(idx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_peak_centroids` of the peak pixels at flat indices ``idx`` (raster order, sorted)
    of a grid ``width`` columns wide."""
    r, c = np.divmod(idx, width)
    if len(idx) == 0:
        return r.astype(np.float64), c.astype(np.float64)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each neighbour pair once
        target = idx + dr * width + dc
        pos = np.minimum(np.searchsorted(idx, target), len(idx) - 1)
        hit = (idx[pos] == target) & (c + dc >= 0) & (c + dc < width)
        src.append(np.flatnonzero(hit))
        dst.append(pos[hit])
    a, b = np.concatenate(src), np.concatenate(dst)
    if len(a) == 0:
        return r.astype(np.float64), c.astype(np.float64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(idx), len(idx)))
    n, labels = connected_components(graph, directed=False)
    count = np.bincount(labels, minlength=n).astype(np.float64)
    return (np.bincount(labels, r.astype(np.float64), n) / count,
            np.bincount(labels, c.astype(np.float64), n) / count)


def _local_maxima(best: np.ndarray, mask: np.ndarray, snr: float) -> np.ndarray:
    """Flat indices (raster order) of ``(b >= snr) & (b >= cv2.dilate(b, 5 x 5))`` with ``b``
    = ``best`` zeroed outside ``mask`` (in place), tested at the few pixels at or above ``snr``
    (~0.5 % of the grid) instead of dilating and comparing the whole grid. OpenCV's dilation
    ignores neighbours beyond the edge (its default border is -inf); so does this."""
    np.copyto(best, np.float32(0.0), where=~mask)
    rows, cols = best.shape
    flat = best.reshape(-1)
    idx = np.flatnonzero(flat >= snr)
    v = flat[idx]
    ok = np.ones(len(idx), bool)
    r, c = np.divmod(idx, cols)
    inner = len(idx) == 0 or (r[0] >= 2 and r[-1] < rows - 2 and c.min() >= 2
                              and c.max() < cols - 2)
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            if dr == 0 and dc == 0:
                continue
            if inner:  # every neighbour inside the grid (the usual case: the mask has a border)
                ok &= v >= flat[idx + (dr * cols + dc)]
                continue
            rr, cc = r + dr, c + dc
            there = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            nb = flat[np.clip(rr, 0, rows - 1) * cols + np.clip(cc, 0, cols - 1)]
            ok &= ~there | (v >= nb)
    return idx[ok]


def find_candidates(
    image01: np.ndarray,
    mask: np.ndarray,
    spacing_mm: float,
    p: CandidateParams = CandidateParams(),
    *,
    view: str = "",
) -> Candidates:
    """Candidates and their features for one prepared image (see the module docstring)."""
    anat = anatomy(image01, mask, spacing_mm, view)
    work_mm = max(p.work_mm, spacing_mm)
    work, wmask, f = to_work_grid(image01, mask, spacing_mm, work_mm)
    px = work_mm
    b = int(round(p.border_mm / px))
    if b > 0:
        wmask = wmask.copy()
        wmask[:b], wmask[-b:], wmask[:, :b], wmask[:, -b:] = False, False, False, False
    empty = Candidates(np.zeros(0), np.zeros(0),
                       np.zeros((0, len(CANDIDATE_FEATURES)), np.float32), anat)
    if not wmask.any():
        return empty
    # Pass 1, detection: differences of Gaussians between successive blurs (ratio 1.5:
    # scale-normalised up to a constant that the noise normalisation removes), each blur from
    # the previous one; only the running maximum SNR is kept (memory: a few image copies).
    # Only the breast's bounding box is filtered (with a margin wider than the chained blurs'
    # reach, its left edge on a multiple of 32 columns so that OpenCV's vector lanes fall on
    # the same columns as in the whole image: every value inside the breast is bit-identical
    # to filtering the whole grid, tests/test_detector_speed.py); the noise estimate reads the
    # response inside the breast only, from a whole-grid buffer (zero outside the box).
    sigmas = [EDGES_MM[0] / px] + [np.sqrt(s1 * s1 - s0 * s0) / px
                                   for s0, s1 in zip(EDGES_MM[:-1], EDGES_MM[1:], strict=True)]
    box = _filter_box(wmask, sigmas)
    r0, r1, c0, c1 = box
    region = work[r0:r1, c0:c1]
    rmask = wmask[r0:r1, c0:c1]
    mask_cache: dict = {}
    prev = cv2.GaussianBlur(region, (0, 0), sigmas[0])
    spare = np.empty_like(prev)
    best = np.zeros(region.shape, np.float32)
    coarse_sd = []
    # Buffers are reused in place (the response in the previous blur's, the next blur in the
    # buffer the last response is done with, the noise map in one whole-grid buffer): a few
    # region-sized arrays, allocated (and page-faulted) once per image, not once per band.
    up = np.empty(work.shape, np.float32)
    for sigma in sigmas[1:]:
        nxt = cv2.GaussianBlur(prev, (0, 0), sigma, dst=spare)
        resp = np.subtract(prev, nxt, out=prev)
        sd = coarse_noise(resp, rmask, p.noise_window_mm / px, mask_cache=mask_cache,
                          origin=(r0, c0), shape=work.shape)
        coarse_sd.append(sd)
        cv2.resize(sd, (work.shape[1], work.shape[0]), dst=up, interpolation=cv2.INTER_LINEAR)
        resp /= up[r0:r1, c0:c1]
        np.maximum(best, resp, out=best)
        prev, spare = nxt, resp
    del prev, nxt, resp, spare, up, mask_cache
    # local maxima of the SNR inside the breast (zeroed outside it) at or above the threshold
    cent_r, cent_c = _centroids_of(_local_maxima(best, rmask, p.snr), c1 - c0)
    if len(cent_r) == 0:
        return empty
    pr = np.clip(np.round(cent_r + r0).astype(int), 0, work.shape[0] - 1)
    pc = np.clip(np.round(cent_c + c0).astype(int), 0, work.shape[1] - 1)
    order = np.lexsort((pc, pr, -best[pr - r0, pc - c0]))[: p.max_candidates]
    pr, pc = pr[order], pc[order]
    ok = wmask[pr, pc]
    pr, pc = pr[ok], pc[ok]
    del best
    if len(pr) == 0:
        return empty
    # Pass 2, features at the candidates only: Gaussian stencils from local windows.
    hs = [max(1, int(round(s / px))) for s in SCALES_MM]
    radius = max(_gauss(EDGES_MM[-1] / px)[1] + max(hs), 2)
    inner = (pr.min() >= radius and pc.min() >= radius and pr.max() < work.shape[0] - radius
             and pc.max() < work.shape[1] - radius)
    if inner:  # no window reaches the edge (the usual case: the border is wider): no padding
        win = np.lib.stride_tricks.sliding_window_view(work, (2 * radius + 1, 2 * radius + 1))
        windows = win[pr - radius, pc - radius].astype(np.float64)
    else:
        padded = np.pad(work, radius, mode="reflect")
        win = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
        windows = win[pr, pc].astype(np.float64)  # (n, 2R+1, 2R+1), centred on each candidate
        del padded
    del win
    centre = [_stencils(windows, radius, e / px, 0)[:, 1, 1] for e in EDGES_MM]
    per_scale = np.zeros((len(SCALES_MM), len(pr)))
    noise_k = np.zeros((len(SCALES_MM), len(pr)))
    for k in range(len(SCALES_MM)):
        noise_k[k] = sample_like_resize(coarse_sd[k], work.shape, pr, pc)
        per_scale[k] = (centre[k] - centre[k + 1]) / noise_k[k]
    k_best = per_scale.argmax(axis=0)
    snr = per_scale.max(axis=0)
    scale_mm = np.asarray(SCALES_MM)[k_best]
    noise = noise_k[k_best, np.arange(len(pr))]
    # elongation at the best scale: l2 / l1 for a bright blob (both negative): 1 round, 0 line
    l1 = np.zeros(len(pr))
    l2 = np.zeros(len(pr))
    for k in range(len(SCALES_MM)):
        sel = k_best == k
        if sel.any():
            a1, a2, _ = _hessian_from(_stencils(windows[sel], radius, EDGES_MM[k + 1] / px,
                                                hs[k]), hs[k])
            l1[sel], l2[sel] = a1, a2
    del windows
    elong = np.where(l1 < 0, np.clip(l2 / np.minimum(l1, -1e-9), -1, 1), -1.0)
    curv_ratio = np.abs(l1) / (np.abs(l1) + np.abs(l2) + 1e-9)
    # context (vessels, duct walls, dense-tissue edges) and background on a coarse copy
    cmm = max(0.4, px)
    coarse = cv2.resize(work, (max(1, int(work.shape[1] * px / cmm)),
                               max(1, int(work.shape[0] * px / cmm))), interpolation=cv2.INTER_AREA)
    cf = coarse.shape[1] / work.shape[1]
    cr = np.clip(np.round((pr + 0.5) * cf - 0.5).astype(int), 0, coarse.shape[0] - 1)
    cc = np.clip(np.round((pc + 0.5) * cf - 0.5).astype(int), 0, coarse.shape[1] - 1)
    background = cv2.GaussianBlur(coarse, (0, 0), 1.0 / cmm)[cr, cc]
    contrast = centre[0] - background
    ctx = []
    for s in CONTEXT_MM:
        g = cv2.GaussianBlur(coarse, (0, 0), s / cmm)
        h = max(1, int(round(s / cmm)))
        a1, a2, grad = _hessian_at(g, cr, cc, h)
        mag = np.abs(a1) + np.abs(a2) + 1e-9
        # 1 for a bright line (one strongly negative eigenvalue, one ~0), 0 for a blob or flat
        line = np.where(a1 < 0, (np.abs(a1) - np.abs(a2)) / mag, 0.0)
        ridge = -a1 * s * s / (cmm * cmm) / np.maximum(noise, 1e-6)
        ctx.append((line, ridge, grad * s / cmm / np.maximum(noise, 1e-6)))
    rows_src = (pr + 0.5) / f - 0.5
    cols_src = (pc + 0.5) / f - 0.5
    edge_mm, pect_mm = anat.sample(rows_src, cols_src)
    pect_mm = np.where(np.isfinite(pect_mm), pect_mm, -100.0)
    pts = np.stack([pr, pc], axis=1).astype(np.float64) * px  # mm
    tree = cKDTree(pts)
    counts = [tree.query_ball_point(pts, r, return_length=True) - 1 for r in (2.0, 5.0, 15.0)]
    # rank of this candidate's SNR among its 5 mm neighbours (1 = the strongest there)
    nb = cast(list[list[int]], tree.query_ball_point(pts, 5.0))  # per point, its neighbours
    owner = np.repeat(np.arange(len(nb)), [len(idx) for idx in nb])
    other = np.fromiter(itertools.chain.from_iterable(nb), np.intp, len(owner))
    rank = np.bincount(owner, snr[other] > snr[owner], len(nb)).astype(np.int64) + 1
    feats = np.column_stack([
        snr, per_scale[0], per_scale[1], per_scale[2], per_scale[3], scale_mm, contrast,
        background, noise, elong, curv_ratio, ctx[0][0], ctx[1][0], ctx[0][1], ctx[0][2],
        edge_mm, pect_mm, counts[0], counts[1], counts[2], rank,
        np.full(len(pr), spacing_mm),
    ]).astype(np.float32)
    return Candidates(rows_src.astype(np.float64), cols_src.astype(np.float64), feats, anat)
