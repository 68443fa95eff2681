"""The analysed images as the report builders see them, derived once per result.

:func:`describe_study` checks the analysis against the source headers, keeps one analysed image
per displayed image, finds the image each one's results reference (its For Presentation
counterpart for a For Processing image) and reads laterality, view, orientation and pixel
spacing from the headers. Every builder then takes these facts from :class:`AnalysedImage`
instead of reading the raw headers again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForPresentation,
)

from node.analysis.result import ImageAnalysis, ModelInfo, StudyAnalysis
from node.dicom_header import (
    Code,
    is_for_processing,
    laterality_and_view,
    mammo_view,
    modifier_term_for_code,
    patient_orientation,
    term_code,
    view_term,
)
from node.reports.common import check_analysis
from node.reports.labels import site_name

log = logging.getLogger(__name__)

FOR_PRESENTATION_MG = {
    DigitalMammographyXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForPresentation,
}


def header_laterality(ds: Dataset) -> str:
    """"L", "R" or "" (bilateral or unknown) from the header."""
    lat = laterality_and_view(ds)[0]
    return lat if lat in ("L", "R") else ""


def header_view(ds: Dataset) -> str:
    return laterality_and_view(ds)[1]


def header_orientation(ds: Dataset) -> tuple[str, str] | None:
    """The two Patient Orientation values when they are legal (PS3.3 C.7.6.1.1.1, combined
    values such as ``A\\FR`` included), else None.

    Digitised-film archives put view names ("CC") there; those must not be copied on. The
    values are copied as they are: highdicom's enumeration takes single letters only, so the
    builders set the attribute themselves (see :mod:`node.reports.sc`)."""
    value = patient_orientation(ds)
    return (str(value[0]), str(value[1])) if value is not None else None


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme or "SCT", code.meaning or code.value)


def view_codes(ref: Dataset, analysed_view: str
               ) -> tuple[hd.sr.CodedConcept | None, tuple[hd.sr.CodedConcept, ...]]:
    """Image View and its modifiers (CID 4014 / 4015): the current SCT code of the view the
    source names (ViewCodeSequence with any designator, SRT and SNM3 included, or View
    Position), else of the view the analysis determined; a code outside the context groups is
    copied as the source has it."""
    mv = mammo_view(ref)
    term = view_term(mv.view) or view_term(analysed_view)
    view: hd.sr.CodedConcept | None
    if term is not None:
        view = _concept(term_code(term))
    else:
        view = _concept(mv.view_code) if mv.view_code is not None else None
    mods = []
    for code in mv.modifiers:
        mterm = modifier_term_for_code(code.value)
        mods.append(_concept(term_code(mterm) if mterm is not None else code))
    return view, tuple(mods)


def presentation_image_for(image: ImageAnalysis, sources: Mapping[str, Dataset]) -> Dataset:
    """The dataset whose SOP instance the results should reference for ``image``.

    The analysed instance itself, unless it is For Processing and the study has a For
    Presentation image of the same laterality and view with the same Rows/Columns (then the
    coordinates carry over unchanged). Among several candidates, one that names the analysed
    image in its SourceImageSequence wins, else the lowest SOP Instance UID (deterministic).
    """
    src = sources[image.sop_instance_uid]
    if not is_for_processing(src):
        return src
    lat = header_laterality(src) or image.laterality
    view = header_view(src) or image.view
    candidates = []
    for uid, ds in sources.items():
        if uid == image.sop_instance_uid or "SOPClassUID" not in ds:
            continue
        if is_for_processing(ds) or str(ds.SOPClassUID) not in FOR_PRESENTATION_MG:
            continue
        if ds.get("StudyInstanceUID") != src.StudyInstanceUID:
            continue
        if (ds.get("Rows"), ds.get("Columns")) != (src.Rows, src.Columns):
            continue
        if not lat or header_laterality(ds) != lat or not view or header_view(ds) != view:
            continue
        names_source = any(
            item.get("ReferencedSOPInstanceUID") == image.sop_instance_uid
            for item in ds.get("SourceImageSequence", [])
        )
        candidates.append((not names_source, str(ds.SOPInstanceUID), ds))
    if not candidates:
        return src
    candidates.sort(key=lambda c: (c[0], c[1]))
    return candidates[0][2]


@dataclass(frozen=True)
class AnalysedImage:
    """One analysed image with what its headers say, read once.

    ``source`` is the analysed instance; ``reference`` the image the results reference (the
    same, or its For Presentation counterpart). Header facts of the reference: ``laterality``
    (header, else the analysis; "" unknown), ``header_laterality`` (header only),
    ``orientation``, ``view`` and ``view_modifiers`` (CID 4014/4015 codes), ``spacing_mm``
    (row, column: ImagerPixelSpacing or PixelSpacing, else the spacing the analysis used).
    ``source_laterality`` and ``source_orientation`` are those of the analysed instance (the SC
    is derived from its pixels). ``site`` names the finding site in words."""

    analysis: ImageAnalysis
    number: int  # 1-based among the reported images: the SC / GSPS Instance Number
    source: Dataset
    reference: Dataset
    laterality: str
    header_laterality: str
    orientation: tuple[str, str] | None
    view: hd.sr.CodedConcept | None
    view_modifiers: tuple[hd.sr.CodedConcept, ...]
    spacing_mm: tuple[float, float]
    source_laterality: str
    source_orientation: tuple[str, str] | None
    site: str

    @property
    def reference_uid(self) -> str:
        return str(self.reference.SOPInstanceUID)


@dataclass(frozen=True)
class ReportedStudy:
    """The analysed images of one result, in analysis order, and the model that analysed them.

    ``identity`` gives every object of the study the same patient and study attributes: the
    first image's reference (the SRs' first evidence)."""

    study_instance_uid: str
    model: ModelInfo
    images: tuple[AnalysedImage, ...]

    @property
    def identity(self) -> Dataset:
        return self.images[0].reference

    def library(self) -> list[AnalysedImage]:
        """One image per referenced image, first occurrence first (the SRs' Image Library)."""
        seen: dict[str, AnalysedImage] = {}
        for image in self.images:
            seen.setdefault(image.reference_uid, image)
        return list(seen.values())


def _describe(image: ImageAnalysis, number: int, source: Dataset, ref: Dataset) -> AnalysedImage:
    analysed_lat = image.laterality if image.laterality in ("L", "R") else ""
    view, modifiers = view_codes(ref, image.view)
    spacing = ref.get("ImagerPixelSpacing") or ref.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        spacing_mm = (float(spacing[0]), float(spacing[1]))
    else:  # the spacing the analysis worked with (possibly the configured fallback)
        spacing_mm = (float(image.pixel_spacing_mm), float(image.pixel_spacing_mm))
    return AnalysedImage(
        analysis=image, number=number, source=source, reference=ref,
        laterality=header_laterality(ref) or analysed_lat,
        header_laterality=header_laterality(ref),
        orientation=header_orientation(ref), view=view, view_modifiers=modifiers,
        spacing_mm=spacing_mm,
        source_laterality=header_laterality(source) or analysed_lat,
        source_orientation=header_orientation(source),
        site=site_name(image.laterality, image.view),
    )


def describe_study(analysis: StudyAnalysis, sources: Mapping[str, Dataset]) -> ReportedStudy:
    """The analysed images of ``analysis`` with their header facts (see :class:`AnalysedImage`).

    Raises ``TypeError``/``ValueError`` naming the problem when the analysis or a source header
    is unusable. At most one analysed image per image the results reference: a study may hold
    both the For Processing and the For Presentation image of a view (GE sends both); analysing
    both would mark every cluster twice, so the analysis of the image the results reference
    wins (else the first one); the others are left out and logged."""
    analysed = check_analysis(analysis, sources)
    refs = {image.sop_instance_uid: presentation_image_for(image, sources) for image in analysed}
    keep: dict[str, str] = {}  # referenced SOP Instance UID -> analysed image kept for it
    for image in analysed:
        ref = str(refs[image.sop_instance_uid].SOPInstanceUID)
        kept = keep.get(ref)
        if kept is None or (image.sop_instance_uid == ref and kept != ref):
            keep[ref] = image.sop_instance_uid
    kept_uids = set(keep.values())
    reported = []
    for image in analysed:
        if image.sop_instance_uid not in kept_uids:
            log.info("image %s left out of the results: another analysed image of the study "
                     "is the one its results would reference", image.sop_instance_uid)
            continue
        reported.append(image)
    images = tuple(
        _describe(image, n, sources[image.sop_instance_uid], refs[image.sop_instance_uid])
        for n, image in enumerate(reported, start=1))
    return ReportedStudy(analysis.study_instance_uid, analysis.model, images)
