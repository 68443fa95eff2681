"""Specific Character Set: what the node accepts, and how result objects stay valid.

The node interprets no text it receives, but it copies the Patient and Study modules into its
results, and a wrong patient name in a result is worse than none. So:

* A value that is a defined term of PS3.3 C.12.1.1.2 (``ISO_IR 100``, ``ISO 2022 IR 87``,
  ``ISO_IR 192``, ``GB18030``, ...) is used as it is; a known misspelling (``ISO-IR 100``,
  ``ISO_IR100``) is read as the term it means.
* An unknown value is accepted when every text value of the dataset is plain ASCII (ASCII reads
  the same in every DICOM character set): the results then carry no Specific Character Set.
* An unknown value with non-ASCII text is refused at C-STORE with 0xC003: the node cannot know
  what those bytes say and will not guess a patient's name.

:func:`normalise_for_copy` prepares a received header for the report builders: text decoded
with the terms above and the Specific Character Set rewritten to defined terms (or removed).
"""

from __future__ import annotations

import re
import warnings

from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
#: VRs whose bytes are decoded with the Specific Character Set.
TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}


def defined_term(value: str) -> str | None:
    """The defined term ``value`` stands for (spelling corrected), or None when unknown."""
    term = value.strip()
    if term in python_encoding:
        return term
    m = re.match(r"^ISO[ _-]?IR[ _-]?(\d+)$", term)
    if m:
        fixed = f"ISO_IR {m.group(1)}"
        return fixed if fixed in python_encoding else None
    m = re.match(r"^ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)$", term)
    if m:
        fixed = f"ISO 2022 IR {m.group(1)}"
        return fixed if fixed in python_encoding else None
    return None


def declared_values(ds: Dataset) -> list[str]:
    elem = ds._dict.get(SPECIFIC_CHARACTER_SET)
    if elem is None:
        return []
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return value.split("\\")
    return [str(v) for v in value or []]


def unknown_terms(ds: Dataset) -> list[str]:
    return [v for v in declared_values(ds) if defined_term(v) is None]


def non_ascii_text(ds: Dataset) -> str | None:
    """Keyword (or tag) of the first text element with a non-ASCII byte, None when all ASCII.

    Reads the raw bytes (before pydicom decodes them), recursing into sequences that were
    parsed; deferred values (bulk data) are never text.
    """
    for tag, elem in ds._dict.items():
        if isinstance(elem, RawDataElement):
            vr = elem.VR
            raw = elem.value
            if vr in TEXT_VRS and isinstance(raw, bytes) and any(b >= 0x80 for b in raw):
                return str(ds[tag].keyword or tag)
            if vr == "SQ":
                value = ds[tag].value  # parsing a sequence decodes nothing yet
            else:
                continue
        else:
            value = elem.value
            if elem.VR in TEXT_VRS:
                texts = value if isinstance(value, list | tuple) else [value]
                if any(not str(t).isascii() for t in texts if t is not None):
                    return str(elem.keyword or tag)
                continue
            if elem.VR != "SQ":
                continue
        for item in value or []:
            found = non_ascii_text(item)
            if found:
                return found
    return None


def charset_problem(ds: Dataset) -> str | None:
    """Why ``ds`` must be refused for its Specific Character Set (None: acceptable)."""
    unknown = unknown_terms(ds)
    if not unknown:
        return None
    where = non_ascii_text(ds)
    if where is None:
        return None
    named = "\\".join(unknown)
    return (f"Specific Character Set {named!r} is not a DICOM defined term and {where} has "
            "non-ASCII bytes: they cannot be decoded")


def normalise_for_copy(ds: Dataset) -> Dataset:
    """``ds`` (a received header) with decoded text and a Specific Character Set of defined
    terms only, so the report builders copy valid values. Returns ``ds``."""
    values = declared_values(ds)
    if not values:
        return ds
    terms = [defined_term(v) for v in values]
    if terms == [v.strip() for v in values]:
        return ds
    known = [t for t in terms if t is not None]
    if None not in terms:  # misspelled terms: decode with the terms they stand for
        ds.SpecificCharacterSet = known if len(known) > 1 else known[0]
        ds.decode()
        return ds
    # An unknown term: only ASCII text gets past the C-STORE check, and ASCII needs no
    # character set. (An instance stored before that check is decoded as ISO-IR 100, as pydicom
    # would, and written in UTF-8.)
    ds.SpecificCharacterSet = "ISO_IR 100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.decode()
    if non_ascii_text(ds) is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
