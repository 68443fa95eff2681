"""Report stage: DICOM objects the node sends back for one study analysis.

* :func:`build_sr` - one TID 1500 Comprehensive SR per study (ROIs, cluster score; P(malignant)
  and the pathology call only for a model validated for classification).
* :func:`build_sc` - one RGB Grad-CAM Secondary Capture per analysed image.
* :func:`build_mammo_cad_sr` - one Mammography CAD SR (TID 4000) per study.
* :func:`build_gsps` - one GSPS with the ROI outlines per analysed image.
* :func:`build_reports` - the selected kinds (:mod:`node.reports.kinds`), SRs first. All UIDs
  derive from ``analysis_key`` (:mod:`node.reports.uids`), so the same analysis always yields the
  same objects.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence

from pydicom.dataset import Dataset

from node.analysis.result import StudyAnalysis
from node.reports.cad_sr import CAD_SR_SERIES_DESCRIPTION, build_mammo_cad_sr
from node.reports.common import (
    check_analysis,
    check_common_args,
    check_series_number,
    presentation_image_for,
)
from node.reports.gsps import GSPS_SERIES_DESCRIPTION, build_gsps
from node.reports.kinds import (
    DEFAULT_KINDS,
    GSPS,
    MAMMO_CAD,
    MAMMOGRAPHY_CAD_SR,
    SC,
    TID1500,
    check_kinds,
)
from node.reports.sc import SC_SERIES_DESCRIPTION, build_sc, render_overlay
from node.reports.sr import SR_SERIES_DESCRIPTION, build_sr
from node.reports.uids import ResultUIDs, derive_uid

__all__ = [
    "CAD_SR_SERIES_DESCRIPTION",
    "GSPS_SERIES_DESCRIPTION",
    "build_gsps",
    "build_mammo_cad_sr",
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
    kinds: Sequence[str] = DEFAULT_KINDS,
    cad_operating_point: float | None = None,
    cad_sr_series_number: int = 9903,
    gsps_series_number: int = 9904,
) -> list[Dataset]:
    """The result objects of the selected ``kinds``, in this order: TID 1500 SR, Mammography
    CAD SR, one Grad-CAM SC per analysed image, one GSPS per analysed image (analysis order).

    ``previous_srs`` are the headers of SRs this result supersedes (a re-opened study); each
    new SR lists those of its own SOP class in its Predecessor Documents Sequence.
    ``cad_operating_point`` (None: ``threshold`` for a model validated for classification, 0 -
    every reported cluster - otherwise) splits the CAD SR's findings into "Presentation
    Required" and "Presentation Optional"; it applies to P(malignant) for a validated model and
    to the cluster score otherwise.

    Raises ``TypeError``/``ValueError`` naming the problem before anything is built when an
    argument, the analysis or a source header is unusable. With ``sc`` selected, every analysed
    image must carry ``display`` and ``cam``.
    """
    kinds = check_kinds(kinds, "kinds")
    check_common_args(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                      threshold=threshold, software_version=software_version)
    numbers = {"sr_series_number": sr_series_number, "sc_series_number": sc_series_number,
               "cad_sr_series_number": cad_sr_series_number,
               "gsps_series_number": gsps_series_number}
    for name, value in numbers.items():
        check_series_number(name, value)
    if sr_series_number == sc_series_number:
        raise ValueError("sr_series_number and sc_series_number must differ")
    if len(set(numbers.values())) != len(numbers):
        raise ValueError("the series numbers of the output kinds must all differ")
    if cad_operating_point is not None:
        operating_point = cad_operating_point
    else:  # every mark the detector reports is at or above its own operating point
        operating_point = threshold if analysis.model.classification_validated else 0.0
    check_analysis(analysis, sources)
    analysis = one_analysis_per_displayed_image(analysis, sources)
    analysed = check_analysis(analysis, sources)
    if SC in kinds:
        for n, image in enumerate(analysed, start=1):
            if image.display is None or image.cam is None:
                raise ValueError(f"analysed image #{n} has no display image or Grad-CAM map")

    previous_cad = [ds for ds in previous_srs if str(ds.SOPClassUID) == MAMMOGRAPHY_CAD_SR]
    previous_tid1500 = [ds for ds in previous_srs if str(ds.SOPClassUID) != MAMMOGRAPHY_CAD_SR]
    common = dict(analysis_key=analysis_key, created=created, manufacturer=manufacturer,
                  software_version=software_version)
    out: list[Dataset] = []
    if TID1500 in kinds:
        out.append(build_sr(analysis, sources, series_number=sr_series_number,
                            threshold=threshold, previous_versions=previous_tid1500, **common))
    if MAMMO_CAD in kinds:
        out.append(build_mammo_cad_sr(analysis, sources, series_number=cad_sr_series_number,
                                      operating_point=operating_point,
                                      previous_versions=previous_cad, **common))
    # One patient/study identity for all objects: the SRs' first evidence (see build_sr).
    identity = presentation_image_for(analysed[0], sources)
    if SC in kinds:
        for n, image in enumerate(analysed, start=1):
            out.append(build_sc(image, sources[image.sop_instance_uid], model=analysis.model,
                                series_number=sc_series_number, instance_number=n,
                                threshold=threshold, identity=identity, **common))
    if GSPS in kinds:
        for n, image in enumerate(analysed, start=1):
            out.append(build_gsps(image, sources, model=analysis.model,
                                  series_number=gsps_series_number, instance_number=n,
                                  identity=identity, threshold=threshold, **common))
    log.info("built %d report object(s): %s", len(out), ", ".join(kinds))
    return out


def one_analysis_per_displayed_image(analysis: StudyAnalysis, sources: Mapping[str, Dataset]
                                     ) -> StudyAnalysis:
    """At most one analysed image per image the results reference.

    A study may hold both the For Processing and the For Presentation image of a view (GE sends
    both); the results reference the For Presentation one (see :func:`presentation_image_for`).
    Analysing both would mark every cluster twice and give two presentation states for one
    image, so the analysis of the image the results reference wins (else the first one); the
    others are reported as skipped, with the reason."""
    keep: dict[str, str] = {}  # referenced SOP Instance UID -> analysed image kept for it
    for image in analysis.images:
        if not image.analysed:
            continue
        ref = str(presentation_image_for(image, sources).SOPInstanceUID)
        kept = keep.get(ref)
        if kept is None or (image.sop_instance_uid == ref and kept != ref):
            keep[ref] = image.sop_instance_uid
    kept_uids = set(keep.values())
    if all(i.sop_instance_uid in kept_uids for i in analysis.images if i.analysed):
        return analysis
    images = []
    for image in analysis.images:
        if image.analysed and image.sop_instance_uid not in kept_uids:
            log.info("image %s left out of the results: another analysed image of the study "
                     "is the one its results would reference", image.sop_instance_uid)
            image = dataclasses.replace(
                image, findings=[], display=None, cam=None,
                skipped_reason="the study's For Presentation image of this view was analysed")
        images.append(image)
    return dataclasses.replace(analysis, images=images)
