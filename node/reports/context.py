"""What every report builder receives besides the study: :class:`ReportContext`, checked once.

The context holds the values that are the same for every object of one result (the analysis
key all UIDs derive from, the creation time, the node's identity, the decision threshold, the
CAD operating point, the series number of each kind, the SRs this result supersedes).
:class:`ReportBuilder` is the one signature each output kind implements.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import MammographyCADSRStorage

from node.reports.uids import ResultUIDs

if TYPE_CHECKING:
    from node.analysis.result import ModelInfo
    from node.reports.images import ReportedStudy

MAX_SERIES_NUMBER = 2**31 - 1  # IS


def _check_lo(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > 64:
        raise ValueError(f"{name} must be at most 64 characters (LO)")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class SeriesNumbers:
    """The Series Number of each output kind: positive integers, all different (a viewer that
    sorts by series number must not mix the SR with the overlays)."""

    tid1500: int
    sc: int
    mammo_cad: int = 9903
    gsps: int = 9904

    def __post_init__(self) -> None:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"series number of {f.name} must be an int, "
                                f"got {type(value).__name__}")
            if not 1 <= value <= MAX_SERIES_NUMBER:
                raise ValueError(f"series number of {f.name} must be a positive integer, "
                                 f"got {value}")
            values[f.name] = value
        if len(set(values.values())) != len(values):
            raise ValueError(f"the series numbers of the output kinds must all differ: {values}")


@dataclass(frozen=True)
class ReportContext:
    """The values every object of one result shares; raises ``TypeError``/``ValueError``
    naming the field when one is unusable, so no builder checks them again.

    ``previous_srs`` are the headers of SRs this result supersedes (a re-opened study); each new
    SR lists those of its own SOP class in its Predecessor Documents Sequence.
    ``cad_operating_point`` (None: ``threshold`` for a model validated for classification, 0 -
    every reported cluster - otherwise) splits the CAD SR's findings into "Presentation Required"
    and "Presentation Optional"."""

    analysis_key: str
    created: dt.datetime
    manufacturer: str
    software_version: str
    threshold: float
    series: SeriesNumbers
    cad_operating_point: float | None = None
    previous_srs: Sequence[Dataset] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.analysis_key, str) or not self.analysis_key.strip():
            raise ValueError("analysis_key must be a non-empty string")
        if not isinstance(self.created, dt.datetime):
            raise TypeError(f"created must be a datetime.datetime, "
                            f"got {type(self.created).__name__}")
        _check_lo("manufacturer", self.manufacturer)
        _check_lo("software_version", self.software_version)
        _check_fraction("threshold", self.threshold)
        if self.cad_operating_point is not None:
            _check_fraction("cad_operating_point", self.cad_operating_point)
        if not isinstance(self.series, SeriesNumbers):
            raise TypeError("series must be a SeriesNumbers")
        for n, ds in enumerate(self.previous_srs, start=1):
            if not isinstance(ds, Dataset) or "SOPClassUID" not in ds:
                raise TypeError(f"previous SR #{n} is not a Dataset with a SOP Class UID")
        object.__setattr__(self, "previous_srs", tuple(self.previous_srs))

    @property
    def uids(self) -> ResultUIDs:
        return ResultUIDs(self.analysis_key)

    def operating_point(self, model: ModelInfo) -> float:
        """The CAD operating point: the configured one, else the threshold for a model
        validated for classification, else 0 (every mark the detector reports is at or above
        its own operating point)."""
        if self.cad_operating_point is not None:
            return float(self.cad_operating_point)
        return float(self.threshold) if model.classification_validated else 0.0

    def previous_of(self, sop_class_uid: str) -> list[Dataset]:
        """The superseded SRs of one SOP class (a CAD SR succeeds CAD SRs; a TID 1500 SR every
        other SR)."""
        cad = str(sop_class_uid) == MammographyCADSRStorage
        return [ds for ds in self.previous_srs
                if (str(ds.SOPClassUID) == MammographyCADSRStorage) == cad]


class ReportBuilder(Protocol):
    """One output kind: the objects of ``study`` (SRs: one; SC and GSPS: one per analysed
    image, in analysis order)."""

    def __call__(self, study: ReportedStudy, context: ReportContext) -> list[Dataset]: ...
