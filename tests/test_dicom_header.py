"""Header reading as the standard gives it (node/dicom_header.py, node/intake.py), in-process.

The end-to-end matrix (tests/test_mg_matrix.py) sends the same variants through a node; this
checks what each variant's header reads as, and that the analysis's grey levels are the same
image whatever the photometric / VOI / stored-value form, in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.analysis.prepare import prepare
from node.dicom_header import (
    is_quality_control,
    is_synthesized_2d,
    legal_orientation_value,
    mammo_view,
    parse_view_position,
    patient_orientation,
)
from node.intake import ANALYSE, OTHER, REFUSE, IntakePolicy, decide
from tests.mgvariants import baseline, build, matrix
from tests.testdata import standard_orientation


@pytest.mark.parametrize(("value", "expected"), [
    ("CC", ("CC", ())), ("MLO", ("MLO", ())), ("XCCL", ("XCCL", ())), ("FB", ("FB", ())),
    ("SCC", ("CC", ("S",))), ("MCC", ("CC", ("M",))), ("MMLO", ("MLO", ("M",))),
    ("SMCC", ("CC", ("S", "M"))), ("MLOID", ("MLO", ("ID",))), ("CCRL", ("CC", ("RL",))),
    ("MXCCL", ("XCCL", ("M",))), ("LMO", ("LMO", ())), ("FLATFIELD", ("", ())), ("", ("", ())),
])
def test_view_position_mqcm_abbreviations(value: str, expected: tuple) -> None:
    assert parse_view_position(value) == expected


@pytest.mark.parametrize(("value", "legal"), [
    ("A", True), ("FR", True), ("FL", True), ("HL", True), ("P", True), ("AFR", True),
    ("AP", False), ("RL", False), ("FF", False), ("MLO", False), ("CC", False), ("", False),
    ("AFRL", False), ("X", False),
])
def test_orientation_values_biped(value: str, legal: bool) -> None:
    assert legal_orientation_value(value) is legal


def test_orientation_quadruped_and_standard_mammography_values() -> None:
    ds = Dataset()
    ds.AnatomicalOrientationType = "QUADRUPED"
    ds.PatientOrientation = ["CR", "LE"]
    assert patient_orientation(ds) == ("CR", "LE")
    # PS3.3 / dicom3tools values for the screening views; MLO combines two directions.
    assert standard_orientation("L", "CC") == ("A", "R")
    assert standard_orientation("R", "CC") == ("P", "L")
    assert standard_orientation("L", "MLO") == ("A", "FR")
    assert standard_orientation("R", "MLO") == ("P", "FL")


@pytest.mark.parametrize("variant", matrix(), ids=lambda v: v.name)
def test_matrix_variant_reads_as_the_standard_says(variant) -> None:  # type: ignore[no-untyped-def]
    ds = build(variant, "1.2.3", "P", 1)
    mv = mammo_view(ds)
    assert mv.laterality == variant.expected_laterality
    assert mv.orientation == variant.expected_orientation
    term_code = mv.view_code.value if mv.view_code else None
    if variant.expected_view_code is not None and term_code != variant.expected_view_code:
        # legacy designators: the same CID 4014 term
        from node.dicom_header import view_term
        assert view_term(mv.view).sct == variant.expected_view_code
    assert decide(ds, IntakePolicy()).action == ANALYSE
    if variant.out_modifiers and mv.view:  # MQCM label, e.g. "SCC", "SMMLO", "CCID"
        assert mv.label != mv.view and mv.view in mv.label
    # The analysis sees the same image, bright = dense, whatever the header's form.
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
    image = prepare(None, ds=ds).image01
    plain = prepare(None, ds=baseline(variant)).image01
    corr = np.corrcoef(image.ravel()[::7], plain.ravel()[::7])[0, 1]
    assert corr > 0.98, corr


def _bytes(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_synthesized_2d_quality_control_and_other_objects() -> None:
    ds = build(matrix()[0], "1.2.3", "P", 1)
    assert not is_synthesized_2d(ds)
    ds.SeriesDescription = "L SCC VIEW POSITION ONLY"  # not a C-View
    assert not is_synthesized_2d(ds)
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
    assert is_synthesized_2d(ds)
    assert decide(ds, IntakePolicy()).kind == "synthesized_2d"
    assert decide(ds, IntakePolicy(synthesized_2d="analyse")).action == ANALYSE
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SeriesDescription = "R MLO C-View"
    assert is_synthesized_2d(ds)
    ds.SeriesDescription = "R MLO"
    ds.QualityControlImage = "YES"
    assert is_quality_control(ds) and decide(ds, IntakePolicy()).kind == "quality_control"
    ds.QualityControlImage = "BOTH"  # patient and phantom: still a mammogram
    assert decide(ds, IntakePolicy()).action == ANALYSE
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "CR"
    assert decide(ds, IntakePolicy()).action == REFUSE  # a DX that is not a mammogram
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    assert decide(ds, IntakePolicy()).action == OTHER
    assert decide(ds, IntakePolicy(other_sop_classes=frozenset())).action == REFUSE
