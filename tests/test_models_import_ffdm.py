"""INbreast, VinDr-Mammo and CMMD importers on fixtures with each dataset's documented folder
layout, file names, table headers and annotation formats (tiny synthetic pixels)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from models.data import load_rois
from models.importers import import_cmmd, import_inbreast, import_vindr
from tests.importfixtures import (
    CMMD_HEADER,
    INBREAST_HEADER,
    VINDR_BREAST_HEADER,
    VINDR_FINDING_HEADER,
    inbreast_xml,
    mammogram,
    write_csv,
)
from tests.testdata import mg_dataset, uid_from


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _mg(path: Path, pixels: np.ndarray, *, patient: str, lat: str, view: str,
        spacing: float | None, study: str | None = None, sop: str | None = None) -> Path:
    ds = mg_dataset(pixels, patient_id=patient, study_uid=study or uid_from(patient, "st"),
                    sop_uid=sop or uid_from(patient, lat, view, str(path)), laterality=lat,
                    view=view, spacing_mm=spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _centre_bright(out: Path, rel: str) -> float:
    patch = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED) / 65535.0
    h, w = patch.shape
    return float(patch[h // 2 - 5: h // 2 + 5, w // 2 - 5: w // 2 + 5].max())


# --------------------------------------------------------------------------- INbreast


def _inbreast(root: Path) -> Path:
    rel = root / "INbreast Release 1.0"
    lines = [INBREAST_HEADER]
    cases = [  # file name, patient hash, side, view, ACR, BI-RADS, annotations
        ("22678622", "6c613a14b80a8591", "R", "CC", "2", "2",
         [("Cluster", [(40, 50), (60, 50), (60, 70), (40, 70)]), ("Calcification", [(50, 60)])]),
        ("22678646", "6c613a14b80a8591", "R", "ML", "2", "5",  # calcifications, no cluster
         [("Calcification", [(30, 100)]), ("Calcification", [(34, 104)]),
          ("Calcification", [(38, 100), (39, 101)]), ("Calcification", [(100, 20)]),
          ("Mass", [(80, 150), (100, 150), (100, 170), (80, 170)])]),
        ("24055274", "f4b2d377f43ba0bd", "L", "CC", "3", "4a",
         [("Cluster", [(10, 10), (20, 20)])]),
        ("24055355", "f4b2d377f43ba0bd", "L", "ML", "3", "6", None),  # no XML
        ("50994408", "0d4b8e7c57a9fa1b", "L", "CC", "1", "1", []),
    ]
    for fn, ph, side, view, acr, birads, rois in cases:
        spots = [(int(y), int(x)) for _, pts in (rois or []) for x, y in pts]
        _mg(rel / "AllDICOMs" / f"{fn}_{ph}_MG_{side}_{view}_ANON.dcm",
            mammogram(200, 140, spots=spots), patient=f"{ph}", lat=side,
            view="MLO" if view == "ML" else view, spacing=0.07)
        lines.append(f"removed;removed;{side};{view};201001;{fn};{acr};{birads}")
        if rois is not None:
            inbreast_xml(rel / "AllXML" / f"{fn}.xml", rois)
    (rel / "INbreast.csv").write_text("\n".join(lines) + "\n")
    return root


def test_inbreast_clusters_by_birads(tmp_path: Path) -> None:
    src = _inbreast(tmp_path / "inbreast")
    # the fixture images are 14 mm tall: link calcifications closer than 2 mm
    s = import_inbreast(src, tmp_path / "out", patch_mm=4.0, cluster_link_mm=2.0)
    rows = _rows(tmp_path / "out" / "rois.csv")
    # image 1 (BI-RADS 2): one Cluster; image 2 (BI-RADS 5): three calcifications linked into a
    # cluster, one isolated; 4a is neither benign nor malignant; BI-RADS 6 has no XML
    assert [r["label"] for r in rows] == ["benign", "malignant"]
    assert {r["patient_id"] for r in rows} == {"INB-6c613a14b80a8591"}
    assert rows[0]["roi_kind"] == "cluster" and rows[0]["birads"] == "2"
    assert rows[0]["roi_height_mm"] == "1.40" and rows[0]["roi_width_mm"] == "1.40"
    assert (rows[1]["laterality"], rows[1]["view"], rows[1]["density"]) == ("R", "ML", "2")
    assert _centre_bright(tmp_path / "out", rows[1]["path"]) > 0.9
    assert s.skipped["BI-RADS 4a not in benign 1,2 or malignant 5,6"] == 1
    assert s.skipped["no XML annotation (no ROI to cut)"] == 1  # the BI-RADS 6 image
    assert s.skipped["no calc annotation in the XML"] == 1  # the normal: an empty ROI list
    assert s.skipped["isolated calcifications (< 3 within 2 mm)"] == 1
    # configurable labels; masses; whole-breast ROIs
    s = import_inbreast(src, tmp_path / "b", patch_mm=4.0, benign_birads="1,2,3",
                        malignant_birads="4,5,6", abnormality="mass")
    rows = _rows(tmp_path / "b" / "rois.csv")
    assert [(r["label"], r["abnormality"]) for r in rows] == [("malignant", "mass")]
    s = import_inbreast(src, tmp_path / "c", roi="breast", breast_px=64)
    rows = _rows(tmp_path / "c" / "rois.csv")
    assert len(rows) == 4 and {r["roi_kind"] for r in rows} == {"breast"}  # all but 4a
    assert all(not r["pixel_spacing_mm"] for r in rows)
    rois = load_rois(tmp_path / "c" / "rois.csv", roi_size_mm=32.0, input_size=32)
    assert sorted(rois.labels.tolist()) == [0, 0, 1, 1]


# --------------------------------------------------------------------------- VinDr-Mammo


def test_vindr_findings(tmp_path: Path) -> None:
    root = tmp_path / "vindr-mammo"
    st1, st2 = "0a0c5108270e814818c1ad002482ce74", "1b1d2c3e4f5a6b7c8d9e0f1a2b3c4d5e"
    imgs = {"0a6a90bdc088e0cc62df8d2d58d14840": (st1, "L", "CC", [(50, 40)]),
            "0b7b81bdd199f1dd73ef9e3e69e25951": (st1, "R", "MLO", [(120, 90)]),
            "0c8c92cee2aa02ee84f0af4f7af36a62": (st2, "L", "CC", [])}
    for image_id, (study, lat, view, spots) in imgs.items():
        _mg(root / "images" / study / f"{image_id}.dicom", mammogram(200, 140, spots=spots),
            patient="ANON", lat=lat, view=view, spacing=0.085)
    ids = list(imgs)
    write_csv(root / "finding_annotations.csv", VINDR_FINDING_HEADER, [
        [st1, "s1", ids[0], "L", "CC", 200, 140, "BI-RADS 4", "DENSITY C",
         "['Suspicious Calcification']", "BI-RADS 4", 35.0, 45.0, 45.0, 55.0, "training"],
        [st1, "s1", ids[0], "L", "CC", 200, 140, "BI-RADS 4", "DENSITY C", "['Mass']",
         "BI-RADS 4", 10.0, 10.0, 30.0, 30.0, "training"],
        [st1, "s2", ids[1], "R", "MLO", 200, 140, "BI-RADS 3", "DENSITY C",
         "['Mass', 'Suspicious Calcification']", "BI-RADS 3", 80.0, 110.0, 100.0, 130.0,
         "training"],
        [st1, "s2", ids[1], "R", "MLO", 200, 140, "BI-RADS 3", "DENSITY C",
         "['Suspicious Calcification']", "", 1.0, 1.0, 5.0, 5.0, "training"],
        [st2, "s3", ids[2], "L", "CC", 200, 140, "BI-RADS 1", "DENSITY B", "['No Finding']",
         "", "", "", "", "", "test"],
        [st2, "s3", "ffffffffffffffffffffffffffffffff", "R", "CC", 200, 140, "BI-RADS 5",
         "DENSITY B", "['Suspicious Calcification']", "BI-RADS 5", 1, 1, 9, 9, "test"],
    ])
    write_csv(root / "breast-level_annotations.csv", VINDR_BREAST_HEADER,
              [[imgs[i][0], "s", i, imgs[i][1], imgs[i][2], 200, 140, "BI-RADS 1", "DENSITY C",
                "training"] for i in ids])
    s = import_vindr(root, tmp_path / "out", patch_mm=4.0)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert [r["label"] for r in rows] == ["malignant", "benign"]
    assert rows[0]["patient_id"] == f"VINDR-{st1}" and rows[0]["birads"] == "4"
    assert rows[0]["density"] == "C" and rows[0]["split"] == "training"
    assert rows[0]["roi_width_mm"] == f"{10 * 0.085:.2f}"
    assert all(_centre_bright(tmp_path / "out", r["path"]) > 0.9 for r in rows)
    assert s.skipped["finding BI-RADS ? not in benign 2,3 or malignant 4,5"] == 1
    assert s.skipped["image not found"] == 1
    assert "no pathology" in " ".join(s.notes)

    # a PNG re-distribution at half size: boxes rescaled from the CSV's height/width
    png_root = tmp_path / "vindr-png"
    for image_id, (study, _, _, spots) in imgs.items():
        (png_root / "images" / study).mkdir(parents=True, exist_ok=True)
        half = cv2.resize(mammogram(200, 140, spots=spots), (70, 100),
                          interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(png_root / "images" / study / f"{image_id}.png"), half)
    (png_root / "finding_annotations.csv").write_text(
        (root / "finding_annotations.csv").read_text())
    s = import_vindr(png_root, tmp_path / "png-out", patch_mm=4.0, pixel_spacing_mm=0.085)
    rows = _rows(tmp_path / "png-out" / "rois.csv")
    assert len(rows) == 2 and float(rows[0]["pixel_spacing_mm"]) == pytest.approx(0.17)
    assert rows[0]["roi_width_mm"] == f"{10 * 0.085:.2f}"
    assert all(_centre_bright(tmp_path / "png-out", r["path"]) > 0.5 for r in rows)
    with pytest.raises(ValueError, match="no finding_annotations.csv"):
        import_vindr(tmp_path / "out", tmp_path / "x")


# --------------------------------------------------------------------------- CMMD


def test_cmmd_image_level_labels(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    root = tmp_path / "manifest-1616439774456"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(CMMD_HEADER)
    ws.append(["D1-0001", "R", 44, 2, "calcification", "Benign", None])
    ws.append(["D1-0002", "L", 51, 2, "both", "Malignant", None])
    ws.append(["D1-0003", "L", 60, 2, "mass", "Malignant", None])
    ws.append(["D2-0001", "R", 48, 2, "calcification", "Malignant", "Luminal A"])
    root.mkdir(parents=True)
    wb.save(root / "CMMD_clinicaldata_revision.xlsx")
    series = "07-18-2010-NA-NA-79377/1.000000-NA-70244"
    n = 0
    for pid, side in (("D1-0001", "R"), ("D1-0002", "L"), ("D1-0003", "L"), ("D2-0001", "R")):
        for k, view in enumerate(("CC", "MLO"), start=1):
            n += 1
            _mg(root / "CMMD" / pid / series / f"1-{k}.dcm",
                mammogram(160, 120, spots=[(80, 40)], seed=n), patient=pid, lat=side,
                view=view, spacing=0.094)
    # a breast that is not in the table (the other side of D1-0001)
    _mg(root / "CMMD" / "D1-0001" / series / "1-3.dcm", mammogram(160, 120), patient="D1-0001",
        lat="L", view="CC", spacing=0.094)
    s = import_cmmd(root, tmp_path / "out", breast_px=64)
    rows = _rows(tmp_path / "out" / "rois.csv")
    assert len(rows) == 6 and {r["roi_kind"] for r in rows} == {"breast"}
    labels = {(r["patient_id"], r["view"]): r["label"] for r in rows}
    assert labels[("CMMD-D1-0001", "CC")] == "benign"
    assert labels[("CMMD-D2-0001", "MLO")] == "malignant"
    assert s.skipped["breast not in the clinical table"] == 1
    assert s.skipped["abnormality mass not selected (--abnormality calc)"] == 2
    assert "image-level classifier" in " ".join(s.notes)
    info = json.loads((tmp_path / "out" / "import.json").read_text())
    assert info["roi_kinds"] == {"breast": 6}

    # candidates (e.g. the detector's) instead of whole breasts: weak labels, stated
    cands = tmp_path / "cands.csv"
    write_csv(cands, ["file", "row", "col"], [
        [f"CMMD/D1-0002/{series}/1-1.dcm", 80, 40], [f"CMMD/D1-0002/{series}/1-1.dcm", 20, 20]])
    s = import_cmmd(root, tmp_path / "cand", candidates=cands, patch_mm=4.0)
    rows = _rows(tmp_path / "cand" / "rois.csv")
    assert [(r["roi_kind"], r["label"]) for r in rows] == [("candidate", "malignant")] * 2
    assert _centre_bright(tmp_path / "cand", rows[0]["path"]) > 0.9
    assert s.skipped["no candidate listed for this image"] == 5
