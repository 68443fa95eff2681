"""SR SOP instances assembled once: a drop-in for highdicom's ``ComprehensiveSR(...)`` call.

highdicom's constructor (0.28) spends two thirds of a TID 1500 build on work whose result the
node never uses or already knows:

* ``deepcopy(content)`` and a re-parse of the copy into ``ContentItem`` objects, kept only as
  the Python attribute behind ``.content`` (the dataset itself takes the *original* content's
  elements);
* ``collect_evidence`` and the SCOORD3D check, each a recursive ``find_content_items`` walk
  that builds a ``ContentItem`` and a ``CodedConcept`` for every node of the tree, only to read
  back three attributes.

:func:`comprehensive_sr` writes the same dataset (same modules, attributes, evidence and
predecessor sequences; tests/test_sr_document.py compares it element by element with
highdicom's and runs dciodvfy/dsrdump on it) with one plain walk of the tree that gathers the
referenced instances and value types at once, and parses ``.content`` only when it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from copy import deepcopy
from typing import Any

import highdicom as hd
from highdicom.sr.utils import _create_references
from highdicom.sr.value_types import ContentItem, ContentSequence
from pydicom.dataset import Dataset
from pydicom.uid import UID, ComprehensiveSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.reports.common import acquisition_equipment, study_identity

__all__ = ["ComprehensiveSRDocument", "comprehensive_sr", "content_references"]

_REFERENCE_TYPES = frozenset({"IMAGE", "COMPOSITE"})


def _walk(item: Dataset) -> Iterator[Dataset]:
    """Every content item below ``item`` (depth first, document order), by plain element
    access (no highdicom object is made)."""
    stack = [iter(item.get("ContentSequence", ()))]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        yield child
        if "ContentSequence" in child:
            stack.append(iter(child.ContentSequence))


def content_references(content: Dataset) -> tuple[set[str], set[str]]:
    """(SOP Instance UIDs referenced by IMAGE/COMPOSITE items, value types present) of the tree
    below ``content``, in one walk."""
    refs: set[str] = set()
    value_types: set[str] = set()
    for child in _walk(content):
        value_type = str(child.get("ValueType", ""))
        value_types.add(value_type)
        if value_type in _REFERENCE_TYPES:
            refs.add(str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return refs, value_types


def _evidence_items(evidence: Sequence[Dataset], study_uid: str
                    ) -> tuple[list[Dataset], list[Dataset], set[str]]:
    """highdicom's ``collect_evidence`` grouping: (same-study items, other-study items, UIDs)."""
    same: dict[tuple[str, str], list[Dataset]] = {}
    other: dict[tuple[str, str], list[Dataset]] = {}
    seen: set[str] = set()
    for evd in evidence:
        if evd.SOPInstanceUID in seen:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = evd.SOPClassUID
        item.ReferencedSOPInstanceUID = evd.SOPInstanceUID
        group = same if evd.StudyInstanceUID == study_uid else other
        group.setdefault((evd.StudyInstanceUID, evd.SeriesInstanceUID), []).append(item)
        seen.add(evd.SOPInstanceUID)
    return (_create_references(same), _create_references(other),  # type: ignore[arg-type]
            seen)


class ComprehensiveSRDocument(hd.sr.ComprehensiveSR):
    """A :class:`highdicom.sr.ComprehensiveSR` whose ``content`` is parsed on first read.

    Made by :func:`comprehensive_sr` only (its ``__init__`` is highdicom's, never called)."""

    _root: Dataset

    @property
    def content(self) -> ContentSequence:
        if getattr(self, "_content", None) is None:
            root = deepcopy(self._root)
            if any(elem.is_raw for elem in root.elements()):
                # decode raw (encoded) elements with the document's character set
                decoder = Dataset()
                if "SpecificCharacterSet" in self:
                    decoder.SpecificCharacterSet = self.SpecificCharacterSet
                for elem in list(root.elements()):
                    if elem.is_raw:
                        decoder[elem.tag] = elem
                        root[elem.tag] = decoder[elem.tag]
            item = ContentItem._from_dataset_derived(root)
            self._content = ContentSequence([item], is_root=True)
        return self._content


def comprehensive_sr(
    evidence: Sequence[Dataset],
    content: Dataset,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str | None = None,
    is_complete: bool = False,
    previous_versions: Sequence[Dataset] | None = None,
    record_evidence: bool = True,
    transfer_syntax_uid: str | UID = ExplicitVRLittleEndian,
    references: frozenset[str] | None = None,
    **kwargs: Any,
) -> ComprehensiveSRDocument:
    """The Comprehensive SR highdicom's ``ComprehensiveSR(evidence=..., content=..., ...)``
    makes with these arguments (unverified, preliminary, no institution, no requested or
    performed procedure, no extra contributing equipment: what the node asks for), built once.

    ``kwargs`` go to :class:`highdicom.SOPClass` as highdicom passes them (series_description,
    software_versions, manufacturer_model_name, ...). ``references`` (the SOP Instance UIDs the
    content's IMAGE items reference, from a builder that knows them and writes no SCOORD3D item:
    :mod:`node.reports.sr_content`) saves the walk of the tree; ``content`` may then hold raw
    (encoded) elements, which the dataset keeps as they are. Raises ``ValueError`` as highdicom
    does: no evidence, an unsupported transfer syntax, a referenced instance not in ``evidence``, a
    SCOORD3D item.
    """
    if len(evidence) == 0:
        raise ValueError("No evidence was provided.")
    if transfer_syntax_uid not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        raise ValueError(f'Transfer syntax "{transfer_syntax_uid}" is not supported.')
    first = evidence[0]
    charset = kwargs.pop("specific_character_set", first.get("SpecificCharacterSet"))
    if references is not None:  # a tree the node encoded itself: no SCOORD3D item in it
        refs, value_types = set(references), set[str]()
    else:
        refs, value_types = content_references(content)
    if "SCOORD3D" in value_types:
        raise ValueError("Comprehensive SR does not support content items with SCOORD3D "
                         "value type.")

    sr = ComprehensiveSRDocument.__new__(ComprehensiveSRDocument)
    hd.SOPClass.__init__(
        sr,
        **study_identity(first),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=ComprehensiveSRStorage,
        instance_number=instance_number,
        manufacturer=manufacturer,
        modality="SR",
        transfer_syntax_uid=transfer_syntax_uid,
        specific_character_set=charset,
        **kwargs,
    )
    sr.CompletionFlag = "COMPLETE" if is_complete else "PARTIAL"
    sr.VerificationFlag = "UNVERIFIED"
    sr.PreliminaryFlag = "PRELIMINARY"
    sr._root = content
    for tag, value in content.items():
        sr[tag] = value

    same, other, evidence_uids = _evidence_items(evidence, str(sr.StudyInstanceUID))
    missing = refs - {str(uid) for uid in evidence_uids}
    if missing:
        raise ValueError(
            "No evidence was provided for the following SOP instances, which are referenced "
            'in the document content: "{}"'.format('", "'.join(sorted(missing))))
    if same:
        sr.CurrentRequestedProcedureEvidenceSequence = same
    if other and record_evidence:
        sr.PertinentOtherEvidenceSequence = other
    if previous_versions is not None:
        sr.PredecessorDocumentsSequence = sr._collect_predecessors(previous_versions)
    sr.PerformedProcedureCodeSequence = []
    sr.ReferencedPerformedProcedureStepSequence = []
    sr.copy_patient_and_study_information(first)
    acquisition = acquisition_equipment(first)  # highdicom's, with its IOD check cached
    sr._add_contributing_equipment([acquisition] if acquisition is not None else None, None)
    if any(elem.is_raw for elem in content.elements()):
        # the content's raw (already encoded) elements are written as they are: only when the
        # dataset says it is in the encoding they were made in (else pydicom decodes them)
        sr.set_original_encoding(False, True, sr._character_set)
    return sr
