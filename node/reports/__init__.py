"""Report stage: DICOM objects the node sends back for one study analysis.

* :func:`build_sr` - one TID 1500 Comprehensive SR per study (ROIs, P(malignant), pathology call).
* :func:`build_sc` - one RGB Grad-CAM Secondary Capture per analysed image.
* :func:`build_reports` - both, SR first. All UIDs derive from ``analysis_key``
  (:mod:`node.reports.uids`), so the same analysis always yields the same objects.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence

from pydicom.dataset import Dataset

from node.analysis.result import StudyAnalysis
from node.reports.common import (
    check_analysis,
    check_common_args,
    check_series_number,
    presentation_image_for,
)
from node.reports.sc import SC_SERIES_DESCRIPTION, build_sc, render_overlay
from node.reports.sr import SR_SERIES_DESCRIPTION, build_sr
from node.reports.uids import ResultUIDs, derive_uid

__all__ = [
    "SC_SERIES_DESCRIPTION",
    "SR_SERIES_DESCRIPTION",
    "ResultUIDs",
    "build_reports",
    "build_sc",
    "build_sr",
    "derive_uid",
    "presentation_image_for",
    "render_overlay",
]

log = logging.getLogger(__name__)


def build_reports(
    analysis: StudyAnalysis,
    sources: Mapping[str, Dataset],
    *,
    analysis_key: str,
    created: dt.datetime,
    manufacturer: str,
    sr_series_number: int,
    sc_series_number: int,
    threshold: float,
    software_version: str,
    previous_srs: Sequence[Dataset] = (),
) -> list[Dataset]:
    """The SR followed by one Grad-CAM SC per analysed image (in analysis order).

    ``previous_srs`` are the headers of SRs this one supersedes (a re-opened study); they are
    listed in the SR's Predecessor Documents Sequence.

    Raises ``TypeError``/``ValueError`` naming the problem before anything is built when an
    argument, the analysis or a source header is unusable. Every analysed image must carry
    ``display`` and ``cam``.
    """
    check_common_args(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                      threshold=threshold, software_version=software_version)
    check_series_number("sr_series_number", sr_series_number)
    check_series_number("sc_series_number", sc_series_number)
    if sr_series_number == sc_series_number:
        raise ValueError("sr_series_number and sc_series_number must differ")
    analysed = check_analysis(analysis, sources)
    for n, image in enumerate(analysed, start=1):
        if image.display is None or image.cam is None:
            raise ValueError(f"analysed image #{n} has no display image or Grad-CAM map")

    out: list[Dataset] = [
        build_sr(analysis, sources, analysis_key=analysis_key, created=created,
                 manufacturer=manufacturer, series_number=sr_series_number,
                 threshold=threshold, software_version=software_version,
                 previous_versions=previous_srs)
    ]
    # One patient/study identity for all objects: the SR's first evidence (see build_sr).
    identity = presentation_image_for(analysed[0], sources)
    for n, image in enumerate(analysed, start=1):
        out.append(
            build_sc(image, sources[image.sop_instance_uid], model=analysis.model,
                     analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                     series_number=sc_series_number, instance_number=n, threshold=threshold,
                     software_version=software_version, identity=identity)
        )
    log.info("built %d report object(s): 1 SR, %d SC", len(out), len(out) - 1)
    return out
