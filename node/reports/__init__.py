"""Report stage: DICOM objects the node sends back for one study analysis.

Each output kind (:mod:`node.kinds`) is a content module and a SOP object module, and implements
:class:`~node.reports.context.ReportBuilder`:

* ``tid1500`` - one TID 1500 Comprehensive SR per study (ROIs, cluster score; P(malignant) and
  the pathology call only for a model validated for classification): :mod:`.sr_content`,
  :mod:`.sr`.
* ``mammo_cad`` - one Mammography CAD SR (TID 4000) per study: :mod:`.cad_sr_content`,
  :mod:`.cad_sr`.
* ``sc`` - one RGB Grad-CAM Secondary Capture per analysed image: :mod:`.sc_content`, :mod:`.sc`.
* ``gsps`` - one GSPS with the ROI outlines per analysed image: :mod:`.gsps_content`,
  :mod:`.gsps`.

:func:`build_reports` derives the analysed images' header facts once (:mod:`.images`) and hands
them, with the :class:`ReportContext`, to the builder of each selected kind, SRs first. All
UIDs derive from the context's ``analysis_key`` (:mod:`.uids`), so the same analysis always
yields the same objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from pydicom.dataset import Dataset

from node.analysis.result import StudyAnalysis
from node.kinds import DEFAULT_KINDS, GSPS, MAMMO_CAD, SC, TID1500, check_kinds
from node.reports.cad_sr import CAD_SR_SERIES_DESCRIPTION, build_mammo_cad_sr, mammo_cad_objects
from node.reports.context import ReportBuilder, ReportContext, SeriesNumbers
from node.reports.gsps import GSPS_SERIES_DESCRIPTION, build_gsps, gsps_objects
from node.reports.images import (
    AnalysedImage,
    ReportedStudy,
    describe_study,
    presentation_image_for,
)
from node.reports.sc import (
    SC_SERIES_DESCRIPTION,
    build_sc,
    iter_sc_objects,
    render_overlay,
    sc_objects,
)
from node.reports.sr import SR_SERIES_DESCRIPTION, build_sr, tid1500_objects
from node.reports.uids import ResultUIDs, derive_uid

__all__ = [
    "BUILDERS",
    "CAD_SR_SERIES_DESCRIPTION",
    "GSPS_SERIES_DESCRIPTION",
    "SC_SERIES_DESCRIPTION",
    "SR_SERIES_DESCRIPTION",
    "AnalysedImage",
    "ReportBuilder",
    "ReportContext",
    "ReportedStudy",
    "ResultUIDs",
    "SeriesNumbers",
    "build_gsps",
    "build_mammo_cad_sr",
    "build_reports",
    "build_sc",
    "build_sr",
    "derive_uid",
    "describe_study",
    "iter_reports",
    "presentation_image_for",
    "render_overlay",
]

log = logging.getLogger(__name__)

#: The builder of each output kind, in the order :func:`build_reports` runs them.
BUILDERS: Mapping[str, ReportBuilder] = {
    TID1500: tid1500_objects,
    MAMMO_CAD: mammo_cad_objects,
    SC: sc_objects,
    GSPS: gsps_objects,
}


def build_reports(
    analysis: StudyAnalysis,
    sources: Mapping[str, Dataset],
    context: ReportContext,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> list[Dataset]:
    """The result objects of the selected ``kinds``, in this order: TID 1500 SR, Mammography
    CAD SR, one Grad-CAM SC per analysed image, one GSPS per analysed image (analysis order).

    ``sources`` maps SOP Instance UID to the study's source datasets (headers suffice: pixels
    are never read). Raises ``TypeError``/``ValueError`` naming the problem when the analysis or
    a source header is unusable (before anything is built), or when a kind cannot be built
    (with ``sc`` selected, every analysed image must carry ``display`` and ``cam``).
    """
    return list(iter_reports(analysis, sources, context, kinds))


def iter_reports(
    analysis: StudyAnalysis,
    sources: Mapping[str, Dataset],
    context: ReportContext,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> Iterator[Dataset]:
    """:func:`build_reports` one object at a time: each is built when the previous one was
    taken, so that the caller writes (or sends) it while the next is built (the worker hands
    this to ``Spool.write_datasets``). The checks run before the first object is built."""
    kinds = check_kinds(kinds, "kinds")
    if not isinstance(context, ReportContext):
        raise TypeError(f"context must be a ReportContext, got {type(context).__name__}")
    study = describe_study(analysis, sources)
    n = 0
    for kind, builder in BUILDERS.items():
        if kind in kinds:
            for ds in _ONE_BY_ONE.get(kind, builder)(study, context):
                n += 1
                yield ds
    log.info("built %d report object(s): %s", n, ", ".join(kinds))


#: Builders that make their objects one at a time (the others' lists are small and quick).
_ONE_BY_ONE: Mapping[str, Callable[[ReportedStudy, ReportContext], Iterable[Dataset]]] = {
    SC: iter_sc_objects,
}
