"""The output kinds a site can select (``[output] objects``, ``[[destinations]] objects``).

A kind names one family of result objects and maps to exactly one SOP class, so the worker can
build the union of the kinds the destinations want, and the deliverer can pick, per destination,
the stored objects of its kinds by their SOP Class UID.

This module imports pydicom only (not highdicom, not :mod:`node.reports`), so the configuration
can check kinds without loading the report stage.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    MammographyCADSRStorage,
    SecondaryCaptureImageStorage,
)

TID1500 = "tid1500"  # TID 1500 Measurement Report, Comprehensive SR
MAMMO_CAD = "mammo_cad"  # Mammography CAD SR, TID 4000
GSPS = "gsps"  # Grayscale Softcopy Presentation State with the ROI outlines
SC = "sc"  # Grad-CAM Secondary Capture

SOP_CLASS_OF_KIND: dict[str, UID] = {
    TID1500: ComprehensiveSRStorage,
    MAMMO_CAD: MammographyCADSRStorage,
    GSPS: GrayscaleSoftcopyPresentationStateStorage,
    SC: SecondaryCaptureImageStorage,
}
KINDS: tuple[str, ...] = tuple(SOP_CLASS_OF_KIND)
DEFAULT_KINDS: tuple[str, ...] = (TID1500, SC)
#: The structured reports among the kinds (a re-opened study's SRs are superseded, not replaced).
SR_SOP_CLASSES: frozenset[UID] = frozenset({ComprehensiveSRStorage, MammographyCADSRStorage})


def check_kinds(kinds: Iterable[str], what: str = "objects") -> tuple[str, ...]:
    """``kinds`` as a tuple in canonical order; ``ValueError`` naming ``what`` when one is
    unknown, repeated, or the list is empty."""
    if isinstance(kinds, str):
        raise TypeError(f"{what} must be a list of output kinds, not a string")
    given = list(kinds)
    if not given:
        raise ValueError(f"{what} must name at least one of {', '.join(KINDS)}")
    for kind in given:
        if kind not in SOP_CLASS_OF_KIND:
            raise ValueError(f"{what}: unknown output kind {kind!r} (known: {', '.join(KINDS)})")
    if len(set(given)) != len(given):
        raise ValueError(f"{what} lists an output kind twice")
    return tuple(k for k in KINDS if k in given)


def union_of_kinds(lists: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """Every kind named in any of ``lists``, in canonical order."""
    wanted = {k for kinds in lists for k in kinds}
    return tuple(k for k in KINDS if k in wanted)


def sop_classes_for(kinds: Iterable[str]) -> frozenset[UID]:
    """The SOP Class UIDs of ``kinds``."""
    return frozenset(SOP_CLASS_OF_KIND[k] for k in kinds)


def kind_of(sop_class_uid: str) -> str | None:
    """The kind whose objects have ``sop_class_uid``, or None."""
    for kind, uid in SOP_CLASS_OF_KIND.items():
        if uid == str(sop_class_uid):
            return kind
    return None
