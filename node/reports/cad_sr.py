"""Mammography CAD SR document (PS3.3 A.35.5; output kind ``mammo_cad``).

highdicom has no class for it: :class:`MammographyCADSR` is the IOD around the TID 4000 content
tree that :mod:`node.reports.cad_sr_content` builds.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MammographyCADSRStorage

from node.reports.cad_sr_content import cad_report
from node.reports.common import set_document_dates, study_identity
from node.reports.context import ReportContext
from node.reports.images import ReportedStudy

__all__ = ["CAD_SR_SERIES_DESCRIPTION", "MammographyCADSR", "build_mammo_cad_sr",
           "mammo_cad_objects"]

log = logging.getLogger(__name__)

CAD_SR_SERIES_DESCRIPTION = "AI calcification CAD marks"


def hierarchical_references(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference Macro items (study > series > instance)."""
    grouped: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        grouped[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(item)
    studies: dict[str, Dataset] = {}
    for (study_uid, series_uid), items in grouped.items():
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = []
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = items
        study.ReferencedSeriesSequence.append(series)
    return list(studies.values())


class MammographyCADSR(hd.SOPClass):
    """Mammography CAD SR document (PS3.3 A.35.5) around a TID 4000 content tree.

    ``evidence`` are the headers of the images the tree references (the first one gives the
    patient and study identity); ``content`` is the root item
    (:func:`node.reports.cad_sr_content.cad_report`).
    """

    def __init__(
        self,
        *,
        evidence: Sequence[Dataset],
        content: Dataset,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        previous_versions: Sequence[Dataset] = (),
        **kwargs: object,
    ) -> None:
        if not evidence:
            raise ValueError("a Mammography CAD SR needs at least one evidence image")
        identity = evidence[0]
        super().__init__(
            **study_identity(identity),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=MammographyCADSRStorage,
            instance_number=instance_number,
            modality="SR",
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            specific_character_set=identity.get("SpecificCharacterSet"),
            **kwargs,  # type: ignore[arg-type]
        )
        self.CompletionFlag = "COMPLETE"
        self.VerificationFlag = "UNVERIFIED"
        for elem in content:
            self.add(elem)
        same_study = [ds for ds in evidence
                      if ds.StudyInstanceUID == identity.StudyInstanceUID]
        self.CurrentRequestedProcedureEvidenceSequence = hierarchical_references(same_study)
        if previous_versions:
            self.PredecessorDocumentsSequence = hierarchical_references(previous_versions)
        self.PerformedProcedureCodeSequence = DicomSequence()
        self.ReferencedPerformedProcedureStepSequence = DicomSequence()
        self.copy_patient_and_study_information(identity)
        self._add_contributing_equipment(None, identity)


def build_mammo_cad_sr(study: ReportedStudy, context: ReportContext) -> MammographyCADSR:
    """The Mammography CAD SR of one study (the tree: :mod:`node.reports.cad_sr_content`).

    Clusters at or above the context's operating point (:meth:`ReportContext.operating_point`:
    P(malignant) for a model validated for classification, the cluster score otherwise) are
    "Presentation Required". Findings on a For Processing image reference the matching For
    Presentation image when the study has one (as in the TID 1500 SR); the CAD SRs of the
    study's earlier result are listed as predecessors.
    """
    content = cad_report(study, context)
    uids = context.uids
    sr = MammographyCADSR(
        evidence=content.evidence,
        content=content.root,
        series_instance_uid=uids.cad_sr_series,
        series_number=context.series.mammo_cad,
        sop_instance_uid=uids.cad_sr_instance,
        instance_number=1,
        manufacturer=context.manufacturer,
        previous_versions=context.previous_of(MammographyCADSRStorage),
        series_description=CAD_SR_SERIES_DESCRIPTION,
        software_versions=context.software_version,
        manufacturer_model_name=study.model.name[:64],
    )
    set_document_dates(sr, context.created)
    log.info("built Mammography CAD SR: %d finding(s) (%d presentation required), "
             "%d library image(s)", content.findings, content.required, len(content.evidence))
    return sr


def mammo_cad_objects(study: ReportedStudy, context: ReportContext) -> list[Dataset]:
    """The ``mammo_cad`` kind (:class:`node.reports.context.ReportBuilder`): one CAD SR."""
    return [build_mammo_cad_sr(study, context)]
