"""The Grad-CAM SC built around its rendering's own buffer (node.reports.sc) is highdicom's.

Each case builds the SCs of a study with the node's builder and with the builder it replaced
(tests/sc_reference.py: ``SCImage.from_ref_dataset`` around the whole pixel array, the code of
667f167); the datasets must agree element by element and the encoded files byte for byte.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import tests.sc_reference as reference
from bench.outputs import study as bench_study
from node.analysis.result import Finding, ModelInfo, StudyAnalysis
from node.reports import build_reports, describe_study
from node.reports.context import ReportContext
from node.store import Spool
from tests.test_reports import MODEL, circle, context, image_analysis, mias_four_view_analysis
from tests.test_sr_document import differences
from tests.testdata import mg_dataset, mias_pixels
from tests.tools import dciodvfy_problems

UNVALIDATED = ModelInfo(MODEL.name, MODEL.version, MODEL.architecture, MODEL.threshold)


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def assert_same_scs(analysis: StudyAnalysis, sources: dict[str, Dataset], ctx: ReportContext,
                    tmp_path: Path | None = None) -> list[Dataset]:
    ours = build_reports(analysis, sources, ctx, ["sc"])
    study = describe_study(analysis, sources)
    theirs = reference.sc_objects(study, ctx)
    assert len(ours) == len(theirs) == len(study.images)
    spool = Spool(tmp_path / "spool") if tmp_path is not None else None
    for mine, ref in zip(ours, theirs, strict=True):
        assert list(differences(ref, mine)) == []
        data = encoded(mine)
        assert data == encoded(ref)
        if spool is not None:  # the spool writes the same file, pixel buffer included
            rel = spool.write_dataset(mine)
            assert spool.path(rel).read_bytes() == data
    return ours


def test_bench_study(tmp_path: Path) -> None:
    analysis, sources = bench_study(4096, 3328, 3)
    assert_same_scs(analysis, sources, context("bench"), tmp_path)


def test_mias_validated_model(tmp_path: Path) -> None:
    analysis, sources, _ = mias_four_view_analysis(tmp_path / "src")
    scs = assert_same_scs(analysis, sources, context("mias"), tmp_path)
    path = tmp_path / "sc.dcm"
    scs[0].save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy_problems(path)
    assert errors == []


@pytest.mark.parametrize("variant", ["acquisition", "no-manufacturer", "no-orientation",
                                     "no-laterality", "utf8"])
def test_source_header_variants(variant: str, tmp_path: Path) -> None:
    pixels = mias_pixels("mdb209").astype(np.uint16) << 4
    study = "2.25.9000"
    ds = mg_dataset(pixels, patient_id="S1", study_uid=study, sop_uid="2.25.9001",
                    laterality="L", view="MLO", spacing_mm=0.1, bits_stored=12)
    if variant == "acquisition":
        ds.AcquisitionDateTime = "20260102101112"
        ds.InstitutionName = "Breast Centre"
        ds.StationName = "MAMMO1"
        ds.DeviceSerialNumber = "SN-42"
        ds.ManufacturerModelName = "Senographe"
        ds.SoftwareVersions = ["1.0", "2.1"]
    elif variant == "no-manufacturer":
        ds.Manufacturer = ""
    elif variant == "no-orientation":
        del ds.PatientOrientation
    elif variant == "no-laterality":
        ds.ImageLaterality = ""
    else:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Ærø^Zoë"
        ds.Manufacturer = "Médecine Élan"
    f = Finding(1, ds.SOPInstanceUID, "L", "MLO", (300.0, 300.0), circle(300.0, 300.0, 30.0),
                4.0, 5, 0.8)
    image = image_analysis(ds, [f], mias_pixels("mdb209").astype(np.uint8))
    model = UNVALIDATED if variant == "no-laterality" else MODEL
    ctx = context(f"sc-{variant}", created=dt.datetime(2026, 5, 6, 7, 8, 9),
                  manufacturer="Hôpital mammo-node" if variant == "utf8" else "mammo-node")
    (sc,) = assert_same_scs(StudyAnalysis(study, model, [image]), {ds.SOPInstanceUID: ds}, ctx)
    back = pydicom.dcmread(io.BytesIO(encoded(sc)))
    items = back.ContributingEquipmentSequence
    assert len(items) == (1 if variant == "no-manufacturer" else 2)
