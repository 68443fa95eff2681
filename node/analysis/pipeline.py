"""The analysis stage: :class:`AnalysisPipeline` implements :class:`StudyAnalyser`.

Per study: decode and prepare every image, find calcification clusters on each (in millimetres;
:mod:`node.analysis.rois`), keep the ``max_rois_per_image`` highest-scoring ones, and score each
for malignancy with the card's classification head: either the EfficientNet (every cluster
cropped with the shared :func:`models.roi.crop_roi`, all crops of the study in batches, each
ROI's Grad-CAM in the same pass) or a morphology head on the detector's cluster features (no CNN
forward; the heat map is then the detector's calcification evidence). The maps are blended,
feathered and confined to the breast, into a display-sized canvas for the Secondary Capture.
Whether the reports may show the call is the card's (``ModelInfo.classification_validated``),
withheld for a study with images outside the validated pixel-size range. Findings are
numbered 1..n over the study: images in input order, within an image by descending score; every
report kind uses that number.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import pydicom

from models.detector.anatomy import reuse_downscaled
from models.roi import crop_roi
from node.analysis.allocator import keep_freed_images
from node.analysis.classify import Classifier
from node.analysis.heatmap import SparseMap, evidence_map, finish_cam, paste_cam
from node.analysis.prepare import SkipImage, display_image, prepare
from node.analysis.result import (
    Finding,
    ImageAnalysis,
    ImageInput,
    ModelInfo,
    StudyAnalysis,
)
from node.analysis.rois import (
    DEFAULT_DETECTOR,
    Cluster,
    DetectorParams,
    find_clusters,
    load_detector,
)
from node.config import AnalysisSettings, LimitsSettings, ModelSettings
from node.decode_limits import (
    DecodeBudget,
    LimitExceeded,
    check_declared,
    geometry,
    working_set_bytes,
)

log = logging.getLogger("node.analysis.pipeline")


class AnalysisPipeline:
    """Calcification-cluster analysis of a study. The model is loaded once, here.

    Configured by its sections, checked when they were parsed (node.config), trusted here:

    * ``model`` (``[model]``): the card (its weights are named inside it), the expected timm
      architecture (a card for another one stops start-up), device, batch size (ROIs per
      forward pass), precision (:func:`classify.resolve_precision`) and the P(malignant)
      decision threshold (``"card"``: the card's).
    * ``analysis`` (``[analysis]``): FOR PROCESSING images analysed or skipped, the pixel
      size used when the header has none (logged), the long side of the display/CAM images,
      the strongest clusters kept per image, the detector's operating point (``"card"``: the
      detector file's; the file is the one the card names, else the shipped one) and the
      memory all concurrent decodes together may take.
    * ``limits`` (``[limits]``): declared sizes refused before decoding (node.decode_limits).

    Not configuration: ``max_workers``, the images of a study decoded and searched in
    parallel (default min(4, CPUs)).

    Raises ``RuntimeError`` with a clear message when the card or weights are unusable.
    """

    def __init__(
        self,
        model: ModelSettings,
        analysis: AnalysisSettings | None = None,
        limits: LimitsSettings | None = None,
        *,
        max_workers: int | None = None,
    ) -> None:
        analysis = analysis or AnalysisSettings()
        # the per-image arrays reuse freed blocks instead of new pages (node.analysis.allocator)
        keep_freed_images()
        self.classifier = Classifier(
            model.card, architecture=model.architecture, device=model.device,
            batch_size=model.batch_size, threshold=model.threshold_override,
            precision=model.precision,
        )
        self.model: ModelInfo = self.classifier.info
        self.for_processing = analysis.for_processing
        self.fallback_spacing_mm = float(analysis.fallback_pixel_spacing_mm)
        self.sc_max_side = analysis.sc_max_side
        min_score = analysis.detector_operating_point_override
        path = self.classifier.card.detector_path(self.classifier.card_path) or DEFAULT_DETECTOR
        self.detector = DetectorParams(path=path, min_score=min_score)
        self.detector_model = load_detector(path)
        self.detector_operating_point = (self.detector_model.operating_point
                                         if min_score is None else min_score)
        log.info("detector %s %s (%s), operating point %.3f%s", self.detector_model.name,
                 self.detector_model.version, path.name, self.detector_operating_point,
                 "" if min_score is None else " (configured)")
        from models.detector.clusters import CLUSTER_FEATURES

        missing = [n for n in self.classifier.head_features if n not in CLUSTER_FEATURES]
        if missing:
            raise RuntimeError(f"model card {model.card}: its morphology head needs detector "
                               f"features {missing} that the detector does not compute")
        self.max_rois_per_image = analysis.max_rois_per_image
        # Images of a study prepared in parallel: at most 4 (a four-view study), at most the CPUs.
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.limits = limits or LimitsSettings()
        self.decode_budget = DecodeBudget(analysis.decode_memory_mb << 20)
        # Images prepared at once, over the study's threads and node.preanalysis's pool
        # together: one per CPU. Each holds ~200 MB of full-resolution arrays (3328 x 4096) and
        # already spreads its OpenCV filters over the cores, so more at once only adds memory
        # (measured: bench/results/2026-12-01-issue18c-C-cpu.md).
        self.preparation_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    # ------------------------------------------------------------------------------ public

    def analyse(self, study_instance_uid: str, images: list[ImageInput], *,
                checkpoint: Callable[[], None] | None = None,
                cache: dict[str, Any] | None = None) -> StudyAnalysis:
        """``checkpoint`` is called at safe points (before each image, before classifying) and
        may raise to stop a superseded analysis; ``cache`` keeps the per-image work (decode,
        ROI finding, crops) of this study for a later run of the same files."""
        timings = {"decode": 0.0, "rois": 0.0, "classify": 0.0, "gradcam": 0.0}
        t_start = time.perf_counter()
        check = checkpoint or (lambda: None)
        cnn = self.classifier.head_kind == "cnn"

        def one(item: ImageInput) -> tuple:
            check()  # a safe point before each image: a superseded analysis stops here
            ia, crops, clusters, t_decode, t_rois, breast = self._prepare_cached(item, cache)
            # A morphology head's heat map is this image's alone: made here, while the other
            # images are still being prepared (or already made with a pre-analysed image).
            t_map = 0.0 if cnn or crops is None else self._evidence_into(ia, clusters, breast)
            return ia, crops, clusters, t_decode, t_rois, breast, t_map

        # Decode + ROI finding of the images of a study run side by side (OpenCV, numpy and the
        # JPEG 2000 decoder release the GIL); the classifier then sees every ROI of the study.
        workers = max(1, min(self.max_workers, len(images)))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
                done = list(pool.map(one, images))
        else:
            done = [one(item) for item in images]
        check()
        wall = time.perf_counter() - t_start
        busy = sum(d[3] + d[4] + d[6] for d in done) or 1.0
        # Per-stage shares of the parallel phase's wall time (so the stages add up to the total).
        timings["decode"] = wall * sum(d[3] for d in done) / busy
        timings["rois"] = wall * sum(d[4] for d in done) / busy
        timings["gradcam"] = wall * sum(d[6] for d in done) / busy
        results: list[ImageAnalysis] = [d[0] for d in done]
        # (analysis, ROI crops, clusters) per analysed image; the full-resolution images are
        # already gone (cropped in the worker thread), which keeps the peak RSS down.
        work: list[tuple[ImageAnalysis, list[np.ndarray], list[Cluster], np.ndarray | None]] = [
            (d[0], d[1], d[2], d[5]) for d in done if d[1] is not None
        ]

        crops = [crop for _, image_crops, _, _ in work for crop in image_crops]
        clusters_all = [c for _, _, image_clusters, _ in work for c in image_clusters]
        check()  # before classifying
        card = self.classifier.card
        if cnn:  # the CNN makes the call: its forward gives P(malignant) and the Grad-CAM
            cnn_p, cams, t = self.classifier.predict(crops, with_cam=True)
            timings["classify"] += t["classify"] / 1000.0
            timings["gradcam"] += t["gradcam"] / 1000.0
        else:  # a morphology head: the call comes from the detector's cluster features
            cnn_p, cams = np.zeros(len(crops)), []
        t0 = time.perf_counter()
        probs = self.classifier.malignancy(cnn_p, self._head_inputs(clusters_all))
        timings["classify"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        k = 0
        for ia, _, clusters, breast in work:
            side_px = card.roi_size_mm / ia.pixel_spacing_mm
            px_per_mm = ia.display_scale / ia.pixel_spacing_mm  # display pixels per mm
            for c in clusters:
                ia.findings.append(
                    Finding(
                        index=k + 1,
                        sop_instance_uid=ia.sop_instance_uid,
                        laterality=ia.laterality,
                        view=ia.view,
                        centre_xy=c.centre_xy,
                        outline_xy=c.outline_xy,
                        radius_mm=round(c.radius_mm, 2),
                        n_calcifications=len(c.members),
                        probability=float(probs[k]),
                        detection_score=round(float(c.score), 4),
                    )
                )
                assert ia.cam is not None
                if cnn:
                    paste_cam(ia.cam, cams[k], c.centre_rc, side_px, ia.display_scale)
                k += 1
            if not cnn:  # its map is made already (one())
                ia.cam_source = "calcification evidence of the detector"
            elif ia.cam is not None:
                # ~1 mm of smoothing at display scale: one continuous surface over the breast
                finish_cam(ia.cam, breast, px_per_mm)
        timings["gradcam"] += time.perf_counter() - t0
        model = self.model
        if model.classification_validated:
            outside = sorted({round(ia.pixel_spacing_mm, 3) for ia, _, _, _ in work
                              if not self.classifier.in_validated_domain(ia.pixel_spacing_mm)})
            if outside:
                # the card is validated for another kind of image: marks and scores only
                log.info("study %s: pixel spacing %s mm outside the classifier's validated "
                         "range %s mm: no benign/malignant call", study_instance_uid, outside,
                         self.classifier.validated_spacing)
                model = replace(model, classification_validated=False)
        out = StudyAnalysis(
            study_instance_uid=study_instance_uid,
            model=model,
            images=results,
            timings_ms={name: round(1000.0 * s, 1) for name, s in timings.items()},
        )
        out.timings_ms["total"] = round(1000.0 * (time.perf_counter() - t_start), 1)
        log.info(
            "study %s: %d images (%d analysed), %d findings, max P per breast %s, %s",
            study_instance_uid, len(results), sum(r.analysed for r in results),
            len(out.findings),
            {lat: round(v, 3) for lat, v in out.max_probability_per_breast().items()},
            out.timings_ms,
        )
        return out

    @functools.cached_property
    def preparation_key(self) -> str:
        """Digest of everything the per-image work depends on (model, ROI size and input size
        of the crops, detector file and operating point, display size, image policy): a
        pre-analysed image is reused only under the same key (node.preanalysis)."""
        card = self.classifier.card
        model = self.model
        text = "|".join(str(v) for v in (
            model.name, model.version, model.architecture, card.roi_size_mm, card.input_size,
            self.classifier.head_kind, self.detector.path, self.detector_model.version,
            self.detector_operating_point, self.max_rois_per_image, self.sc_max_side,
            self.for_processing, self.fallback_spacing_mm))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def prepare_one(self, item: ImageInput) -> tuple:
        """The per-image work of :meth:`analyse` (decode, preparation, ROI finding, crops) for
        one image, in the form its ``cache`` holds: node.preanalysis runs it as soon as the
        instance is stored. Never raises for a bad image (it comes back failed/skipped).

        With a morphology head the image's finished heat map is made here too (it depends on
        nothing else: :func:`node.analysis.heatmap.evidence_map`) and kept in place of the
        breast mask as a :class:`~node.analysis.heatmap.SparseMap`, without the all-zero
        canvas: the study's completion only pastes it."""
        hit = self._prepare_image(item)
        ia, crops, clusters, t_decode, t_rois, breast = hit
        if self.classifier.head_kind == "cnn" or crops is None or ia.display is None:
            return hit
        t0 = time.perf_counter()
        cam = np.zeros(ia.display.shape, np.float32)
        evidence_map(cam, [c.member_points for c in clusters], ia.display_scale,
                     ia.pixel_spacing_mm, breast)
        made = SparseMap.of(cam, time.perf_counter() - t0)
        return dataclasses.replace(ia, cam=None), crops, clusters, t_decode, t_rois, made

    # ------------------------------------------------------------------------------ helpers

    def _head_inputs(self, clusters: list[Cluster]) -> np.ndarray | None:
        """The detector features a morphology head reads, in its order (None for a CNN head)."""
        names = self.classifier.head_features
        if not names:
            return None
        from models.detector.clusters import CLUSTER_FEATURES

        idx = [CLUSTER_FEATURES.index(n) for n in names]
        return np.array([[c.features[i] for i in idx] for c in clusters],
                        dtype=np.float64).reshape(len(clusters), len(idx))

    def _evidence_into(self, ia: ImageAnalysis, clusters: list[Cluster],
                       breast: np.ndarray | SparseMap | None) -> float:
        """A morphology head's heat map of one image into ``ia.cam`` (all zero): pasted when
        :meth:`prepare_one` made it, else made now; the seconds it took to make."""
        if ia.cam is None or ia.display is None:
            return 0.0
        if isinstance(breast, SparseMap):
            breast.paste(ia.cam)
            return breast.seconds
        t0 = time.perf_counter()
        evidence_map(ia.cam, [c.member_points for c in clusters], ia.display_scale,
                     ia.pixel_spacing_mm, breast)
        return time.perf_counter() - t0

    def _prepare_cached(self, item: ImageInput, cache: dict[str, Any] | None) -> tuple:
        """:meth:`_prepare_image`, reusing what an earlier (superseded) analysis of the same
        file already computed: decode, ROI finding and crops are per image; the findings and
        the heat map are rebuilt, since classification runs per study."""
        key = str(item.path)
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            hit = self._prepare_image(item)
            if cache is not None:
                cache[key] = hit
        ia, crops, clusters, t_decode, t_rois, breast = hit
        # A kept image holds no heat map (node.preanalysis drops the all-zero canvas): each
        # analysis paints on a fresh one of the display's size.
        fresh = dataclasses.replace(
            ia, findings=[], display=None if ia.display is None else ia.display.copy(),
            cam=None if ia.display is None else np.zeros(ia.display.shape, np.float32))
        return fresh, crops, clusters, t_decode, t_rois, breast

    def _prepare_image(
        self, item: ImageInput
    ) -> tuple[ImageAnalysis, list[np.ndarray] | None, list[Cluster], float, float,
               np.ndarray | None]:
        """Decode, prepare, find the clusters of one image and crop them; (analysis, crops,
        clusters, decode seconds, ROI seconds, display-size breast mask). A skipped image comes
        back with ``crops`` None. Declared sizes over ``limits`` are refused before decoding,
        and the image's decode working set is reserved from the decode budget."""
        t0 = time.perf_counter()
        try:
            header = pydicom.dcmread(item.path, stop_before_pixels=True)
            g = geometry(header)
            check_declared(g, self.limits)
        except LimitExceeded as exc:
            log.warning("image %s not decoded: %s", item.sop_instance_uid, exc)
            return (self._skipped(item, f"not decoded: {exc}", failed=True), None, [],
                    time.perf_counter() - t0, 0.0, None)
        except Exception:  # noqa: BLE001 - prepare() says what is wrong
            g = None  # prepare() says what is wrong with it
        # The whole working set of this image (decoded, float copies, mask) is reserved until
        # its crops are made; concurrent decodes wait while the budget is spent.
        with self.preparation_slots, \
                self.decode_budget.reserve(working_set_bytes(g) if g is not None else 0):
            return self._prepare_within_budget(item, t0)

    def _prepare_within_budget(
        self, item: ImageInput, t0: float
    ) -> tuple[ImageAnalysis, list[np.ndarray] | None, list[Cluster], float, float,
               np.ndarray | None]:
        # the breast mask and the detector's anatomy share one ~1 mm copy of the image
        with reuse_downscaled():
            return self._prepare_and_search(item, t0)

    def _prepare_and_search(
        self, item: ImageInput, t0: float
    ) -> tuple[ImageAnalysis, list[np.ndarray] | None, list[Cluster], float, float,
               np.ndarray | None]:
        try:
            prepared = prepare(
                item.path, for_processing=self.for_processing,
                fallback_spacing_mm=self.fallback_spacing_mm, limits=self.limits,
            )
        except SkipImage as exc:
            log.info("image %s skipped: %s", item.sop_instance_uid, exc)
            return self._skipped(item, str(exc)), None, [], time.perf_counter() - t0, 0.0, None
        except LimitExceeded as exc:
            log.warning("image %s not decoded: %s", item.sop_instance_uid, exc)
            return (self._skipped(item, f"not decoded: {exc}", failed=True), None, [],
                    time.perf_counter() - t0, 0.0, None)
        except Exception as exc:  # noqa: BLE001 - undecodable pixel data must not stop the study
            log.warning("image %s not analysed: %s", item.sop_instance_uid, exc)
            return (self._skipped(item, f"cannot decode: {type(exc).__name__}: {exc}",
                                  failed=True), None, [], time.perf_counter() - t0, 0.0, None)
        t1 = time.perf_counter()
        clusters = find_clusters(
            prepared.image01, prepared.breast_mask, prepared.pixel_spacing_mm, self.detector,
            view=prepared.view, detector=self.detector_model,
        )
        clusters = clusters[: self.max_rois_per_image]  # strongest first
        display, scale = display_image(prepared.image01, self.sc_max_side)
        mask = prepared.breast_mask
        m8 = mask.view(np.uint8) if mask.dtype == np.bool_ and mask.flags.c_contiguous \
            else mask.astype(np.uint8)  # 0/1 bytes either way; the view is no copy
        breast = cv2.resize(m8, display.shape[::-1], interpolation=cv2.INTER_NEAREST)
        ia = ImageAnalysis(
            sop_instance_uid=item.sop_instance_uid,
            sop_class_uid=item.sop_class_uid,
            laterality=prepared.laterality,
            view=prepared.view,
            rows=prepared.rows,
            columns=prepared.columns,
            pixel_spacing_mm=prepared.pixel_spacing_mm,
            spacing_source=prepared.spacing_source,
            for_presentation=prepared.for_presentation,
            display=display,
            cam=np.zeros(display.shape, dtype=np.float32),
            display_scale=scale,
        )
        card = self.classifier.card
        crops = [crop_roi(prepared.image01, c.centre_rc, prepared.pixel_spacing_mm,
                          card.roi_size_mm, card.input_size) for c in clusters] \
            if self.classifier.head_kind == "cnn" else []  # a morphology head needs no crops
        return ia, crops, clusters, t1 - t0, time.perf_counter() - t1, breast

    def _skipped(self, item: ImageInput, reason: str, failed: bool = False) -> ImageAnalysis:
        return ImageAnalysis(
            sop_instance_uid=item.sop_instance_uid,
            sop_class_uid=item.sop_class_uid,
            laterality="",
            view="",
            rows=0,
            columns=0,
            pixel_spacing_mm=0.0,
            spacing_source="",
            for_presentation=True,
            skipped_reason=reason,
            failed=failed,
        )
