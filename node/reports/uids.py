"""Deterministic UIDs for the node's result objects.

Every UID the report stage writes (series, instances, observer, tracking identifiers) is derived
from an ``analysis_key`` that the caller computes from the analysed input (for example a hash of
the Study Instance UID, the input SOP Instance UIDs and the model version). The same key always
gives the same UIDs, so re-sending a result after a crash replaces the earlier objects in the PACS
instead of duplicating them.

UIDs are ``2.25.<decimal>`` (PS3.5 B.2) where the decimal is a 128-bit value taken from SHA-256 and
shaped as an RFC 9562 version-8 UUID, at most 44 characters.
"""

from __future__ import annotations

import hashlib

from pydicom.uid import UID

__all__ = ["derive_uid", "ResultUIDs"]


def derive_uid(analysis_key: str, *parts: str) -> UID:
    """A ``2.25`` UID derived from ``analysis_key`` and ``parts`` (same input, same UID)."""
    if not isinstance(analysis_key, str) or not analysis_key:
        raise ValueError("analysis_key must be a non-empty string")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"UID parts must be strings, got {type(part).__name__}")
    payload = "\x1f".join(("mammo-node-result", analysis_key, *parts)).encode("utf-8")
    raw = bytearray(hashlib.sha256(payload).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # UUID version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    uid = UID("2.25." + str(int.from_bytes(raw, "big")))
    if not uid.is_valid:  # pragma: no cover - cannot happen for 128-bit values
        raise RuntimeError("derived UID is not valid")
    return uid


class ResultUIDs:
    """The UIDs of one analysis result, all derived from its ``analysis_key``."""

    def __init__(self, analysis_key: str) -> None:
        if not isinstance(analysis_key, str) or not analysis_key.strip():
            raise ValueError("analysis_key must be a non-empty string")
        self.analysis_key = analysis_key

    @property
    def sr_series(self) -> UID:
        return derive_uid(self.analysis_key, "sr", "series")

    @property
    def sr_instance(self) -> UID:
        return derive_uid(self.analysis_key, "sr", "instance")

    @property
    def sc_series(self) -> UID:
        return derive_uid(self.analysis_key, "sc", "series")

    def sc_instance(self, source_sop_instance_uid: str) -> UID:
        """The SC derived from the analysed image ``source_sop_instance_uid``."""
        return derive_uid(self.analysis_key, "sc", "instance", source_sop_instance_uid)

    @property
    def observer_device(self) -> UID:
        return derive_uid(self.analysis_key, "observer", "device")

    def tracking(self, finding_index: int) -> UID:
        """Tracking UID of the ROI group of finding ``finding_index``."""
        return derive_uid(self.analysis_key, "tracking", "finding", str(int(finding_index)))

    def tracking_absent(self, sop_instance_uid: str) -> UID:
        """Tracking UID of the "no calcification cluster" group of one image."""
        return derive_uid(self.analysis_key, "tracking", "absent", sop_instance_uid)

    @property
    def cad_sr_series(self) -> UID:
        return derive_uid(self.analysis_key, "mammo-cad-sr", "series")

    @property
    def cad_sr_instance(self) -> UID:
        return derive_uid(self.analysis_key, "mammo-cad-sr", "instance")

    def gsps_series(self, laterality: str) -> UID:
        """The GSPS series of one breast ("L", "R", or "" when unknown)."""
        return derive_uid(self.analysis_key, "gsps", "series", laterality)

    def gsps_instance(self, referenced_sop_instance_uid: str) -> UID:
        """The GSPS that presents the image ``referenced_sop_instance_uid``."""
        return derive_uid(self.analysis_key, "gsps", "instance", referenced_sop_instance_uid)
