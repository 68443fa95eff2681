"""What the node reads from DICOM headers in more than one stage: the presentation intent,
laterality and view of a mammogram. One definition, used by receive, analysis and reports."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset

FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image - For Processing
}

_VIEW_CODES = {  # SNOMED CT / SRT codes of ViewCodeSequence -> ViewPosition-style abbreviation
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10236": "ML",
    "399352003": "LM", "R-10230": "LM",
    "399099002": "XCCL", "R-1024A": "XCCL",
    "399192003": "XCCM", "R-1024B": "XCCM",
    "441555000": "FB", "R-40AAA": "FB",
    "399196006": "SIO", "R-102D0": "SIO",
}
_KNOWN_VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT", "CV"}


def is_for_processing(ds: Dataset) -> bool:
    """True for For Processing images: by SOP class, else by PresentationIntentType."""
    if str(ds.get("SOPClassUID", "")) in FOR_PROCESSING_SOP_CLASSES:
        return True
    return str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING"


def laterality_and_view(ds: Dataset) -> tuple[str, str]:
    """("L"/"R"/"", "CC"/"MLO"/.../"").

    Laterality: ImageLaterality, then Laterality, then the frame anatomy of functional groups.
    View: ViewPosition, then ViewCodeSequence, then a view abbreviation found in
    PatientOrientation (digitised-film archives such as CBIS-DDSM put "CC"/"MLO" there).
    """
    laterality = ""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R", "B"):
            laterality = value
            break
    if not laterality:
        try:
            frame = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
            value = str(frame.FrameLaterality).upper()
            if value in ("L", "R", "B"):
                laterality = value
        except (AttributeError, IndexError, KeyError):
            pass

    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view not in _KNOWN_VIEWS:
        view = ""
        for item in ds.get("ViewCodeSequence", []) or []:
            code = str(item.get("CodeValue", ""))
            if code in _VIEW_CODES:
                view = _VIEW_CODES[code]
                break
    orientation = ds.get("PatientOrientation")
    if orientation and (not view or not laterality):
        values = [str(v).strip().upper() for v in
                  (orientation if isinstance(orientation, list | pydicom.multival.MultiValue)
                   else [orientation])]
        for v in values:
            if not view and v in _KNOWN_VIEWS:
                view = v
            if not laterality and v in ("L", "R") and len(values) == 1:
                laterality = v
    return laterality, view
