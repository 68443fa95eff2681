"""TID 1500 Measurement Report as a Comprehensive SR document (output kind ``tid1500``).

The content tree is :mod:`node.reports.sr_content`; this module makes the SOP instance.
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from node.reports.common import set_document_dates
from node.reports.context import ReportContext
from node.reports.images import ReportedStudy
from node.reports.sr_content import NOT_VALIDATED_TEXT, measurement_report
from node.reports.sr_document import comprehensive_sr

__all__ = ["NOT_VALIDATED_TEXT", "SR_SERIES_DESCRIPTION", "build_sr", "tid1500_objects"]

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "AI calcification analysis"


def build_sr(study: ReportedStudy, context: ReportContext) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Comprehensive SR of one study.

    Findings on a For Processing image are referenced on the matching For Presentation image
    when the study has one (see :func:`node.reports.images.presentation_image_for`); missing
    Type 2 patient/study attributes are written empty.
    """
    content = measurement_report(study, context)
    uids = context.uids
    sr = comprehensive_sr(  # highdicom's ComprehensiveSR, built once (sr_document)
        evidence=content.evidence,
        content=content.root,
        series_instance_uid=uids.sr_series,
        series_number=context.series.tid1500,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=context.manufacturer,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=context.software_version,
        manufacturer_model_name=study.model.name[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        previous_versions=context.previous_of(ComprehensiveSRStorage) or None,
        references=content.references,
    )
    set_document_dates(sr, context.created)
    log.info("built TID 1500 SR: %d ROI(s), %d image(s) without ROI, %d library image(s)",
             content.rois, content.absent, len(content.evidence))
    return sr


def tid1500_objects(study: ReportedStudy, context: ReportContext) -> list[Dataset]:
    """The ``tid1500`` kind (:class:`node.reports.context.ReportBuilder`): one SR."""
    return [build_sr(study, context)]
