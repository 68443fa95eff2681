"""Small, fast mammography studies for the reliability tests (crash, hostile, load, security).

Each study is built from 256 x 256 crops of mini-MIAS images wrapped as MG For Presentation
instances: real pixels, so the analysis stage runs for real, but small enough that dozens of
studies analyse in seconds on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from tests.testdata import MIAS_SPACING_MM, mg_dataset, mias_pixels, uid_from

SIZE = 256
_VIEWS = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
_REFS = {"R": ["mdb209", "mdb211", "mdb213", "mdb215"], "L": ["mdb210", "mdb212", "mdb214",
                                                              "mdb216"]}
_CACHE: dict[str, np.ndarray] = {}


def _crop(refnum: str, shift: int) -> np.ndarray:
    if refnum not in _CACHE:
        _CACHE[refnum] = mias_pixels(refnum)
    px = _CACHE[refnum]
    r0 = (px.shape[0] - SIZE) // 2 + (shift % 7) * 8
    c0 = (px.shape[1] - SIZE) // 2 + (shift % 5) * 8
    crop = px[r0:r0 + SIZE, c0:c0 + SIZE].astype(np.uint16)
    return (crop << 4) | (crop >> 4)  # 12 bits stored, like mias_to_mg


def small_study(out_dir: Path, index: int, views: int = 4, tag: str = "small") -> list[Path]:
    """Study number ``index`` (distinct UIDs and patient per index) with 1-4 views."""
    out_dir.mkdir(parents=True, exist_ok=True)
    patient = f"{tag.upper()}{index:04d}"
    study_uid = uid_from(tag, "study", str(index))
    paths = []
    for n, (lat, view) in enumerate(_VIEWS[:views], start=1):
        ref = _REFS[lat][(index + n) % len(_REFS[lat])]
        ds = mg_dataset(_crop(ref, index + n), patient_id=patient, study_uid=study_uid,
                        sop_uid=uid_from(tag, "sop", str(index), lat, view), laterality=lat,
                        view=view, spacing_mm=MIAS_SPACING_MM, bits_stored=12,
                        instance_number=n)
        path = out_dir / f"{patient}_{lat}{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def big_study(out_dir: Path, instances: int = 500, size: int = 128, tag: str = "big"
              ) -> list[Path]:
    """One study of ``instances`` small MG images: the four screening views first, then the
    same views again and again (as a re-sent archive or a long series would arrive), each a
    distinct instance. Sent in this order, the four-view rule fires on the 4th instance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = uid_from(tag, "study")
    paths = []
    for n in range(instances):
        lat, view = _VIEWS[n % 4]
        ref = _REFS[lat][n % len(_REFS[lat])]
        px = _crop(ref, n)[:size, :size]
        ds = mg_dataset(np.ascontiguousarray(px), patient_id=tag.upper(), study_uid=study_uid,
                        sop_uid=uid_from(tag, "sop", str(n)), laterality=lat, view=view,
                        spacing_mm=MIAS_SPACING_MM, bits_stored=12, instance_number=n + 1,
                        series_uid=uid_from(tag, "series", str(n // 100)))
        path = out_dir / f"{tag}_{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
