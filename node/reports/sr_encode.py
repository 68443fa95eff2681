"""SR content items written straight to Explicit VR Little Endian bytes, as pydicom writes them.

Building a TID 1500 tree with highdicom's content-item objects costs a pydicom ``__setattr__``
(with value validation) per attribute, ~4,500 of them for a 12-ROI study, and pydicom's writer
then walks the ~750 nested items again to encode them. The node's TID 1500 builder
(:mod:`node.reports.sr_content`) writes each content item directly as the bytes pydicom would
write for it instead:

* every sequence and item with its defined length (pydicom computes and writes defined lengths
  for the datasets the node builds), elements in ascending tag order, strings padded to even
  length (UI with NUL, text with a space), text encoded with the document's character set
  (:func:`pydicom.charset.encode_string`), DS as pydicom's ``DS(value, auto_format=True)``
  string, FL/FD packed little endian;
* every coded concept (concept names, units, coded values) and every sub-tree that depends only
  on a few values (algorithm identification, finding site, language, ...) is encoded **once by
  pydicom itself** from the highdicom object the old builder made, and the bytes are kept
  (:func:`frozen`): the codes are byte for byte highdicom's by construction.

The whole content sequence becomes one :class:`pydicom.dataelem.RawDataElement` of the SR
dataset (:func:`raw_sequence`): pydicom writes it as it is and parses it only when someone reads
it. tests/test_sr_content_bytes.py compares the datasets and the encoded files with those of the
highdicom-template builder (tests/tid1500_reference.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.tag import Tag
from pydicom.valuerep import DS

__all__ = [
    "Encodings",
    "code_item",
    "container_item",
    "element",
    "encode_items",
    "encodings_of",
    "frozen",
    "image_item",
    "item",
    "num_item",
    "raw_sequence",
    "scoord_item",
    "sequence",
    "text_item",
    "uidref_item",
]

#: Python codec names of a document's Specific Character Set (pydicom's ``convert_encodings``).
Encodings = tuple[str, ...]

_ITEM = b"\xfe\xff\x00\xe0"
_UL = struct.Struct("<I")
# VRs with a 2-byte reserved field and a 4-byte length in Explicit VR (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})

# Tags the content items use (PS3.6)
REFERENCED_SOP_SEQUENCE = 0x00081199
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155
RELATIONSHIP_TYPE = 0x0040A010
VALUE_TYPE = 0x0040A040
CONCEPT_NAME_CODE_SEQUENCE = 0x0040A043
CONTINUITY_OF_CONTENT = 0x0040A050
UID = 0x0040A124
TEXT_VALUE = 0x0040A160
FLOATING_POINT_VALUE = 0x0040A161
CONCEPT_CODE_SEQUENCE = 0x0040A168
MEASURED_VALUE_SEQUENCE = 0x0040A300
MEASUREMENT_UNITS_CODE_SEQUENCE = 0x004008EA
NUMERIC_VALUE = 0x0040A30A
CONTENT_TEMPLATE_SEQUENCE = 0x0040A504
CONTENT_SEQUENCE = 0x0040A730
GRAPHIC_DATA = 0x00700022
GRAPHIC_TYPE = 0x00700023
MAPPING_RESOURCE = 0x00080105
TEMPLATE_IDENTIFIER = 0x0040DB00


def encodings_of(charset: object) -> Encodings:
    """The codecs pydicom encodes text with for a dataset whose Specific Character Set is
    ``charset`` (its value; None or empty: pydicom's default)."""
    value = charset if charset else "iso8859"
    return tuple(convert_encodings(value))  # type: ignore[arg-type]


def _header(tag: int, vr: bytes, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sxxI", tag >> 16, tag & 0xFFFF, vr, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length)


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element: tag, VR, length and ``value`` (already padded to even length)."""
    return _header(tag, vr, len(value)) + value


def item(body: bytes) -> bytes:
    """One sequence item (defined length) holding the encoded elements ``body``."""
    return _ITEM + _UL.pack(len(body)) + body


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """An SQ element (defined length) of already encoded items (each from :func:`item`)."""
    body = b"".join(items)
    return _header(tag, b"SQ", len(body)) + body


def _ascii(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("iso8859")
    return raw + pad if len(raw) % 2 else raw


def cs(tag: int, value: str) -> bytes:
    return element(tag, b"CS", _ascii(value))


def ui(tag: int, value: str) -> bytes:
    return element(tag, b"UI", _ascii(str(value), b"\0"))


def text(tag: int, vr: bytes, value: str, encodings: Encodings) -> bytes:
    raw = encode_string(value, list(encodings))
    return element(tag, vr, raw + b" " if len(raw) % 2 else raw)


def ds(tag: int, value: float) -> bytes:
    number = DS(value, auto_format=True)
    string = getattr(number, "original_string", None) or str(number)
    return element(tag, b"DS", _ascii(string))


def fd(tag: int, value: float) -> bytes:
    return element(tag, b"FD", struct.pack("<d", value))


def fl(tag: int, values: np.ndarray) -> bytes:
    return element(tag, b"FL", np.asarray(values, dtype="<f4").ravel().tobytes())


# --------------------------------------------------------------------------- pydicom-encoded
_FROZEN: dict[Hashable, bytes] = {}


def encode_items(datasets: Sequence[Dataset], encodings: Encodings) -> bytes:
    """``datasets`` as sequence items, encoded by pydicom's own writer."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    for ds_ in datasets:
        write_sequence_item(fp, ds_, list(encodings))
    return fp.getvalue()


def _pydicom_element(ds_: Dataset, tag: int, encodings: Encodings) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, ds_[tag], list(encodings))
    return fp.getvalue()


def frozen(key: Hashable, make: Callable[[], Sequence[Dataset]], encodings: Encodings) -> bytes:
    """The items ``make()`` returns (highdicom content items), encoded once by pydicom's own
    writer per ``key`` and character set, then reused (they depend on ``key`` only)."""
    full = (key, encodings)
    out = _FROZEN.get(full)
    if out is None:
        out = encode_items(make(), encodings)
        _FROZEN[full] = out
    return out


def frozen_element(key: Hashable, make: Callable[[], tuple[Dataset, int]],
                   encodings: Encodings) -> bytes:
    """One element (``make()`` gives the dataset and its tag) encoded once by pydicom."""
    full = ("element", key, encodings)
    out = _FROZEN.get(full)
    if out is None:
        ds_, tag = make()
        out = _pydicom_element(ds_, tag, encodings)
        _FROZEN[full] = out
    return out


def concept_name(proto: Callable[[], Dataset], key: Hashable, encodings: Encodings) -> bytes:
    """The Concept Name Code Sequence of the content item ``proto()`` makes, pydicom-encoded
    once (so that the code is exactly the one highdicom writes for that item)."""
    return frozen_element(("name", key), lambda: (proto(), CONCEPT_NAME_CODE_SEQUENCE),
                          encodings)


# --------------------------------------------------------------------------- content items
def _head(relationship: str | None, value_type: str, name: bytes) -> bytes:
    rel = cs(RELATIONSHIP_TYPE, relationship) if relationship else b""
    return rel + cs(VALUE_TYPE, value_type) + name


def _children(children: Sequence[bytes]) -> bytes:
    return sequence(CONTENT_SEQUENCE, children) if children else b""


def text_item(relationship: str, name: bytes, value: str, encodings: Encodings,
              children: Sequence[bytes] = ()) -> bytes:
    """A TEXT content item (``name``: encoded Concept Name Code Sequence)."""
    return item(_head(relationship, "TEXT", name) + text(TEXT_VALUE, b"UT", value, encodings)
                + _children(children))


def uidref_item(relationship: str, name: bytes, value: str) -> bytes:
    return item(_head(relationship, "UIDREF", name) + ui(UID, value))


def code_item(relationship: str, name: bytes, value: bytes, children: Sequence[bytes] = ()
              ) -> bytes:
    """A CODE content item (``value``: encoded Concept Code Sequence)."""
    return item(_head(relationship, "CODE", name) + value + _children(children))


def num_item(relationship: str, name: bytes, value: float, unit: bytes,
             children: Sequence[bytes] = ()) -> bytes:
    """A NUM content item as highdicom's ``NumContentItem`` writes it: Numeric Value as
    ``DS(value, auto_format=True)``, Floating Point Value only for a float."""
    measured = unit + (fd(FLOATING_POINT_VALUE, value) if isinstance(value, float) else b"")
    measured += ds(NUMERIC_VALUE, value)
    return item(_head(relationship, "NUM", name) + sequence(MEASURED_VALUE_SEQUENCE,
                                                             [item(measured)])
                + _children(children))


def scoord_item(relationship: str, name: bytes, graphic_type: str, graphic_data: np.ndarray,
                children: Sequence[bytes] = ()) -> bytes:
    return item(_head(relationship, "SCOORD", name) + _children(children)
                + fl(GRAPHIC_DATA, graphic_data) + cs(GRAPHIC_TYPE, graphic_type))


def image_item(relationship: str, name: bytes, sop_class_uid: str, sop_instance_uid: str,
               children: Sequence[bytes] = ()) -> bytes:
    ref = item(ui(REFERENCED_SOP_CLASS_UID, sop_class_uid)
               + ui(REFERENCED_SOP_INSTANCE_UID, sop_instance_uid))
    return item(sequence(REFERENCED_SOP_SEQUENCE, [ref]) + _head(relationship, "IMAGE", name)
                + _children(children))


def container_item(relationship: str | None, name: bytes, children: Sequence[bytes],
                   template_id: str | None = None) -> bytes:
    """A CONTAINER (continuous), with its Content Template Sequence when ``template_id``."""
    template = b""
    if template_id is not None:
        template = sequence(CONTENT_TEMPLATE_SEQUENCE, [item(
            cs(MAPPING_RESOURCE, "DCMR") + cs(TEMPLATE_IDENTIFIER, template_id))])
    return item(_head(relationship, "CONTAINER", name) + cs(CONTINUITY_OF_CONTENT, "CONTINUOUS")
                + template + _children(children))


def raw_sequence(tag: int, items: Sequence[bytes]) -> RawDataElement:
    """An SQ element of encoded items that pydicom writes unchanged (Explicit VR Little Endian,
    defined length) and parses only when it is read."""
    body = b"".join(items)
    return RawDataElement(Tag(tag), "SQ", len(body), body, 0, False, True)
