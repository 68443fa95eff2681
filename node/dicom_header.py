"""What the node reads from DICOM headers in more than one stage: the presentation intent,
laterality, view, view modifiers and patient orientation of a mammogram, and what kind of object
an instance is (an image to analyse, a synthesized 2D view, a quality-control image, ...).

One definition, used by receive, analysis and reports. Values come from the standard, not from a
library's enumerations:

* views: PS3.16 CID 4014 "View for Mammography" (SCT codes, their legacy SNOMED-RT/SRT and SNM3
  forms, and the ACR MQCM abbreviations used in View Position);
* view modifiers: PS3.16 CID 4015 "View Modifier for Mammography" (spot compression,
  magnification, rolled, implant displaced, ...), with their MQCM prefix/suffix;
* laterality: Image Laterality (MG Image module, Type 1), then Laterality (General Series), then
  Frame Laterality (enhanced objects such as breast tomosynthesis);
* patient orientation: PS3.3 C.7.6.1.1.1: two values, each a principal direction letter
  (A P R L H F for bipeds) optionally refined by one or two more letters, e.g. ``A\\FR`` for a
  left MLO; quadruped letters when Anatomical Orientation Type is QUADRUPED.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pydicom
from pydicom import uid as uids
from pydicom.dataset import Dataset

FOR_PROCESSING_SOP_CLASSES = {
    uids.DigitalMammographyXRayImageStorageForProcessing,
    uids.DigitalXRayImageStorageForProcessing,
    uids.BreastProjectionXRayImageStorageForProcessing,
}


@dataclass(frozen=True)
class Code:
    """A coded concept (Code Sequence Macro): value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class _Term:
    abbreviation: str  # ACR MQCM 1999 equivalent
    sct: str
    srt: str
    meaning: str


# PS3.16 CID 4014 View for Mammography.
VIEW_TERMS: tuple[_Term, ...] = (
    _Term("ML", "399260004", "R-10224", "medio-lateral"),
    _Term("MLO", "399368009", "R-10226", "medio-lateral oblique"),
    _Term("LM", "399352003", "R-10228", "latero-medial"),
    _Term("LMO", "399099002", "R-10230", "latero-medial oblique"),
    _Term("CC", "399162004", "R-10242", "cranio-caudal"),
    _Term("FB", "399196006", "R-10244", "caudo-cranial (from below)"),
    _Term("SIO", "399188001", "R-102D0", "superolateral to inferomedial oblique"),
    _Term("ISO", "441555000", "R-40AAA", "inferomedial to superolateral oblique"),
    _Term("XCCL", "399192008", "R-1024A", "cranio-caudal exaggerated laterally"),
    _Term("XCCM", "399101009", "R-1024B", "cranio-caudal exaggerated medially"),
    _Term("SPECIMEN", "127457009", "G-8310", "tissue specimen from breast"),
)
# PS3.16 CID 4015 View Modifier for Mammography; "prefix"/"suffix"/"replace" is how the MQCM
# abbreviation combines with the view's (e.g. M + CC = "MCC", MLO + ID = "MLOID").
MODIFIER_TERMS: tuple[tuple[_Term, str], ...] = (
    (_Term("CV", "399161006", "R-102D2", "Cleavage"), "replace"),
    (_Term("AT", "399011000", "R-102D1", "Axillary Tail"), "replace"),
    (_Term("RL", "399197002", "R-102D3", "Rolled Lateral"), "suffix"),
    (_Term("RM", "399226006", "R-102D4", "Rolled Medial"), "suffix"),
    (_Term("RI", "414493004", "R-102CA", "Rolled Inferior"), "suffix"),
    (_Term("RS", "415670009", "R-102C9", "Rolled Superior"), "suffix"),
    (_Term("ID", "399209000", "R-102D5", "Implant Displaced"), "suffix"),
    (_Term("M", "399163009", "R-102D6", "Magnification"), "prefix"),
    (_Term("S", "399055006", "R-102D7", "Spot Compression"), "prefix"),
    (_Term("TAN", "399110001", "R-102C2", "Tangential"), "replace"),
    (_Term("NP", "442581004", "R-40AB3", "Nipple in profile"), "suffix"),
    (_Term("AC", "441752004", "P2-00161", "Anterior compression"), "suffix"),
    (_Term("IMF", "442593008", "R-40ABE", "Infra-mammary fold"), "suffix"),
    (_Term("AX", "442580003", "R-40AB2", "Axillary tissue"), "suffix"),
)
_LEGACY_SCHEMES = ("SRT", "SNM3", "99SDM")  # SNOMED-RT designators still sent by modalities
_VIEW_BY_CODE = {code: t for t in VIEW_TERMS for code in (t.sct, t.srt)}
# Deprecated codes of an earlier CID 4014 (PS3.16 notes): XCCL Y-X1770, XCCM Y-X1771.
_VIEW_BY_CODE.update({"Y-X1770": VIEW_TERMS[8], "Y-X1771": VIEW_TERMS[9],
                      "399265009": VIEW_TERMS[4]})  # "cranio-caudal exaggerated" (older CID)
_VIEW_BY_ABBREV = {t.abbreviation: t for t in VIEW_TERMS}
_VIEW_BY_ABBREV["SPEC"] = VIEW_TERMS[-1]
_MODIFIER_BY_CODE = {code: (t, how) for t, how in MODIFIER_TERMS for code in (t.sct, t.srt)}
_MODIFIER_BY_ABBREV = {t.abbreviation: (t, how) for t, how in MODIFIER_TERMS}
#: Views an analysis of whole-breast images accepts (the replace-modifiers are views too).
KNOWN_VIEWS = frozenset([*_VIEW_BY_ABBREV, "CV", "AT", "TAN"])

BIPED_LETTERS = frozenset("APRLHF")
QUADRUPED_TOKENS = ("LE", "RT", "CR", "CD", "PR", "DI", "PA", "PL", "D", "V", "R", "M", "L")
_QUADRUPED_RE = re.compile("^(?:" + "|".join(QUADRUPED_TOKENS) + "){1,3}$")
_OPPOSITE = (frozenset("AP"), frozenset("RL"), frozenset("HF"))


def is_for_processing(ds: Dataset) -> bool:
    """True for For Processing images: by SOP class, else by PresentationIntentType."""
    if str(ds.get("SOPClassUID", "")) in FOR_PROCESSING_SOP_CLASSES:
        return True
    return str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING"


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - an unreadable value is treated as absent
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else ""
    return str(value or "").strip().upper()


def _multi(ds: Dataset, keyword: str) -> list[str]:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - unreadable: treated as absent
        return []
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value.strip().upper()]
    try:
        return [str(v).strip().upper() for v in value]
    except TypeError:
        return [str(value).strip().upper()]


def _code_of(item: Dataset) -> Code | None:
    try:
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "").strip()
    except Exception:  # noqa: BLE001 - unreadable: treated as absent
        return None
    return Code(value, scheme, meaning) if value else None


def term_code(term: _Term) -> Code:
    """The current (SCT) code of a CID 4014/4015 term."""
    return Code(term.sct, "SCT", term.meaning)


def view_term(abbreviation: str) -> _Term | None:
    return _VIEW_BY_ABBREV.get(abbreviation)


def modifier_term(abbreviation: str) -> _Term | None:
    found = _MODIFIER_BY_ABBREV.get(abbreviation)
    return found[0] if found else None


def modifier_term_for_code(value: str) -> _Term | None:
    """The CID 4015 term of a modifier code value (SCT, SRT or SNM3 form)."""
    found = _MODIFIER_BY_CODE.get(value)
    return found[0] if found else None


def parse_view_position(value: str) -> tuple[str, tuple[str, ...]]:
    """("MLO", ("M",)) from an MQCM View Position such as "MMLO", "SCC", "MLOID", "XCCL".

    Unknown values give ("", ()): vendors put non-views there (e.g. Hologic "FLATFIELD")."""
    value = value.strip().upper().replace(" ", "")
    if value in KNOWN_VIEWS:
        return value, ()
    suffixes = [a for a, (_, how) in _MODIFIER_BY_ABBREV.items() if how == "suffix"]

    def split(rest: str, prefixes: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
        for n in range(len(rest), 0, -1):  # longest view first: "MLO" before "ML"
            head, tail = rest[:n], rest[n:]
            if head not in KNOWN_VIEWS:
                continue
            mods: list[str] = []
            while tail:
                found = next((a for a in suffixes if tail.startswith(a)), None)
                if found is None:
                    break
                mods.append(found)
                tail = tail[len(found):]
            if not tail:
                return head, (*prefixes, *mods)
        if rest[:1] in ("M", "S") and len(prefixes) < 2:
            return split(rest[1:], (*prefixes, rest[0]))
        return None

    return split(value, ()) or ("", ())


@dataclass(frozen=True)
class MammoView:
    """Laterality, view and orientation of one image, as far as its header says.

    ``view`` is the MQCM abbreviation ("CC", "MLO", ... or "" when unknown); ``view_code`` the
    coded view (the source's own ViewCodeSequence item when it has one, else the standard's
    code for ``view``); ``modifiers`` the CID 4015 codes (ViewModifierCodeSequence, or decoded
    from View Position such as "MCC"); ``orientation`` the two Patient Orientation values when
    they are legal (see :func:`patient_orientation`).
    """

    laterality: str
    view: str
    view_code: Code | None
    modifiers: tuple[Code, ...]
    modifier_abbreviations: tuple[str, ...]
    orientation: tuple[str, str] | None

    @property
    def label(self) -> str:
        """Human-readable view with modifiers in MQCM order, e.g. "MCC", "SMLO", "MLOID"."""
        if not self.view:
            return ""
        pre = "".join(a for a in self.modifier_abbreviations
                      if _MODIFIER_BY_ABBREV.get(a, (None, ""))[1] == "prefix")
        post = "".join(a for a in self.modifier_abbreviations
                       if _MODIFIER_BY_ABBREV.get(a, (None, ""))[1] == "suffix")
        return f"{pre}{self.view}{post}"


def _laterality(ds: Dataset) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword)
        if value in ("L", "R", "B"):
            return value
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            frame = ds.get(seq)[0].FrameAnatomySequence[0]
            value = str(frame.FrameLaterality).strip().upper()
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
        if value in ("L", "R", "B"):
            return value
    return ""


def _view_sequence(ds: Dataset) -> Dataset | None:
    try:
        seq = ds.get("ViewCodeSequence")
        if seq:
            return seq[0]
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and "ViewCodeSequence" in shared[0]:  # not standard, seen in the wild
            return shared[0].ViewCodeSequence[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return None


def mammo_view(ds: Dataset) -> MammoView:
    """Read laterality, view, modifiers and orientation from every standard place.

    View: ViewCodeSequence (CID 4014 code, any of its designators), then View Position (MQCM
    abbreviation, with M/S prefixes and suffixes decoded), then a view abbreviation in
    PatientOrientation (digitised-film archives such as CBIS-DDSM put "CC"/"MLO" there).
    Modifiers: ViewModifierCodeSequence (CID 4015), then those decoded from View Position.
    """
    laterality = _laterality(ds)
    view, view_code = "", None
    modifiers: list[Code] = []
    abbrevs: list[str] = []
    item = _view_sequence(ds)
    if item is not None:
        view_code = _code_of(item)
        term = _VIEW_BY_CODE.get(view_code.value) if view_code else None
        if term is not None:
            view = term.abbreviation
        for mod in item.get("ViewModifierCodeSequence", []) or []:
            code = _code_of(mod)
            if code is None:
                continue
            modifiers.append(code)
            found = _MODIFIER_BY_CODE.get(code.value)
            if found is not None:
                abbrevs.append(found[0].abbreviation)
    position_view, position_mods = parse_view_position(_text(ds, "ViewPosition"))
    if not view and position_view:
        view = position_view
    if not modifiers and position_mods:
        abbrevs = list(position_mods)
        modifiers = [term_code(_MODIFIER_BY_ABBREV[a][0]) for a in position_mods]
    if view in ("CV", "AT", "TAN") and view not in abbrevs:
        abbrevs.append(view)  # "replace" modifiers used as the view itself
    raw_orientation = _multi(ds, "PatientOrientation")
    if not view or not laterality:
        for v in raw_orientation:
            if not view and v in KNOWN_VIEWS:
                view = v
            if not laterality and v in ("L", "R") and len(raw_orientation) == 1:
                laterality = v
    if view_code is None and view in _VIEW_BY_ABBREV:
        view_code = term_code(_VIEW_BY_ABBREV[view])
    return MammoView(laterality, view, view_code, tuple(modifiers), tuple(abbrevs),
                     patient_orientation(ds))


def laterality_and_view(ds: Dataset) -> tuple[str, str]:
    """("L"/"R"/"B"/"", "CC"/"MLO"/.../""): see :func:`mammo_view`."""
    v = mammo_view(ds)
    return v.laterality, v.view


def legal_orientation_value(value: str, quadruped: bool = False) -> bool:
    """One Patient Orientation value is legal (PS3.3 C.7.6.1.1.1).

    Biped: a principal direction letter (A P R L H F) optionally refined by one or two more,
    no letter twice and never two opposite directions ("AP"). Quadruped: one to three of the
    veterinary abbreviations (LE RT D V CR CD R M L PR DI PA PL).
    """
    if not value or len(value) > 16:
        return False
    if quadruped:
        return bool(_QUADRUPED_RE.match(value))
    letters = set(value)
    if not letters <= BIPED_LETTERS or len(value) > 3 or len(letters) != len(value):
        return False
    return not any(pair <= letters for pair in _OPPOSITE)


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """The two Patient Orientation values when both are legal, else None.

    Digitised-film archives put view names ("CC", "MLO") there, and some headers hold one value
    or garbage: those are not orientations, and outputs then write the attribute empty."""
    values = _multi(ds, "PatientOrientation")
    if len(values) != 2:
        return None
    quadruped = _text(ds, "AnatomicalOrientationType") == "QUADRUPED"
    if all(legal_orientation_value(v, quadruped) for v in values):
        return values[0], values[1]
    return None


# ------------------------------------------------------------------------- kinds of objects

SYNTHESIZED_2D_MARKERS = frozenset({
    "GENERATED_2D",  # DICOM defined term (Breast Projection X-Ray; Hologic C-View, GE V-Preview)
    "SYNTHETIC", "SYNTHESIZED", "C-VIEW", "CVIEW", "V-PREVIEW", "VPREVIEW", "INSIGHT_2D",
})


def is_synthesized_2d(ds: Dataset) -> bool:
    """A 2D view computed from a tomosynthesis acquisition (Hologic C-View, GE V-Preview,
    Siemens Insight 2D, ...): Image Type (values 3+) names it, e.g. ``DERIVED\\PRIMARY\\
    TOMOSYNTHESIS\\GENERATED_2D``, or the Acquisition Device Processing Description / Series
    Description says C-View / V-Preview."""
    image_type = [v.replace(" ", "_") for v in _multi(ds, "ImageType")]
    if any(v in SYNTHESIZED_2D_MARKERS for v in image_type[2:]):
        return True
    for keyword in ("AcquisitionDeviceProcessingDescription", "SeriesDescription"):
        if _SYNTHESIZED_TEXT.search(_text(ds, keyword)):
            return True
    return False


# Product names as whole words ("L CC C-View", "V-Preview"), never a "C VIEW" inside "SCC VIEW".
_SYNTHESIZED_TEXT = re.compile(
    r"(?<![A-Z0-9])(C-?VIEW|V-?PREVIEW|INSIGHT[ _-]?2D|SYNTHE(?:TIC|SIZED|SISED)[ _-]?2D)"
    r"(?![A-Z0-9])")


def is_quality_control(ds: Dataset) -> bool:
    """A QC / calibration image (Quality Control Image YES, or a flat-field View Position)."""
    return _text(ds, "QualityControlImage") == "YES" or \
        _text(ds, "ViewPosition") in ("FLATFIELD", "FLAT FIELD", "QC", "PHANTOM")
