"""A stand-in for the analysis stage with the analyser's interface (node.analysis.result):
it reads each image's header (real files from the node's spool), returns one fixed finding per
image and records what it was asked, so the node's own stages (completion, worker, reports,
delivery) run in-process in milliseconds instead of behind a model load.

It is not a mock of anything the node does: the worker, the report builders, the queue and the
delivery around it are the real ones; only the model's numbers are fixed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from node.analysis.result import Finding, ImageAnalysis, ImageInput, ModelInfo, StudyAnalysis
from node.dicom_header import is_for_processing, laterality_and_view

FAKE_MODEL = ModelInfo(name="fake-analyser", version="1", architecture="fixed-findings",
                       threshold=0.5)
PROBABILITY = 0.83  # every finding's P(malignant): the reports must carry it


class FakeAnalyser:
    """Fixed findings for every image; ``hold`` (an Event) blocks each analysis at a safe point
    until it is set, calling the checkpoint meanwhile, so a test can change the study while its
    analysis runs; ``fail_times`` makes the first N analyses raise."""

    def __init__(self, model: ModelInfo = FAKE_MODEL, probability: float = PROBABILITY) -> None:
        self.model = model
        self.probability = probability
        self.calls: list[tuple[str, list[str]]] = []  # (study UID, SOP Instance UIDs) per call
        self.started = threading.Event()  # set when an analysis began
        self.hold: threading.Event | None = None
        self.fail_times = 0
        self.display_scale = 1.0  # 0 makes the Secondary Capture's builder refuse the image
        self._lock = threading.Lock()

    def analyse(self, study_instance_uid: str, images: list[ImageInput], *,
                checkpoint: Callable[[], None] | None = None,
                cache: dict[str, Any] | None = None) -> StudyAnalysis:
        with self._lock:
            self.calls.append((study_instance_uid, [i.sop_instance_uid for i in images]))
            fail = self.fail_times > 0
            self.fail_times -= fail
        self.started.set()
        if fail:
            raise RuntimeError("fake analyser told to fail")
        if self.hold is not None:
            while not self.hold.wait(0.05):
                if checkpoint is not None:
                    checkpoint()  # Superseded / TooLong go up to the worker, as the real one's
        out = [self._image(i, n) for n, i in enumerate(images, start=1)]
        if checkpoint is not None:
            checkpoint()
        return StudyAnalysis(study_instance_uid=study_instance_uid, model=self.model, images=out,
                             timings_ms={"fake": 0.1})

    def _image(self, image: ImageInput, index: int) -> ImageAnalysis:
        ds = pydicom.dcmread(Path(image.path), stop_before_pixels=True)
        lat, view = laterality_and_view(ds)
        rows, cols = int(ds.Rows), int(ds.Columns)
        cx, cy, r = cols / 2, rows / 2, min(rows, cols) / 8
        outline = ((cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r),
                   (cx - r, cy - r))
        finding = Finding(index=index, sop_instance_uid=image.sop_instance_uid, laterality=lat,
                          view=view, centre_xy=(cx, cy), outline_xy=outline, radius_mm=2.0,
                          n_calcifications=5, probability=self.probability)
        cam = np.zeros((rows, cols), np.float32)
        cam[int(cy - r):int(cy + r), int(cx - r):int(cx + r)] = 1.0
        return ImageAnalysis(
            sop_instance_uid=image.sop_instance_uid, sop_class_uid=image.sop_class_uid,
            laterality=lat, view=view, rows=rows, columns=cols, pixel_spacing_mm=0.1,
            spacing_source="ImagerPixelSpacing", for_presentation=not is_for_processing(ds),
            findings=[finding], display=np.full((rows, cols), 128, np.uint8), cam=cam,
            display_scale=self.display_scale)
